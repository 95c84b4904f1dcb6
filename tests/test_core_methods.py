"""cat / linear / svd on the tiny example, checked on values against plain dense references and PEFT."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from soupkit.execute import RunOptions
from soupkit.merge import merge_recipe
from soupkit.recipe import Recipe

from conftest import TINY, reference_deltas, tiny_recipe, weighted_sum

QUIET = RunOptions(progress=False)


def merged_deltas(out: Path) -> dict[str, torch.Tensor]:
    return reference_deltas(out)  # the output is a PEFT adapter too: read it the same plain way


def run(tmp_path: Path, recipe: dict, name: str = "out") -> Path:
    out = tmp_path / name
    merge_recipe(Recipe.from_dict(recipe, tmp_path), out, QUIET)
    return out


def assert_close_rel(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    err = (got - want).norm() / max(want.norm(), 1e-12)
    assert err <= rel, f"relative error {err:.2e} > {rel}"


def test_cat_equals_dense_weighted_sum(tmp_path: Path) -> None:
    weights = [0.6, -0.3]
    out = run(tmp_path, tiny_recipe("cat", tuple(weights)))
    want = weighted_sum([reference_deltas(TINY / "adapters" / n) for n in ("math", "code")], weights)
    got = merged_deltas(out)
    assert set(got) == set(want)
    for path in want:
        assert_close_rel(got[path], want[path])


def test_cat_equals_peft_add_weighted_adapter(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    weights = [0.7, 0.4]
    out = run(tmp_path, tiny_recipe("cat", tuple(weights)))
    base = AutoModelForCausalLM.from_pretrained(TINY / "base", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, TINY / "adapters" / "math", adapter_name="math")
    model.load_adapter(TINY / "adapters" / "code", adapter_name="code")
    model.add_weighted_adapter(["math", "code"], weights, "peft_cat", combination_type="cat")
    got = merged_deltas(out)
    checked = set()
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "peft_cat" in module.lora_A:
            path = name.removeprefix("base_model.model.")
            assert_close_rel(got[path], module.get_delta_weight("peft_cat").double())
            checked.add(path)
    assert checked == set(got) and len(checked) == 14  # every merged module compared (examples/tiny: 14 targeted)


def test_merged_adapter_logits_equal_dense_reference(tmp_path: Path) -> None:
    """PEFT loading our adapter gives the logits of the base with sum_i w_i delta_i added by hand."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    weights = [0.5, 1.5]
    out = run(tmp_path, tiny_recipe("cat", tuple(weights)))
    ids = torch.randint(4, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    reference = AutoModelForCausalLM.from_pretrained(TINY / "base", dtype=torch.float32)
    deltas = weighted_sum([reference_deltas(TINY / "adapters" / n) for n in ("math", "code")], weights)
    added = set()
    with torch.no_grad():
        for name, param in reference.named_parameters():
            path = name.removesuffix(".weight")
            if path in deltas:
                param += deltas[path].float()
                added.add(path)
        want = reference(ids).logits
    assert added == set(deltas)  # every update reached the reference model
    with torch.no_grad():
        assert (
            float((want - AutoModelForCausalLM.from_pretrained(TINY / "base", dtype=torch.float32)(ids).logits).abs().max())
            > 1e-3
        )
    base = AutoModelForCausalLM.from_pretrained(TINY / "base", dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, out)
    with torch.no_grad():
        got = merged(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rank", [2, 6])
def test_svd_truncation_error_is_the_dense_optimum(tmp_path: Path, rank: int) -> None:
    weights = [1.0, 0.5]
    out = run(tmp_path, tiny_recipe("svd", tuple(weights), rank=rank))
    want = weighted_sum([reference_deltas(TINY / "adapters" / n) for n in ("math", "code")], weights)
    got = merged_deltas(out)
    for path, dense in want.items():
        s = torch.linalg.svdvals(dense)
        optimum = s[rank:].square().sum().sqrt()  # Eckart-Young: the best rank-k error
        error = (got[path] - dense).norm()
        assert torch.linalg.matrix_rank(got[path]) <= rank
        assert error == pytest.approx(float(optimum), rel=1e-4, abs=1e-6 * float(dense.norm()))  # float32 output


def test_linear_default_rank_is_exact(tmp_path: Path) -> None:
    weights = [0.3, 0.9]
    out = run(tmp_path, tiny_recipe("linear", tuple(weights)))
    want = weighted_sum([reference_deltas(TINY / "adapters" / n) for n in ("math", "code")], weights)
    got = merged_deltas(out)
    for path in want:
        assert_close_rel(got[path], want[path], rel=1e-5)


@pytest.mark.parametrize("method", ["cat", "linear", "svd"])
def test_identity_zero_and_order(tmp_path: Path, method: str) -> None:
    math_only = tiny_recipe(method)
    math_only["adapters"] = math_only["adapters"][:1]
    got = merged_deltas(run(tmp_path, math_only, "identity"))
    math = reference_deltas(TINY / "adapters" / "math")
    assert set(got) == set(math)
    for path, want in math.items():
        assert_close_rel(got[path], want)

    zero = merged_deltas(run(tmp_path, tiny_recipe(method, (0.0, 0.0)), "zero"))
    assert len(zero) == 14  # every targeted module of examples/tiny is written, as zeros
    assert all(float(d.abs().max()) == 0.0 for d in zero.values())

    budget = {} if method == "cat" else {"rank": 12}  # cat refuses merge.rank: its rank is sum r_i
    forward = merged_deltas(run(tmp_path, tiny_recipe(method, (0.4, 0.8), **budget), "fwd"))
    swapped = tiny_recipe(method, (0.4, 0.8), **budget)
    swapped["adapters"].reverse()
    backward = merged_deltas(run(tmp_path, swapped, "bwd"))
    assert set(backward) == set(forward) and len(forward) == 14
    for path in forward:
        assert float(forward[path].norm()) > 0
        assert_close_rel(backward[path], forward[path], rel=1e-5)


def test_per_module_and_gradient_weights(tmp_path: Path) -> None:
    recipe = tiny_recipe("cat")
    recipe["adapters"][1]["weight"] = [0.0, 1.0]  # layer 0 -> 0.0, layer 1 -> 1.0
    recipe["merge"]["modules"] = [{"match": "*.mlp.*", "weights": {"math": 2.0}}]
    got = merged_deltas(run(tmp_path, recipe))
    math, code = reference_deltas(TINY / "adapters" / "math"), reference_deltas(TINY / "adapters" / "code")
    assert set(got) == set(math) | set(code)
    for path, delta in got.items():
        w_math = 2.0 if ".mlp." in path else 1.0
        w_code = 0.0 if ".layers.0." in path else 1.0
        want = w_math * math[path] + (w_code * code[path] if path in code else 0)
        assert_close_rel(delta, want)


def test_merged_adapter_logits_equal_peft_with_both_adapters_active(tmp_path: Path) -> None:
    """With weights 1 and 1, our single adapter reproduces PEFT running both source adapters at once."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = run(tmp_path, tiny_recipe("cat", (1.0, 1.0)))
    ids = torch.randint(4, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    base = AutoModelForCausalLM.from_pretrained(TINY / "base", dtype=torch.float32)
    both = PeftModel.from_pretrained(base, TINY / "adapters" / "math", adapter_name="math")
    both.load_adapter(TINY / "adapters" / "code", adapter_name="code")
    both.base_model.set_adapter(["math", "code"])
    with torch.no_grad():
        want = both(ids).logits
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY / "base", dtype=torch.float32), out)
    with torch.no_grad():
        got = merged(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
