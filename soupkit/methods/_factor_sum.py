"""The weighted sum of the updates, re-factorised in factor space: what ``linear`` and ``svd`` share."""

from __future__ import annotations

from soupkit.methods.base import LoraFactors, MergeContext, MergeMethod, MergeResult, MethodParams
from soupkit.ops import concat_factors, truncate_factors


class FactorSum(MergeMethod):
    """delta = sum_i w_i s_i B_i A_i, written as its best rank-k factors, k from ``output_rank``.

    The thin-QR + small-core SVD of the concatenated factors (``ops.truncate_factors``) never forms
    the d_out x d_in matrix; at k >= sum r_i it is exact. Subclasses choose the default k.
    """

    space = "factors"

    def merge(self, factors: list[LoraFactors], weights: list[float], params: MethodParams, ctx: MergeContext) -> MergeResult:
        rank = self.output_rank([f.rank for f in factors], params, ctx.rank)
        merged, kept = truncate_factors(concat_factors(factors, weights), rank)
        return MergeResult(merged, kept)
