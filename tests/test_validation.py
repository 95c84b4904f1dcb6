"""Validation beyond the bad-input table: PEFT's target_modules rule (against PEFT itself), LoRA-LEGO's
k-means on duplicated units, the memory check, the finite check after the cast, fit-alpha's data-first order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from soupkit.cli import main
from soupkit.errors import SoupkitError

from conftest import TINY, reference_deltas, tiny_recipe, write_recipe

# ---- target_modules: soupkit's rule == the modules PEFT 0.21 wraps ------------------------------------

TARGET_CONFIGS = [
    {"target_modules": ["q_proj", "v_proj"]},
    {"target_modules": ["self_attn.q_proj", "down_proj"]},
    {"target_modules": r".*\.layers\.1\..*_proj"},
    {"target_modules": "all-linear"},
    {"target_modules": ["q_proj", "k_proj", "up_proj"], "layers_to_transform": [1]},
    {"target_modules": ["q_proj", "o_proj"], "layers_to_transform": 0, "layers_pattern": "layers"},
    {"target_modules": ["q_proj", "k_proj", "v_proj"], "exclude_modules": ["k_proj"]},
    {"target_modules": ["q_proj", "gate_proj"], "exclude_modules": r".*\.layers\.0\..*"},
]


@pytest.mark.parametrize("config", TARGET_CONFIGS, ids=[json.dumps(c)[:60] for c in TARGET_CONFIGS])
def test_target_rule_matches_the_modules_peft_wraps(config: dict) -> None:
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import AutoModelForCausalLM

    from soupkit.io.adapter_config import peft_targets

    model = AutoModelForCausalLM.from_pretrained(TINY / "base")
    linear = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    peft_config = LoraConfig(r=2, **config)
    saved = json.loads(json.dumps(peft_config.to_dict(), default=sorted))  # as adapter_config.json stores it
    wrapped = inject_adapter_in_model(peft_config, model)
    peft_wrapped = {name.removesuffix(".lora_A") for name, _ in wrapped.named_modules() if name.endswith(".lora_A")}
    assert peft_wrapped, "the case must wrap something"
    ours = {name for name in linear if peft_targets(saved, name)}
    assert ours == peft_wrapped


def test_peft_ignores_tensors_outside_target_modules_and_soupkit_refuses(tmp_path: Path) -> None:
    """What the refusal protects against: PEFT loads such an adapter and silently drops those tensors."""
    import shutil

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "math"
    shutil.copytree(TINY / "adapters" / "math", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["target_modules"] = [m for m in config["target_modules"] if m != "k_proj"]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert any(".k_proj." in k for k in load_file(adapter / "adapter_model.safetensors"))

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY / "base"), adapter)
    assert not any(name.endswith("k_proj.lora_A") for name, _ in model.named_modules())

    recipe = tiny_recipe("cat")
    recipe["adapters"][0]["path"] = str(adapter)
    result = CliRunner().invoke(main, ["validate", str(write_recipe(tmp_path, recipe))])
    assert result.exit_code == 2
    assert "module model.layers.0.self_attn.k_proj" in result.output and "PEFT never applies others" in result.output


# ---- LoRA-LEGO and k-means with duplicated units -----------------------------------------------------


def test_refill_gives_each_empty_cluster_its_own_point() -> None:
    from soupkit.ops import refill_empty_clusters

    assign = torch.tensor([0, 0, 0, 0, 0, 1])
    distance = torch.tensor([0.5, 3.0, 2.0, 1.0, 0.0, 9.0])
    refill_empty_clusters(assign, distance, k=5)
    assert sorted(torch.bincount(assign, minlength=5).tolist()) == [1, 1, 1, 1, 2]
    assert int(assign[5]) == 1  # the only member of cluster 1 is never taken
    assert {int(assign[i]) for i in (1, 2, 3)} == {2, 3, 4}  # the three worst-served points, one per empty cluster


def test_kmeans_leaves_no_cluster_empty_on_duplicates() -> None:
    from soupkit.ops import kmeans

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    points = torch.cat([base.repeat(4, 1), base[:2] + 1e-12])  # 12 exact duplicates, 2 near-duplicates
    for k in range(1, points.shape[0] + 1):
        assign = kmeans(points, k, torch.Generator().manual_seed(k), max_iter=50)
        counts = torch.bincount(assign, minlength=k)
        assert counts.numel() == k and bool((counts >= 1).all()), (k, counts.tolist())


def lego_inputs(kind: str) -> list:
    from soupkit.io.adapter import LoraAdapter

    math = LoraAdapter("math", TINY / "adapters" / "math")
    path = "model.layers.0.self_attn.q_proj"
    f = math.load(path)
    if kind == "duplicate":
        return [f, f]
    gen = torch.Generator().manual_seed(1)
    near = type(f)(A=f.A + 1e-7 * torch.randn(f.A.shape, generator=gen), B=f.B + 1e-7 * torch.randn(f.B.shape, generator=gen))
    return [f, near]


@pytest.mark.parametrize("kind", ["duplicate", "near_duplicate"])
@pytest.mark.parametrize("reweight", [True, False])
def test_lego_every_k_on_duplicated_adapters(kind: str, reweight: bool) -> None:
    from soupkit.methods import MergeContext, get_method

    method = get_method("lego")
    params = method.Params(parameter_reweighting=reweight, output_reweighting=reweight)
    factors, weights = lego_inputs(kind), [0.5, 0.7]
    # The independent reference: the weighted sum, formed densely in float64.
    target = sum(w * (f.B.double() @ f.A.double()) for f, w in zip(factors, weights))
    total = sum(f.rank for f in factors)
    for k in range(1, total + 1):
        out = method.merge(factors, weights, params, MergeContext("m", k, seed=0)).factors
        delta = out.B.double() @ out.A.double()
        assert out.rank <= k and bool(torch.isfinite(delta).all()), k
        if reweight:  # output reweighting: the merged update has the weighted sum's Frobenius norm
            assert float(delta.norm()) == pytest.approx(float(target.norm()), rel=1e-5), k
        if k == total:  # one unit per cluster: exactly CAT
            torch.testing.assert_close(delta, target, rtol=1e-5, atol=1e-6 * float(target.abs().max()))


def test_lego_same_adapter_twice_rank_7_merges(tmp_path: Path) -> None:
    """The reported crash: the same rank-4 adapter twice with merge.rank 7 (k-means leaves clusters empty)."""
    recipe = tiny_recipe("lego", rank=7)
    recipe["adapters"][1] = {"name": "again", "path": str(TINY / "adapters" / "math"), "weight": 1.0}
    result = CliRunner().invoke(main, ["merge", str(write_recipe(tmp_path, recipe)), "-o", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 0, result.output
    tensors = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert all(bool(torch.isfinite(t).all()) for t in tensors.values())
    want = {p: 2 * d for p, d in reference_deltas(TINY / "adapters" / "math").items()}
    for path, delta in want.items():  # output reweighting: each module's norm is that of 2 * delta
        key = f"base_model.model.{path}"
        got = tensors[f"{key}.lora_B.weight"].double() @ tensors[f"{key}.lora_A.weight"].double()
        assert float(got.norm()) == pytest.approx(float(delta.norm()), rel=1e-4)


# ---- memory ------------------------------------------------------------------------------------------


def test_memory_check_refuses_in_validate_and_merge_and_warns_in_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import soupkit.execute

    monkeypatch.setattr(soupkit.execute, "available_memory", lambda device="cpu": 1000)
    recipe = str(write_recipe(tmp_path, tiny_recipe("ties", density=0.5)))
    for args in (["validate", recipe], ["merge", recipe, "-o", str(tmp_path / "out"), "--quiet"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and "GiB available on this machine" in result.stderr, result.output
        assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(main, ["plan", recipe])
    assert result.exit_code == 0 and result.stderr.startswith("warning: plan: expected an estimated peak"), result.output


def test_available_memory_reads_the_machine() -> None:
    from soupkit.execute import available_memory

    free = available_memory()
    assert free is None or free > 0


# ---- the finite check runs on what is written --------------------------------------------------------


def test_finite_check_after_the_cast() -> None:
    from soupkit.io.writer import check_finite_cast

    ok = torch.tensor([1.0, -60000.0])
    check_finite_cast(ok.half(), ok, "t")  # 60000 fits float16 (max 65504)
    big = torch.tensor([1.0, -70000.0])
    check_finite_cast(big.bfloat16(), big, "t")  # bfloat16 has float32's range
    with pytest.raises(
        SoupkitError, match=r"values up to 7e\+04 in magnitude, beyond float16's maximum 6.55e\+04; use dtype: bfloat16"
    ):
        check_finite_cast(big.half(), big, "t")
    nan = torch.tensor([1.0, float("nan")])
    with pytest.raises(SoupkitError, match="NaN or Inf before the cast"):
        check_finite_cast(nan, nan, "t")


# ---- fit-alpha checks its data before it loads the model ---------------------------------------------


@pytest.mark.parametrize("data", ["calib.jsonll", "bad.jsonl", "empty.jsonl"])
def test_fit_alpha_data_errors_come_before_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: str) -> None:
    import soupkit.fit.run

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the base model was loaded before the data was checked")

    monkeypatch.setattr(soupkit.fit.run, "load_fit_model", no_model)
    monkeypatch.setattr(soupkit.fit.run, "make_accelerator", no_model)
    (tmp_path / "calib.jsonl").write_text('{"text": "hello"}\n')
    (tmp_path / "bad.jsonl").write_text('{"text": "hello"}\n{"prompt": "no completion"}\n')
    (tmp_path / "empty.jsonl").write_text("\n")
    recipe = write_recipe(tmp_path, tiny_recipe("cat"))
    result = CliRunner().invoke(
        main, ["fit-alpha", str(recipe), "--data", str(tmp_path / data), "-o", str(tmp_path / "fitted.yaml")]
    )
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not (tmp_path / "fitted.yaml").exists()
