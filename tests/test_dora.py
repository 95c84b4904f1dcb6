"""DoRA adapters, saved by PEFT 0.21: each stands for its exact task vector t_i = W'_i - W.

PEFT cannot merge several DoRA adapters correctly, so the reference is ``W + sum_i w_i (W'_i - W)``
with W'_i taken from PEFT's own ``merge_and_unload`` of adapter i alone; TIES runs plainly in float64
on those t_i; an adapter output is checked against a float64 SVD of the exact merged delta.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from soupkit.errors import SoupkitError
from soupkit.execute import RunOptions
from soupkit.merge import merge_recipe
from soupkit.recipe import Recipe

from conftest import TINY

QUIET = RunOptions(progress=False)
WEIGHTS = {"a": 0.7, "b": 0.4}
IDS = torch.randint(4, 100, (2, 11), generator=torch.Generator().manual_seed(0))


def save_dora(base: Path, out: Path, seed: int, **config: object) -> Path:
    """A PEFT DoRA adapter: random A and B, magnitudes PEFT's initial row norms times 1 + 0.05 N(0, 1)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    model = get_peft_model(model, LoraConfig(init_lora_weights=False, use_dora=True, **config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude" in name:
                param.mul_(1 + 0.05 * torch.randn(param.shape, generator=gen))
            elif "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5 / param.shape[-1] ** 0.5)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def doras(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dora")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "a": save_dora(
                TINY / "base", root / "a", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "embed_tokens"]
            ),
            "b": save_dora(
                TINY / "base", root / "b", 2, r=2, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "down_proj"]
            ),
        }


