"""Interference statistics of LoRA updates, from their factors (float64; r x r products only).

For delta_i = B_i A_i (B_i (d_out, r_i), A_i (r_i, d_in), scale folded into B):
- ||delta_i||_F^2 = <B_i^T B_i, A_i A_i^T> (entrywise sum of the product of two r x r matrices);
- <delta_i, delta_j> = trace((B_i^T B_j)(A_j A_i^T)) = sum((B_i^T B_j) * (A_i A_j^T));
- orthonormal bases of the column and row spaces of delta_i (its left / right singular vectors with
  s > RANK_RTOL * s_1), from the eigen-decompositions of the small Gram matrices;
- principal angles between two spaces: cos(theta_k) = singular values of U_i^T U_j.
All of it comes from the two Gram matrices of the stacked factors (``Grams``): one pass over the
factors per module, then R x R maths (R = sum r_i).
Only ``sign_conflict`` forms dense (d_out, d_in) matrices (``soupkit analyze --dense``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from soupkit.ops import eigh, small_lapack, svd, top_fraction_threshold

RANK_RTOL = 1e-6  # singular values below this fraction of the largest count as zero (as TSV's ranks, docs/methods.md)


@dataclass(frozen=True)
class Grams:
    """Gram matrices of one module's stacked factors, float64: everything else is r x r maths on them.

    G_B = B_stack^T B_stack and G_A = A_stack A_stack^T (R x R, R = sum r_i), B_stack = [B_1 ... B_n],
    A_stack = [A_1; ...; A_n]; block (i, j) is B_i^T B_j (resp. A_i A_j^T). Cost O((d_out + d_in) R^2).
    """

    G_B: torch.Tensor
    G_A: torch.Tensor
    offsets: list[int]  # block i is rows/columns offsets[i]:offsets[i + 1]

    @classmethod
    def of(cls, Bs: list[torch.Tensor], As: list[torch.Tensor]) -> Grams:
        B = torch.cat([b.double() for b in Bs], dim=1)
        A = torch.cat([a.double() for a in As], dim=0)
        offsets = [0]
        for a in As:
            offsets.append(offsets[-1] + a.shape[0])
        return cls(B.T @ B, A @ A.T, offsets)

    def block(self, G: torch.Tensor, i: int, j: int) -> torch.Tensor:
        o = self.offsets
        return G[o[i] : o[i + 1], o[j] : o[j + 1]]

    def inner(self, i: int, j: int) -> float:
        """<B_i A_i, B_j A_j>_F = trace((B_i^T B_j)(A_j A_i^T)) = sum((B_i^T B_j) * (A_i A_j^T))."""
        return float((self.block(self.G_B, i, j) * self.block(self.G_A, i, j)).sum())


@dataclass(frozen=True)
class Bases:
    """Orthonormal bases of delta_i's column space, U = B_i M_u, and row space, V = A_i^T M_v, given by
    their coordinates M_u, M_v (r_i, k) so that inner products of bases need only Gram blocks."""

    M_u: torch.Tensor
    M_v: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.M_u.shape[1])


def _gram_eig(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvectors W (r, k) and singular values s (k,) of M from G = M^T M; exact zeros dropped."""
    evals, evecs = eigh(G)
    keep = evals > max(float(evals.max()), 0.0) * 1e-24 if evals.numel() else evals > 0
    keep &= evals > 0
    return evecs[:, keep], evals[keep].sqrt()


def factor_bases(grams: Grams, i: int) -> Bases:
    """Column and row bases of B_i A_i without forming it: B_i = Q_b diag(s_b) W_b^T, A_i^T = Q_a diag(s_a) W_a^T
    (eigen-decompositions of the Gram blocks), SVD of the core diag(s_b) W_b^T W_a diag(s_a) = U_c S V_c^T,
    U = Q_b U_c = B_i (W_b / s_b) U_c, V = Q_a V_c = A_i^T (W_a / s_a) V_c; directions with S <= RANK_RTOL S_1 dropped."""
    W_b, s_b = _gram_eig(grams.block(grams.G_B, i, i))
    W_a, s_a = _gram_eig(grams.block(grams.G_A, i, i))
    core = s_b[:, None] * (W_b.T @ W_a) * s_a[None, :]
    if core.numel() == 0:
        empty = grams.G_B.new_zeros(grams.offsets[i + 1] - grams.offsets[i], 0)
        return Bases(empty, empty)
    U_c, S, Vh_c = svd(core)
    keep = S > S[0] * RANK_RTOL
    return Bases((W_b / s_b[None, :]) @ U_c[:, keep], (W_a / s_a[None, :]) @ Vh_c[keep].T)


def overlap(cross: torch.Tensor) -> tuple[float, float]:
    """Two summaries of the principal angles between two spaces, given X^T Y (k_x, k_y) of their
    orthonormal bases: mean cos^2 over min(k_x, k_y) angles (1: one space holds the other; about
    k_y / d for random spaces), and the largest cosine cos(theta_1). (nan, nan) if a space is empty."""
    k = min(cross.shape)
    if k == 0:
        return float("nan"), float("nan")
    with small_lapack(cross):
        cosines = torch.linalg.svdvals(cross).clamp(max=1.0)
    return float(cosines.square().sum()) / k, float(cosines[0])


def subspace_overlaps(grams: Grams, bases: list[Bases], i: int, j: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """Column-space and row-space ``overlap`` of delta_i and delta_j: U_i^T U_j = M_u,i^T (B_i^T B_j) M_u,j,
    V_i^T V_j = M_v,i^T (A_i A_j^T) M_v,j."""
    col = bases[i].M_u.T @ grams.block(grams.G_B, i, j) @ bases[j].M_u
    row = bases[i].M_v.T @ grams.block(grams.G_A, i, j) @ bases[j].M_v
    return overlap(col), overlap(row)


def gram_rank(G: torch.Tensor) -> int:
    """Rank of M from G = M^T M: eigenvalues above RANK_RTOL^2 times the largest (s > RANK_RTOL s_1)."""
    evals = torch.linalg.eigvalsh(G).clamp_min(0)
    if evals.numel() == 0 or float(evals.max()) == 0.0:
        return 0
    return int((evals > float(evals.max()) * RANK_RTOL**2).sum())


def sign_conflict(deltas: list[torch.Tensor], density: float | None) -> float:
    """TIES' sign conflicts: among the entries where at least two (weighted, trimmed) deltas are nonzero,
    the fraction where some are positive and some negative. ``density`` trims each delta to its top
    fraction by |.| first (TIES' trim), None keeps every entry. nan if no entry has two nonzeros."""
    positive = torch.zeros(deltas[0].shape, dtype=torch.int32, device=deltas[0].device)
    negative = torch.zeros_like(positive)
    for d in deltas:
        pos, neg = d > 0, d < 0
        if density is not None and density < 1.0:  # TIES' trim (as ops.trim_to_density): keep |d| >= t
            mag = d.abs()
            t = top_fraction_threshold(mag, density)
            if t > 0:
                kept = mag >= t
                pos &= kept
                neg &= kept
            del mag
        positive += pos
        negative += neg
    shared = (positive + negative) >= 2
    n_shared = int(shared.sum())
    return float(((positive > 0) & (negative > 0) & shared).sum()) / n_shared if n_shared else float("nan")
