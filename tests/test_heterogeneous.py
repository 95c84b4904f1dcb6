"""Real-world adapter variants, built by PEFT itself, merged and checked against PEFT's own deltas.

Each variant (ranks, target sets, rank_pattern / alpha_pattern, rsLoRA, layers_to_transform,
embedding LoRA, bf16, GPT-2 Conv1D with fan_in_fan_out) is written by ``peft.get_peft_model(...)
.save_pretrained``. The reference is ``get_delta_weight`` of each PEFT-loaded input; the merged
output is loaded by PEFT too, and must load with no missing keys and every file tensor in place.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from soupkit.execute import RunOptions
from soupkit.io.adapter import LoraAdapter
from soupkit.merge import merge_recipe
from soupkit.recipe import Recipe
from soupkit.testing import make_base, make_lora

from conftest import TINY

QUIET = RunOptions(progress=False)
LLAMA_VARIANTS: dict[str, dict] = {
    "attn_r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "mlp_patterns": dict(
        r=12,
        lora_alpha=6,
        target_modules=["gate_proj", "up_proj", "down_proj"],
        # first match wins: layer 1's up_proj gets 2, layer 0's gets 6
        rank_pattern={"model.layers.1.mlp.up_proj": 2, "up_proj": 6, "down_proj": 4},
        alpha_pattern={"gate_proj": 20, "layers.0.mlp.down_proj": 3},
    ),
    "rslora": dict(
        r=16, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], rank_pattern={"o_proj": 4}
    ),
    "layers": dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "down_proj"], layers_to_transform=[1], layers_pattern="layers"
    ),
    "layers0": dict(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"], layers_to_transform=[0], layers_pattern="layers"),
    "embed": dict(r=4, lora_alpha=4, target_modules=["embed_tokens", "k_proj"]),
    "bf16": dict(r=6, lora_alpha=12, target_modules=["v_proj", "up_proj"]),
}
GPT2_VARIANTS: dict[str, dict] = {
    "g_attn": dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True),
    "g_all": dict(r=8, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, use_rslora=True),
}


def to_bf16(adapter: Path) -> None:
    """Rewrite an adapter's tensors in bfloat16 (as adapters trained in bf16 are shipped)."""
    path = adapter / "adapter_model.safetensors"
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(path).items()}
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """name -> (base dir, adapter dir) for every variant; built once per session."""
    from transformers import GPT2Config

    root = tmp_path_factory.mktemp("zoo")
    gpt2 = make_base(root / "gpt2", seed=1, config=GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=64))
    out: dict[str, tuple[Path, Path]] = {}
    for seed, (name, kwargs) in enumerate(LLAMA_VARIANTS.items()):
        out[name] = (TINY / "base", make_lora(TINY / "base", root / name, seed=100 + seed, **kwargs))
    to_bf16(out["bf16"][1])
    for seed, (name, kwargs) in enumerate(GPT2_VARIANTS.items()):
        out[name] = (gpt2, make_lora(gpt2, root / name, seed=200 + seed, **kwargs))
    return out


