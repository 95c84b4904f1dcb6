"""Core space (Panariello et al., NeurIPS 2025, arXiv 2509.17786; docs/methods.md, "Merge space").

Per module, with T adapters, R = sum_i r_i and the weight and scale folded into B (w_i s_i B_i):
  U_ref (d_out, R): left singular vectors of B_stack = [w_1 s_1 B_1, ..., w_T s_T B_T];
  V_ref (R, d_in):  right singular vectors (rows) of A_stack = [A_1; ...; A_T];
  M_i = (U_ref^T B_i)(A_i V_ref^T), an R x R "core matrix" (never a d_out x d_in one).
A merge rule runs on the M_i and gives M; the update is U_ref M V_ref, a LoRA of rank <= R, exact for the
sum (U_ref spans every B_i, V_ref every A_i). The bases are the SINGULAR vectors, as the published code:
entry-wise rules (TIES, DARE) depend on the basis; singular-vector sign flips do not change their result.

Dense methods trim and drop the UNWEIGHTED core matrices (s_i B_i A_i projected) and weight them
afterwards, as they do with dense deltas: module-scope rules are scale-invariant so this is the same as
folding w_i in, and global thresholds stay per adapter, independent of per-module weights.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Literal

import torch

from soupkit.methods.base import LoraFactors, MergeResult
from soupkit.ops import energy_fraction, small_lapack, svd

# Rank-revealing tolerance of the spectral rules (tsv, iso_c, knots, core matrices): a singular value (or a
# direction's norm) below this fraction of the largest is dropped, not amplified. 100x above the 1e-6 input
# changes the rules must absorb, 1e4x above float32 rounding; docs/methods.md, "Rank-revealing tolerance".
RANK_RTOL = 1e-4

# The spaces a method may run its rule in: the recipe key ``merge.space``.
MergeSpace = Literal["full", "core"]
SPACE_DOC = (
    "Where the rule runs: 'full' = on the d_out x d_in updates, 'core' = on the R x R core matrices "
    "(R = sum of input ranks; Core Space merging, arXiv 2509.17786)."
)


def small_maths(like: torch.Tensor) -> AbstractContextManager[None]:
    """One CPU thread for a factor-space rule on a small module (every dimension of ``like`` <=
    ``ops.linalg.SMALL_MATRIX``: tiny models, where thread start-up dominates; measured on the busy 2-core
    machine, a (9 x 40) @ (40 x 3) float64 product takes 45 ms with 2 threads, 0.02 ms with one). A real
    module keeps torch's default threads for its thin products; its R x R LAPACK calls still run on one
    (``ops.svd``, ``ops.eigh``). No effect on GPU."""
    return small_lapack(like)


@dataclass(frozen=True)
class CoreSpace:
    """One module's core basis: ``delta = U @ M @ V`` for a core matrix M (float64).

    Attributes:
        U: (d_out, R_u) orthonormal columns, R_u = min(d_out, R).
        V: (R_v, d_in) orthonormal rows, R_v = min(d_in, R).
    """

    U: torch.Tensor
    V: torch.Tensor

    def project(self, f: LoraFactors, weight: float = 1.0) -> torch.Tensor:
        """The core matrix of ``weight * B @ A``: (U^T B)(A V^T), (R_u, R_v) float64, from the factors only."""
        return (self.U.T @ (weight * f.B.double())) @ (f.A.double() @ self.V.T)

    def lift(self, M: torch.Tensor, rank: int) -> MergeResult:
        """``U @ M @ V`` as balanced LoRA factors of rank <= ``rank`` (best rank-k: the SVD of M is that
        of the update, since U and V are orthonormal), float32, with the Frobenius energy kept."""
        U_c, S, Vh_c = svd(M.double())
        k = min(rank, int((S > 0).sum()))
        root = S[:k].sqrt()
        B = (self.U @ U_c[:, :k]) * root[None, :]
        A = root[:, None] * (Vh_c[:k] @ self.V)
        return MergeResult(LoraFactors(A=A.float(), B=B.float()), energy_fraction(S, k))


def core_space(factors: list[LoraFactors], weights: list[float]) -> CoreSpace:
    """The core basis of one module's inputs (weights folded into B, as docs/methods.md, "Merge space")."""
    B_stack = torch.cat([w * f.B.double() for f, w in zip(factors, weights, strict=True)], dim=1)
    A_stack = torch.cat([f.A.double() for f in factors], dim=0)
    U, _, _ = svd(B_stack)  # (d_out, R_u)
    V = svd(A_stack.T)[0].T  # (R_v, d_in); LAPACK is ~2x faster on the tall transpose than on the wide matrix
    return CoreSpace(U=U, V=V)


def zero_null_lines(M: torch.Tensor, columns: bool = True) -> torch.Tensor:
    """M (float64) with every row (and, if ``columns``, every column) whose norm is below RANK_RTOL of the
    largest row (column) norm set to exactly zero, in place. Only lines along a rotated basis are zeroed.

    In a rotated basis (core, KnOTS) an adapter's update has exact zeros along the directions it does not
    span; computed, they hold rounding noise (~1e-16), and an entry-wise rule counts noise: TIES' disjoint
    mean over "agreeing" entries halved the updates of two orthogonal adapters. Zeroing them keeps the rule
    continuous there (docs/methods.md, "Rank-revealing tolerance")."""
    for dim in (1, 0) if columns else (1,):  # row norms, then column norms
        norms = torch.linalg.vector_norm(M, dim=dim)
        if norms.numel() and float(norms.max()) > 0:
            null = norms <= RANK_RTOL * norms.max()
            if bool(null.any()):
                if dim == 1:
                    M[null] = 0.0
                else:
                    M[:, null] = 0.0
    return M


def core_matrices(factors: list[LoraFactors], weights: list[float]) -> tuple[CoreSpace, list[torch.Tensor]]:
    """The basis and each input's UNWEIGHTED core matrix s_i B_i A_i projected, (R_u, R_v) float32, with the
    rows and columns outside the input's own span exactly zero (``zero_null_lines``).

    float32 like the dense deltas, so that global thresholds (float32 radix selection) are exact.
    """
    space = core_space(factors, weights)
    return space, [zero_null_lines(space.project(f)).float() for f in factors]
