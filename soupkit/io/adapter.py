"""Read a PEFT LoRA adapter directory into per-module factors with the scale folded in."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from soupkit.errors import AdapterError, UnsupportedAdapterError
from soupkit.io.tensor_index import TensorIndex
from soupkit.methods.base import LoraFactors

PREFIX = "base_model.model."
# tensor-key suffix -> (module kind, factor)
SUFFIXES: dict[str, tuple[str, str]] = {
    ".lora_A.weight": ("linear", "A"),
    ".lora_B.weight": ("linear", "B"),
    ".lora_embedding_A": ("embedding", "A"),
    ".lora_embedding_B": ("embedding", "B"),
}
Kind = Literal["linear", "embedding"]


@dataclass(frozen=True)
class ModuleSpec:
    """One adapted module, from headers and config only.

    Attributes:
        path: module path without PEFT's prefix, e.g. ``model.layers.0.self_attn.q_proj``.
        kind: ``linear`` (lora_A/lora_B) or ``embedding`` (lora_embedding_A/B).
        a_key, b_key: tensor keys in the adapter file.
        rank: r of this module; A is (rank, d_in), B is (d_out, rank).
        scale: lora_alpha / r, or lora_alpha / sqrt(r) under rsLoRA.
    """

    path: str
    kind: Kind
    a_key: str
    b_key: str
    rank: int
    d_in: int
    d_out: int
    scale: float


def pattern_value(patterns: dict[str, int], path: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern rule: first key matching ``(.*\\.)?(KEY)$`` wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _refuse_features(name: str, config: dict) -> None:
    where = f"adapter '{name}' adapter_config.json"
    if config.get("peft_type", "LORA") != "LORA":
        raise UnsupportedAdapterError(where, "peft_type LORA", repr(config.get("peft_type")), "soupkit merges LoRA adapters only")
    if config.get("use_dora"):
        raise UnsupportedAdapterError(
            where, "a plain LoRA", "use_dora: true (DoRA is not a low-rank update)", "merge DoRA adapters with PEFT's merge_and_unload"
        )
    if config.get("lora_bias"):
        raise UnsupportedAdapterError(where, "a plain LoRA", "lora_bias: true", "retrain without lora_bias or merge it with PEFT")
    if config.get("modules_to_save"):
        raise UnsupportedAdapterError(
            where, "no modules_to_save", f"modules_to_save: {config['modules_to_save']}", "drop them from the adapter"
        )
    if config.get("target_parameters"):
        raise UnsupportedAdapterError(where, "no target_parameters", "target_parameters set", "soupkit merges module LoRAs only")


class LoraAdapter:
    """A PEFT LoRA adapter on disk: config, lazy tensor index, and one ModuleSpec per module.

    Args:
        name: the adapter's name in the recipe (used in messages).
        directory: a directory holding adapter_config.json and adapter_model.safetensors.
    """

    def __init__(self, name: str, directory: Path) -> None:
        self.name, self.directory = name, directory
        config_path = directory / "adapter_config.json"
        if not config_path.is_file():
            raise AdapterError(f"adapter '{name}'", f"{config_path}", "no such file", "point path at a PEFT adapter directory")
        try:
            self.config: dict = json.loads(config_path.read_text())
        except json.JSONDecodeError as err:
            raise AdapterError(str(config_path), "valid JSON", f"a parse error ({err.msg})", "fix or re-save the file") from None
        _refuse_features(name, self.config)
        index = TensorIndex.from_dir(directory, "adapter_model")
        if index is None:
            found = "only adapter_model.bin (pickle)" if (directory / "adapter_model.bin").exists() else "no weights"
            raise AdapterError(
                f"adapter '{name}'", "adapter_model.safetensors", found, "convert it to safetensors (pickles are never loaded)"
            )
        self.index = index
        self.fan_in_fan_out = bool(self.config.get("fan_in_fan_out", False))
        self.modules = self._scan_modules()

    def _scan_modules(self) -> dict[str, ModuleSpec]:
        parts: dict[str, dict[str, str]] = {}
        kinds: dict[str, str] = {}
        for key in self.index.keys():
            suffix = next((s for s in SUFFIXES if key.endswith(s)), None)
            if suffix is None:
                raise UnsupportedAdapterError(
                    f"adapter '{self.name}' tensor {key}", "only lora_A/lora_B tensors", "another tensor", "remove it or merge with PEFT"
                )
            path = key[: -len(suffix)]
            path = path[len(PREFIX) :] if path.startswith(PREFIX) else path
            kinds[path], factor = SUFFIXES[suffix]
            parts.setdefault(path, {})[factor] = key
        return {path: self._module_spec(path, kinds[path], keys) for path, keys in sorted(parts.items())}

    def _module_spec(self, path: str, kind: str, keys: dict[str, str]) -> ModuleSpec:
        where = f"adapter '{self.name}' module {path}"
        if set(keys) != {"A", "B"}:
            raise AdapterError(where, "both lora_A and lora_B", f"only lora_{''.join(keys)}", "re-save the adapter")
        a_shape, b_shape = self.index.infos[keys["A"]].shape, self.index.infos[keys["B"]].shape
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise UnsupportedAdapterError(where, "2-D factors (Linear or Embedding)", f"shapes {a_shape}, {b_shape}", "conv LoRAs are not supported")
        rank = a_shape[0]
        if b_shape[1] != rank or rank == 0:
            raise AdapterError(where, f"B of shape (d_out, {rank})", f"{b_shape}", "re-save the adapter")
        config_rank = pattern_value(self.config.get("rank_pattern") or {}, path, self.config.get("r", rank))
        if int(config_rank) != rank:
            raise AdapterError(where, f"rank {int(config_rank)} (from adapter_config.json)", f"tensors of rank {rank}", "fix r / rank_pattern")
        alpha = pattern_value(self.config.get("alpha_pattern") or {}, path, self.config.get("lora_alpha", rank))
        scale = alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank
        return ModuleSpec(path, kind, keys["A"], keys["B"], rank, a_shape[1], b_shape[0], float(scale))  # type: ignore[arg-type]

    def load(self, path: str, device: torch.device | str = "cpu") -> LoraFactors:
        """Read one module's factors as float32 on ``device``, with the scale folded into B."""
        spec = self.modules[path]
        A = self.index.get(spec.a_key).to(device=device, dtype=torch.float32)
        B = self.index.get(spec.b_key).to(device=device, dtype=torch.float32) * spec.scale
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise AdapterError(f"adapter '{self.name}' module {path}", "finite values", "NaN or Inf", "retrain or repair the adapter")
        return LoraFactors(A=A, B=B)

    def files(self) -> list[Path]:
        """Every file of the adapter that the merge reads."""
        return [self.directory / "adapter_config.json", *self.index.files]
