"""Interference statistics of LoRA updates, from their factors (float64; r x r products only).

For delta_i = B_i A_i (B_i (d_out, r_i), A_i (r_i, d_in), scale folded into B):
- ||delta_i||_F^2 = <B_i^T B_i, A_i A_i^T> (entrywise sum of the product of two r x r matrices);
- <delta_i, delta_j> = trace((B_i^T B_j)(A_j A_i^T)) = sum((B_i^T B_j) * (A_i A_j^T));
- orthonormal bases of the column and row spaces of delta_i (its left / right singular vectors with
  s > RANK_RTOL * s_1), from the eigen-decompositions of the small Gram matrices;
- principal angles between two spaces: cos(theta_k) = singular values of U_i^T U_j.
Only ``sign_conflict`` forms dense (d_out, d_in) matrices (``soupkit analyze --dense``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

RANK_RTOL = 1e-6  # singular values below this fraction of the largest count as zero (methods.md 4.12)


@dataclass(frozen=True)
class Bases:
    """Orthonormal bases of a delta's column space U (d_out, k) and row space V (d_in, k), float64."""

    U: torch.Tensor
    V: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.U.shape[1])


def _gram_eig(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvectors W (R, k) and singular values s (k,) of a tall M (n, R), from M^T M; zeros dropped."""
    evals, evecs = torch.linalg.eigh(M.T @ M)
    keep = evals > max(float(evals.max()), 0.0) * 1e-24 if evals.numel() else evals > 0
    keep &= evals > 0
    return evecs[:, keep], evals[keep].sqrt()


def factor_bases(B: torch.Tensor, A: torch.Tensor) -> Bases:
    """Column and row bases of B @ A without forming it: B = Q_b R_b, A^T = Q_a R_a (orthonormal Q from
    the Gram matrices), SVD of the small core R_b R_a^T = U_c S V_c^T, U = Q_b U_c, V = Q_a V_c."""
    B, A = B.double(), A.double()
    W_b, s_b = _gram_eig(B)
    W_a, s_a = _gram_eig(A.T)
    core = s_b[:, None] * (W_b.T @ W_a) * s_a[None, :]
    if core.numel() == 0:
        return Bases(B.new_zeros(B.shape[0], 0), A.new_zeros(A.shape[1], 0))
    U_c, S, Vh_c = torch.linalg.svd(core, full_matrices=False)
    keep = S > S[0] * RANK_RTOL
    U = B @ ((W_b / s_b[None, :]) @ U_c[:, keep])
    V = A.T @ ((W_a / s_a[None, :]) @ Vh_c[keep].T)
    return Bases(U, V)


def inner(B_i: torch.Tensor, A_i: torch.Tensor, B_j: torch.Tensor, A_j: torch.Tensor) -> float:
    """<B_i A_i, B_j A_j>_F = sum((B_i^T B_j) * (A_i A_j^T)), in float64."""
    return float(((B_i.double().T @ B_j.double()) * (A_i.double() @ A_j.double().T)).sum())


def overlap(X: torch.Tensor, Y: torch.Tensor) -> tuple[float, float]:
    """Two summaries of the principal angles between span(X) and span(Y) (orthonormal columns):
    mean cos^2 over min(k_x, k_y) angles (1: one space holds the other; ~k_y/d for random spaces),
    and the largest cosine cos(theta_1). (nan, nan) if either space is empty."""
    k = min(X.shape[1], Y.shape[1])
    if k == 0:
        return float("nan"), float("nan")
    cosines = torch.linalg.svdvals(X.T @ Y).clamp(max=1.0)
    return float(cosines.square().sum()) / k, float(cosines[0])


def numerical_rank(M: torch.Tensor) -> int:
    """Rank of a tall or wide matrix from its smaller Gram matrix (s > RANK_RTOL * s_1)."""
    M = M.double()
    gram = M.T @ M if M.shape[0] >= M.shape[1] else M @ M.T
    evals = torch.linalg.eigvalsh(gram).clamp_min(0)
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
        if density is not None and density < 1.0:
            k = int(density * d.numel())
            keep = d.abs() >= torch.topk(d.abs().flatten(), k).values[-1] if k > 0 else torch.zeros_like(d, dtype=torch.bool)
            d = torch.where(keep, d, torch.zeros_like(d))
        positive += d > 0
        negative += d < 0
    shared = (positive + negative) >= 2
    n_shared = int(shared.sum())
    return float(((positive > 0) & (negative > 0) & shared).sum()) / n_shared if n_shared else float("nan")
