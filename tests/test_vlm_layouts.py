"""Vision-language bases whose checkpoint keys are not their module paths (llava, llava-next, qwen2_vl).

transformers 5 saves these models under ``language_model.model.layers.N...`` (llava, llava-next) or
``model.layers.N...`` (qwen2_vl), while PEFT's adapter keys follow the modules,
``model.language_model.layers.N...``. soupkit reads the base through transformers' own renaming.
Reference: PEFT itself, with both adapters active and each LoRA layer's scaling multiplied by the
adapter's weight; the full-model export must keep the base's own keys and equal PEFT's weighted merge.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from soupkit.errors import AdapterError
from soupkit.execute import RunOptions
from soupkit.merge import merge_recipe
from soupkit.recipe import Recipe
from soupkit.testing import make_base, make_lora, model_class, tiny_vlm_config

KINDS = ["llava", "llava_next", "qwen2_vl"]
IDS = torch.tensor([[5, 9, 20, 33, 40, 7, 61]])
QUIET = RunOptions(progress=False)


@pytest.fixture(scope="module")
def vlms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """kind -> base and three PEFT adapters: a, b (overlapping targets with a) and c (disjoint from a)."""
    root = tmp_path_factory.mktemp("vlm")
    out = {}
    for i, kind in enumerate(KINDS):
        base = make_base(root / kind, seed=i, config=tiny_vlm_config(kind))
        out[kind] = {
            "base": base,
            "a": make_lora(base, root / f"{kind}-a", seed=10 + i, target_modules=["q_proj", "v_proj", "down_proj"]),
            "b": make_lora(base, root / f"{kind}-b", seed=20 + i, r=2, lora_alpha=6, target_modules=["q_proj", "o_proj"]),
            "c": make_lora(base, root / f"{kind}-c", seed=30 + i, r=3, target_modules=["o_proj", "up_proj"]),
        }
    return out


def checkpoint_keys(directory: Path) -> set[str]:
    with safe_open(directory / "model.safetensors", "pt") as f:
        return set(f.keys())


def peft_weighted(files: dict[str, Path], weights: dict[str, float]) -> torch.nn.Module:
    """PEFT with every adapter active at once, each LoRA layer's scaling multiplied by the adapter's weight."""
    from peft import PeftModel

    base = model_class(files["base"]).from_pretrained(files["base"], dtype=torch.float32)
    names = list(weights)
    model = PeftModel.from_pretrained(base, files[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(files[name], adapter_name=name)
    model.base_model.set_adapter(names)
    for module in model.modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict):
            for name, w in weights.items():
                if name in scaling:
                    scaling[name] *= w
    return model.eval()


def soupkit_merge(tmp_path: Path, files: dict[str, Path], weights: dict[str, float], method: str, output: str) -> Path:
    recipe = {
        "base_model": str(files["base"]),
        "adapters": [{"name": n, "path": str(files[n]), "weight": w} for n, w in weights.items()],
        "merge": {"method": method, **({"density": 1.0} if method == "ties" else {})},
        "dtype": "float32",
        "output": output,
    }
    out = tmp_path / f"{method}-{output}"
    merge_recipe(Recipe.from_dict(recipe, tmp_path), out, QUIET)
    return out


def load_output(files: dict[str, Path], out: Path, output: str) -> torch.nn.Module:
    from peft import PeftModel

    cls = model_class(files["base"])
    if output == "model":
        return cls.from_pretrained(out, dtype=torch.float32).eval()
    return PeftModel.from_pretrained(cls.from_pretrained(files["base"], dtype=torch.float32), out).eval()


# ties with density 1 on adapters that share no module is the weighted sum, so PEFT is its reference too
CASES = [("cat", "adapter", "b"), ("cat", "model", "b"), ("linear", "adapter", "b"), ("ties", "adapter", "c")]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("method", "output", "other"), CASES)
def test_vlm_merge_matches_peft(tmp_path: Path, vlms: dict, kind: str, method: str, output: str, other: str) -> None:
    files = vlms[kind]
    weights = {"a": 0.7, other: -0.4}
    out = soupkit_merge(tmp_path, files, weights, method, output)
    reference = peft_weighted(files, weights)
    merged = load_output(files, out, output)
    with torch.no_grad():
        want, got = reference(input_ids=IDS).logits, merged(input_ids=IDS).logits
    assert (got - want).abs().max() < 1e-5 * want.abs().max()
    if output == "model":  # the base's own keys, every tensor (vision tower included) equal to PEFT's merge
        assert checkpoint_keys(out) == checkpoint_keys(files["base"])
        folded = reference.merge_and_unload().state_dict()
        for name, tensor in merged.state_dict().items():
            assert torch.allclose(tensor, folded[name], atol=1e-6), name


@pytest.mark.parametrize("kind", KINDS)
def test_vlm_one_adapter_is_peft_merge_and_unload(tmp_path: Path, vlms: dict, kind: str) -> None:
    from peft import PeftModel

    files = vlms[kind]
    out = soupkit_merge(tmp_path, files, {"a": 1.0}, "cat", "model")
    base = model_class(files["base"]).from_pretrained(files["base"], dtype=torch.float32)
    folded = PeftModel.from_pretrained(base, files["a"]).merge_and_unload().eval()
    merged = load_output(files, out, "model")
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=IDS).logits, folded(input_ids=IDS).logits, atol=1e-6)


def test_vlm_layout_is_transformers_renaming(vlms: dict) -> None:
    """The map comes from transformers: llava's text tower, projector and vision tower all map 1:1."""
    from soupkit.io.base_model import BaseModelInfo

    base = BaseModelInfo(vlms["llava"]["base"])
    base.adopt_module_paths(["model.language_model.layers.0.self_attn.q_proj"])
    assert base.weight_key("model.language_model.layers.1.mlp.down_proj") == "language_model.model.layers.1.mlp.down_proj.weight"
    assert (
        base.weight_key("model.vision_tower.encoder.layers.0.self_attn.q_proj")
        == "vision_tower.encoder.layers.0.self_attn.q_proj.weight"
    )
    assert base.checkpoint_key("lm_head.weight") == "language_model.lm_head.weight"
    assert sorted(base.key_of.values()) == sorted(checkpoint_keys(vlms["llava"]["base"]))


