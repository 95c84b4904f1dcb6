"""One model on the device whose targeted weights are set, per row, to base + the row's LoRA delta.

This is what PEFT's ``merge_and_unload`` computes (checked against it in the smoke test), without a
model copy and an adapter load per row: W = W0 + s * B @ A per module, s = alpha / r (rank_pattern and
alpha_pattern respected). Adapters this plain reader does not cover go through PEFT itself.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

PLAIN_KEYS = {"use_dora": False, "use_rslora": False, "fan_in_fan_out": False, "modules_to_save": None}


def _pattern(patterns: dict, path: str, default: float) -> float:
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", path):
            return value
    return default


def adapter_deltas(adapter_dir: Path, device: torch.device) -> dict[str, torch.Tensor] | None:
    """module path -> float32 delta (out, in) on ``device``; None if the adapter is not plain LoRA."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if any(config.get(k, v) not in (v, [], {}) for k, v in PLAIN_KEYS.items()):
        return None
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"), device=str(device))
    out = {}
    for key, a in tensors.items():
        if not key.endswith("lora_A.weight"):
            continue
        b = tensors.get(key.replace("lora_A", "lora_B"))
        path = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        r = _pattern(config.get("rank_pattern"), path, config["r"])
        if b is None or a.dim() != 2 or r != a.shape[0]:
            return None
        alpha = _pattern(config.get("alpha_pattern"), path, config["lora_alpha"])
        out[path] = (alpha / r) * (b.float() @ a.float())
    if len(out) != sum(k.endswith("lora_B.weight") for k in tensors) or not out:
        return None  # embeddings or other tensors this reader does not cover
    return out


def peft_deltas(model, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Deltas through PEFT itself: merge_and_unload on a copy, minus the base weights."""
    from peft import PeftModel

    merged = PeftModel.from_pretrained(copy.deepcopy(model), str(adapter_dir)).merge_and_unload()
    base = dict(model.named_parameters())
    return {
        name.removesuffix(".weight"): (p.float() - base[name].float())
        for name, p in merged.named_parameters()
        if name.endswith(".weight") and not torch.equal(p, base[name])
    }


class WorkingModel:
    """``model`` with per-row deltas added to its weights (in float32, stored in the model's dtype)."""

    def __init__(self, model) -> None:
        self.model = model
        self.params = dict(model.named_parameters())
        self.saved: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        with torch.no_grad():
            for path, weight in self.saved.items():
                self.params[f"{path}.weight"].copy_(weight)
        self.saved = {}

    def set_deltas(self, deltas: dict[str, torch.Tensor]) -> None:
        self.reset()
        with torch.no_grad():
            for path, delta in deltas.items():
                weight = self.params[f"{path}.weight"]
                self.saved[path] = weight.detach().clone()
                weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))

    def set_adapter(self, adapter_dir: Path | None) -> None:
        if adapter_dir is None:
            return self.reset()
        device = next(self.model.parameters()).device
        self.reset()
        deltas = adapter_deltas(adapter_dir, device)
        self.set_deltas(deltas if deltas is not None else peft_deltas(self.model, adapter_dir))