def peft_model(base: Path, adapter: Path) -> tuple[torch.nn.Module, list[str]]:
    """PEFT's model for ``adapter`` on ``base`` and the warnings that loading raised."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(model, adapter)
    return model, [str(w.message) for w in caught]


def lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {
        name.removeprefix("base_model.model."): m
        for name, m in model.named_modules()
        if isinstance(m, LoraLayer) and ("default" in m.lora_A or "default" in m.lora_embedding_A)
    }


def peft_deltas(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """PEFT's own get_delta_weight per module (in the base weight's layout), float64."""
    model, _ = peft_model(base, adapter)
    with torch.no_grad():
        return {path: m.get_delta_weight("default").double() for path, m in lora_layers(model).items()}


def merge(tmp_path: Path, base: Path, adapters: dict[str, float], zoo: dict, name: str = "out") -> Path:
    recipe = {
        "base_model": str(base),
        "adapters": [{"name": n, "path": str(zoo[n][1]), "weight": w} for n, w in adapters.items()],
        "merge": {"method": "cat"},
        "dtype": "float32",
    }
    out = tmp_path / name
    merge_recipe(Recipe.from_dict(recipe, tmp_path), out, QUIET)
    return out


def check_output(base: Path, out: Path, want: dict[str, torch.Tensor]) -> None:
    """PEFT loads ``out`` cleanly, every file tensor is in place, and its deltas equal ``want`` (zeros elsewhere)."""
    model, caught = peft_model(base, out)
    assert not [w for w in caught if "missing" in w.lower() or "unexpected" in w.lower()], caught
    params = dict(model.named_parameters())
    for key, tensor in load_file(out / "adapter_model.safetensors").items():
        loaded = key.replace(".weight", ".default.weight") if key.endswith(".weight") else key + ".default"
        assert torch.equal(params[loaded].detach(), tensor), key
    layers = lora_layers(model)
    assert set(want) <= set(layers)
    with torch.no_grad():
        for path, module in layers.items():
            got = module.get_delta_weight("default").double()
            ref = want.get(path, torch.zeros_like(got))
            err = (got - ref).norm() / max(ref.norm().item(), 1e-12)
            assert (got.abs().max() == 0) if path not in want else err < 1e-5, f"{path}: relative error {err:.2e}"


@pytest.mark.parametrize("name", list(LLAMA_VARIANTS) + list(GPT2_VARIANTS))
def test_single_variant_identity(tmp_path: Path, zoo: dict, name: str) -> None:
    """One adapter at weight 1 reproduces PEFT's own delta on every module; other written modules are exact zeros."""
    base, adapter = zoo[name]
    out = merge(tmp_path, base, {name: 1.0}, zoo)
    check_output(base, out, peft_deltas(base, adapter))
    config = json.loads((out / "adapter_config.json").read_text())
    assert (
        config["lora_alpha"] == config["r"]
        and not config["use_rslora"]
        and not config["rank_pattern"]
        and not config["alpha_pattern"]
    )
    assert not config.get("layers_to_transform")  # the zeros written for other layers are exact


def test_llama_union_of_all_variants(tmp_path: Path, zoo: dict) -> None:
    """Different ranks, targets, patterns, rsLoRA, layer subsets, embedding LoRA and bf16 next to fp32, in one merge."""
    weights = {"attn_r8": 0.5, "mlp_patterns": -1.0, "rslora": 0.7, "layers": 1.2, "embed": 0.9, "bf16": 0.3}
    out = merge(tmp_path, TINY / "base", weights, zoo)
    want: dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        for path, delta in peft_deltas(*zoo[name]).items():
            want[path] = want.get(path, torch.zeros_like(delta)) + w * delta
    check_output(TINY / "base", out, want)


def test_layer_covered_only_by_the_later_adapter_is_kept(tmp_path: Path, zoo: dict) -> None:
    """layers_to_transform [0] then [1]: both layers are merged.

    (PEFT 0.21.2's add_weighted_adapter raises "No matching LoRAs found" on this pair: the merged
    config inherits adapters[0]'s layers_to_transform.)
    """
    weights = {"layers0": 0.5, "layers": 2.0}
    out = merge(tmp_path, TINY / "base", weights, zoo)
    want: dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        for path, delta in peft_deltas(*zoo[name]).items():
            want[path] = want.get(path, torch.zeros_like(delta)) + w * delta
    assert {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.o_proj"} <= set(want)
    check_output(TINY / "base", out, want)


def test_gpt2_conv1d_fan_in_fan_out(tmp_path: Path, zoo: dict) -> None:
    """GPT-2's Conv1D (weight stored (in, out)): merged delta matches PEFT's transposed delta."""
    weights = {"g_attn": 0.8, "g_all": -0.6}
    out = merge(tmp_path, zoo["g_attn"][0], weights, zoo)
    want: dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        for path, delta in peft_deltas(*zoo[name]).items():
            want[path] = want.get(path, torch.zeros_like(delta)) + w * delta
    assert want["transformer.h.0.attn.c_attn"].shape == (64, 192)  # Conv1D layout (in, out)
    check_output(zoo["g_attn"][0], out, want)


@pytest.mark.parametrize("name", ["mlp_patterns", "rslora", "g_all"])
def test_rank_and_scale_match_peft(zoo: dict, name: str) -> None:
    """soupkit's per-module rank and scale (rank_pattern / alpha_pattern first match, rsLoRA) equal PEFT's."""
    base, adapter_dir = zoo[name]
    model, _ = peft_model(base, adapter_dir)
    adapter = LoraAdapter(name, adapter_dir)
    layers = lora_layers(model)
    assert set(adapter.modules) == set(layers)
    for path, module in layers.items():
        assert adapter.modules[path].rank == module.r["default"], path
        assert adapter.modules[path].scale == pytest.approx(module.scaling["default"], rel=1e-12), path