def test_missing_tensor_names_the_key_and_near_names(tmp_path: Path, vlms: dict) -> None:
    """A module the base lacks: the message names the key looked for and the closest stored names."""
    from safetensors.torch import load_file, save_file

    base = vlms["llava"]["base"]
    lone = make_lora(base, tmp_path / "lone", seed=5, target_modules=["q_proj"])
    weights = lone / "adapter_model.safetensors"
    tensors = {k.replace("layers.1.self_attn.q_proj", "layers.7.self_attn.q_proj"): v for k, v in load_file(weights).items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(AdapterError) as err:
        soupkit_merge(tmp_path, {"base": base, "lone": lone}, {"lone": 1.0}, "cat", "adapter")
    line = err.value.line()
    assert "no tensor model.language_model.layers.7.self_attn.q_proj.weight in the base" in line, line
    assert "keys as transformers loads LlavaForConditionalGeneration" in line, line
    assert "nearest: model.language_model.layers.1.self_attn.q_proj.weight" in line, line


# transformers 4.56's class-level renaming rules for these two models (their _checkpoint_conversion_mapping)
V4_RULES = {
    "llava": {
        "^language_model.model": "model.language_model",
        "^vision_tower": "model.vision_tower",
        "^multi_modal_projector": "model.multi_modal_projector",
        "^language_model.lm_head": "lm_head",
    },
    "qwen2_vl": {"^visual": "model.visual", r"^model(?!\.(language_model|visual))": "model.language_model"},
}


@pytest.mark.parametrize("kind", list(V4_RULES))
def test_transformers_4_rules_give_the_same_map(vlms: dict, kind: str) -> None:
    """The fallback for transformers 4.x (first matching class regex, then the prefix) maps every key as 5.x does."""
    import json

    from soupkit.io.base_model import BaseModelInfo
    from soupkit.io.checkpoint_layout import _renamer_v4, meta_model

    directory = vlms[kind]["base"]
    model = meta_model(directory, json.loads((directory / "config.json").read_text()))
    model._checkpoint_conversion_mapping = V4_RULES[kind]
    rename = _renamer_v4(model, set(model.state_dict()))
    v4 = {rename(key): key for key in checkpoint_keys(directory)}
    assert v4 == BaseModelInfo(directory).layout().model_to_checkpoint
