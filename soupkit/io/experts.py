"""LoRA on ``nn.Parameter``s (PEFT ``target_parameters``): fused MoE expert tensors and routers.

PEFT (``peft/tuners/lora/layer.py``, ``ParamWrapper``) wraps each targeted parameter of a module; a
second targeted parameter of the same module wraps the first wrapper, so its tensors sit one
``.base_layer`` deeper. Parameters are wrapped in the module's own parameter order (the first one
is the innermost). A 2-D parameter (a router's ``gate.weight``, (d_out, d_in)) gets a plain
``B @ A``. A 3-D parameter (E, d1, d2) gets E low-rank updates packed into one A and one B (see
``ExpertSlice``), and which of ``B_e @ A_e`` or its transpose updates ``param[e]`` depends on the
PEFT version (``expert_transposed``). Each expert is merged as a module of its own.

The base checkpoint may store the fused tensor itself (gpt-oss) or one tensor per expert and
projection (Mixtral, Qwen-MoE checkpoints, which transformers 5 fuses on load with its conversion
mapping); ``checkpoint_pieces`` maps an expert's rows to the stored tensors either way.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

from soupkit.errors import AdapterError, SoupkitError, UnsupportedAdapterError, did_you_mean
from soupkit.io.adapter import ExpertSlice, LoraAdapter, ModuleSpec
from soupkit.io.adapter_config import FLOAT_TAGS, pattern_value
from soupkit.io.tensor_index import TensorIndex

Piece = tuple[str, int, int, int]  # (checkpoint key, its first row (2-D view) that is updated, rows lo:hi of the expert)
OUTPUT_PEFT_VERSION = "0.21.0"  # soupkit writes 3-D parameter LoRAs in the layout of PEFT >= 0.19.1


@dataclass(frozen=True)
class TargetedParam:
    """One parameter of the base model as its module holds it (a meta-device instance: shapes only)."""

    module: str  # e.g. model.layers.0.mlp.experts
    name: str  # e.g. gate_up_proj
    shape: tuple[int, ...]  # (E, d1, d2) or (d_out, d_in)
    module_transposed: bool  # transformers' ``is_transposed``: the experts store (E, in, out)

    @property
    def path(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(frozen=True)
class ParamSlot:
    """Where a merged targeted parameter (or one expert of it) goes: the PEFT output and the checkpoint."""

    param: TargetedParam
    expert: int | None  # None for a 2-D parameter
    depth: int  # ``.base_layer`` nesting of its ParamWrapper in the output adapter
    pieces: tuple[Piece, ...]  # checkpoint tensors this update is added to


class ParamStructure:
    """The base model's parameters by module, from ``AutoModelForCausalLM.from_config`` on the meta device."""

    def __init__(self, directory: Path) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        try:
            config = AutoConfig.from_pretrained(directory)
            with torch.device("meta"):  # names and shapes only: no weights are allocated
                model = AutoModelForCausalLM.from_config(config)
        except (ValueError, KeyError, OSError, ImportError) as err:
            raise UnsupportedAdapterError(
                "base_model",
                "a model transformers builds from config.json (needed to place target_parameters LoRAs)",
                f"{type(err).__name__}: {err}"[:160],
                "upgrade transformers, or merge the adapter with PEFT's merge_and_unload",
            ) from None
        self.model_type: str = getattr(config, "model_type", "")
        self.params: dict[str, list[TargetedParam]] = {}
        for name, module in model.named_modules():
            own = [(n, tuple(p.shape)) for n, p in module.named_parameters(recurse=False)]
            transposed = bool(getattr(module, "is_transposed", False))
            if own and name:
                self.params[name] = [TargetedParam(name, n, shape, transposed) for n, shape in own]

    def targeted(self, targets: list[str]) -> dict[str, list[TargetedParam]]:
        """PEFT's match (``_inject_parameters``): ``module.param`` equals or ends with ``.t``; wrap order = parameter order."""
        out = {}
        for module, params in self.params.items():
            hit = [p for p in params if any(p.path == t or p.path.endswith(f".{t}") for t in targets)]
            if hit:
                out[module] = hit
        return out


def param_structure(base: object) -> ParamStructure:
    """The (cached) parameter structure of a ``BaseModelInfo``."""
    cached = getattr(base, "_param_structure", None)
    if cached is None:
        cached = ParamStructure(base.directory)  # type: ignore[attr-defined]
        base._param_structure = cached  # type: ignore[attr-defined]
    return cached


def _release(version: str) -> tuple[int, int, int] | None:
    match = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2]), int(match[3])) if match else None


