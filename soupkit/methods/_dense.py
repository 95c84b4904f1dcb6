"""Shared machinery of the dense-delta methods (TIES, DARE, DELLA, breadcrumbs, magnitude prune).

Per module: form each delta_i = s_i B_i A_i (d_out, d_in) densely, sparsify it (the method's own
rule), weight it, combine (weighted sum, or TIES sign election + disjoint mean), scale by lambda,
and write the full-rank result back as the best rank-k LoRA (``ops.best_rank_k``), k = the recipe's
``merge.rank`` or, by default, the sum of the input ranks. The Frobenius energy kept is reported.

Conventions (documented in docs/methods.md):
- the sign election runs on the *weighted* sparsified deltas w_i * delta_i (as mergekit), so a
  weight of 0 removes an adapter entirely and negating every weight negates the result;
- the disjoint merge is the mean over agreeing entries (as the TIES paper and PEFT);
- per-element random draws come from ``ctx.uniform`` (counter-based, keyed by the adapter's recipe name).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
from pydantic import ConfigDict, Field

from soupkit.methods.base import LoraFactors, MergeContext, MergeMethod, MergeResult, MethodParams, ModuleInputs, RunInputs
from soupkit.ops import best_rank_k, dense_delta, disjoint_mean, elect_sign

Density = Annotated[float, Field(gt=0.0, le=1.0, description="Fraction of entries kept, in (0, 1].")]
SignRule = Literal["total", "frequency"]
Scope = Literal["module", "global"]

SIGN_DOC = "Sign election: 'total' = sign of the sum of values, 'frequency' = sign of the count of signs."
SCOPE_DOC = "Top-k per module, or 'global' over each adapter's whole task vector (TIES/KnOTS as published)."


class DenseParams(MethodParams):
    """Parameters every dense method shares. ``lambda`` is spelled as in the papers."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, serialize_by_alias=True)

    lambda_: float = Field(1.0, alias="lambda", description="Scale of the merged update (TIES' lambda).")


class DenseMethod(MergeMethod):
    """Template for the dense-delta methods: subclasses define ``sparsify`` and ``combine``."""

    space = "delta"
    combine: Literal["sum", "ties"] = "sum"

    def output_rank(self, input_ranks: list[int], params: MethodParams, budget: int | None) -> int:
        return budget if budget is not None else sum(input_ranks)

    def sparsify(self, delta: torch.Tensor, j: int, params: Any, ctx: MergeContext) -> torch.Tensor:
        """The method's per-adapter rule on the dense delta of input j (default: keep all)."""
        return delta

    def global_fractions(self, params: Any) -> list[float] | None:
        """Top fractions whose global thresholds ``prepare`` computes (None: module scope)."""
        return None

    def prepare(self, params: MethodParams, run: RunInputs) -> Any:
        fractions = self.global_fractions(params)
        if fractions is None:
            return None
        from soupkit.methods._global import global_thresholds

        def magnitudes(mod: ModuleInputs) -> list[torch.Tensor]:
            return [dense_delta(f).abs() for f in mod.factors]

        return global_thresholds(run, magnitudes, fractions)

    def merge(
        self, factors: list[LoraFactors], weights: list[float], params: MethodParams, ctx: MergeContext
    ) -> MergeResult:
        merged = self.dense_merge(factors, weights, params, ctx)
        rank = self.output_rank([f.rank for f in factors], params, ctx.rank)
        seed = int(ctx.generator("range-finder").initial_seed())
        start = torch.cat([f.A for f in factors], dim=0).T  # the inputs' row space: a close first guess
        out, energy = best_rank_k(merged, rank, start=start, seed=seed)
        return MergeResult(out, energy)

    def dense_merge(
        self, factors: list[LoraFactors], weights: list[float], params: MethodParams, ctx: MergeContext
    ) -> torch.Tensor:
        """The merged update before re-factorisation, (d_out, d_in) float32."""
        p: Any = params
        stack = factors[0].A.new_empty(len(factors), factors[0].B.shape[0], factors[0].A.shape[1])
        for j, (f, w) in enumerate(zip(factors, weights, strict=True)):
            torch.mul(self.sparsify(dense_delta(f), j, p, ctx), w, out=stack[j])  # no extra copy
        if self.combine == "ties":
            merged = disjoint_mean(stack, elect_sign(stack, p.majority_sign))
        else:
            merged = stack.sum(dim=0)
        del stack
        return merged.mul_(p.lambda_)


def uniform_for(delta: torch.Tensor, j: int, ctx: MergeContext, salt: str) -> torch.Tensor:
    """U[0,1) draws of delta's shape for input j, on delta's device, keyed by (seed, module, salt, adapter name)."""
    return ctx.uniform(delta.shape, delta.device, salt, j)


def module_threshold(ctx: MergeContext, j: int, index: int = 0) -> float | None:
    """The global threshold of input j computed by ``prepare`` (None under module scope)."""
    if ctx.state is None:
        return None
    return ctx.state[ctx.source(j)][index]
