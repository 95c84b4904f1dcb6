"""The fitting loop: accelerate for device placement, bf16 autocast, accumulation and data parallelism.

Exactness across GPU counts: every optimizer step sees one global batch of
``batch_size * grad_accum * num_processes`` examples, drawn from one seeded stream that every
process computes alike. Each micro-batch's summed loss is divided by the label-token count of the
WHOLE global batch (known in advance), so the gradient is the global per-token mean however the
batch is split; DDP's average over processes is undone by multiplying by the process count.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from soupkit.errors import SoupkitError
from soupkit.fit.data import Example, collate
from soupkit.fit.model import CatFitModel, Constraint, Granularity
from soupkit.fit.shard import sync_logit_grads
from soupkit.io.progress import progress


@dataclass(frozen=True)
class FitOptions:
    """Options of ``soupkit fit-alpha`` (defaults suit a few hundred logits; see docs/fit-alpha.md)."""

    steps: int | None = None  # optimizer steps; None: ``epochs`` passes over the data
    epochs: float = 1.0
    lr: float = 5e-2
    batch_size: int = 8  # examples per micro-batch per process
    seq_len: int = 512
    grad_accum: int = 1
    seed: int = 0
    granularity: Granularity = "module"
    constraint: Constraint = "softmax"
    init: Literal["uniform", "recipe"] = "uniform"
    eval_every: int = 20  # steps between held-out evaluations (early stopping)
    patience: int = 3  # evaluations without improvement before stopping
    heldout_fraction: float = 0.1  # of --data, when no --eval-data is given
    search: Literal["gradient", "lorahub"] = "gradient"
    budget: int = 40  # lorahub: loss evaluations
    lorahub_examples: int = 5  # lorahub: calibration examples it scores
    l1: float = 0.05  # lorahub: L1 penalty on the weights
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on a GPU, fp32 on CPU
    shard: bool = False  # FSDP2: shard the frozen base and factors over the processes (shard.py)
    checkpointing: bool = False  # recompute each block's activations in backward (less memory, ~1 more forward)


@dataclass
class FitState:
    """What a fit produced and measured; ``report.py`` turns it into files."""

    weights: torch.Tensor  # (M, n) fitted per-module weights, float32 on CPU
    heldout: dict[str, float]  # held-out loss per token: uniform, recipe, init, fitted
    curve: list[dict[str, float]] = field(default_factory=list)  # {"step", "train_loss"?, "eval_loss"?}
    steps: int = 0
    best_step: int = 0
    stopped_early: bool = False
    tokens: int = 0  # training tokens processed (all processes, padding excluded)
    seconds: float = 0.0  # training wall time, evaluations excluded
    peak_memory_bytes: int | None = None
    num_processes: int = 1
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)
    chosen: str = "fitted"  # whose weights are written: "fitted", or "recipe"/"uniform" when those score better held out


def make_accelerator(options: FitOptions) -> Any:
    """An Accelerator: bf16 autocast on a GPU unless fp32 is asked for; DDP without buffer broadcasts
    (the frozen factors are buffers, identical on every process)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    cuda = torch.cuda.is_available() and options.device != "cpu"
    if options.device == "cuda" and not cuda:
        raise SoupkitError("--device", "a visible CUDA GPU", "none", "use --device cpu")
    bf16 = options.precision == "bf16" or (options.precision == "auto" and cuda)
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
    return Accelerator(cpu=not cuda, mixed_precision="bf16" if bf16 else "no", kwargs_handlers=[ddp])


def with_autocast(model: nn.Module, accelerator: Any) -> nn.Module:
    """Run ``model``'s forward under the accelerator's autocast (what ``prepare`` does for a model it
    wraps; the sharded path wraps the model itself). Wrapped on the instance, so FSDP's hooks stay."""
    forward = model.forward

    def forward_autocast(*args: Any, **kwargs: Any) -> Any:
        with accelerator.autocast():
            return forward(*args, **kwargs)

    model.forward = forward_autocast
    return model


