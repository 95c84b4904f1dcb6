"""Full merged model export: fold each merged update into the base weight as the base streams past.

For every tensor of the base, in layer order: if it is a target module, read the base weight in
row blocks, add the merged delta (from the factors, in float32, never materialised whole), cast back
to the base dtype and write; otherwise copy its bytes through unchanged. Memory holds one row block
and one layer's merged factors, whatever the model size. The directory written is what
``AutoModelForCausalLM.from_pretrained`` loads: sharded safetensors (+ index), config.json,
generation_config.json and the tokenizer files of the base.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from soupkit.errors import SoupkitError
from soupkit.io.base_model import BaseModelInfo, layer_of
from soupkit.io.sharded import ShardedWriter, TensorSpec, read_range, tensor_ranges
from soupkit.io.tensor_index import DTYPES
from soupkit.methods import LoraFactors
from soupkit.plan import ModulePlan, Plan

if TYPE_CHECKING:
    from soupkit.execute import Inputs, RunOptions
    from soupkit.recipe.schema import Recipe

BLOCK_ELEMENTS = 8 * 1024 * 1024  # rows per block are chosen so a float32 block is ~32 MB
ITEMSIZE = {dt: size for dt, size in DTYPES.values()}  # torch dtype -> bytes per element
COPIED_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def delta_rows(factors: LoraFactors, lo: int, hi: int, transposed: bool) -> torch.Tensor:
    """Rows ``lo:hi`` of the update as stored in the base weight, in float32.

    A is (r, d_in), B is (d_out, r), delta = B @ A is (d_out, d_in). A Linear stores (d_out, d_in);
    a GPT-2 Conv1D (fan_in_fan_out) and an Embedding store (d_in, d_out), i.e. delta transposed,
    whose rows are ``A[:, lo:hi].T @ B.T``.
    """
    if transposed:
        return factors.A[:, lo:hi].T @ factors.B.T
    return factors.B[lo:hi] @ factors.A


def merged_blocks(fd: int, offset: int, dtype: torch.dtype, shape: tuple[int, ...], factors: LoraFactors, transposed: bool) -> Iterator[torch.Tensor]:
    """Yield the merged weight in row blocks: base rows read from ``fd`` + delta rows, cast back to ``dtype``."""
    rows, cols = shape
    itemsize = ITEMSIZE[dtype]
    step = max(1, BLOCK_ELEMENTS // max(cols, 1))
    device = factors.A.device
    for lo in range(0, rows, step):
        hi = min(rows, lo + step)
        base = read_range(fd, offset + lo * cols * itemsize, (hi - lo) * cols * itemsize).view(dtype).reshape(hi - lo, cols)
        merged = base.to(device=device, dtype=torch.float32) + delta_rows(factors, lo, hi, transposed)
        yield merged.to(dtype)


def output_order(keys: list[str], ranges: dict) -> list[str]:
    """Base keys grouped by layer (0, 1, ..., then tensors outside the stack), file order within.

    This is the plan's layer order, so the merged factors arrive just when their tensors do.
    """
    def sort_key(key: str) -> tuple:
        layer = layer_of(key.removesuffix(".weight"))
        return (layer is None, layer or 0, str(ranges[key].file), ranges[key].offset)

    return sorted(keys, key=sort_key)


def tied_output_key(base: BaseModelInfo, plan: Plan) -> tuple[str, str] | None:
    """(input embedding key, output embedding key) when a targeted embedding is tied to the head.

    A LoRA on a tied input embedding changes only the input side; folding it in would change the
    head too (the weight is shared), so the export unties: the head keeps the base weight.
    """
    targeted = {f"{m.path}.weight" for m in plan.modules if m.sources and m.kind == "embedding"}
    if not targeted:
        return None
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base.directory)
    if not getattr(config.get_text_config(), "tie_word_embeddings", False):
        return None
    with torch.device("meta"):  # module names only: no weights are allocated
        model = AutoModelForCausalLM.from_config(config)
    names = {id(module): name for name, module in model.named_modules()}
    in_key = names[id(model.get_input_embeddings())] + ".weight"
    out_key = names[id(model.get_output_embeddings())] + ".weight"
    if in_key not in targeted:
        raise SoupkitError(
            "adapters", f"a LoRA on the tied input embedding {in_key}", f"one on {sorted(targeted)}", "untie the base first"
        )
    return in_key, out_key


def copy_side_files(base: BaseModelInfo, tmp: Path, untie: bool) -> None:
    """config.json (untied if needed), generation config and tokenizer files, as in the base."""
    config = json.loads((base.directory / "config.json").read_text())
    if untie:
        config["tie_word_embeddings"] = False
        if isinstance(config.get("text_config"), dict):
            config["text_config"]["tie_word_embeddings"] = False
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in COPIED_FILES:
        if (base.directory / name).is_file():
            shutil.copyfile(base.directory / name, tmp / name)


def export_model(recipe: Recipe, plan: Plan, inputs: Inputs, tmp: Path, out: Path, options: RunOptions) -> dict[str, float]:
    """Write the base with every merged update folded in to ``tmp`` (renamed to ``out`` later).

    Returns the energy kept per truncated module, as ``write_adapter`` does.
    """
    from soupkit.execute import iter_merged, resolve_device

    base = inputs.base
    ranges = tensor_ranges(base.index.files)
    tied = tied_output_key(base, plan)
    if tied and tied[1] not in ranges:
        ranges[tied[1]] = ranges[tied[0]]  # the untied head starts as a copy of the base embedding
    order = output_order(list(ranges), ranges)
    infos = dict(base.index.infos)
    if tied:
        infos.setdefault(tied[1], infos[tied[0]])
    specs: dict[str, TensorSpec] = {key: (infos[key].dtype, infos[key].shape) for key in order}
    targets = {f"{m.path}.weight": m for m in plan.modules if m.sources}
    merged = iter_merged(recipe, plan, inputs, resolve_device(options.device), options.progress)
    pending: dict[str, tuple[ModulePlan, LoraFactors]] = {}
    energy: dict[str, float] = {}
    fds: dict[Path, int] = {}
    try:
        with ShardedWriter(tmp, specs, options.shard_bytes, {"format": "pt"}) as writer:
            for key in order:
                module = targets.get(key)
                if module is None or (tied and key == tied[1]):
                    writer.copy_range(key, ranges[key])
                    continue
                while module.path not in pending:  # the plan yields modules in this same layer order
                    got, factors, kept = next(merged)
                    if got.sources:
                        pending[got.path] = (got, factors)
                    if kept is not None:
                        energy[got.path] = round(kept, 6)
                _, factors = pending.pop(module.path)
                where = ranges[key]
                fd = fds.get(where.file) or fds.setdefault(where.file, os.open(where.file, os.O_RDONLY))
                tag, shape = specs[key]
                transposed = module.kind == "embedding" or plan.fan_in_fan_out
                writer.write_parts(key, merged_blocks(fd, where.offset, DTYPES[tag][0], shape, factors, transposed))
    finally:
        for fd in fds.values():
            os.close(fd)
    copy_side_files(base, tmp, untie=tied is not None)
    return energy
