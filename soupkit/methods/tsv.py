"""TSV-Merge: task singular vectors, whitened (Gargiulo et al., CVPR 2025, arXiv 2412.00081; docs/methods.md, tsv).

Per module, with Delta_i = w_i s_i B_i A_i (weights folded in) and T adapters:
  Delta_i = U_i S_i V_i^T, keeping its top k_i = min(rank_i, floor(dim / T)) NONZERO triplets
  (s > RANK_RTOL s_1 of that task; rank_i = their count, dim = min(d_out, d_in));
  U = [U_1k ... U_Tk], S = diag(S_1k ... S_Tk), V = [V_1k ... V_Tk];
  whiten each side (rank-revealing polar factor: X = P Sigma Q^T -> P_n Q_n^T over the n singular
  values above RANK_RTOL sigma_1: where tasks share a direction, X is rank-deficient and the published
  P Q^T fills the missing directions by rounding, so the output jumped by 100% for inputs 1e-6 apart);
  delta = lambda * U_perp S V_perp^T, a LoRA of rank <= sum k_i <= sum r_i (top ``merge.rank`` of S if set).
``space: full`` is the published rule on the d_out x d_in deltas. Each Delta_i has rank <= r_i, so its
SVD is computed exactly from the factors (``ops.factor_svd``) and U_perp S V_perp^T is already a factored
SVD: the d_out x d_in matrix is never formed. ``space: core`` runs the same rule on the R x R core
matrices M_i, with dim = R; with equal ranks the two give the same update, with unequal ranks the core
cap floor(R / T) may cut the larger adapters' spectra.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch

from soupkit.methods._core import RANK_RTOL, core_space, small_maths
from soupkit.methods._dense import DenseParams
from soupkit.methods.base import LoraFactors, MergeContext, MergeMethod, MergeResult, MethodParams, sum_rank_within
from soupkit.ops import energy_fraction, factor_svd, svd

Triplets = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # U (m, k), S (k,), Vh (k, n), float64


def kept_count(S: torch.Tensor) -> int:
    """How many of the singular values S (descending) are above RANK_RTOL of the largest."""
    return int((S > RANK_RTOL * S[0]).sum()) if S.numel() and float(S[0]) > 0 else 0


def nonzero_triplets(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> Triplets:
    """The numerically nonzero singular triplets (S descending, above RANK_RTOL of the largest), float64."""
    k = kept_count(S)
    return U[:, :k].double(), S[:k].double(), Vh[:k].double()


def task_triplets(f: LoraFactors, weight: float) -> Triplets:
    """The nonzero singular triplets of weight * B @ A, exact from the factors (no d_out x d_in matrix)."""
    if weight == 0.0:
        empty = f.A.new_zeros(0, f.A.shape[1]).double()
        return f.B.new_zeros(f.B.shape[0], 0).double(), empty.new_zeros(0), empty
    return nonzero_triplets(*factor_svd(LoraFactors(A=f.A, B=weight * f.B)))


def polar_parts(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-revealing polar factor of a tall X (m, k), k <= m, as (P_n (m, n), Qh_n (n, k)): the factor is
    P_n Qh_n from X = P Sigma Q^T, over the n singular values above RANK_RTOL of the largest. For a full-rank
    X (n = k) it is the nearest matrix with orthonormal columns, as published; for a rank-deficient one it
    is X (X^T X)^+1/2, the limit of X (X^T X + mu I)^-1/2 as mu -> 0, instead of directions picked by rounding."""
    P, S, Qh = svd(X)
    n = kept_count(S)
    return P[:, :n], Qh[:n]


