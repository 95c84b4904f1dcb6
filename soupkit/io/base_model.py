"""The base model as soupkit needs it: its config and its tensor headers, never its weights."""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path

import torch

from soupkit.errors import AdapterError, SoupkitError, UnsupportedAdapterError
from soupkit.io.adapter import LoraAdapter, ModuleSpec
from soupkit.io.checkpoint_layout import CheckpointLayout, checkpoint_layout, meta_model
from soupkit.io.tensor_index import TensorIndex

LAYER_INDEX = re.compile(r"\.(\d+)\.")


def layer_of(path: str) -> int | None:
    """The transformer-block index in a module path (``model.layers.3.mlp`` -> 3), or None."""
    match = LAYER_INDEX.search(f".{path}.")
    return int(match.group(1)) if match else None


class BaseModelInfo:
    """config.json plus a header-only index of the base model's safetensors.

    Args:
        directory: a Hugging Face model directory (config.json + model*.safetensors).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        config_path = directory / "config.json"
        if not config_path.is_file():
            raise SoupkitError("base_model", f"a model directory with config.json at {directory}", "none", "check base_model")
        try:
            self.config: dict = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise SoupkitError(
                str(config_path), "valid JSON", f"a parse error ({getattr(err, 'msg', err)})", "fix or re-download the file"
            ) from None
        if not isinstance(self.config, dict):
            raise SoupkitError(str(config_path), "a JSON object", type(self.config).__name__, "fix or re-download the file")
        index = TensorIndex.from_dir(directory, "model")
        if index is None:
            raise SoupkitError(
                "base_model",
                f"model.safetensors (or an index) in {directory}",
                "no safetensors weights",
                "save the base with safe_serialization=True",
            )
        self.index = index
        layers = {layer_of(k) for k in index.keys()} - {None}
        text_config = self.config.get("text_config", self.config)
        self.num_layers: int = int(
            text_config.get("num_hidden_layers") or text_config.get("n_layer") or (max(layers) + 1 if layers else 0)  # type: ignore[type-var]
        )
        # module-path tensor name -> checkpoint key; the identity until adopt_module_paths finds renamed keys
        self.key_of: dict[str, str] = {key: key for key in index.keys()}
        self._layout: CheckpointLayout | None = None

    def layout(self) -> CheckpointLayout:
        """transformers' renaming of this checkpoint's keys (built once, on first need: it imports transformers)."""
        if self._layout is None:
            self._layout = checkpoint_layout(self.directory, self.config, list(self.index.keys()))
        return self._layout

    def adopt_module_paths(self, paths: list[str]) -> None:
        """Name tensors by module path (``model.language_model.layers.0...``) when the adapters do.

        A checkpoint saved under other keys (llava's ``language_model.model.layers.0...``) is read
        through transformers' own renaming. Adapters whose paths are the checkpoint's keys keep the
        identity (the naming that finds more of the paths wins); a path found in neither is reported
        by ``check_module``.
        """
        if all(f"{p}.weight" in self.index for p in paths):
            return
        renamed = self.layout().model_to_checkpoint
        found = sum(f"{p}.weight" in renamed for p in paths)
        if found > sum(f"{p}.weight" in self.index for p in paths):
            self.key_of = dict(renamed)

    def weight_key(self, path: str) -> str | None:
        """The checkpoint key of the base tensor updated by module ``path`` (``path.weight``), if the base has it."""
        return self.key_of.get(f"{path}.weight")

    def checkpoint_key(self, name: str) -> str | None:
        """The checkpoint key of model parameter ``name`` (as ``named_parameters`` spells it), if stored."""
        if name in self.key_of:
            return self.key_of[name]
        return self.layout().model_to_checkpoint.get(name)

    def tied_source(self, name: str) -> str | None:
        """The checkpoint key of the input embedding when ``name`` (``lm_head.weight``) is a tied head the checkpoint omits."""
        try:
            model = meta_model(self.directory, self.config)
        except ValueError:
            return None
        if not getattr(model.config.get_text_config(), "tie_word_embeddings", False):
            return None
        names = {id(module): path for path, module in model.named_modules()}
        head, embed = model.get_output_embeddings(), model.get_input_embeddings()
        if head is None or embed is None or f"{names.get(id(head))}.weight" != name:
            return None
        return self.checkpoint_key(f"{names[id(embed)]}.weight")

    def missing_tensor(self, path: str) -> str:
        """What to say when ``path.weight`` is not in the base: the key looked for and the nearest stored names."""
        key = f"{path}.weight"
        names = set(self.key_of) | set(self.index.keys())
        leaf = key.rsplit(".", 2)[-2]
        near = difflib.get_close_matches(key, [n for n in names if f".{leaf}." in f".{n}"] or names, n=2, cutoff=0.0)
        layout = self.layout()
        how = f"keys as transformers loads {layout.architecture}" if layout.architecture else (layout.problem or "")
        return f"no tensor {key} in the base ({how}); nearest: {', '.join(near) or 'none'}"

    def check_module(self, adapter: LoraAdapter, spec: ModuleSpec) -> None:
        """Refuse a module whose factor shapes do not fit the base weight (names both shapes)."""
        key = self.weight_key(spec.path)
        where = f"adapter '{adapter.name}' tensor {spec.a_key}"
        if key is None:
            tied = (
                " (lm_head tied to the input embeddings is not stored separately, so soupkit cannot target it)"
                if spec.path.endswith("lm_head")
                else ""
            )
            raise AdapterError(
                where,
                f"a base tensor for module {spec.path}",
                f"{self.missing_tensor(spec.path)}{tied}",
                "check that the adapter was trained on this base",
            )
        base_shape = self.index.infos[key].shape
        transposed = spec.kind == "embedding" or adapter.fan_in_fan_out
        expected = (spec.d_in, spec.d_out) if transposed else (spec.d_out, spec.d_in)
        if tuple(base_shape) != expected:
            raise AdapterError(
                where,
                f"base {key} of shape {expected} for A {(spec.rank, spec.d_in)} and B {(spec.d_out, spec.rank)}",
                f"shape {tuple(base_shape)}",
                "use the base model the adapter was trained on",
            )
        self.check_base_layer_copy(adapter, spec, key)

    def check_base_layer_copy(self, adapter: LoraAdapter, spec: ModuleSpec, base_key: str) -> None:
        """PEFT saves an embedding's base weight beside its LoRA; it must equal ours, or the vocabulary was changed.

        Reads that one base tensor (an embedding matrix) once per adapter module that carries a copy.
        """
        key = adapter.base_layer_copies.get(spec.path)
        if key is None:
            return
        where = f"adapter '{adapter.name}' tensor {key}"
        copy_shape, base_shape = adapter.index.infos[key].shape, self.index.infos[base_key].shape
        if tuple(copy_shape) != tuple(base_shape):
            raise UnsupportedAdapterError(
                where,
                f"the base's {base_key} shape {tuple(base_shape)}",
                f"shape {tuple(copy_shape)} (a resized vocabulary)",
                "merge it into the model with PEFT",
            )
        base = self.index.get(base_key)
        if not torch.equal(adapter.index.get(key).to(base.dtype), base):
            raise UnsupportedAdapterError(
                where,
                f"a copy equal to the base's {base_key}",
                "different values (trained or resized embeddings)",
                "merge it into the model with PEFT",
            )

    def files(self) -> list[Path]:
        return [self.directory / "config.json", *self.index.files]
