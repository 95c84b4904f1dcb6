"""SVD merge: PEFT's ``svd`` combination, computed without the dense matrix.

delta = best rank-k approximation (Eckart-Young) of sum_i w_i s_i B_i A_i, k = ``merge.rank``
(default max_i r_i, as PEFT). Space: factors (QR + core SVD, ``ops.truncate_factors``).
Unlike PEFT 0.x before #3111, each scale s_i is applied once.
"""

from __future__ import annotations

from soupkit.methods._factor_sum import FactorSum
from soupkit.methods.base import MethodParams


class Svd(FactorSum):
    name = "svd"
    paper = "PEFT add_weighted_adapter(combination_type='svd'); Eckart-Young truncation"
    summary = "best rank-k approximation of sum_i w_i s_i B_i A_i, k default max r_i"

    def output_rank(self, input_ranks: list[int], params: MethodParams, budget: int | None) -> int:
        return budget if budget is not None else max(input_ranks, default=0)
