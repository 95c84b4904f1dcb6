"""Low-rank algebra on LoRA factors: float32 in and out unless stated.

Shapes follow PEFT: ``A`` is (r, d_in), ``B`` is (d_out, r), and a module's update is
``delta = B @ A`` of shape (d_out, d_in), with every scale already folded into B.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoraFactors:
    """One module's low-rank update with the scale folded in: ``delta = B @ A``.

    Attributes:
        A: (r, d_in) float tensor.
        B: (d_out, r) float tensor.
        scale: the PEFT scale s already folded into B (1.0 for merged factors). Only the
            factor-wise ``peft_*`` methods use it, to split s as PEFT does.
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


# LAPACK on a CPU matrix with at most this many rows and columns runs on one thread: the R x R core
# maths (R = summed input ranks). Larger ones keep torch's default thread count, which a many-core
# server needs. Figures: benchmarks/bench_threads.py, docs/benchmarks.md (Threads).
SMALL_MATRIX = 512


@contextmanager
def single_thread() -> Iterator[None]:
    """Run the block on one CPU thread, then restore the count. Measured on the shared 2-core machine
    (load average 22, benchmarks/bench_threads.py): eigh of a 128 x 128 matrix takes 321 ms with 2
    threads and 14 ms with one, a 512 x 512 one 5.3 s vs 0.64 s (the threads wait for each other)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def small_lapack(M: torch.Tensor) -> AbstractContextManager[None]:
    """One thread for LAPACK on a small CPU matrix (every dimension <= ``SMALL_MATRIX``); else no change."""
    small = M.device.type == "cpu" and max(M.shape[-2:], default=0) <= SMALL_MATRIX
    return single_thread() if small else nullcontext()


def on_host(M: torch.Tensor) -> bool:
    """True for a small matrix on a GPU, which LAPACK on the host decomposes faster than the GPU's solver:
    each GPU eigh / svd of an R x R matrix is a chain of small kernels and host syncs, and the dense
    methods' range finder makes about ten per module (R = 40 to 100)."""
    return M.device.type != "cpu" and max(M.shape[-2:], default=0) <= SMALL_MATRIX


