"""Shared machinery of the dense-delta methods (TIES, DARE, DELLA, breadcrumbs, magnitude prune).

Per module: form each delta_i = s_i B_i A_i (d_out, d_in) densely, sparsify it (the method's own
rule), weight it, combine (weighted sum, or TIES sign election + disjoint mean), scale by lambda,
and write the full-rank result back as the best rank-k LoRA (``ops.best_rank_k``), k = the recipe's
``merge.rank`` or, by default, the sum of the input ranks. The Frobenius energy kept is reported.
With ``space: core`` the same sparsify / combine rule runs on the R x R core matrices instead
(``soupkit.methods._core``): no dense matrix, and the result is a LoRA of rank <= R, exact in M.

Conventions (documented in docs/methods.md):
- the sign election runs on the *weighted* sparsified deltas w_i * delta_i (as mergekit), so a
  weight of 0 removes an adapter entirely and negating every weight negates the result;
- the disjoint merge is the mean over agreeing entries (as the TIES paper and PEFT), or with
  ``normalize: weights`` the agreeing sum divided by the agreeing weights' sum (mergekit's rule);
- per-element random draws come from ``ctx.uniform`` (counter-based, keyed by the adapter's recipe name).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Annotated, Any, Literal

import torch
from pydantic import ConfigDict, Field

from soupkit.methods import seeds
from soupkit.methods._core import SPACE_DOC, MergeSpace, core_matrices, small_maths
from soupkit.methods._global import global_thresholds
from soupkit.methods.base import (
    LoraFactors,
    MergeContext,
    MergeMethod,
    MergeResult,
    MethodParams,
    ModuleInputs,
    RunInputs,
    sum_rank_within,
)
from soupkit.ops import best_rank_k, dense_delta, disjoint_mean, drop_and_rescale, elect_sign, trim_to_density

Density = Annotated[float, Field(gt=0.0, le=1.0, description="Fraction of entries kept, in (0, 1].")]
SignRule = Literal["total", "frequency"]
Scope = Literal["module", "global"]

Normalize = Literal["count", "weights"]
NORMALIZE_DOC = (
    "Divisor of the disjoint merge: 'count' = number of agreeing adapters (TIES paper, PEFT), "
    "'weights' = sum of their weights (mergekit's normalize: true; weights must be >= 0)."
)
SIGN_DOC = "Sign election: 'total' = sign of the sum of values, 'frequency' = sign of the count of signs."
SCOPE_DOC = "Top-k per module, or 'global' over each adapter's whole task vector (TIES/KnOTS as published)."


class ScaledParams(MethodParams):
    """Parameters with ``lambda``, the scale of the merged update, spelled as in the papers."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, serialize_by_alias=True)

    lambda_: float = Field(1.0, alias="lambda", description="Scale of the merged update (TIES' lambda).")


class DenseParams(ScaledParams):
    """Parameters every dense method shares: ``lambda`` and the space the rule runs in."""

    space: MergeSpace = Field("full", description=SPACE_DOC)


def in_core(params: MethodParams) -> bool:
    """True when the recipe asks for ``space: core`` (methods without a ``space`` key: False)."""
    return getattr(params, "space", "full") == "core"