def tsv_whiten(parts: list[Triplets], dim: int) -> Triplets:
    """TSV's rule on per-task triplets: keep k_i = min(rank_i, dim // T), concatenate, whiten both sides.

    Returns U_perp (m, K'), S (K',), Vh_perp (K', n) with orthonormal U_perp and Vh_perp rows (S not sorted):
    K' = K = sum k_i as published when both polar factors have full rank; otherwise U_perp S Vh_perp is the
    exact SVD of the (lower-rank) whitened update, so that a rank budget still keeps its best directions.
    """
    cap = dim // len(parts)
    U = torch.cat([u[:, :cap] for u, _, _ in parts], dim=1)
    S = torch.cat([s[:cap] for _, s, _ in parts])
    Vh = torch.cat([vh[:cap] for _, _, vh in parts], dim=0)
    if S.numel() == 0:
        return U, S, Vh
    (P_u, Qh_u), (P_v, Qh_v) = polar_parts(U), polar_parts(Vh.T)
    if Qh_u.shape[0] == S.numel() and Qh_v.shape[0] == S.numel():
        return P_u @ Qh_u, S, (P_v @ Qh_v).T
    # U_perp diag(S) V_perp^T = P_u (Qh_u diag(S) Qh_v^T) P_v^T: the SVD of the small middle gives the update's.
    U_c, S_c, Vh_c = svd((Qh_u * S[None, :]) @ Qh_v.T)
    return P_u @ U_c, S_c, Vh_c @ P_v.T


def factors_from_svd(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int, scale: float) -> MergeResult:
    """Balanced float32 factors of scale * U diag(S) Vh, keeping the ``rank`` largest S (U, Vh orthonormal,
    so that is the best rank-k approximation), and the Frobenius energy kept."""
    order = torch.argsort(S, descending=True, stable=True)
    k = min(rank, S.numel())
    top = order[:k]
    root = (abs(scale) * S[top]).sqrt()
    B = U[:, top] * (root * (1.0 if scale >= 0 else -1.0))[None, :]
    A = root[:, None] * Vh[top]
    return MergeResult(LoraFactors(A=A.float(), B=B.float()), energy_fraction(S[order], k))


class SpectralMerge(MergeMethod):
    """Shared by ``tsv`` and ``iso_c``: a rule on the singular triplets of the updates, computed exactly
    from the factors; the output has rank <= sum r_i (or ``merge.rank``)."""

    space = "factors"
    Params = DenseParams

    def output_rank(self, input_ranks: list[int], params: MethodParams, budget: int | None) -> int:
        return sum_rank_within(input_ranks, budget)

    def merge(self, factors: list[LoraFactors], weights: list[float], params: MethodParams, ctx: MergeContext) -> MergeResult:
        rank = self.output_rank([f.rank for f in factors], params, ctx.rank)
        with small_maths(factors[0].A):
            return self.merge_spectrum(factors, weights, params, rank)

    @abstractmethod
    def merge_spectrum(self, factors: list[LoraFactors], weights: list[float], params: Any, rank: int) -> MergeResult:
        """Merge one module into a LoRA of rank ``rank`` (float64 maths, one CPU thread)."""


class Tsv(SpectralMerge):
    name = "tsv"
    paper = "Task Singular Vectors: Reducing Task Interference in Model Merging (Gargiulo et al., CVPR 2025, arXiv 2412.00081)"
    summary = (
        "top singular triplets of each w_i delta_i, whiten U and V (polar factors), U_perp S V_perp^T x lambda; rank <= sum r_i"
    )

    def merge_spectrum(self, factors: list[LoraFactors], weights: list[float], p: Any, rank: int) -> MergeResult:
        if p.space == "core":
            space = core_space(factors, weights)
            parts = [nonzero_triplets(*svd(space.project(f, w))) for f, w in zip(factors, weights, strict=True)]
            U, S, Vh = tsv_whiten(parts, min(space.U.shape[1], space.V.shape[0]))
            return factors_from_svd(space.U @ U, S, Vh @ space.V, rank, p.lambda_)
        parts = [task_triplets(f, w) for f, w in zip(factors, weights, strict=True)]
        U, S, Vh = tsv_whiten(parts, min(factors[0].B.shape[0], factors[0].A.shape[1]))
        return factors_from_svd(U, S, Vh, rank, p.lambda_)
