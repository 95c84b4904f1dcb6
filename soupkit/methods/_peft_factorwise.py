"""PEFT's factor-wise combinations (``add_weighted_adapter`` with linear / ties / dare_* / magnitude_prune).

Reproduces peft 0.21 ``LoraModel._generalized_task_arithmetic_weighted_adapter`` and
``peft.utils.merge_utils``: with c_i = w_i s_i (s_i = PEFT scale of adapter i in this module),
  A = combine([A_i], weights sgn(c_i) sqrt|c_i|),  B = combine([B_i], weights sqrt|c_i|),
where ``combine`` (task_arithmetic, ties, dare_linear, dare_ties, magnitude_prune) runs on the stacked
A's and, separately, on the stacked B's. B A therefore has cross terms B_i A_j: this is NOT the
published TIES/DARE (use ``ties``, ``dare_*`` for those); it is here to reproduce PEFT merges and the
LoRA Soups baselines exactly. As in PEFT: equal ranks are required, the result has that rank, and a
recipe with one adapter is merged as ``linear`` whatever the combination.

Randomness: PEFT draws ``torch.bernoulli(full_like(t, density))`` from the global RNG, for the A list
then the B list, adapter by adapter. soupkit makes the same calls in the same order on a generator
seeded by (recipe seed, module), so results are reproducible; seeding a generator with the same value
PEFT's global RNG had at that module gives PEFT's exact masks (this is how the tests compare).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field

from soupkit.methods import seeds
from soupkit.methods.base import LoraFactors, MergeContext, MergeMethod, MergeResult, MethodParams, RunInputs

Combination = Literal["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"]


class PeftParams(MethodParams):
    density: float = Field(0.5, gt=0.0, le=1.0, description="Fraction of factor entries kept (PEFT's density).")


class PeftSignParams(PeftParams):
    majority_sign: Literal["total", "frequency"] = Field("total", description="PEFT's majority_sign_method.")


def magnitude_prune_tensor(t: torch.Tensor, density: float) -> torch.Tensor:
    """``merge_utils.magnitude_based_pruning`` (top int(density * numel) by |.|, via topk as PEFT)."""
    if density >= 1:
        return t
    mask = torch.zeros_like(t).reshape(-1)
    mask[torch.topk(t.abs().reshape(-1), k=int(density * t.numel()), largest=True)[1]] = 1
    return t * mask.reshape(t.shape)


def random_prune_tensor(t: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """``merge_utils.random_pruning`` with rescale; the Bernoulli draws are made on the CPU generator."""
    if density >= 1:
        return t
    mask = torch.bernoulli(torch.full(t.shape, density, dtype=t.dtype), generator=generator).to(t.device)
    return t * mask / density


def combine(kind: Combination, tensors: list[torch.Tensor], weights: torch.Tensor, p: Any, gen: torch.Generator) -> torch.Tensor:
    """One of PEFT's merge_utils combinations on a list of same-shape tensors (A's or B's)."""
    if kind in ("ties", "magnitude_prune"):
        tensors = [magnitude_prune_tensor(t, p.density) for t in tensors]
    elif kind in ("dare_linear", "dare_ties"):
        tensors = [random_prune_tensor(t, p.density, gen) for t in tensors]
    stack = torch.stack(tensors, dim=0)
    w = weights.view(weights.shape + (1,) * (stack.dim() - 1))
    if kind not in ("ties", "dare_ties"):
        return (stack * w).sum(dim=0)
    sign = stack.sign()
    votes = stack.sum(dim=0) if p.majority_sign == "total" else sign.sum(dim=0)
    mask = sign == torch.where(votes >= 0, 1, -1)  # sign election on the unweighted tensors, as PEFT
    return (stack * w * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)


class PeftFactorwise(MergeMethod):
    """Template: subclasses set ``name``, ``combination`` and ``Params``."""

    space = "factors"
    combination: Combination = "linear"
    Params = PeftParams
    identity_params: dict = {}
    uses_rank = False

    def output_rank(self, input_ranks: list[int], params: MethodParams, budget: int | None) -> int:
        return max(input_ranks, default=0)  # PEFT's rule: the (common) input rank; merge.rank does not apply

    def check_inputs(self, input_ranks: list[list[int]], params: MethodParams) -> str | None:
        ranks = sorted({r for adapter in input_ranks for r in adapter})
        if len(ranks) > 1:
            return f"module ranks {ranks}; PEFT's factor-wise combinations need one rank everywhere (use cat, linear or lego)"
        return None

    def prepare(self, params: MethodParams, run: RunInputs) -> Any:
        return {"n_adapters": run.n_adapters}

    def merge(self, factors: list[LoraFactors], weights: list[float], params: MethodParams, ctx: MergeContext) -> MergeResult:
        single = isinstance(ctx.state, dict) and ctx.state.get("n_adapters") == 1
        kind: Combination = "linear" if single else self.combination
        c = [w * f.scale for f, w in zip(factors, weights, strict=True)]
        w_A = torch.tensor([math.sqrt(abs(x)) * (1 if x >= 0 else -1) for x in c], device=factors[0].A.device)
        w_B = torch.tensor([math.sqrt(abs(x)) for x in c], device=factors[0].A.device)
        raw_B = [f.B / f.scale if f.scale != 0 else f.B for f in factors]  # B arrives with s folded in
        gen = ctx.generator(seeds.PEFT_MASKS)
        A = combine(kind, [f.A for f in factors], w_A, params, gen)
        B = combine(kind, raw_B, w_B, params, gen)
        return MergeResult(LoraFactors(A=A, B=B))
