"""Read a PEFT LoRA adapter directory into per-module factors with the scale folded in."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError

from soupkit.errors import AdapterError, UnsupportedAdapterError
from soupkit.io.adapter_config import FLOAT_TAGS, check_config_types, pattern_value, peft_targets, refuse_features, shown_targets
from soupkit.io.tensor_index import TensorIndex
from soupkit.ops import LoraFactors, all_finite

PREFIX = "base_model.model."  # PEFT's prefix of every tensor key in adapter_model.safetensors
# tensor-key suffix -> (module kind, factor)
SUFFIXES: dict[str, tuple[str, str]] = {
    ".lora_A.weight": ("linear", "A"),
    ".lora_B.weight": ("linear", "B"),
    ".lora_embedding_A": ("embedding", "A"),
    ".lora_embedding_B": ("embedding", "B"),
}
Kind = Literal["linear", "embedding", "param"]
BASE_LAYER_COPY = ".base_layer.weight"
LORA_BIAS = ".lora_B.bias"  # lora_bias: PEFT's lora_B is a Linear with a bias; the update adds s * bias
MAGNITUDE = ".lora_magnitude_vector"  # DoRA's per-output magnitude m, (d_out,)
BASE_LAYER = ".base_layer"  # PEFT nests one ParamWrapper per targeted parameter of a module under this name


@dataclass(frozen=True)
class ExpertSlice:
    """Expert ``index`` of a PEFT ``ParamWrapper`` LoRA on a 3-D parameter (num_experts, d1, d2).

    PEFT stores A as (r * E, a_in) with expert e in rows e*r:(e+1)*r, and B as (b_out, r * E) with
    expert e in columns e, e+E, e+2E, ... (``reshape(b_out, r, E)``). Expert e's update of
    ``param[e]`` (d1, d2) is ``s * B_e @ A_e``, or its transpose when ``transposed`` (PEFT's layout
    depends on its version and on the module's ``is_transposed``; io/experts.py resolves it).
    """

    index: int
    num_experts: int
    transposed: bool


@dataclass(frozen=True)
class ModuleSpec:
    """One adapted module, from headers and config only.

    Attributes:
        path: module path without PEFT's prefix, e.g. ``model.layers.0.self_attn.q_proj``; for a targeted
            parameter (``kind`` param) the parameter's path, plus ``.{expert}`` for a 3-D one.
        kind: ``linear`` (lora_A/lora_B), ``embedding`` (lora_embedding_A/B) or ``param`` (target_parameters:
            A is (rank, d_in) and B (d_out, rank) once sliced, d_out x d_in being the parameter (or expert) as stored).
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
    expert: ExpertSlice | None = None  # a 3-D parameter's expert: A and B are slices of the stored tensors
    magnitude_key: str | None = None  # DoRA: the key of m; the module's update is then t = W' - W (ops/dora.py)


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
        check_config_types(str(config_path), self.config)
        refuse_features(name, self.config)
        index = TensorIndex.from_dir(directory, "adapter_model")
        if index is None:
            found = "only adapter_model.bin (pickle)" if (directory / "adapter_model.bin").exists() else "no weights"
            raise AdapterError(
                f"adapter '{name}'", "adapter_model.safetensors", found, "convert it to safetensors (pickles are never loaded)"
            )
        self.index = index
        self.fan_in_fan_out = bool(self.config.get("fan_in_fan_out", False))
        self.base_layer_copies: dict[str, str] = {}  # module path -> key of a saved copy of its base weight
        # target_parameters: (module path, .base_layer depth) -> {"A": key, "B": key}; io/experts.py resolves these
        # against the base model's parameters and adds their ModuleSpecs to ``modules``
        self.param_wrappers: dict[tuple[str, int], dict[str, str]] = {}
        self.magnitudes: dict[str, str] = {}  # DoRA: module path -> key of its lora_magnitude_vector
        self._cached: dict[str, torch.Tensor] = {}  # the last A and B of a 3-D parameter: its E experts share them
        self.biases: dict[str, str] = {}  # lora_bias: module path -> key of its lora_B.bias (d_out,)
        self.saved: dict[str, str] = {}  # modules_to_save: tensor name (``lm_head.weight``) -> key of the trained copy
        self.modules = self._scan_modules()

    def _scan_modules(self) -> dict[str, ModuleSpec]:
        parts: dict[str, dict[str, str]] = {}
        kinds: dict[str, str] = {}
        for key in self.index.infos:
            if key.endswith(BASE_LAYER_COPY):  # PEFT saves embeddings' base weights beside their LoRA
                path = key.removeprefix(PREFIX).removesuffix(BASE_LAYER_COPY)
                self.base_layer_copies[path] = key
                continue
            if key.endswith(LORA_BIAS) and self.config.get("lora_bias"):
                self.biases[key.removeprefix(PREFIX).removesuffix(LORA_BIAS)] = key
                continue
            if key.endswith(MAGNITUDE) and self.config.get("use_dora"):
                self.magnitudes[key.removeprefix(PREFIX).removesuffix(MAGNITUDE)] = key
                continue
            suffix = next((s for s in SUFFIXES if key.endswith(s)), None)
            if suffix is None and self._saved_module(key):
                self.saved[key.removeprefix(PREFIX)] = key
                continue
            if suffix is None:
                raise UnsupportedAdapterError(
                    f"adapter '{self.name}' tensor {key}",
                    "only lora_A/lora_B (or lora_embedding_A/B) tensors",
                    "another tensor (a feature soupkit cannot merge as a low-rank update)",
                    "remove it, or merge the adapter into the model with PEFT",
                )
            path = key[: -len(suffix)]
            path = path.removeprefix(PREFIX)
            kinds[path], factor = SUFFIXES[suffix]
            parts.setdefault(path, {})[factor] = key
        if not parts and not self.saved:  # nothing to merge: almost certainly the wrong file, never a silent no-op
            files = ", ".join(str(f) for f in self.index.files)
            raise AdapterError(
                f"adapter '{self.name}' file {files}",
                "at least one LoRA tensor (lora_A/lora_B or lora_embedding_A/B)",
                "no LoRA tensor",
                "point path at the adapter you trained (PEFT's save_pretrained writes its LoRA tensors there)",
            )
        for path, key in [*self.base_layer_copies.items(), *self.magnitudes.items()]:
            if path not in parts:
                raise UnsupportedAdapterError(
                    f"adapter '{self.name}' tensor {key}",
                    "a base-layer copy or DoRA magnitude beside a LoRA",
                    "one without lora_A/lora_B",
                    "remove it",
                )
        if self.config.get("target_parameters"):
            for path in [p for p in parts if self._param_wrapper(p)]:
                depth = path.count(BASE_LAYER)
                self.param_wrappers[(path.replace(BASE_LAYER, ""), depth)] = parts.pop(path)
        for path, key in self.biases.items():
            if path not in parts:
                raise AdapterError(
                    f"adapter '{self.name}' tensor {key}", "a lora_B.bias beside its LoRA", "a bias alone", "re-save it"
                )
        for path in sorted(parts):
            if not peft_targets(self.config, path):
                raise UnsupportedAdapterError(
                    f"adapter '{self.name}' module {path}",
                    f"a module named by target_modules {shown_targets(self.config)} (PEFT never applies others)",
                    "LoRA tensors for it",
                    f"add '{path.rsplit('.', 1)[-1]}' to target_modules in adapter_config.json to apply them, or delete them",
                )
        return {path: self._module_spec(path, kinds[path], keys) for path, keys in sorted(parts.items())}

    def _param_wrapper(self, path: str) -> bool:
        """Whether LoRA tensors at ``path`` belong to a ParamWrapper (target_parameters), not to a module LoRA."""
        if BASE_LAYER in path:  # nested wrappers: a second targeted parameter of one module
            return True
        return self.config.get("target_modules") in (None, [], "") or not peft_targets(self.config, path)

    def _saved_module(self, key: str) -> bool:
        """Whether ``key`` is a tensor of a module PEFT saves whole (``modules_to_save``, matched by name suffix)."""
        entries = self.config.get("modules_to_save") or []
        module = key.removeprefix(PREFIX).rsplit(".", 1)[0]
        return isinstance(entries, list) and any(module == e or module.endswith(f".{e}") for e in entries)

    def _module_spec(self, path: str, kind: str, keys: dict[str, str]) -> ModuleSpec:
        where = f"adapter '{self.name}' module {path}"
        if set(keys) != {"A", "B"}:
            raise AdapterError(where, "both lora_A and lora_B", f"only lora_{''.join(keys)}", "re-save the adapter")
        a_info, b_info = self.index.infos[keys["A"]], self.index.infos[keys["B"]]
        a_shape, b_shape = a_info.shape, b_info.shape
        for key, info in ((keys["A"], a_info), (keys["B"], b_info)):
            if info.dtype not in FLOAT_TAGS:
                raise UnsupportedAdapterError(
                    f"adapter '{self.name}' tensor {key}",
                    "a float tensor (F16, BF16, F32, F64)",
                    info.dtype,
                    "dequantise the adapter first",
                )
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise UnsupportedAdapterError(
                where, "2-D factors (Linear or Embedding)", f"shapes {a_shape}, {b_shape}", "conv LoRAs are not supported"
            )
        rank = a_shape[0]
        if rank == 0:
            raise AdapterError(
                where, "rank >= 1", f"rank 0 (A of shape {a_shape})", "drop the module from the adapter or re-save it"
            )
        if b_shape[1] != rank:
            raise AdapterError(where, f"B of shape (d_out, {rank})", f"{b_shape}", "re-save the adapter")
        config_rank = pattern_value(self.config.get("rank_pattern") or {}, path, self.config.get("r", rank))
        if int(config_rank) != rank:
            raise AdapterError(
                where, f"rank {int(config_rank)} (from adapter_config.json)", f"tensors of rank {rank}", "fix r / rank_pattern"
            )
        alpha = pattern_value(self.config.get("alpha_pattern") or {}, path, self.config.get("lora_alpha", rank))
        scale = alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank
        magnitude = self._magnitude_key(path, b_shape[0])
        return ModuleSpec(path, kind, keys["A"], keys["B"], rank, a_shape[1], b_shape[0], float(scale), None, magnitude)  # type: ignore[arg-type]

    def _magnitude_key(self, path: str, d_out: int) -> str | None:
        """A DoRA module's magnitude key: every module of a use_dora adapter has one, of shape (d_out,)."""
        if not self.config.get("use_dora"):
            return None
        key = self.magnitudes.get(path)
        where = f"adapter '{self.name}' module {path}"
        if key is None:
            raise AdapterError(where, f"a {MAGNITUDE[1:]} (use_dora: true)", "none", "re-save the adapter with PEFT")
        info = self.index.infos[key]
        if tuple(info.shape) != (d_out,) or info.dtype not in FLOAT_TAGS:
            raise AdapterError(
                f"adapter '{self.name}' tensor {key}",
                f"a float vector of shape ({d_out},)",
                f"{info.dtype} {info.shape}",
                "re-save the adapter with PEFT",
            )
        return key

    def load_magnitude(self, path: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """DoRA's magnitude m of one module, float32 (d_out,)."""
        key = self.modules[path].magnitude_key
        assert key is not None
        m = self._read(key).to(device=device, dtype=torch.float32)
        if not all_finite(m):
            raise AdapterError(
                f"adapter '{self.name}' tensor {key}", "finite values", "NaN or Inf entries", "retrain or repair the adapter"
            )
        return m

    def load(self, path: str, device: torch.device | str = "cpu") -> LoraFactors:
        """Read one module's factors as float32 on ``device``, with the scale folded into B."""
        spec = self.modules[path]
        keep = spec.expert is not None
        A, B = self._read(spec.a_key, keep), self._read(spec.b_key, keep)
        if spec.expert is not None:
            e, n = spec.expert.index, spec.expert.num_experts
            A, B = A[e * spec.rank : (e + 1) * spec.rank], B[:, e::n]
            if spec.expert.transposed:  # delta[e] = (B_e A_e)^T = A_e^T B_e^T
                A, B = B.T, A.T
            A, B = A.contiguous(), B.contiguous()
        A = A.to(device=device, dtype=torch.float32)
        B = B.to(device=device, dtype=torch.float32) * spec.scale
        for key, tensor in ((spec.a_key, A), (spec.b_key, B)):
            self._check_finite(key, tensor)
        return LoraFactors(A=A, B=B)

    def load_bias(self, path: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """lora_bias: module ``path``'s bias update s * b, (d_out,) float32 on ``device``."""
        bias = self._read(self.biases[path]).to(device=device, dtype=torch.float32) * self.modules[path].scale
        self._check_finite(self.biases[path], bias)
        return bias

    def load_saved(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """modules_to_save: the trained copy of tensor ``name`` (e.g. ``lm_head.weight``), float32 on ``device``."""
        tensor = self._read(self.saved[name]).to(device=device, dtype=torch.float32)
        self._check_finite(self.saved[name], tensor)
        return tensor

    def _check_finite(self, key: str, tensor: torch.Tensor) -> None:
        if not all_finite(tensor):
            bad = int((~torch.isfinite(tensor)).sum())
            raise AdapterError(
                f"adapter '{self.name}' tensor {key}",
                "finite values",
                f"{bad} NaN or Inf entries",
                "retrain or repair the adapter",
            )

    def _read(self, key: str, keep: bool = False) -> torch.Tensor:
        """One stored tensor; a file safetensors cannot parse is a user error, not a traceback.

        ``keep``: cache it, with the one kept read before it (each of E experts reads the same stored A and B).
        """
        if key in self._cached:
            return self._cached[key]
        try:
            tensor = self.index.get(key)
            if keep:
                self._cached = {**dict(list(self._cached.items())[-1:]), key: tensor}
            return tensor
        except (SafetensorError, OSError) as err:  # a corrupt file or an I/O error; anything else is a bug and raises
            file = self.index.infos[key].file
            raise AdapterError(
                f"adapter '{self.name}' tensor {key}",
                f"a readable tensor in {file}",
                f"{type(err).__name__}: {err}"[:200],
                "re-download or re-save the file",
            ) from None

    def files(self) -> list[Path]:
        """Every file of the adapter that the merge reads."""
        return [self.directory / "adapter_config.json", *self.index.files]
