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
import math
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import closing
from itertools import chain, groupby
from operator import itemgetter
from pathlib import Path

import torch

from soupkit.background import in_background, maths_threads
from soupkit.errors import SoupkitError
from soupkit.execute import Inputs, RunOptions, iter_merged, merged_bias, merged_saved, resolve_device
from soupkit.io.adapter import LoraAdapter
from soupkit.io.base_model import BaseModelInfo, layer_of
from soupkit.io.checkpoint_layout import meta_model
from soupkit.io.resolve import TOKENIZER_FILES
from soupkit.io.sharded import ByteRange, ShardedWriter, TensorSpec, read_range, tensor_ranges
from soupkit.io.tensor_index import DTYPES
from soupkit.io.writer import check_finite_cast
from soupkit.ops import LoraFactors
from soupkit.plan import ModulePlan, Plan
from soupkit.recipe.schema import Recipe

MergedModule = tuple[ModulePlan, LoraFactors, float | None]  # what iter_merged yields
# a module's update in one stored tensor: (module, the tensor's first row (2-D view) it updates, rows lo:hi of B @ A)
Part = tuple[ModulePlan, int, int, int]
QUEUE_DEPTH = 2  # row blocks computed ahead of the writer
BLOCK_ELEMENTS = 8 * 1024 * 1024  # rows per block are chosen so a float32 block is ~32 MB
ITEMSIZE = {dt: size for dt, size in DTYPES.values()}  # torch dtype -> bytes per element
COPIED_FILES = TOKENIZER_FILES  # generation config and tokenizer files, as fetched from a hub base


def add_delta_rows_(rows: torch.Tensor, factors: LoraFactors, lo: int, hi: int, transposed: bool) -> torch.Tensor:
    """Add rows ``lo:hi`` of the update, as stored in the base weight, to ``rows`` (float32) in place.

    A is (r, d_in), B is (d_out, r), delta = B @ A is (d_out, d_in). A Linear stores (d_out, d_in);
    a GPT-2 Conv1D (fan_in_fan_out) and an Embedding store (d_in, d_out), i.e. delta transposed,
    whose rows are ``A[:, lo:hi].T @ B.T``. ``addmm_`` never allocates the delta block.
    """
    if transposed:
        return rows.addmm_(factors.A[:, lo:hi].T, factors.B.T)
    return rows.addmm_(factors.B[lo:hi], factors.A)


def add_parts_rows_(
    rows: torch.Tensor, parts: list[tuple[LoraFactors, int, int, int]], lo: int, hi: int, transposed: bool
) -> None:
    """Add the updates of ``parts`` that fall in stored rows ``lo:hi`` (a 3-D tensor is viewed as (E * d1, d2)).

    A part (factors, first, a, b) puts rows a:b of ``B @ A`` at stored rows first:first + (b - a): an
    expert of a fused MoE tensor, or gate/up rows of a per-expert checkpoint tensor. A plain module is
    one part (factors, 0, 0, d_out), and may be stored transposed.
    """
    if transposed:  # GPT-2 Conv1D or an embedding: always one whole module
        add_delta_rows_(rows, parts[0][0], lo, hi, transposed)
        return
    for factors, first, a, b in parts:
        r0, r1 = max(lo, first), min(hi, first + b - a)
        if r0 < r1:
            rows[r0 - lo : r1 - lo].addmm_(factors.B[a + r0 - first : a + r1 - first], factors.A)


