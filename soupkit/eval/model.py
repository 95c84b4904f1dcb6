"""A model loaded once, with a low-rank update on each adapted module that can be swapped in place.

Each adapted module gets a forward hook that adds ``((x A^T) * s) B^T`` to its output, with
A (r, d_in), B (d_out, r) and an optional per-rank scale s (r,): the same update a PEFT LoRA layer
adds, for Linear and Conv1D alike (both see x as (..., d_in)); an Embedding adds
``embedding(ids, A^T) B^T``. Swapping a trial's merged factors in is a dictionary update: the base
weights are never copied, reloaded or modified, and the base stays on the device between trials.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from soupkit.errors import SoupkitError


@dataclass
class LowRankUpdate:
    """One module's update: A (r, d_in), B (d_out, r), optional per-rank scale (r,), in the model's dtype."""

    A: torch.Tensor
    B: torch.Tensor
    rank_scale: torch.Tensor | None = None


class ScoringModel:
    """A causal LM and its tokenizer, on one device, with swappable low-rank updates.

    Args:
        model: a transformers causal LM (put in eval mode; its weights are never written).
        tokenizer: its tokenizer (a pad token is set to eos if it has none).
    """

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.updates: dict[str, LowRankUpdate] = {}
        self._hooks: dict[str, Any] = {}

    def _hook(self, path: str, module: nn.Module) -> Any:
        embedding = isinstance(module, nn.Embedding)

        def add_update(mod: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            update = self.updates.get(path)
            if update is None:
                return output
            x = args[0]
            h = F.embedding(x, update.A.T) if embedding else x.to(update.A.dtype) @ update.A.T
            if update.rank_scale is not None:
                h = h * update.rank_scale
            return output + (h @ update.B.T).to(output.dtype)

        return add_update

    def set_updates(self, updates: dict[str, LowRankUpdate]) -> None:
        """Replace every update (modules absent from ``updates`` run as the plain base)."""
        for path in updates:
            if path not in self._hooks:
                try:
                    module = self.model.get_submodule(path)
                except AttributeError:
                    raise SoupkitError(
                        f"module {path}", "a module of the loaded model", "no such module", "check the base model"
                    ) from None
                self._hooks[path] = module.register_forward_hook(self._hook(path, module))
        self.updates = dict(updates)

    def update(self, A: torch.Tensor, B: torch.Tensor, rank_scale: torch.Tensor | None = None) -> LowRankUpdate:
        """Factors moved to this model's device and dtype."""
        to = {"device": self.device, "dtype": self.dtype}
        return LowRankUpdate(A.to(**to), B.to(**to), None if rank_scale is None else rank_scale.to(**to))

    def remove_hooks(self) -> None:
        for handle in self._hooks.values():
            handle.remove()
        self._hooks, self.updates = {}, {}


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU (half the memory, tensor cores), float32 on the CPU (bf16 matmuls are slow there)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def pick_device(name: str) -> torch.device:
    """``auto``: the first visible GPU, else the CPU; ``cuda`` without one is a one-line error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SoupkitError("--device", "a visible CUDA GPU", "none", "use --device cpu")
    return torch.device(name)


def load_scoring_model(directory: Path, device: torch.device, dtype: torch.dtype | None = None) -> ScoringModel:
    """Load a causal LM and tokenizer from a local folder (the base, or a full merged model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # soupkit shows its own progress; no "Loading weights" frames in logs

    if not any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise SoupkitError(
            str(directory), "tokenizer files beside the model", "none", "copy the tokenizer files into the model folder"
        )
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype or default_dtype(device)).to(device)
    return ScoringModel(model, tokenizer)