def eigh(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` (ascending); one CPU thread for a small matrix (see ``small_lapack``); a
    small GPU matrix is decomposed on the host (``on_host``) and the result moved back."""
    if on_host(G):
        evals, evecs = eigh(G.cpu())
        return evals.to(G.device), evecs.to(G.device)
    with small_lapack(G):
        return torch.linalg.eigh(G)


def svd(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin ``torch.linalg.svd``; one CPU thread for a small matrix (see ``small_lapack``); a small GPU
    matrix is decomposed on the host (``on_host``) and the result moved back."""
    if on_host(M):
        U, S, Vh = svd(M.cpu())
        return U.to(M.device), S.to(M.device), Vh.to(M.device)
    with small_lapack(M):
        return torch.linalg.svd(M, full_matrices=False)


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


def gram_basis(M: torch.Tensor, rtol: float = 1e-13) -> tuple[torch.Tensor, torch.Tensor]:
    """Right singular vectors and values of a tall (n, R) matrix from its (R, R) Gram matrix.

    ``M = U diag(s) W^T`` with ``U = M W / s``. Directions whose squared singular value is below
    ``rtol`` times the largest are dropped: in float64 they are rounding noise.

    Returns:
        W (R, k) and s (k,), k <= R.
    """
    evals, evecs = eigh(M.T @ M)
    keep = evals > evals.max().clamp_min(0) * rtol if evals.numel() else evals > 0
    keep &= evals > 0
    return evecs[:, keep], evals[keep].sqrt()


def factor_svd(f: LoraFactors, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact thin SVD of ``B @ A`` without forming it.

    B = U_b diag(s_b) W_b^T and A^T = U_a diag(s_a) W_a^T come from the eigen-decompositions of the
    small Gram matrices B^T B and A A^T (R x R, float64); the core diag(s_b) W_b^T W_a diag(s_a)
    (at most R x R) has SVD U_c S V_c^T, so B @ A = (U_b U_c) S (U_a V_c)^T. This is the thin-QR
    construction with the orthonormal bases taken from the Gram matrices, which is several times
    faster than LAPACK's QR on CPU. Cost O((d_out + d_in) R^2 + R^3).

    Args:
        rank: if given, U and Vh keep only the first ``rank`` directions (S stays whole, for energy).

    Returns:
        U (d_out, k'), S (k,) descending, Vh (k', d_in), with k <= min(R, d_out, d_in), k' = min(k, rank).
    """
    B, A = f.B.double(), f.A.double()  # float64: the Gram matrices square the condition number
    W_b, s_b = gram_basis(B)
    W_a, s_a = gram_basis(A.T)
    core = s_b[:, None] * (W_b.T @ W_a) * s_a[None, :]
    U_c, S, Vh_c = svd(core)
    if rank is not None:  # only the kept directions reach the tall products
        U_c, Vh_c = U_c[:, :rank], Vh_c[:rank]
    # The tall products run in float32 (the outputs are float32); only the small maths needs float64.
    U = f.B.float() @ ((W_b / s_b[None, :]) @ U_c).float()  # (d_out, k) = U_b U_c
    Vh = (Vh_c @ (W_a / s_a[None, :]).T).float() @ f.A.float()  # (k, d_in) = (U_a V_c)^T
    return U.float(), S.float(), Vh.float()


def truncate_factors(f: LoraFactors, rank: int) -> tuple[LoraFactors, float]:
    """Best rank-``rank`` approximation (Eckart-Young) of ``B @ A``, computed in factor space.

    Returns:
        balanced factors of rank <= ``rank`` and the fraction of Frobenius energy kept.
    """
    U, S, Vh = factor_svd(f, rank)
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
    evals, evecs = eigh(m.T @ m)  # ascending, (small,), (small, small)
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


def orthonormal_columns(Y: torch.Tensor, rounds: int = 2) -> torch.Tensor:
    """Orthonormal basis (n, k <= m) of the column space of a tall (n, m) matrix, float32.

    On the CPU from the float64 Gram matrix (``gram_columns``); on a GPU by float64 Householder QR
    (``householder_columns``), which stays on the device: the Gram route needs a host eigh, and its
    device-to-host round trips (four per range-finder round) were most of a GPU refit's time.
    """
    if Y.device.type == "cpu":
        return gram_columns(Y, rounds)
    return householder_columns(Y)


def gram_columns(Y: torch.Tensor, rounds: int = 2) -> torch.Tensor:
    """``orthonormal_columns`` from the float64 Gram matrix (``gram_basis``), applied ``rounds`` times
    (two: CholeskyQR2-style, orthonormal to float32 precision; one: a well-conditioned basis of the
    same span, enough inside a power iteration); several times faster than LAPACK QR on the CPU.
    Directions at rounding level are dropped, so k < m for a rank-deficient Y."""
    Q = Y.double()
    for _ in range(rounds):
        W, s = gram_basis(Q, rtol=1e-12)
        Q = Q @ (W / s[None, :])
    return Q.float()


def householder_columns(Y: torch.Tensor) -> torch.Tensor:
    """``orthonormal_columns`` by float64 Householder QR (k = m): orthonormal to float64 precision
    whatever Y's rank (the columns beyond its rank span other directions, which a range finder may
    hold: they only widen the subspace searched)."""
    return torch.linalg.qr(Y.double(), mode="reduced").Q.float()


def top_ritz(Z: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``rank`` eigenpairs of ``Z^T Z`` (Z: (n, w)), descending: the squared Ritz values of a sketch.

    Returns:
        eigenvalues (<= rank,) clamped at 0 and eigenvectors (w, <= rank), float64.
    """
    Zd = Z.double()
    evals, evecs = eigh(Zd.T @ Zd)  # ascending
    return evals.flip(0)[:rank].clamp_min(0), evecs.flip(1)[:, :rank]


def best_rank_k(
    delta: torch.Tensor,
    rank: int,
    *,
    start: torch.Tensor | None = None,
    oversample: int = 8,
    tol: float = 1e-4,
    max_iter: int = 12,
    seed: int = 0,
) -> tuple[LoraFactors, float]:
    """Best rank-``rank`` approximation of a dense (d_out, d_in) update, as balanced factors.

    Small matrices (or a rank close to full) use the exact eigen-decomposition (``truncate_dense``).
    Large ones use a randomized range finder with power iterations: Q spans
    ``max(rank, m) + oversample`` directions, starting from ``D @ [start, random]`` (``start``:
    (d_in, m) guess of the row space, e.g. the inputs' A^T, which holds nearly all of a merged
    update's energy; random columns from ``seed``, so a rerun is bit for bit the same). Each round
    is two passes over D, ``Z = D^T Q`` then ``Q <- orth(D orth(Z))``; Z also gives the Ritz values
    of the round. After at least one round, it stops when a round adds less than ``tol`` times the
    remaining residual ``||D||_F^2 - captured`` (at most ``max_iter`` rounds): the residual is then
    within about ``tol`` (relative) of the exact best rank-k residual (tests: within 1e-3 against a
    float64 SVD). The energy kept is measured against the exact ||D||_F^2 and the returned factors,
    so it is a true figure, never optimistic.

    Returns:
        factors of rank <= ``rank`` and the fraction of Frobenius energy kept.
    """
    small = min(delta.shape)
    width = min(max(rank, 0 if start is None else start.shape[1]) + oversample, small)
    if small <= 512 or 2 * width >= small:
        return truncate_dense(delta, rank)
    d = delta.float()
    total = float(torch.linalg.vector_norm(d, dtype=torch.float64) ** 2)
    if total == 0.0:
        return LoraFactors(A=d.new_zeros(0, d.shape[1]), B=d.new_zeros(d.shape[0], 0)), 1.0
    guess = [] if start is None else [start.float().to(d.device)[:, :width]]
    n_random = width - (guess[0].shape[1] if guess else 0)
    gen = torch.Generator().manual_seed(seed)
    guess.append(torch.randn(d.shape[1], n_random, generator=gen).to(d.device))
    Q = orthonormal_columns(d @ torch.cat(guess, dim=1))  # (d_out, w)
    Z = d.T @ Q  # (d_in, w) = (Q^T D)^T: the Ritz values now and the next round's first half
    top, U_c = top_ritz(Z, rank)
    for _ in range(max_iter):
        Q = orthonormal_columns(d @ orthonormal_columns(Z, rounds=1))
        Z = d.T @ Q
        before = float(top.sum())
        top, U_c = top_ritz(Z, rank)
        if float(top.sum()) - before <= tol * max(total - float(top.sum()), 0.0):
            break
    S = top.sqrt()
    keep = S > S[0] * 1e-12 if S.numel() else S.bool()
    U_c, S = U_c[:, keep], S[keep]
    Vh = (Z.double() @ U_c).T / S[:, None]  # rows of V^T: S^-1 U_c^T Q^T D
    U = Q.double() @ U_c
    return split_balanced(U.float(), S.float(), Vh.float()), min(1.0, float(S.square().sum()) / total)


def all_finite(t: torch.Tensor) -> bool:
    """True if no element is NaN or Inf. One min/max pass (NaN propagates through both): ~20x
    cheaper on CPU than ``isfinite(t).all()``, which materialises a boolean tensor."""
    if t.numel() == 0:
        return True
    low, high = t.aminmax()
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))