class BlockBuffers:
    """Reused buffers for row blocks: fresh 32 MB allocations cost page faults on every block.

    One read buffer and one float32 work buffer (CPU maths only), and a ring of output buffers:
    a block handed to the writer thread must stay intact until written, and at most ``ring``
    blocks are alive at once (queued + being written + being filled). With the maths on a GPU,
    the host buffers are page-locked, which makes the copies to and from the GPU faster.
    """

    def __init__(self, device: torch.device, ring: int) -> None:
        self.device, self.ring = device, ring
        self._read = torch.empty(0, dtype=torch.uint8)
        self._work = torch.empty(0, dtype=torch.float32)
        self._out = [torch.empty(0, dtype=torch.uint8) for _ in range(ring)]
        self._next = 0

    def _at_least(self, buf: torch.Tensor, n: int) -> torch.Tensor:
        if buf.numel() >= n:
            return buf
        pin = buf.device.type == "cpu" and self.device.type == "cuda"
        return torch.empty(n, dtype=buf.dtype, device=buf.device, pin_memory=pin)

    def read(self, nbytes: int) -> torch.Tensor:
        self._read = self._at_least(self._read, nbytes)
        return self._read[:nbytes]

    def work(self, n: int) -> torch.Tensor:
        self._work = self._at_least(self._work, n)
        return self._work[:n]

    def out(self, nbytes: int) -> torch.Tensor:
        i = self._next
        self._next = (i + 1) % self.ring
        self._out[i] = self._at_least(self._out[i], nbytes)
        return self._out[i][:nbytes]


def merged_blocks(
    fd: int,
    offset: int,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    parts: list[tuple[LoraFactors, int, int, int]],
    transposed: bool,
    buffers: BlockBuffers,
    where: str = "merged weight",
) -> Iterator[torch.Tensor]:
    """Yield the merged weight in row blocks: base rows read from ``fd`` + delta rows, cast back to ``dtype``.

    ``parts``: the updates of this tensor (see ``add_parts_rows_``); a 3-D tensor is read as (E * d1, d2).
    """
    rows, cols = math.prod(shape[:-1]), shape[-1]
    itemsize = ITEMSIZE[dtype]
    step = max(1, BLOCK_ELEMENTS // max(cols, 1))
    for lo in range(0, rows, step):
        hi = min(rows, lo + step)
        n = (hi - lo) * cols
        base = read_range(fd, offset + lo * cols * itemsize, n * itemsize, buffers.read(n * itemsize))
        stored = base.view(dtype).view(hi - lo, cols)
        on_cpu = buffers.device.type == "cpu"
        # On a GPU: move the stored dtype (half the bytes of float32 for bf16), convert there.
        work = buffers.work(n).view(hi - lo, cols).copy_(stored) if on_cpu else stored.to(buffers.device).float()
        add_parts_rows_(work, parts, lo, hi, transposed)
        out = buffers.out(n * itemsize).view(dtype).view(hi - lo, cols)
        out.copy_(work if on_cpu else work.to(dtype))  # the cast back to the base dtype
        check_finite_cast(
            out, work, f"{where} rows {lo}:{hi}", "use smaller weights, or export from a bfloat16/float32 base"
        )  # what is written is what was checked
        yield out


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
    targeted = {base.weight_key(m.path) for m in plan.modules if m.sources and m.kind == "embedding"}
    targeted |= {s.base_key for s in plan.saved}  # a saved embedding or tied head (modules_to_save): untie the two
    if not targeted:
        return None
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base.directory)
    if not getattr(config.get_text_config(), "tie_word_embeddings", False):
        return None
    try:  # the class config.json names (a VLM is no AutoModelForCausalLM), else the causal LM
        model = meta_model(base.directory, base.config)
    except ValueError:
        with torch.device("meta"):  # module names only: no weights are allocated
            model = AutoModelForCausalLM.from_config(config)
    names = {id(module): name for name, module in model.named_modules()}
    head = model.get_output_embeddings()
    if head is None or id(head) not in names:
        return None
    in_key = base.checkpoint_key(names[id(model.get_input_embeddings())] + ".weight")
    if in_key not in targeted:  # e.g. GPT-2's position embeddings: not the tied one
        return None
    head_name = names[id(head)] + ".weight"
    return in_key, base.checkpoint_key(head_name) or head_name  # a tied head is often not stored


def copy_side_files(base: BaseModelInfo, tmp: Path, untie: bool) -> None:
    """config.json (untied if needed), generation config and tokenizer files, as in the base."""
    if untie:
        config = json.loads((base.directory / "config.json").read_text())
        config["tie_word_embeddings"] = False
        if isinstance(config.get("text_config"), dict):
            config["text_config"]["tie_word_embeddings"] = False
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    else:
        shutil.copyfile(base.directory / "config.json", tmp / "config.json")
    for name in COPIED_FILES:
        if (base.directory / name).is_file():
            shutil.copyfile(base.directory / name, tmp / name)


