"""Module paths -> the base checkpoint's own tensor keys, by the rules transformers itself loads with.

A checkpoint does not always store a tensor under its module path. transformers 5 saves a llava
model under ``language_model.model.layers.N...`` and a qwen2_vl model under ``model.layers.N...``,
while the modules (and so PEFT's adapter keys) live at ``model.language_model.layers.N...``; on
load it renames each checkpoint key through the model's conversion mapping and base-model prefix.
soupkit asks transformers for those same rules rather than keep a table of its own: it builds the
model named in ``config.json``'s ``architectures`` on the meta device (no weights), collects
``get_model_conversion_mapping`` (transformers >= 5; ``_checkpoint_conversion_mapping`` before),
and renames every checkpoint key as ``from_pretrained`` would. Only 1:1 renames are kept: a key
that a converter fuses or splits (e.g. per-expert weights into one fused tensor) has no single
module tensor, so it is left out of the map.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class CheckpointLayout:
    """How one base checkpoint's keys relate to its model's parameter names.

    Attributes:
        model_to_checkpoint: model parameter name -> checkpoint key, for every 1:1 key.
        architecture: the class transformers built (``LlavaForConditionalGeneration``), or None.
        problem: why no mapping could be built (unknown architecture, ...), or None.
    """

    model_to_checkpoint: dict[str, str] = field(default_factory=dict)
    architecture: str | None = None
    problem: str | None = None

    @property
    def renamed(self) -> bool:
        """Whether any checkpoint key differs from its model name."""
        return any(m != c for m, c in self.model_to_checkpoint.items())


def meta_model(directory: Path, config: dict) -> Any:
    """The model class named by ``config.json``'s ``architectures``, built on the meta device (no weights).

    Raises ValueError with the reason when transformers cannot build it.
    """
    import transformers
    from transformers import AutoConfig

    names = config.get("architectures") or []
    name = names[0] if isinstance(names, list) and names and isinstance(names[0], str) else None
    cls = getattr(transformers, name, None) if name else None
    if cls is None:
        raise ValueError(f"config.json architectures {names!r} is not a transformers class")
    try:
        hf_config = AutoConfig.from_pretrained(directory)
        with torch.device("meta"):
            return cls(hf_config)
    except (ValueError, KeyError, TypeError, AttributeError, OSError, ImportError, RuntimeError, NotImplementedError) as err:
        raise ValueError(f"transformers cannot build {name}: {type(err).__name__}: {err}"[:200]) from None


def _renamer_v5(model: Any, meta_keys: set[str]) -> Any:
    """transformers >= 5: its own ``rename_source_key`` over the model's conversion mapping (None if absent)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:
        return None
    conversions = get_model_conversion_mapping(model)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    prefix = model.base_model_prefix
    meta_state = dict.fromkeys(meta_keys, True)  # rename_source_key only asks .get(key) is not None

    def rename(key: str) -> str | None:
        renamed, converted = rename_source_key(key, renamings, converters, prefix, meta_state)
        if renamed not in meta_keys and key in meta_keys:  # as from_pretrained: undo a needless rename
            renamed, converted = rename_source_key(key, [], [], prefix, meta_state)
        return renamed if converted is None else None

    return rename


def _renamer_v4(model: Any, meta_keys: set[str]) -> Any:
    """transformers 4.x: the class's ``_checkpoint_conversion_mapping`` (first matching regex), then the prefix."""
    mapping: dict[str, str] = getattr(model, "_checkpoint_conversion_mapping", None) or {}
    prefix = model.base_model_prefix

    def rename(key: str) -> str | None:
        for pattern, replacement in mapping.items():
            key, n = re.subn(pattern, replacement, key)
            if n:
                break
        if key not in meta_keys and prefix:
            if f"{prefix}.{key}" in meta_keys:
                return f"{prefix}.{key}"
            if key.startswith(f"{prefix}.") and key.removeprefix(f"{prefix}.") in meta_keys:
                return key.removeprefix(f"{prefix}.")
        return key

    return rename


def checkpoint_layout(directory: Path, config: dict, checkpoint_keys: list[str]) -> CheckpointLayout:
    """Rename every checkpoint key as transformers' ``from_pretrained`` would, keeping the 1:1 renames."""
    try:
        model = meta_model(directory, config)
    except ValueError as err:
        return CheckpointLayout(problem=str(err))
    meta_keys = set(model.state_dict())
    rename = _renamer_v5(model, meta_keys) or _renamer_v4(model, meta_keys)
    out: dict[str, str] = {}
    for key in checkpoint_keys:
        renamed = rename(key)
        if renamed is not None and renamed in meta_keys:
            out.setdefault(renamed, key)
    return CheckpointLayout(out, type(model).__name__)
