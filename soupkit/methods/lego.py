"""LoRA-LEGO: merge by clustering rank-1 units (Zhao et al., ICLR 2025, arXiv 2409.16167).

Per module: pool every adapter's rank-1 units u = (w_i b_j, a_j) (b_j column j of s_i B_i, a_j row j
of A_i), so that sum_u b a^T = sum_i w_i delta_i (this pooling is exactly CAT). Each unit is
canonicalised before clustering, so that a unit is never averaged with its own negation or a
rescaled copy: scale balanced (||b|| = ||a||, same b a^T) and sign fixed (largest-|.| entry of a > 0).
k-means (k-means++ seeded from ``ctx.generator``; units sorted by norm first, so adapter order does
not matter) groups the [b; a] vectors into k clusters; each centroid becomes one rank.

Dual reweighting (both on by default; with k = sum r_i every cluster is one unit and both are identities):
- parameter reweighting: each centroid [b; a] is rescaled to the mean norm of its cluster's members
  (averaging non-parallel units shrinks the norm);
- output reweighting: the merged update B'A' is rescaled by one factor so that its Frobenius norm equals
  that of the weighted sum sum_i w_i delta_i (computed exactly in factor space). soupkit's choice: the
  paper's exact constant is not public in the sources we could check; this one makes the merged output
  as large as task arithmetic's. The factor is split as sqrt on B' and on A', keeping units balanced.
k = ``merge.rank``, default max r_i (k = sum r_i reproduces CAT exactly).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from soupkit.methods import seeds
from soupkit.methods.base import LoraFactors, MergeContext, MergeMethod, MergeResult, MethodParams
from soupkit.ops import concat_factors, frobenius_norm, kmeans


class LegoParams(MethodParams):
    parameter_reweighting: bool = Field(True, description="Rescale each centroid to its cluster's mean unit norm.")
    output_reweighting: bool = Field(True, description="Rescale the merged update to the Frobenius norm of sum_i w_i delta_i.")
    max_iter: int = Field(100, ge=1, description="Lloyd iterations at most (stops earlier when assignments settle).")


def canonical_units(factors: list[LoraFactors], weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled units as rows: b (N, d_out) and a (N, d_in), balanced, sign-fixed, zero units dropped,
    sorted by descending ||b a^T|| (float64)."""
    b = torch.cat([w * f.B.double() for f, w in zip(factors, weights, strict=True)], dim=1).T
    a = torch.cat([f.A.double() for f in factors], dim=0)
    nb, na = b.norm(dim=1), a.norm(dim=1)
    live = (nb > 0) & (na > 0)
    b, a, nb, na = b[live], a[live], nb[live], na[live]
    c = (na / nb).sqrt()[:, None]  # b * c and a / c both get norm sqrt(||b|| ||a||)
    b, a = b * c, a / c
    peak = a.gather(1, a.abs().argmax(dim=1, keepdim=True))
    flip = torch.where(peak < 0, -1.0, 1.0).to(a.dtype)
    b, a = b * flip, a * flip
    order = torch.argsort(nb * na, descending=True, stable=True)
    return b[order], a[order]


class Lego(MergeMethod):
    name = "lego"
    space = "factors"
    paper = "LoRA-LEGO: Merging LoRAs like Playing LEGO (Zhao et al., ICLR 2025, arXiv 2409.16167)"
    summary = "k-means of the pooled rank-1 units (sign/scale canonicalised), centroids as ranks, dual reweighting; rank k"
    Params = LegoParams

    def output_rank(self, input_ranks: list[int], params: MethodParams, budget: int | None) -> int:
        total = sum(input_ranks)
        return min(budget, total) if budget is not None else max(input_ranks, default=0)

    def merge(self, factors: list[LoraFactors], weights: list[float], params: MethodParams, ctx: MergeContext) -> MergeResult:
        p: Any = params
        b, a = canonical_units(factors, weights)
        d_out, d_in = factors[0].B.shape[0], factors[0].A.shape[1]
        k = min(self.output_rank([f.rank for f in factors], params, ctx.rank), b.shape[0])
        if k == 0:
            return MergeResult(LoraFactors(A=a.new_zeros(0, d_in).float(), B=b.new_zeros(d_out, 0).float()))
        points = torch.cat([b, a], dim=1)
        assign = kmeans(points, k, ctx.generator(seeds.LEGO_KMEANS), p.max_iter)
        member = torch.nn.functional.one_hot(assign, k).T.to(points.dtype)  # (k, N) cluster membership
        sizes = member.sum(dim=1).clamp_min(1)  # kmeans leaves no cluster empty; never divide by 0 regardless
        centres = (member @ points) / sizes[:, None]
        if p.parameter_reweighting:
            mean_norm = (member @ points.norm(dim=1)) / sizes
            norms = centres.norm(dim=1)
            ratio = torch.where(norms > 0, mean_norm / norms.clamp_min(1e-300), torch.ones_like(norms))
            centres = centres * ratio[:, None]
        merged = LoraFactors(A=centres[:, d_out:].float(), B=centres[:, :d_out].T.float())
        if p.output_reweighting:
            target = frobenius_norm(concat_factors(factors, weights))
            current = frobenius_norm(merged)
            if current > 0:
                root = (target / current) ** 0.5
                merged = LoraFactors(A=merged.A * root, B=merged.B * root)
        return MergeResult(merged)
