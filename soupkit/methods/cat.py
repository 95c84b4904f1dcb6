"""CAT: concatenate the adapters along the rank (LoRA Soups, Prabhakar et al. 2024, arXiv 2410.13025).

delta = sum_i w_i s_i B_i A_i exactly: B = [w_1 s_1 B_1, ..., w_n s_n B_n], A = [A_1; ...; A_n].
Space: factors. Output rank: sum_i r_i. Weights may differ per adapter, per layer and per module
(that is where the weights learned by ``soupkit fit-alpha`` land).
"""

from __future__ import annotations

from soupkit.methods.base import LoraFactors, MergeContext, MergeMethod, MergeResult, MethodParams
from soupkit.ops import concat_factors


class Cat(MergeMethod):
    name = "cat"
    space = "factors"
    paper = "LoRA Soups (Prabhakar et al. 2024, arXiv 2410.13025)"
    summary = "B = [w_i s_i B_i], A = [A_i]; exact sum of weighted updates, rank sum r_i"
    uses_rank = False

    def output_rank(self, input_ranks: list[int], params: MethodParams, budget: int | None) -> int:
        return sum(input_ranks)  # exact: the rank budget does not apply

    def merge(self, factors: list[LoraFactors], weights: list[float], params: MethodParams, ctx: MergeContext) -> MergeResult:
        return MergeResult(concat_factors(factors, weights))
