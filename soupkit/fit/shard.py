"""fit-alpha on a base larger than one GPU: FSDP2 (torch's ``fully_shard``) over the fit model.

Layout (what ``shard_fit_model`` wraps):

- each transformer block is one FSDP unit: its frozen base weights AND the frozen concatenated
  factors of its ``CatLinear`` modules (parameters of the block) are sharded along dim 0 and
  all-gathered only while that block runs (forward, and again for backward);
- the input embeddings are a unit of their own (unless tied to the LM head); the root unit holds
  what is left (final norm, LM head);
- the weight logits, ONE (G, n) float32 tensor owned by the root ``CatFitModel``, are an ignored
  parameter: replicated on every rank, never sharded, and the only tensor the optimizer sees.
  Their gradient is all-reduced here (``sync_logit_grads``), once per optimizer step.

This avoids the three known pitfalls of training a few scalars under FSDP: FSDP1's flat parameter
mixing frozen and trainable tensors, FSDP1 ``use_orig_params`` gradient memory of a whole block,
and FSDP2 dim-0 shards of a tiny tensor that are empty on most ranks.

Loading (``build_sharded_fit_model``): the base is built on the meta device, sharded, given
uninitialised local storage, and each rank then reads only its own rows of each tensor from the
safetensors files, so host memory per process stays near one tensor's shard, not the model.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from soupkit.errors import SoupkitError
from soupkit.fit.model import CatFitModel, Constraint, Granularity, fit_targets, load_factors
from soupkit.recipe.schema import Recipe


def transformer_blocks(base: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: modules whose class transformers marks as unsplittable."""
    names = set(getattr(base, "_no_split_modules", None) or [])
    blocks = [m for m in base.modules() if type(m).__name__ in names]
    if not blocks:
        raise SoupkitError(
            "base_model",
            "a transformers model that names its blocks (_no_split_modules)",
            type(base).__name__,
            "fit without --shard",
        )
    return blocks


def enable_checkpointing(base: nn.Module) -> int:
    """Recompute each block's activations in backward instead of keeping them (non-reentrant).

    The block's ``forward`` is wrapped on the instance, so module names and FSDP's hooks (on
    ``__call__``) are unchanged: FSDP gathers the block's weights, then the checkpointed forward runs.
    Returns the number of blocks wrapped.
    """
    blocks = transformer_blocks(base)
    for block in blocks:
        forward = block.forward

        def checkpointed(*args: Any, _forward: Any = forward, **kwargs: Any) -> Any:
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = checkpointed
    return len(blocks)


def device_mesh(device: torch.device, world: int) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world,))


def shard_fit_model(model: CatFitModel, mesh: Any) -> CatFitModel:
    """Apply ``fully_shard`` per block, to the input embeddings, and at the root (in place).

    The logits stay a plain replicated parameter (``ignored_params``): FSDP neither shards, moves
    nor reduces them. Weights keep their stored dtype (bf16 for a bf16 fit): no FSDP mixed-precision
    cast is needed for frozen weights; autocast covers the compute as on one GPU.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for block in transformer_blocks(model.base):
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    embed, head = model.base.get_input_embeddings(), model.base.get_output_embeddings()
    if head is None or embed.weight is not head.weight:  # tied: the shared weight must stay in one unit (the root)
        fully_shard(embed, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=False, ignored_params={model.logits})
    register_fsdp_forward_method(model, "lm_logits")  # gathers the root's weights when called directly, too
    return model


def sync_logit_grads(model: CatFitModel, world: int) -> None:
    """Average the logits' gradient over processes, as DDP would (sum, then divide by ``world``)."""
    grad = model.logits.grad
    if world > 1 and grad is not None:
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        grad.div_(world)


