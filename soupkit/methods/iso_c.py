"""Iso-C: isotropic merging, a flat spectrum for the summed update (Marczak et al., ICML 2025,
"No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces"; docs/methods.md, iso_c).

delta = sum_i w_i s_i B_i A_i = U S V^T; keep the n numerically nonzero singular values (s > 1e-6 s_1:
the zeros of a low-rank update would pull the mean down and let null-space directions of arbitrary
orientation in); delta_iso = lambda * mean(S_1..n) U_n V_n^T, a LoRA of rank n <= sum r_i. With
``merge.rank`` k < n, the k directions of largest original s are kept (all have the same new value).
``space: full`` takes the exact SVD of the summed update from the factors (``ops.factor_svd``); the
d_out x d_in matrix is never formed. ``space: core`` isotropizes M = sum_i w_i M_i instead: U_ref and
V_ref are orthonormal, so M has the same nonzero spectrum and the two spaces give the same update.
"""

from __future__ import annotations

from typing import Any

import torch

from soupkit.methods._core import core_space
from soupkit.methods.base import LoraFactors, MergeResult
from soupkit.methods.tsv import SpectralMerge, factors_from_svd, nonzero_triplets
from soupkit.ops import concat_factors, factor_svd, svd


class IsoC(SpectralMerge):
    name = "iso_c"
    paper = "No Task Left Behind: Isotropic Model Merging (Marczak et al., ICML 2025, arXiv 2502.04959)"
    summary = "SVD of sum_i w_i delta_i, every nonzero singular value replaced by their mean, x lambda; rank <= sum r_i"
    identity_needs_flat_spectrum = True

    def merge_spectrum(self, factors: list[LoraFactors], weights: list[float], p: Any, rank: int) -> MergeResult:
        if p.space == "core":
            space = core_space(factors, weights)
            U_c, S, Vh_c = nonzero_triplets(*svd(sum(space.project(f, w) for f, w in zip(factors, weights, strict=True))))
            U, Vh = space.U @ U_c, Vh_c @ space.V
        else:
            U, S, Vh = nonzero_triplets(*factor_svd(concat_factors(factors, weights)))
        # S is descending: stable sorting of the equal values in factors_from_svd keeps the largest first.
        flat = torch.full_like(S, float(S.mean())) if S.numel() else S
        return factors_from_svd(U, flat, Vh, rank, p.lambda_)
