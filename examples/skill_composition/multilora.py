"""Train many LoRAs of one base at once: one forward and backward per step for all of them.

A seed of the pool experiment trains 9 skill LoRAs and a dozen control LoRAs. One process each would
share the GPU by time-slicing, which gives tiny launch-bound steps; here every target ``nn.Linear``
carries K (A_k, B_k) pairs, and batch row r (of group g) sees only its own group's adapter:

    y_r = W x_r + s * B_g A_g x_r          (PEFT's LoRA forward, dropout 0)

The loss is the sum over groups of each group's mean token loss, so a group's gradient is exactly the
one it gets when trained alone (no other row touches its factors). Clipping, AdamW state, the
learning-rate schedule and the batches are per group, as in ``model.train_loop`` and ``model.train_lora``
(same init seed, same batch sampler); ``tests/test_skill_composition_pool.py`` checks the saved adapters
against ``train_lora``. Rows are padded on the right (causal attention: padding never reaches a real token).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from examples.skill_composition.model import autocast, lora_config, lr_at, sft_batches


@dataclass
class Job:
    """One LoRA to train: its examples, steps, batch size, init seed (A's init) and output folder."""

    examples: list
    steps: int
    batch: int
    seed: int
    out: Path
    batch_seed: int | None = None  # the sampler's seed (train_lora uses seed + 7)


class GroupedLora(nn.Module):
    """A frozen linear plus one LoRA per group; ``layout`` (shared) says which groups the batch holds."""

    def __init__(self, base: nn.Linear, inits: list[tuple[torch.Tensor, torch.Tensor]], scale: float, layout: dict) -> None:
        super().__init__()
        self.base, self.scale, self.layout = base, scale, layout
        self.A = nn.ParameterList([nn.Parameter(a.detach().clone().float()) for a, _ in inits])
        self.B = nn.ParameterList([nn.Parameter(b.detach().clone().float()) for _, b in inits])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        parts, at = [], 0
        for groups, per_group in self.layout["blocks"]:  # blocks of groups with equal rows per group
            rows = len(groups) * per_group
            xb = x[at : at + rows].reshape(len(groups), per_group * x.shape[1], x.shape[2])
            a = torch.stack([self.A[g] for g in groups])  # (G, r, in)
            b = torch.stack([self.B[g] for g in groups])  # (G, out, r)
            d = torch.bmm(torch.bmm(xb, a.transpose(1, 2).to(xb.dtype)), b.transpose(1, 2).to(xb.dtype))
            parts.append(d.reshape(rows, x.shape[1], -1))
            at += rows
        return y + self.scale * torch.cat(parts).to(y.dtype)


def _init_factors(base, cfg, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """PEFT's own init for ``seed`` (what ``train_lora`` starts from): module path -> (A, B)."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    peft = get_peft_model(copy.deepcopy(base), lora_config(cfg))
    out = {}
    for name, module in peft.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            path = name.removeprefix("base_model.model.")
            out[path] = (module.lora_A["default"].weight.detach().cpu(), module.lora_B["default"].weight.detach().cpu())
    del peft
    return out


def _wrap(base, cfg, jobs: list[Job], layout: dict) -> tuple[nn.Module, dict[str, GroupedLora]]:
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(False)
    inits = {s: _init_factors(base, cfg, s) for s in sorted({j.seed for j in jobs})}
    wrapped = {}
    for path in inits[jobs[0].seed]:
        parent, leaf = model.get_submodule(path.rsplit(".", 1)[0]), path.rsplit(".", 1)[1]
        module = GroupedLora(getattr(parent, leaf), [inits[j.seed][path] for j in jobs], cfg.lora_alpha / cfg.rank, layout)
        setattr(parent, leaf, module.to(next(base.parameters()).device))
        wrapped[path] = module
    return model, wrapped


def _chunks(active: list[int], jobs: list[Job], max_rows: int) -> list[list[tuple[list[int], int]]]:
    """Split the active groups into forwards of at most ``max_rows`` rows (whole groups); each forward
    is a list of blocks ``(groups, rows per group)`` with equal batch sizes inside a block."""
    chunks: list[list[int]] = [[]]
    for g in sorted(active, key=lambda g: -jobs[g].batch):
        if chunks[-1] and sum(jobs[h].batch for h in chunks[-1]) + jobs[g].batch > max_rows:
            chunks.append([])
        chunks[-1].append(g)
    out = []
    for chunk in chunks:
        sizes = sorted({jobs[g].batch for g in chunk}, reverse=True)
        out.append([([g for g in chunk if jobs[g].batch == size], size) for size in sizes])
    return out


def _group_losses(model, ids: torch.Tensor, labels: torch.Tensor, blocks, device) -> list[torch.Tensor]:
    """Each group's mean token loss (HF's causal-LM loss: logits at t predict the label at t + 1).
    ``labels`` stays on the CPU: the scored positions are known there, so no step waits on the GPU."""
    targets = labels[:, 1:]
    mask = targets != -100
    counts = mask.sum(dim=1).tolist()  # tokens per row, rows in group order
    picked = mask.flatten().nonzero().squeeze(1)
    with autocast(device):
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state[:, :-1].flatten(0, 1)
        logits = model.lm_head(hidden[picked.to(device)])
    ce = nn.functional.cross_entropy(logits.float(), targets.flatten()[picked].to(device), reduction="none")
    per_row = torch.split(ce, counts)
    losses, at = [], 0
    for groups, size in blocks:
        for _ in groups:
            losses.append(torch.cat(per_row[at : at + size]).mean())
            at += size
    return losses


CHECKPOINT_ROWS = 48  # above this many rows a step, recompute each layer in the backward pass


def train_many(base, cfg, jobs: list[Job], codec, log, max_rows: int = 128) -> list[dict]:
    """Train every job's LoRA together; save each as a PEFT adapter in ``job.out``; return their infos.

    A forward of more than ``CHECKPOINT_ROWS`` rows keeps only each decoder layer's input for the
    backward pass (about 0.07 instead of 1.0 MB a token for SmolLM2-135M in bf16), so many packs fit
    on one GPU side by side; the recomputation gives the same values."""
    from peft import get_peft_model

    device = next(base.parameters()).device
    layout: dict = {"blocks": []}
    model, wrapped = _wrap(base, cfg, jobs, layout)
    if min(max_rows, sum(j.batch for j in jobs)) > CHECKPOINT_ROWS:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    samplers = [
        sft_batches(j.examples, codec, j.batch, j.seed + 7 if j.batch_seed is None else j.batch_seed, torch.device("cpu"))
        for j in jobs
    ]
    params = [[p for m in wrapped.values() for p in (m.A[g], m.B[g])] for g in range(len(jobs))]
    opts = [torch.optim.AdamW(ps, lr=cfg.lora_lr, weight_decay=0.0, betas=(0.9, 0.98)) for ps in params]
    losses: list[list[float]] = [[] for _ in jobs]
    t0 = time.time()
    model.train()
    for step in range(max(j.steps for j in jobs)):
        active = [g for g, j in enumerate(jobs) if step < j.steps]
        batches = {g: samplers[g](step) for g in active}
        for blocks in _chunks(active, jobs, max_rows):
            order = [g for groups, _ in blocks for g in groups]
            width = max(batches[g][0].shape[1] for g in order)
            ids = torch.cat(
                [nn.functional.pad(batches[g][0], (0, width - batches[g][0].shape[1]), value=codec.pad_id) for g in order]
            )
            labels = torch.cat([nn.functional.pad(batches[g][1], (0, width - batches[g][1].shape[1]), value=-100) for g in order])
            layout["blocks"] = blocks
            group_losses = torch.stack(_group_losses(model, ids.to(device), labels, blocks, device))
            group_losses.sum().backward()
            for g, loss in zip(order, group_losses.detach()):
                losses[g].append(loss)  # a GPU scalar: reading it every step would stall the launches
        for g in active:
            for group in opts[g].param_groups:
                group["lr"] = lr_at(step, jobs[g].steps, cfg.lora_lr, max(1, jobs[g].steps // 20))
            torch.nn.utils.clip_grad_norm_(params[g], 1.0)
            opts[g].step()
            opts[g].zero_grad(set_to_none=True)
        if step % 25 == 0:
            mean = float(sum(losses[g][-1] for g in active)) / len(active)
            log(f"  step {step + 1}: {len(active)} LoRAs, mean loss {mean:.3f} ({time.time() - t0:.0f} s)")
    model.eval()
    torch.manual_seed(jobs[0].seed)
    template = get_peft_model(copy.deepcopy(base), lora_config(cfg))
    infos = []
    for g, job in enumerate(jobs):
        with torch.no_grad():
            for path, module in wrapped.items():
                layer = template.base_model.model.get_submodule(path)
                layer.lora_A["default"].weight.copy_(module.A[g])
                layer.lora_B["default"].weight.copy_(module.B[g])
        template.save_pretrained(job.out)
        infos.append(
            {
                "steps": job.steps,
                "seconds": time.time() - t0,
                "final_loss": float(losses[g][-1]),
                "examples": len(job.examples),
                "trained_with": len(jobs),
            }
        )
    return infos
