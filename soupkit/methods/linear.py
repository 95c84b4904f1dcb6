"""Linear / task arithmetic on the updates (Ilharco et al. 2023, arXiv 2212.04089).

delta = sum_i w_i s_i B_i A_i, re-factorised to ``merge.rank`` (default sum r_i: exact) by the
thin-QR + small-core SVD of the concatenated factors; the dense d_out x d_in matrix is never formed.
Space: factors. Unlike PEFT's ``linear`` (see ``peft_linear``) there are no cross terms.
``space: core`` sums the core matrices, M = sum_i w_i M_i, and maps back U_ref M V_ref: the same
update (lossless), a check of the core space rather than a faster path.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from soupkit.methods._core import SPACE_DOC, MergeSpace, core_space, small_maths
from soupkit.methods._factor_sum import FactorSum
from soupkit.methods.base import LoraFactors, MergeContext, MergeResult, MethodParams, sum_rank_within


class LinearParams(MethodParams):
    space: MergeSpace = Field("full", description=SPACE_DOC)


class Linear(FactorSum):
    name = "linear"
    paper = "Editing Models with Task Arithmetic (Ilharco et al. 2023, arXiv 2212.04089)"
    summary = "delta = sum_i w_i s_i B_i A_i, best rank-k factors via QR + core SVD (k default sum r_i)"
    Params = LinearParams

    def output_rank(self, input_ranks: list[int], params: MethodParams, budget: int | None) -> int:
        return sum_rank_within(input_ranks, budget)

    def merge(self, factors: list[LoraFactors], weights: list[float], params: MethodParams, ctx: MergeContext) -> MergeResult:
        p: Any = params
        if p.space == "core":
            rank = self.output_rank([f.rank for f in factors], params, ctx.rank)
            with small_maths(factors[0].A):
                space = core_space(factors, weights)
                return space.lift(sum(space.project(f, w) for f, w in zip(factors, weights, strict=True)), rank)
        return super().merge(factors, weights, params, ctx)