def expert_transposed(version: object, module_transposed: bool) -> bool | None:
    """Whether PEFT ``version`` adds ``(B_e A_e)^T`` (not ``B_e A_e``) to a square expert; None if it cannot tell.

    PEFT < 0.19.0 never swapped in/out (einsum ``e i o``: transposed). 0.19.0 swapped when the module is
    ``is_transposed`` (PR #3083), which was the wrong way round; 0.19.1 swaps when it is not (PR #3165).
    ``peft_version`` is written since PEFT 0.18.0; target_parameters exist since 0.17.0, so a config
    without it comes from 0.17.x. A development build between 0.18.1 and 0.20.0 cannot be placed.
    """
    if version is None:
        return True
    release = _release(str(version).partition("@")[0])
    if release is None:
        loose = re.match(r"(\d+)\.(\d+)", str(version))
        if loose is None or (0, 18) <= (int(loose[1]), int(loose[2])) <= (0, 20):
            return None
        release = (int(loose[1]), int(loose[2]), 0)
    if release < (0, 19, 0):
        return True
    if release < (0, 19, 1):
        return not module_transposed
    return module_transposed


def _expert_layout(adapter: LoraAdapter, param: TargetedParam, a_in: int, b_out: int, where: str) -> bool:
    """True if expert e's update of ``param[e]`` is ``(B_e A_e)^T``, from the shapes, or from the version if square."""
    _, d1, d2 = param.shape
    direct, flipped = (a_in, b_out) == (d2, d1), (a_in, b_out) == (d1, d2)
    if direct != flipped:
        return flipped
    if not direct:
        raise AdapterError(
            where,
            f"A (r*E, {d2}) and B ({d1}, r*E){'' if d1 == d2 else f', or A (r*E, {d1}) and B ({d2}, r*E)'}"
            f" for {param.path} of shape {param.shape}",
            f"A (.., {a_in}) and B ({b_out}, ..)",
            "use the base model the adapter was trained on",
        )
    version = adapter.config.get("peft_version")
    transposed = expert_transposed(version, param.module_transposed)
    if transposed is None:
        raise UnsupportedAdapterError(
            where,
            f"a PEFT version that fixes the in/out layout of the square expert tensor {param.path} {param.shape}",
            f"peft_version {version!r} (a development build from when PEFT changed that layout)",
            "set peft_version in adapter_config.json to the release that trained it, or re-save it with PEFT >= 0.19.1",
        )
    return transposed


def _specs_for(adapter: LoraAdapter, param: TargetedParam, keys: dict[str, str]) -> dict[str, ModuleSpec]:
    """The ModuleSpecs of one wrapped parameter: one for a 2-D parameter, one per expert for a 3-D one."""
    where = f"adapter '{adapter.name}' tensor {keys.get('A') or keys.get('B')}"
    if set(keys) != {"A", "B"}:
        raise AdapterError(where, "both lora_A and lora_B", f"only lora_{''.join(keys)}", "re-save the adapter")
    a_info, b_info = adapter.index.infos[keys["A"]], adapter.index.infos[keys["B"]]
    for key, info in ((keys["A"], a_info), (keys["B"], b_info)):
        if info.dtype not in FLOAT_TAGS or len(info.shape) != 2:
            raise UnsupportedAdapterError(
                f"adapter '{adapter.name}' tensor {key}", "a 2-D float tensor", info.dtype, "re-save it"
            )
    rank = int(pattern_value(adapter.config.get("rank_pattern") or {}, param.path, adapter.config.get("r", a_info.shape[0])))
    alpha = pattern_value(adapter.config.get("alpha_pattern") or {}, param.path, adapter.config.get("lora_alpha", rank))
    scale = float(alpha / rank**0.5 if adapter.config.get("use_rslora") else alpha / rank)
    experts = param.shape[0] if len(param.shape) == 3 else 1
    (a_rows, a_in), (b_out, b_cols) = a_info.shape, b_info.shape
    if a_rows != rank * experts or b_cols != rank * experts:
        raise AdapterError(
            where,
            f"A ({rank * experts}, ..) and B (.., {rank * experts}) for rank {rank} x {experts} expert(s) of {param.path}",
            f"A {a_info.shape} and B {b_info.shape}",
            "fix r / rank_pattern in adapter_config.json",
        )
    if len(param.shape) == 2:
        if (b_out, a_in) != param.shape:
            raise AdapterError(
                where, f"B @ A of the shape of {param.path} {param.shape}", f"({b_out}, {a_in})", "use the base it was trained on"
            )
        return {param.path: ModuleSpec(param.path, "param", keys["A"], keys["B"], rank, a_in, b_out, scale)}
    if len(param.shape) != 3:
        raise UnsupportedAdapterError(
            where, "a 2-D or 3-D target parameter", f"{param.path} of shape {param.shape}", "merge it with PEFT"
        )
    transposed = _expert_layout(adapter, param, a_in, b_out, where)
    _, d1, d2 = param.shape
    return {
        f"{param.path}.{e}": ModuleSpec(
            f"{param.path}.{e}", "param", keys["A"], keys["B"], rank, d2, d1, scale, ExpertSlice(e, experts, transposed)
        )
        for e in range(experts)
    }