def example_stream(n: int, seed: int) -> Iterator[int]:
    """Endless seeded reshuffles of range(n): the same on every process."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield from torch.randperm(n, generator=gen).tolist()


def total_steps(options: FitOptions, n_train: int, num_processes: int) -> int:
    if options.steps is not None:
        return options.steps
    global_batch = options.batch_size * options.grad_accum * num_processes
    return max(1, math.ceil(options.epochs * n_train / global_batch))


def evaluate(accelerator: Any, model: Any, examples: list[Example], batch_size: int, pad_id: int) -> float:
    """Per-token loss over ``examples``, each process scoring its share, summed across processes.

    Every process runs the same number of forwards: sharded (FSDP) forwards are collectives, so a
    process with fewer batches than the others would leave them waiting forever. Rank 0 holds the most
    examples (ceil(n / world)); a process with fewer batches scores a repeated example in their place,
    with weight 0: computed, never counted.
    """
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = examples[rank::world]
    n_batches = math.ceil(math.ceil(len(examples) / world) / batch_size)
    total = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    with torch.no_grad():
        for i in range(0, n_batches * batch_size, batch_size):
            real = mine[i : i + batch_size]
            batch = {k: v.to(accelerator.device) for k, v in collate(real or examples[:1], pad_id).items()}
            loss, count = model(**batch)
            if real:  # a padding batch (weight 0) only keeps the processes in step
                total += torch.stack([loss.double(), count.double()])
    total = accelerator.reduce(total, reduction="sum")
    return float(total[0] / total[1])


def with_weights(accelerator: Any, model: Any, weights: torch.Tensor, examples: list[Example], batch: int, pad_id: int) -> float:
    """Held-out loss with fixed per-module ``weights`` (M, n) instead of the logits."""
    core: CatFitModel = accelerator.unwrap_model(model)
    core.fixed = weights
    try:
        return evaluate(accelerator, model, examples, batch, pad_id)
    finally:
        core.fixed = None


def train(
    accelerator: Any,
    model: Any,
    optimizer: torch.optim.Optimizer,
    train_set: list[Example],
    eval_set: list[Example],
    pad_id: int,
    options: FitOptions,
) -> FitState:
    """Adam on the logits with early stopping on held-out loss; returns the best weights seen."""
    core: CatFitModel = accelerator.unwrap_model(model)
    world, rank = accelerator.num_processes, accelerator.process_index
    stream = example_stream(len(train_set), options.seed)
    n_steps = total_steps(options, len(train_set), world)
    state = FitState(weights=torch.empty(0), heldout={}, num_processes=world, device=str(accelerator.device))
    best = (evaluate(accelerator, model, eval_set, options.batch_size, pad_id), 0, core.logits.detach().clone())
    state.curve.append({"step": 0, "eval_loss": best[0]})
    bad_evals, tokens = 0, torch.zeros((), device=accelerator.device, dtype=torch.float64)
    for step in progress(range(1, n_steps + 1), "fit-alpha", "step", enabled=accelerator.is_main_process):
        start = time.perf_counter()
        step_loss = _one_step(accelerator, model, optimizer, stream, train_set, pad_id, options, world, rank, tokens)
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        state.seconds += time.perf_counter() - start
        state.curve.append({"step": step, "train_loss": step_loss})
        if step % options.eval_every == 0 or step == n_steps:
            loss = evaluate(accelerator, model, eval_set, options.batch_size, pad_id)
            state.curve[-1]["eval_loss"] = loss
            if loss < best[0]:
                best, bad_evals = (loss, step, core.logits.detach().clone()), 0
            else:
                bad_evals += 1
                if bad_evals >= options.patience:
                    state.stopped_early = True
                    break
    state.steps = step
    with torch.no_grad():
        core.logits.copy_(best[2])
    state.best_step, state.heldout["fitted"] = best[1], best[0]
    state.tokens = int(accelerator.reduce(tokens, reduction="sum"))
    return state


def _one_step(
    accelerator: Any,
    model: Any,
    optimizer: torch.optim.Optimizer,
    stream: Iterator[int],
    train_set: list[Example],
    pad_id: int,
    options: FitOptions,
    world: int,
    rank: int,
    tokens: torch.Tensor,
) -> float:
    """One optimizer step over one global batch; returns the global per-token training loss."""
    micro = options.batch_size
    chunk = [train_set[next(stream)] for _ in range(micro * options.grad_accum * world)]
    global_tokens = sum(e.n_target for e in chunk)
    step_loss = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    for k in range(options.grad_accum):
        first = (k * world + rank) * micro  # micro-batch k of this process
        batch = {key: v.to(accelerator.device) for key, v in collate(chunk[first : first + micro], pad_id).items()}
        tokens += batch["attention_mask"].sum()
        last = k == options.grad_accum - 1
        with nullcontext() if last or options.shard else accelerator.no_sync(model):  # all-reduce once per step
            loss, _ = model(**batch)
            accelerator.backward(loss * (world / global_tokens))
        step_loss += loss.detach().double()
    if options.shard:  # the logits are replicated outside FSDP's reductions: average their gradient here
        sync_logit_grads(model, world)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(accelerator.reduce(step_loss, reduction="sum")) / global_tokens