def local_rows(param: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """This rank's storage of ``param`` and the global rows ``start:stop`` it holds.

    FSDP2 shards dim 0 as ``torch.chunk`` does: ceil(rows / world) rows per rank, the last ranks
    possibly fewer or none.
    """
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return param.data, 0, param.shape[0] if param.dim() else 0
    local = param.to_local()
    rows, world, rank = param.shape[0], param.device_mesh.size(), param.device_mesh.get_local_rank()
    chunk = math.ceil(rows / world)
    start, stop = min(rows, rank * chunk), min(rows, (rank + 1) * chunk)
    if local.shape[0] != stop - start:
        raise RuntimeError(f"shard of {tuple(param.shape)} on rank {rank}: {tuple(local.shape)}, expected rows {start}:{stop}")
    return local, start, stop


def checkpoint_key(name: str, target_paths: set[str]) -> str:
    """The base checkpoint's tensor name for a fit-model parameter name.

    ``base.model.layers.0.self_attn.q_proj.base_layer.weight`` -> ``model.layers.0.self_attn.q_proj.weight``
    """
    name = name.removeprefix("base.")
    module, _, leaf = name.rpartition(".")
    owner = module.removesuffix(".base_layer")
    return f"{owner}.{leaf}" if owner != module and owner in target_paths else name


def fill_from_checkpoint(model: CatFitModel, inputs: Any) -> None:
    """Copy into each rank's shards its rows of the base tensors and of the concatenated factors."""
    index, where = inputs.base.index, str(inputs.base.directory)
    row_of = {t.path: m for m, t in enumerate(model.targets)}
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, param in model.named_parameters():
        if param is model.logits:
            continue
        local, start, stop = local_rows(param)
        module, _, leaf = name.removeprefix("base.").rpartition(".")
        if module.endswith(".factors") and leaf in ("A", "B"):
            path = module.removesuffix(".factors")
            if path not in factors:
                pairs = load_factors(inputs, model.targets[row_of[path]])  # one module's factors: a few MB
                factors = {path: (torch.cat([p[0] for p in pairs], 0), torch.cat([p[1] for p in pairs], 1))}
            rows = factors[path][0 if leaf == "A" else 1][start:stop]
        else:
            key = checkpoint_key(name, set(row_of))
            if key not in index:
                raise SoupkitError(
                    where, f"a tensor {key} (--shard reads tensors by the model's own names)", "none", "fit without --shard"
                )
            if tuple(index.infos[key].shape) != tuple(param.shape):
                raise SoupkitError(
                    f"{where}: {key}",
                    f"shape {tuple(param.shape)}",
                    f"{index.infos[key].shape}",
                    "check base_model's config.json",
                )
            rows = index.get_rows(key, start, stop)
        local.copy_(rows.to(local.dtype))


def module_buffers(module: nn.Module) -> Iterator[tuple[nn.Module, str, torch.Tensor]]:
    """Every buffer with its owning module and local name (to put them back after ``to_empty``)."""
    for sub in module.modules():
        for name, buf in sub._buffers.items():
            if buf is not None:
                yield sub, name, buf


def meta_factor_pair(linear: nn.Module, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shape-only (A (r, d_in), B (d_out, r)) for one adapter of ``linear``: filled after sharding."""
    if not isinstance(linear, nn.Linear):
        raise SoupkitError(
            str(linear), "an nn.Linear in the base", type(linear).__name__, "fit-alpha supports Linear targets only"
        )
    return torch.empty(rank, linear.in_features, device="meta"), torch.empty(linear.out_features, rank, device="meta")


def materialise_sharded(model: CatFitModel, device: torch.device, checkpointing: bool) -> CatFitModel:
    """Shard a fit model built on the meta device and give each rank storage for its shards only.

    Parameters come out uninitialised (fill them: ``fill_from_checkpoint``); buffers (rotary tables,
    the fit model's index tensors) were computed for real and are kept; the logits are zero.
    """
    if checkpointing:
        enable_checkpointing(model.base)
    shard_fit_model(model, device_mesh(device, dist.get_world_size() if dist.is_initialized() else 1))
    buffers = [(sub, name, buf.clone()) for sub, name, buf in module_buffers(model)]
    model.to_empty(device=device)
    for sub, name, buf in buffers:
        sub._buffers[name] = buf.to(device)
    with torch.no_grad():
        model.logits.zero_()
    return model


def meta_fit_model(
    config: Any, targets: list, n_adapters: int, granularity: Granularity, constraint: Constraint, dtype: torch.dtype
) -> CatFitModel:
    """A fit model whose base weights and factors are on the meta device (no memory); buffers real."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (rotary tables) computed for real
        base = AutoModelForCausalLM.from_config(config, dtype=dtype)
    base.eval()  # no dropout: the loss is a deterministic function of the weights
    factors = [[meta_factor_pair(base.get_submodule(t.path), r) for r in t.ranks] for t in targets]
    return CatFitModel(base, targets, factors, n_adapters, granularity, constraint)


def build_sharded_fit_model(
    recipe: Recipe,
    granularity: Granularity,
    constraint: Constraint,
    device: torch.device,
    dtype: torch.dtype,
    checkpointing: bool,
) -> tuple[CatFitModel, torch.Tensor]:
    """The fit model built on the meta device, sharded over all processes, then filled per rank
    from the safetensors files (each rank reads its own rows only).

    Returns the model (logits on ``device``, replicated) and the recipe's per-module weights (M, n).
    """
    from transformers import AutoConfig

    targets, recipe_weights, inputs = fit_targets(recipe)
    config = AutoConfig.from_pretrained(inputs.base.directory)
    model = meta_fit_model(config, targets, len(recipe.adapters), granularity, constraint, dtype)
    materialise_sharded(model, device, checkpointing)
    fill_from_checkpoint(model, inputs)
    return model, recipe_weights
