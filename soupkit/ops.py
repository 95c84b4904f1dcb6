"""Shared tensor maths: small pure functions, float32 in and out unless stated.

Shapes follow PEFT: ``A`` is (r, d_in), ``B`` is (d_out, r), and a module's update is
``delta = B @ A`` of shape (d_out, d_in), with every scale already folded into B.
"""

from __future__ import annotations

import torch

from soupkit.methods.base import LoraFactors


def concat_factors(factors: list[LoraFactors], weights: list[float]) -> LoraFactors:
    """Concatenate along the rank: B = [w_1 B_1, ..., w_n B_n] (d_out, R), A = [A_1; ...; A_n] (R, d_in).

    ``B @ A == sum_i w_i B_i A_i`` exactly, with R = sum_i r_i and no cross terms.
    """
    B = torch.cat([w * f.B for f, w in zip(factors, weights, strict=True)], dim=1)
    A = torch.cat([f.A for f in factors], dim=0)
    return LoraFactors(A=A, B=B)


def dense_delta(f: LoraFactors) -> torch.Tensor:
    """The dense update B @ A, (d_out, d_in). Only for methods whose maths needs it."""
    return f.B @ f.A


def energy_fraction(singular_values: torch.Tensor, rank: int) -> float:
    """Fraction of Frobenius energy ``sum_{i<rank} s_i^2 / sum_i s_i^2`` (1.0 for a zero matrix)."""
    energy = singular_values.double().square()
    total = float(energy.sum())
    return 1.0 if total == 0.0 else float(energy[:rank].sum()) / total


def split_balanced(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> LoraFactors:
    """Factors of U diag(S) Vh with sqrt(S) on each side: B = U sqrt(S) (d_out, r), A = sqrt(S) Vh (r, d_in).

    Balanced factors keep B and A on the same scale, which matters if the merged adapter is
    trained further; at inference any split gives the same B @ A.
    """
    root = S.clamp_min(0).sqrt()
    return LoraFactors(A=root[:, None] * Vh, B=U * root[None, :])


def factor_svd(f: LoraFactors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact thin SVD of ``B @ A`` without forming it (reference/methods.md 4.9).

    Thin QR: B = Q_B R_B, A^T = Q_A R_A; core C = R_B R_A^T (at most R x R); C = U_c S V_c^T;
    then B @ A = (Q_B U_c) S (Q_A V_c)^T. Cost O((d_out + d_in) R^2 + R^3).

    Returns:
        U (d_out, k), S (k,) descending, Vh (k, d_in), with k = min(R, d_out, d_in).
    """
    B, A = f.B.double(), f.A.double()  # float64: the core's small singular values stay accurate
    Q_b, R_b = torch.linalg.qr(B)
    Q_a, R_a = torch.linalg.qr(A.T)
    U_c, S, Vh_c = torch.linalg.svd(R_b @ R_a.T, full_matrices=False)
    U = Q_b @ U_c
    Vh = Vh_c @ Q_a.T
    return U.float(), S.float(), Vh.float()


def truncate_factors(f: LoraFactors, rank: int) -> tuple[LoraFactors, float]:
    """Best rank-``rank`` approximation (Eckart-Young) of ``B @ A``, computed in factor space.

    Returns:
        balanced factors of rank <= ``rank`` and the fraction of Frobenius energy kept.
    """
    U, S, Vh = factor_svd(f)
    k = min(rank, S.shape[0])
    return split_balanced(U[:, :k], S[:k], Vh[:k]), energy_fraction(S, k)


def truncate_dense(delta: torch.Tensor, rank: int) -> tuple[LoraFactors, float]:
    """Best rank-``rank`` approximation of a dense (d_out, d_in) update, as balanced factors.

    Uses the eigen-decomposition of the smaller Gram matrix (min(d_out, d_in) squared) in
    float64, which is exact and several times faster on CPU than a full SVD of ``delta``.
    """
    d = delta.double()
    transpose = d.shape[0] < d.shape[1]
    m = d.T if transpose else d  # (big, small)
    evals, evecs = torch.linalg.eigh(m.T @ m)  # ascending, (small,), (small, small)
    order = torch.argsort(evals, descending=True)
    S = evals[order].clamp_min(0).sqrt()
    V = evecs[:, order]
    k = min(rank, S.shape[0])
    S_k, V_k = S[:k], V[:, :k]
    safe = torch.where(S_k > 0, S_k, torch.ones_like(S_k))
    U_k = (m @ V_k) / safe[None, :]
    U_k = torch.where(S_k[None, :] > 0, U_k, torch.zeros_like(U_k))
    if transpose:  # delta = m^T = V S U^T
        U_k, V_k = V_k, U_k
    factors = split_balanced(U_k.float(), S_k.float(), V_k.T.float())
    return factors, energy_fraction(S, k)


def pad_rank(f: LoraFactors, rank: int) -> LoraFactors:
    """Zero-pad factors to ``rank`` (exact: zero rows of A meet zero columns of B)."""
    extra = rank - f.rank
    if extra < 0:
        raise ValueError(f"cannot pad rank {f.rank} down to {rank}")
    if extra == 0:
        return f
    A = torch.cat([f.A, f.A.new_zeros(extra, f.A.shape[1])], dim=0)
    B = torch.cat([f.B, f.B.new_zeros(f.B.shape[0], extra)], dim=1)
    return LoraFactors(A=A, B=B)


def frobenius_norm(f: LoraFactors) -> float:
    """||B @ A||_F without forming it: sqrt(trace((B^T B)(A A^T)))."""
    gram = (f.B.T.double() @ f.B.double()) * (f.A.double() @ f.A.T.double())
    return float(gram.sum().clamp_min(0).sqrt())
