"""modules_to_save and lora_bias adapters, saved by PEFT, merged and checked against PEFT.

References:
- lora_bias only: PEFT with every adapter active, each LoRA layer's scaling multiplied by the
  adapter's weight (the bias update is scaled with the layer, so it is weighted too).
- modules_to_save: PEFT cannot hold two adapters that save one module, so the reference is
  ``W + sum_i w_i (W'_i - W)`` per tensor, W'_i from PEFT's single-adapter ``merge_and_unload``.
- ties on a saved tensor: TIES written plainly in float64 in this test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from soupkit.errors import SoupkitError
from soupkit.execute import RunOptions
from soupkit.merge import merge_recipe
from soupkit.recipe import Recipe
from soupkit.testing import make_base, make_lora, model_class, tiny_llama_config

IDS = torch.tensor([[5, 9, 20, 33, 40, 7, 61]])
QUIET = RunOptions(progress=False)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama with attention biases and PEFT adapters: p, q, t (lora_bias); m, n (modules_to_save)."""
    root = tmp_path_factory.mktemp("saved")
    base = make_base(root / "base", seed=0, config=tiny_llama_config(attention_bias=True))
    return {
        "base": base,
        "p": make_lora(base, root / "p", seed=1, target_modules=["q_proj", "v_proj"], lora_bias=True),
        "q": make_lora(base, root / "q", seed=2, r=2, lora_alpha=6, target_modules=["q_proj", "o_proj"], lora_bias=True),
        "t": make_lora(base, root / "t", seed=3, r=3, target_modules=["k_proj", "o_proj"], lora_bias=True),
        "m": make_lora(base, root / "m", seed=4, target_modules=["k_proj"], modules_to_save=["lm_head"]),
        "n": make_lora(base, root / "n", seed=5, r=2, target_modules=["q_proj"], modules_to_save=["lm_head", "embed_tokens"]),
    }