def attach_param_targets(adapter: LoraAdapter, structure: ParamStructure) -> None:
    """Resolve the adapter's ParamWrapper tensors against the base and add their ModuleSpecs to ``adapter.modules``."""
    if not adapter.param_wrappers:
        return
    targets = adapter.config.get("target_parameters") or []
    targeted = structure.targeted(list(targets))
    for (module, depth), keys in sorted(adapter.param_wrappers.items()):
        params = targeted.get(module, [])
        if depth >= len(params):
            key = keys.get("A") or keys.get("B")
            names = [p.path for ps in structure.params.values() for p in ps]
            raise AdapterError(
                f"adapter '{adapter.name}' tensor {key}",
                f"a parameter of {module} named by target_parameters {list(targets)!r}",
                f"{len(params)} such parameter(s) for a wrapper at depth {depth}{did_you_mean(module, names)}",
                "use the base model the adapter was trained on",
            )
        adapter.modules.update(_specs_for(adapter, params[len(params) - 1 - depth], keys))
    adapter.modules = dict(sorted(adapter.modules.items()))


def _renamed_candidates(key: str, model_type: str) -> list[str]:
    """``key`` and its names under transformers' renamings reversed (e.g. mlp -> block_sparse_moe)."""
    out = [key]
    for transform in _conversions(model_type):
        if type(transform).__name__ != "WeightRenaming":
            continue
        source, target = (p.replace("\\.", ".") for p in (transform.source_patterns[0], transform.target_patterns[0]))
        if re.search(r"[\\^$()\[\]*+?|{}]", source + target) is None and target in key:
            out.append(key.replace(target, source))
    return out


@functools.lru_cache(maxsize=8)
def _conversions(model_type: str) -> tuple:
    """transformers' checkpoint conversion of ``model_type`` (cached: asked for every expert of every layer)."""
    from transformers import conversion_mapping

    aliases = getattr(conversion_mapping, "_MODEL_TO_CONVERSION_PATTERN", {})
    return tuple(conversion_mapping.get_checkpoint_conversion_mapping(aliases.get(model_type, model_type)) or [])


def checkpoint_pieces(index: TensorIndex, model_type: str, param: TargetedParam, expert: int | None) -> tuple[Piece, ...]:
    """The checkpoint tensors (and rows) that hold ``param`` (or its expert ``expert``), as ``Piece``s.

    Stored whole: the tensor itself (expert e at rows e*d1 of its (E*d1, d2) view). Stored per expert
    (transformers' ``MergeModulelist(dim=0)`` then optionally ``Concatenate(dim=1)``): the source
    tensors of expert e, stacked along d1 in the converter's order.
    """
    d1, d2 = param.shape[-2:]
    for key in _renamed_candidates(param.path, model_type):
        if key in index and tuple(index.infos[key].shape) == param.shape:
            return ((key, (expert or 0) * d1, 0, d1),)
    if expert is not None:
        for transform in _conversions(model_type):
            pieces = _converted_pieces(index, model_type, transform, param, expert)
            if pieces:
                return pieces
    near = [k for k in index.keys() if k.startswith(param.module.rsplit(".", 1)[0])][:3]
    raise SoupkitError(
        f"base_model tensor for {param.path}" + ("" if expert is None else f" expert {expert}"),
        f"{param.path} of shape {param.shape}, or its per-expert tensors under transformers' conversion mapping",
        f"neither (near names: {', '.join(near) or 'none'})",
        "use the base model the adapter was trained on",
    )


def _converted_pieces(
    index: TensorIndex, model_type: str, transform: object, param: TargetedParam, expert: int
) -> tuple[Piece, ...]:
    if type(transform).__name__ != "WeightConverter" or len(transform.target_patterns) != 1:  # type: ignore[attr-defined]
        return ()
    target = transform.target_patterns[0]  # type: ignore[attr-defined]
    if not (param.path.endswith(target) and (target.startswith(".") or param.path.endswith(f".{target}"))):
        return ()
    ops = [(type(op).__name__, getattr(op, "dim", None)) for op in transform.operations]  # type: ignore[attr-defined]
    if ops not in ([("MergeModulelist", 0)], [("MergeModulelist", 0), ("Concatenate", 1)]):
        raise UnsupportedAdapterError(
            f"base_model tensors of {param.path}",
            "experts stored whole, or per expert and stacked (transformers' MergeModulelist/Concatenate)",
            f"a conversion {ops}",
            "merge the adapter with PEFT's merge_and_unload",
        )
    prefix = param.path[: -len(target)]
    pieces, row = [], 0
    for source in transform.source_patterns:  # type: ignore[attr-defined]
        wanted = prefix + source.replace("*", str(expert))
        key = next((k for k in _renamed_candidates(wanted, model_type) if k in index), None)
        if key is None:
            return ()
        rows, cols = index.infos[key].shape
        pieces.append((key, 0, row, row + rows))
        row += rows
        if cols != param.shape[-1]:
            return ()
    return tuple(pieces) if row == param.shape[-2] else ()