class DenseMethod(MergeMethod):
    """Template for the dense-delta methods: subclasses define ``sparsify`` and ``combine``."""

    space = "delta"
    combine: Literal["sum", "ties"] = "sum"

    def output_rank(self, input_ranks: list[int], params: MethodParams, budget: int | None) -> int:
        if in_core(params):  # U M V has rank <= R
            return sum_rank_within(input_ranks, budget)
        return budget if budget is not None else sum(input_ranks)

    def forms_dense(self, params: MethodParams) -> bool:
        return not in_core(params)

    full_tensor_rule = "the method's own rule (sparsify each d_i, combine, x lambda) on each whole tensor, per tensor"

    def merge_full(
        self, deltas: list[torch.Tensor], weights: list[float], params: MethodParams, ctx: MergeContext
    ) -> torch.Tensor:
        # per tensor (scope: module): the global thresholds of ``prepare`` were computed over the LoRA updates only
        flat = [d.reshape(1, -1) if d.dim() == 1 else d for d in deltas]  # a bias vector as one row
        merged = self.combine_coordinates(lambda j: flat[j], weights, params, replace(ctx, state=None))
        return merged.reshape(deltas[0].shape)

    def check_weights(self, params: MethodParams, weights: list[float]) -> str | None:
        if getattr(params, "normalize", "count") == "weights" and any(w < 0 for w in weights):
            return f"a negative weight, {min(weights):g}"
        return None

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

        def magnitudes(mod: ModuleInputs) -> list[torch.Tensor]:
            if in_core(params):
                with small_maths(mod.factors[0].A):
                    return [M.abs() for M in core_matrices(mod.factors, mod.weights)[1]]
            return [dense_delta(f).abs() for f in mod.factors]

        return global_thresholds(run, magnitudes, fractions)

    def merge(self, factors: list[LoraFactors], weights: list[float], params: MethodParams, ctx: MergeContext) -> MergeResult:
        rank = self.output_rank([f.rank for f in factors], params, ctx.rank)
        if in_core(params):
            with small_maths(factors[0].A):
                space, cores = core_matrices(factors, weights)
                return space.lift(self.combine_coordinates(lambda j: cores[j], weights, params, ctx), rank)
        merged = self.dense_merge(factors, weights, params, ctx)
        seed = int(ctx.generator(seeds.RANGE_FINDER).initial_seed())
        start = torch.cat([f.A for f in factors], dim=0).T  # the inputs' row space: a close first guess
        out, energy = best_rank_k(merged, rank, start=start, seed=seed)
        return MergeResult(out, energy)

    def dense_merge(
        self, factors: list[LoraFactors], weights: list[float], params: MethodParams, ctx: MergeContext
    ) -> torch.Tensor:
        """The merged update before re-factorisation, (d_out, d_in) float32."""
        return self.combine_coordinates(lambda j: dense_delta(factors[j]), weights, params, ctx)

    def combine_coordinates(
        self, coordinates: Callable[[int], torch.Tensor], weights: list[float], params: MethodParams, ctx: MergeContext
    ) -> torch.Tensor:
        """The rule on one coordinate matrix per input (a dense delta or a core matrix), made one at a
        time by ``coordinates(j)``: sparsify, weight, combine, x lambda. Same shape as the inputs."""
        p: Any = params
        stack: torch.Tensor | None = None
        for j, w in enumerate(weights):
            x = self.sparsify(coordinates(j), j, p, ctx)
            if stack is None:
                stack = x.new_empty(len(weights), *x.shape)
            torch.mul(x, w, out=stack[j])  # no extra copy
            del x
        assert stack is not None, "a module is merged only when at least one adapter targets it"
        if self.combine == "ties":
            divide_by = weights if getattr(p, "normalize", "count") == "weights" else None
            merged = disjoint_mean(stack, elect_sign(stack, p.majority_sign), divide_by)
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


class TrimmedDense(DenseMethod):
    """Keeps the top ``density`` fraction of each |delta_i|, per module or, with ``scope: global``,
    over the adapter's whole task vector: the trim step of TIES and of magnitude pruning.
    Subclasses' ``Params`` have ``density`` and ``scope``."""

    def global_fractions(self, params: Any) -> list[float] | None:
        return [params.density] if params.scope == "global" else None

    def sparsify(self, delta: torch.Tensor, j: int, params: Any, ctx: MergeContext) -> torch.Tensor:
        return trim_to_density(delta, params.density, module_threshold(ctx, j))


class DareDropped(DenseMethod):
    """DARE's drop and rescale of each delta_i: keep entries w.p. ``density``, divide by it
    (unbiased); seeded per (seed, module, adapter name). Subclasses' ``Params`` have ``density``."""

    def sparsify(self, delta: torch.Tensor, j: int, params: Any, ctx: MergeContext) -> torch.Tensor:
        if params.density >= 1.0:
            return delta
        return drop_and_rescale(delta, params.density, uniform_for(delta, j, ctx, seeds.DARE))