def fold_stream(
    order: list[str],
    specs: dict[str, TensorSpec],
    ranges: dict[str, ByteRange],
    targets: dict[str, list[Part]],
    merged: Iterator[MergedModule],
    fan_in_fan_out: bool,
    energy: dict[str, float],
    buffers: BlockBuffers,
    replaced: dict[str, Callable[[], torch.Tensor]] | None = None,
) -> Iterator[tuple[str, ByteRange | torch.Tensor]]:
    """Every output tensor in ``order``: (key, ByteRange) to copy, or (key, row block) parts to write.

    ``merged`` yields modules in the same layer order, so at most one layer's factors wait here. A
    module's factors are dropped once every stored tensor it updates is written.
    ``replaced``: checkpoint key -> its merged value in float32 (lora_bias biases, modules_to_save tensors),
    made when the key is reached and written whole in the base's dtype.
    """
    pending: dict[str, LoraFactors] = {}
    uses = {m.path: 0 for parts in targets.values() for m, *_ in parts}
    for parts in targets.values():
        for m, *_ in parts:
            uses[m.path] += 1
    fds: dict[Path, int] = {}
    try:
        for key in order:
            parts = targets.get(key)
            if parts is None and replaced and key in replaced:
                yield key, cast_like(replaced[key](), specs[key][0], f"tensor {key}")
                continue
            if parts is None:
                yield key, ranges[key]
                continue
            for module, *_ in parts:
                while module.path not in pending:
                    got, factors, kept = next(merged)
                    if got.sources:
                        pending[got.path] = factors
                    if kept is not None:
                        energy[got.path] = round(kept, 6)
            where = ranges[key]
            fd = fds.get(where.file) or fds.setdefault(where.file, os.open(where.file, os.O_RDONLY))
            tag, shape = specs[key]
            transposed = parts[0][0].kind == "embedding" or (fan_in_fan_out and parts[0][0].kind != "param")
            updates = [(pending[m.path], first, a, b) for m, first, a, b in parts]
            for module, *_ in parts:
                uses[module.path] -= 1
                if uses[module.path] == 0:
                    del pending[module.path]
            for block in merged_blocks(fd, where.offset, DTYPES[tag][0], shape, updates, transposed, buffers, f"tensor {key}"):
                yield key, block
    finally:
        for fd in fds.values():
            os.close(fd)


def cast_like(value: torch.Tensor, tag: str, where: str) -> torch.Tensor:
    """``value`` (float32) in the base's dtype ``tag`` on the CPU, refused if the cast overflows."""
    out = value.to(device="cpu", dtype=DTYPES[tag][0])
    check_finite_cast(out, value, where, "use smaller weights, or export from a bfloat16/float32 base")
    return out


def replaced_tensors(recipe: Recipe, plan: Plan, inputs: Inputs, device: torch.device) -> dict[str, Callable[[], torch.Tensor]]:
    """Checkpoint key -> merged value for lora_bias biases (base bias + merged update) and modules_to_save tensors."""
    base = inputs.base
    out: dict[str, Callable[[], torch.Tensor]] = {}
    for module in plan.modules:
        if module.path not in plan.biased:
            continue
        key = base.key_of.get(f"{module.path}.bias")
        if key is None:  # PEFT's merge_and_unload refuses this too
            raise SoupkitError(
                f"module {module.path}",
                "a base layer with a bias to add the lora_bias update to",
                "no bias in the base",
                "write an adapter (output: adapter) instead",
            )
        bias = merged_bias(recipe, plan, inputs, module, device)
        out[key] = lambda key=key, bias=bias: base.index.get(key).to(device=bias.device, dtype=torch.float32).add_(bias)
    for saved in plan.saved:
        out[saved.out_key] = lambda saved=saved: torch.add(*merged_saved(recipe, inputs, saved, device))
    return out