def load_base(zoo: dict) -> torch.nn.Module:
    return model_class(zoo["base"]).from_pretrained(zoo["base"], dtype=torch.float32).eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def peft_weighted(zoo: dict, weights: dict[str, float]) -> torch.Tensor:
    """Logits of PEFT with every adapter active, each LoRA layer's scaling multiplied by its adapter's weight."""
    from peft import PeftModel

    names = list(weights)
    model = PeftModel.from_pretrained(load_base(zoo), zoo[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(zoo[name], adapter_name=name)
    model.base_model.set_adapter(names)
    for module in model.modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict):
            for name, w in weights.items():
                if name in scaling:
                    scaling[name] *= w
    return logits(model.eval())


def task_vector_reference(zoo: dict, weights: dict[str, float]) -> dict[str, torch.Tensor]:
    """``W + sum_i w_i (W'_i - W)`` for every tensor, W'_i = PEFT's merge_and_unload of adapter i alone (float64)."""
    from peft import PeftModel

    base = {k: v.double() for k, v in load_base(zoo).state_dict().items()}
    out = dict(base)
    for name, w in weights.items():
        merged = PeftModel.from_pretrained(load_base(zoo), zoo[name]).merge_and_unload().state_dict()
        out = {k: out[k] + w * (merged[k].double() - base[k]) for k in out}
    return out


def logits_of_state(zoo: dict, state: dict[str, torch.Tensor]) -> torch.Tensor:
    model = load_base(zoo)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return logits(model)


def merge(
    tmp_path: Path, zoo: dict, weights: dict[str, float], method: str = "cat", output: str = "adapter", **params: object
) -> Path:
    recipe = {
        "base_model": str(zoo["base"]),
        "adapters": [{"name": n, "path": str(zoo[n]), "weight": w} for n, w in weights.items()],
        "merge": {"method": method, **params},
        "dtype": "float32",
        "output": output,
    }
    out = tmp_path / f"{method}-{output}"
    merge_recipe(Recipe.from_dict(recipe, tmp_path), out, QUIET)
    return out


def load_output(zoo: dict, out: Path, output: str) -> torch.Tensor:
    """Logits of the merged output, loaded by transformers (model) or PEFT (adapter: no missing or unexpected keys)."""
    import warnings

    from peft import PeftModel

    if output == "model":
        return logits(model_class(out).from_pretrained(out, dtype=torch.float32).eval())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(load_base(zoo), out)
    assert not [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    return logits(model.eval())


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return bool((got - want.float()).abs().max() < 1e-5 * want.abs().max())


# ties with density 1 on adapters that share no module (nor saved tensor) is the weighted sum
CASES = [("cat", "adapter", {}), ("cat", "model", {}), ("linear", "adapter", {})]


@pytest.mark.parametrize(("method", "output", "params"), CASES)
def test_lora_bias_matches_peft(tmp_path: Path, zoo: dict, method: str, output: str, params: dict) -> None:
    weights = {"p": 0.7, "q": -0.4}
    out = merge(tmp_path, zoo, weights, method, output, **params)
    assert close(load_output(zoo, out, output), peft_weighted(zoo, weights))
    if output == "adapter":
        assert json.loads((out / "adapter_config.json").read_text())["lora_bias"] is True
        biases = [k for k in load_file(out / "adapter_model.safetensors") if k.endswith("lora_B.bias")]
        assert len(biases) == 6  # every LoRA module of the output: q, v and o in 2 layers


def test_lora_bias_ties_on_disjoint_modules(tmp_path: Path, zoo: dict) -> None:
    weights = {"p": 0.8, "t": -0.5}
    out = merge(tmp_path, zoo, weights, "ties", "adapter", density=1.0)
    assert close(load_output(zoo, out, "adapter"), peft_weighted(zoo, weights))


@pytest.mark.parametrize(("method", "output", "params"), CASES)
def test_modules_to_save_matches_task_vector_sum(tmp_path: Path, zoo: dict, method: str, output: str, params: dict) -> None:
    weights = {"m": 0.6, "n": 0.3, "p": -0.5}
    out = merge(tmp_path, zoo, weights, method, output, **params)
    assert close(load_output(zoo, out, output), logits_of_state(zoo, task_vector_reference(zoo, weights)))
    if output == "adapter":
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["modules_to_save"] == ["embed_tokens", "lm_head"]
        assert "vLLM refuses adapters with modules_to_save" in (out / "README.md").read_text()


def test_modules_to_save_ties_on_disjoint_tensors(tmp_path: Path, zoo: dict) -> None:
    """m (k_proj, lm_head) and q (q_proj, o_proj, lora_bias) share nothing: each saved tensor and module has one source, so ties at density 1 is the sum."""
    weights = {"m": 0.9, "q": 0.4}
    out = merge(tmp_path, zoo, weights, "ties", "adapter", density=1.0)
    assert close(load_output(zoo, out, "adapter"), logits_of_state(zoo, task_vector_reference(zoo, weights)))


@pytest.mark.parametrize("name", ["p", "n"])
def test_one_adapter_is_peft_merge_and_unload(tmp_path: Path, zoo: dict, name: str) -> None:
    from peft import PeftModel

    out = merge(tmp_path, zoo, {name: 1.0}, "cat", "model")
    folded = PeftModel.from_pretrained(load_base(zoo), zoo[name]).merge_and_unload().eval()
    assert torch.allclose(load_output(zoo, out, "model"), logits(folded), atol=1e-6)


def plain_ties(deltas: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """TIES in float64: keep each delta's top-density |.|, weight, elect the sign of the sum, mean of the agreeing."""
    kept = []
    for delta, w in zip(deltas, weights):
        k = int(density * delta.numel())
        threshold = delta.abs().flatten().kthvalue(delta.numel() - k + 1).values
        kept.append(w * torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta)))
    stack = torch.stack(kept)
    sign = torch.where(stack.sum(0) >= 0, 1.0, -1.0).double()
    agree = (stack * sign > 0).double()
    return (stack * agree).sum(0) / agree.sum(0).clamp_min(1)


def test_ties_rule_on_a_saved_tensor(tmp_path: Path, zoo: dict) -> None:
    """Two adapters save lm_head: the output's lm_head is base + TIES(saved_i - base), the dense method's own rule."""
    weights = {"m": 0.6, "n": -0.8}
    out = merge(tmp_path, zoo, weights, "ties", "adapter", density=0.5)
    base = load_base(zoo).state_dict()["lm_head.weight"].double()
    saved = [load_file(zoo[n] / "adapter_model.safetensors")["base_model.model.lm_head.weight"].double() for n in weights]
    want = base + plain_ties([s - base for s in saved], list(weights.values()), 0.5)
    got = load_file(out / "adapter_model.safetensors")["base_model.model.lm_head.weight"].double()
    assert torch.allclose(got, want, atol=1e-6)


def test_serving_vllm_refuses_or_drops(tmp_path: Path, zoo: dict, capsys: pytest.CaptureFixture) -> None:
    recipe = Recipe.from_dict(
        {"base_model": str(zoo["base"]), "adapters": [{"name": "m", "path": str(zoo["m"])}], "merge": {"method": "cat"}},
        tmp_path,
    )
    with pytest.raises(SoupkitError, match="add --drop-modules-to-save"):
        merge_recipe(recipe, tmp_path / "refused", RunOptions(progress=False, serving="vllm"))
    assert not (tmp_path / "refused").exists()
    merge_recipe(recipe, tmp_path / "dropped", RunOptions(progress=False, serving="vllm", drop_modules_to_save=True))
    assert "dropped modules_to_save (lm_head.weight)" in capsys.readouterr().err
    assert json.loads((tmp_path / "dropped" / "adapter_config.json").read_text())["modules_to_save"] is None
    assert not [k for k in load_file(tmp_path / "dropped" / "adapter_model.safetensors") if "lm_head" in k]
    merge_recipe(recipe, tmp_path / "kept", QUIET)
    assert "vLLM refuses adapters with modules_to_save" in capsys.readouterr().err


def test_serving_vllm_refuses_lora_bias(tmp_path: Path, zoo: dict) -> None:
    recipe = Recipe.from_dict(
        {"base_model": str(zoo["base"]), "adapters": [{"name": "p", "path": str(zoo["p"])}], "merge": {"method": "cat"}},
        tmp_path,
    )
    with pytest.raises(SoupkitError, match="lora_bias on 4 modules"):
        merge_recipe(recipe, tmp_path / "refused", RunOptions(progress=False, serving="vllm"))
    assert not (tmp_path / "refused").exists()


def test_inspect_says_vllm_refuses(tmp_path: Path, zoo: dict) -> None:
    from soupkit.describe import describe_adapter, describe_plan
    from soupkit.execute import plan_recipe

    recipe = Recipe.from_dict(
        {
            "base_model": str(zoo["base"]),
            "adapters": [{"name": "n", "path": str(zoo["n"])}, {"name": "p", "path": str(zoo["p"])}],
            "merge": {"method": "cat"},
        },
        tmp_path,
    )
    shown = describe_plan(recipe, plan_recipe(recipe)[0])
    assert "modules_to_save lm_head.weight 100x64: base + merged (saved - base) of n(w=1)" in shown
    assert "lora_bias: 4 modules" in shown

    text = describe_adapter(zoo["n"])
    assert "modules_to_save: base_model.model" not in text and "lm_head.weight" in text
    assert "vLLM refuses adapters with modules_to_save" in text
    assert "lora_bias: 4 modules" in describe_adapter(zoo["p"])


@pytest.mark.parametrize("name", ["m", "p"])
def test_fit_alpha_refuses_what_it_cannot_model(tmp_path: Path, zoo: dict, name: str) -> None:
    from soupkit.fit.model import fit_targets

    recipe = Recipe.from_dict(
        {"base_model": str(zoo["base"]), "adapters": [{"name": name, "path": str(zoo[name])}], "merge": {"method": "cat"}},
        tmp_path,
    )
    with pytest.raises(SoupkitError, match="fit-alpha models no modules_to_save or lora_bias"):
        fit_targets(recipe)


@pytest.mark.parametrize("saved", ["lm_head", "embed_tokens"])
def test_modules_to_save_on_tied_embeddings(tmp_path: Path, saved: str) -> None:
    """A tied base (no lm_head in the checkpoint): a saved head starts from the input embedding, and the full
    model is untied, as PEFT's merge_and_unload leaves it; reference W + sum_i w_i (W'_i - W)."""
    from peft import PeftModel

    base = make_base(tmp_path / "base", seed=7, config=tiny_llama_config(tie_word_embeddings=True))
    zoo = {"base": base}
    for i, name in enumerate(["x", "y"]):
        zoo[name] = make_lora(base, tmp_path / name, seed=40 + i, target_modules=["q_proj"], modules_to_save=[saved])
    cls = model_class(base)
    untied = {
        k: v.double() for k, v in cls.from_pretrained(base, dtype=torch.float32, tie_word_embeddings=False).state_dict().items()
    }
    untied["lm_head.weight"] = untied["model.embed_tokens.weight"].clone()  # the tied head's value
    weights = {"x": 0.6, "y": -0.3}
    want = dict(untied)
    for name, w in weights.items():
        merged = PeftModel.from_pretrained(load_base(zoo), zoo[name]).merge_and_unload().state_dict()
        want = {k: want[k] + w * (merged[k].double() - untied[k]) for k in want}
    reference = cls.from_pretrained(base, dtype=torch.float32, tie_word_embeddings=False).eval()
    reference.load_state_dict({k: v.float() for k, v in want.items()})
    for output in ("adapter", "model"):
        out = merge(tmp_path, zoo, weights, "cat", output)
        assert close(load_output(zoo, out, output), logits(reference)), output


def test_lora_bias_without_a_base_bias_is_refused_for_a_full_model(tmp_path: Path) -> None:
    """As PEFT's merge_and_unload: no base bias to add the update to; nothing is written."""
    from conftest import TINY

    adapter = make_lora(TINY / "base", tmp_path / "nb", seed=9, target_modules=["q_proj"], lora_bias=True)
    zoo = {"base": TINY / "base", "nb": adapter}
    with pytest.raises(SoupkitError, match="found no bias in the base; write an adapter"):
        merge(tmp_path, zoo, {"nb": 1.0}, "cat", "model")
    assert not (tmp_path / "cat-model").exists()


def test_methods_state_their_whole_tensor_rule() -> None:
    """``soupkit methods`` says, per method, how modules_to_save and lora_bias tensors are merged."""
    from soupkit.describe import describe_methods

    lines = describe_methods().splitlines()

    def rule(name: str) -> str:
        header = next(i for i, line in enumerate(lines) if line.startswith(f"{name}  ["))
        return lines[header + 2]

    assert rule("ties").startswith("    modules_to_save and lora_bias tensors: the method's own rule")
    assert rule("cat") == "    modules_to_save and lora_bias tensors: weighted sum: sum_i w_i d_i"