def load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.double()


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def peft_merged(adapter: Path) -> dict[str, torch.Tensor]:
    """PEFT's merge_and_unload of one adapter, as a float64 state dict."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(load(TINY / "base"), adapter).merge_and_unload()
    return {k: v.double() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def task_vectors(doras: dict[str, Path]) -> dict[str, dict[str, torch.Tensor]]:
    """adapter -> parameter name -> W'_i - W (float64), from PEFT's merge_and_unload."""
    base = {k: v.double() for k, v in load(TINY / "base").state_dict().items()}
    out = {}
    for name, adapter in doras.items():
        merged = peft_merged(adapter)
        out[name] = {k: merged[k] - base[k] for k in base if (merged[k] - base[k]).abs().max() > 0}
    return out


def with_deltas(deltas: dict[str, torch.Tensor]):
    """The tiny base with ``deltas`` (parameter name -> float64 update) added."""
    model = load(TINY / "base")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, delta in deltas.items():
            params[key].copy_((params[key].double() + delta).float())
    return model


def weighted(task_vectors: dict, weights: dict[str, float]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        for key, t in task_vectors[name].items():
            out[key] = out.get(key, 0) + w * t
    return out


def merge(tmp_path: Path, doras: dict[str, Path], weights: dict[str, float], output: str = "model", **m: object) -> Path:
    spec = {
        "base_model": str(TINY / "base"),
        "adapters": [{"name": n, "path": str(doras[n]), "weight": w} for n, w in weights.items()],
        "merge": {"method": "cat", **m},
        "dtype": "float32",
        "output": output,
    }
    out = tmp_path / f"out-{output}-{m.get('method', 'cat')}"
    merge_recipe(Recipe.from_dict(spec, tmp_path), out, QUIET)
    return out


@pytest.mark.parametrize("method", ["cat", "linear", "svd"])
def test_full_model_is_base_plus_weighted_task_vectors(tmp_path: Path, doras: dict, task_vectors: dict, method: str) -> None:
    want = logits(with_deltas(weighted(task_vectors, WEIGHTS)))
    assert relative(logits(load(TINY / "base")), want) > 1e-2  # the comparison has teeth
    rank = {"svd": {"rank": 64}}.get(method, {})  # svd's default rank is max r_i: ask for every direction
    assert relative(logits(load(merge(tmp_path, doras, WEIGHTS, method=method, **rank))), want) < 1e-5


def test_one_adapter_at_weight_one_equals_merge_and_unload(tmp_path: Path, doras: dict) -> None:
    from peft import PeftModel

    want = logits(PeftModel.from_pretrained(load(TINY / "base"), doras["b"]).merge_and_unload().eval())
    assert relative(logits(load(merge(tmp_path, doras, {"b": 1.0}))), want) < 1e-5


def plain_ties(deltas: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """TIES on one matrix: trim each weighted delta to its top-density |.|, elect the sign, disjoint mean."""
    trimmed = []
    for delta, w in zip(deltas, weights):
        flat = (w * delta).flatten()
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[flat.abs().topk(int(density * flat.numel())).indices] = True
        trimmed.append((flat * mask).view(delta.shape))
    sign = torch.sign(sum(trimmed))
    sign[sign == 0] = 1
    agree = [torch.sign(t) == sign for t in trimmed]
    return sum(t * a for t, a in zip(trimmed, agree)) / sum(a.double() for a in agree).clamp(min=1)


def test_ties_merges_the_task_vectors(tmp_path: Path, doras: dict, task_vectors: dict) -> None:
    density = 0.3
    deltas = {}  # TIES is elementwise and trims over the whole matrix: the stored layout is as good as (out, in)
    for key in set(task_vectors["a"]) | set(task_vectors["b"]):
        present = [(task_vectors[n][key], w) for n, w in WEIGHTS.items() if key in task_vectors[n]]
        deltas[key] = plain_ties([t for t, _ in present], [w for _, w in present], density)
    out = merge(tmp_path, doras, WEIGHTS, method="ties", density=density, rank=64)  # rank 64: the dense delta whole
    assert relative(logits(load(out)), logits(with_deltas(deltas))) < 1e-5


def test_adapter_output_is_the_best_rank_k_and_reports_its_energy(tmp_path: Path, doras: dict, task_vectors: dict) -> None:
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    rank = 24
    out = merge(tmp_path, doras, WEIGHTS, output="adapter", rank=rank, min_energy=0.5)
    want = weighted(task_vectors, WEIGHTS)
    model = PeftModel.from_pretrained(load(TINY / "base"), out)
    energy = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and name.removeprefix("base_model.model.") + ".weight" in want:
                path = name.removeprefix("base_model.model.")
                U, S, Vh = torch.linalg.svd(want[f"{path}.weight"], full_matrices=False)  # Eckart-Young, float64
                best = (U[:, :rank] * S[:rank]) @ Vh[:rank]
                assert relative(module.get_delta_weight("default").double(), best) < 1e-4, path
                energy[path] = float(S[:rank].square().sum() / S.square().sum())
    assert len(energy) == 9 and min(energy.values()) < 0.999  # truncation loses something: worth reporting
    lock = yaml.safe_load((out / "soupkit.lock.yaml").read_text())
    recorded = lock["soupkit_lock"]["report"]["energy_kept"]
    assert set(recorded) == set(energy) and all(abs(recorded[k] - energy[k]) < 1e-4 for k in energy)
    assert f"min {min(energy.values()):.4f}" in (out / "README.md").read_text()
    assert not json.loads((out / "adapter_config.json").read_text())["use_dora"]
    base_hashes = lock["soupkit_lock"]["inputs"]["base_model"]  # DoRA read the base's values: hashed whole
    assert all(h.startswith("sha256:") for h in base_hashes.values())


def test_min_energy_names_the_rank_that_reaches_it(tmp_path: Path, doras: dict) -> None:
    with pytest.raises(SoupkitError, match=r"merge.min_energy.*set merge.rank: \d+") as err:
        merge(tmp_path / "short", doras, WEIGHTS, output="adapter", min_energy=0.999)
    assert "\n" not in str(err.value) and not (tmp_path / "short" / "out-adapter-cat").exists()
    rank = int(str(err.value).split("merge.rank: ")[1].split()[0])
    merge(tmp_path / "enough", doras, WEIGHTS, output="adapter", min_energy=0.999, rank=rank)
    with pytest.raises(SoupkitError, match="merge.min_energy"):
        merge(tmp_path / "one-less", doras, WEIGHTS, output="adapter", min_energy=0.999, rank=rank - 1)


def test_factor_methods_are_refused_with_dora(tmp_path: Path, doras: dict) -> None:
    with pytest.raises(SoupkitError, match="merge.method.*DoRA") as err:
        merge(tmp_path, doras, WEIGHTS, method="lego")
    assert "\n" not in str(err.value)


def test_gpt2_conv1d_dora_fan_in_fan_out(tmp_path: Path) -> None:
    """GPT-2 stores Conv1D weights (d_in, d_out): PEFT's norm is still per output; the full model must match."""
    from peft import PeftModel
    from transformers import GPT2Config

    from soupkit.testing import make_base

    base = make_base(tmp_path / "gpt2", seed=1, config=GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = save_dora(base, tmp_path / "a", 3, r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
        b = save_dora(base, tmp_path / "b", 4, r=2, lora_alpha=2, target_modules=["c_attn"], fan_in_fan_out=True)
        merged = {n: PeftModel.from_pretrained(load(base), p).merge_and_unload().state_dict() for n, p in (("a", a), ("b", b))}
    original = {k: v.double() for k, v in load(base).state_dict().items()}
    state = dict(original)
    for name, w in WEIGHTS.items():  # W + sum_i w_i (W'_i - W)
        state = {k: state[k] + w * (merged[name][k].double() - original[k]) for k in state}
    reference = load(base)
    reference.load_state_dict({k: v.float() for k, v in state.items()})
    want = logits(reference)
    spec = {
        "base_model": str(base),
        "adapters": [{"name": "a", "path": str(a), "weight": 0.7}, {"name": "b", "path": str(b), "weight": 0.4}],
        "merge": {"method": "cat"},
        "dtype": "float32",
        "output": "model",
    }
    merge_recipe(Recipe.from_dict(spec, tmp_path), tmp_path / "out", QUIET)
    assert relative(logits(load(base)), want) > 1e-2
    assert relative(logits(load(tmp_path / "out")), want) < 1e-5


def test_fit_alpha_and_eval_refuse_dora_instead_of_reading_b_a(tmp_path: Path, doras: dict) -> None:
    """fit-alpha and eval apply W + sum alpha_i B_i A_i: a DoRA adapter would silently be another update."""
    from soupkit.eval.target import load_target
    from soupkit.fit.model import fit_targets

    spec = {
        "base_model": str(TINY / "base"),
        "adapters": [{"name": "a", "path": str(doras["a"]), "weight": 1.0}],
        "merge": {"method": "cat"},
        "dtype": "float32",
    }
    with pytest.raises(SoupkitError, match="DoRA adapter"):
        fit_targets(Recipe.from_dict({**spec, "adapters": [{**spec["adapters"][0], "path": str(doras["b"])}]}, tmp_path))
    with pytest.raises(SoupkitError, match="DoRA"):
        load_target(doras["a"], torch.device("cpu"), TINY / "base")


def test_cli_reports_the_energy_kept_on_stderr(tmp_path: Path, doras: dict) -> None:
    from click.testing import CliRunner

    from soupkit.cli import main

    spec = {
        "base_model": str(TINY / "base"),
        "adapters": [{"name": n, "path": str(doras[n]), "weight": w} for n, w in WEIGHTS.items()],
        "merge": {"method": "cat", "rank": 24, "min_energy": 0.5},
        "dtype": "float32",
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(spec))
    result = CliRunner().invoke(main, ["merge", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 0, result.output
    kept = yaml.safe_load((tmp_path / "out" / "soupkit.lock.yaml").read_text())["soupkit_lock"]["report"]["energy_kept_min"]
    assert f"energy kept by the rank-24 truncation: min {kept:.4f}" in result.stderr