def release_per_layer(merged: Iterator[MergedModule], adapters: list[LoraAdapter]) -> Iterator[MergedModule]:
    """Close the adapters' file handles whenever a new layer starts.

    Adapter files are read through safe_open's memory maps, and the pages read stay resident
    while a handle is open: left open, they add the adapters' whole size to peak RSS (330 MB for
    two rank-32 adapters of a 7B model; 1.7 GB at 70B). Reopening a handle costs a header read.
    """
    layer: object = object()
    for item in merged:
        if item[0].layer != layer:
            for adapter in adapters:
                adapter.index.close()
            layer = item[0].layer
        yield item


def check_dtypes(specs: dict[str, TensorSpec], targets: dict[str, list[Part]]) -> None:
    """Refuse a base whose tensors soupkit cannot copy, or whose target weights are not floats."""
    for key, (tag, _) in specs.items():
        if tag not in DTYPES:
            raise SoupkitError(f"base_model tensor {key}", f"one of {', '.join(DTYPES)}", tag, "export from an unquantised base")
        if key in targets and not DTYPES[tag][0].is_floating_point:
            raise SoupkitError(
                f"base_model tensor {key}",
                "a floating-point weight to add the update to",
                f"{tag} (quantised?)",
                "merge into an unquantised base, then quantise the export",
            )


def export_targets(plan: Plan, base: BaseModelInfo) -> dict[str, list[Part]]:
    """Checkpoint key -> the merged modules that update it (a targeted parameter may span several tensors)."""
    targets: dict[str, list[Part]] = {}
    for module in plan.modules:
        if not module.sources:
            continue
        if module.param is None:
            targets[base.key_of[f"{module.path}.weight"]] = [(module, 0, 0, module.d_out)]
        else:
            for key, first, a, b in module.param.pieces:
                targets.setdefault(key, []).append((module, first, a, b))
    return targets


def export_model(recipe: Recipe, plan: Plan, inputs: Inputs, tmp: Path, out: Path, options: RunOptions) -> dict[str, float]:
    """Write the base with every merged update folded in to ``tmp`` (renamed to ``out`` later).

    Returns the energy kept per truncated module, as ``write_adapter`` does.
    """
    base = inputs.base
    ranges = tensor_ranges(base.index.files)
    infos = dict(base.index.infos)
    tied = tied_output_key(base, plan)
    if tied and tied[1] not in ranges:  # the untied head is a copy of the base embedding
        ranges[tied[1]], infos[tied[1]] = ranges[tied[0]], infos[tied[0]]
    order = output_order(list(ranges), ranges)
    specs: dict[str, TensorSpec] = {key: (infos[key].dtype, infos[key].shape) for key in order}
    targets = export_targets(plan, base)
    check_dtypes(specs, targets)
    device = resolve_device(options.device)
    merged = release_per_layer(iter_merged(recipe, plan, inputs, device, options.progress), inputs.adapters)
    energy: dict[str, float] = {}
    buffers = BlockBuffers(device, ring=QUEUE_DEPTH + 3)  # queued + held by groupby + being written + being filled
    replaced = replaced_tensors(recipe, plan, inputs, device)
    blocks = fold_stream(order, specs, ranges, targets, merged, plan.fan_in_fan_out, energy, buffers, replaced)
    stream = in_background(blocks, QUEUE_DEPTH)
    spare_cores = max(1, (os.cpu_count() or 2) - 1)  # one core stays free for the writer
    # closing(): a failed write stops the worker now, not whenever the generator is collected
    with closing(stream), maths_threads(spare_cores), ShardedWriter(tmp, specs, options.shard_bytes, {"format": "pt"}) as writer:
        for key, group in groupby(stream, key=itemgetter(0)):
            first = next(group)[1]
            if isinstance(first, ByteRange):
                writer.copy_range(key, first)
            else:
                writer.write_parts(key, chain([first], (block for _, block in group)))  # type: ignore[misc]
    copy_side_files(base, tmp, untie=tied is not None)
    return energy
