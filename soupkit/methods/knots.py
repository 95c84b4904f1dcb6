"""KnOTS: align the adapters in a shared SVD basis, then TIES (or DARE-TIES) on the aligned coordinates
(Stoica et al., ICLR 2025, arXiv 2410.19735).

Per module, M = [delta_1, ..., delta_n] = U S [V_1^T, ..., V_n^T] and Z_i = S V_i^T (R x d_in). Computed in
factor space, never forming delta_i: thin QR of the stacked B_cat = [s_1 B_1, ..., s_n B_n] = Q R_B,
C_i = R_B[:, block i] A_i, eigen-decomposition of sum_i C_i C_i^T = U_c S^2 U_c^T, Z_i = U_c^T C_i, U = Q U_c.
Then on w_i Z_i: optional DARE drop (``dare_density``), trim to ``density`` (per module or global), and
``merge_type: ties`` (sign election + disjoint mean, as published) or ``linear`` (sum); x lambda.
Result: B = U, A = Z_merged, rank <= sum r_i (re-factorised exactly, or to ``merge.rank`` if smaller).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from soupkit.methods import seeds
from soupkit.methods._core import RANK_RTOL, zero_null_lines
from soupkit.methods._dense import SCOPE_DOC, SIGN_DOC, Density, ScaledParams, Scope, SignRule, uniform_for
from soupkit.methods._global import global_thresholds
from soupkit.methods.base import (
    LoraFactors,
    MergeContext,
    MergeMethod,
    MergeResult,
    MethodParams,
    ModuleInputs,
    RunInputs,
    sum_rank_within,
)
from soupkit.ops import disjoint_mean, drop_and_rescale, eigh, elect_sign, trim_to_density, truncate_factors


class KnotsParams(ScaledParams):
    density: Density = Field(1.0, description="Fraction of each Z_i kept by magnitude (1 = no trim, as the Llama configs).")
    dare_density: float | None = Field(
        None, gt=0.0, le=1.0, description="If set, DARE keep probability applied to Z_i before trimming (KnOTS-DARE-TIES)."
    )
    merge_type: Literal["ties", "linear"] = Field("ties", description="Combine the Z_i by TIES disjoint mean or by a plain sum.")
    majority_sign: SignRule = Field("total", description=SIGN_DOC)
    scope: Scope = Field("module", description=SCOPE_DOC)


def aligned_coordinates(factors: list[LoraFactors]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The shared basis U (d_out, R) and each adapter's coordinates Z_i (R, d_in), float64, U Z_i = delta_i."""
    B_cat = torch.cat([f.B.double() for f in factors], dim=1)
    Q, R_B = torch.linalg.qr(B_cat)  # Q (d_out, R'), R_B (R', R), R' = min(d_out, R)
    blocks, start = [], 0
    for f in factors:
        blocks.append(R_B[:, start : start + f.rank] @ f.A.double())
        start += f.rank
    gram = sum(C @ C.T for C in blocks)
    evals, U_c = eigh(gram)  # ascending; order does not matter to U Z
    # Rank-revealing, as the published code keeps only sigma > 1e-5: the components with sigma = sqrt(eval)
    # below RANK_RTOL of the largest (e.g. the same adapter twice) would otherwise hold rounding noise and
    # enlarge every Z_i, so that ``density`` kept more of the real entries.
    kept = int((evals > RANK_RTOL**2 * evals[-1]).sum()) if evals.numel() and float(evals[-1]) > 0 else evals.numel()
    U_c = U_c.flip(1)[:, :kept]
    return Q @ U_c, [zero_null_lines(U_c.T @ C, columns=False) for C in blocks]  # columns: input features


class Knots(MergeMethod):
    name = "knots"
    space = "factors"
    paper = "KnOTS: Model merging with SVD to tie the Knots (Stoica et al., ICLR 2025, arXiv 2410.19735)"
    summary = "shared SVD basis of [delta_1..delta_n], TIES/DARE on the aligned Z_i, B = U, A = Z_merged; rank <= sum r_i"
    Params = KnotsParams

    def output_rank(self, input_ranks: list[int], params: MethodParams, budget: int | None) -> int:
        return sum_rank_within(input_ranks, budget)

    def prepare(self, params: MethodParams, run: RunInputs) -> Any:
        p: Any = params
        if p.scope != "global":
            return None

        def magnitudes(mod: ModuleInputs) -> list[torch.Tensor]:
            return [Z.abs() for Z in self._coordinates(mod.factors, p, mod.ctx)[1]]

        return global_thresholds(run, magnitudes, [p.density])

    def _coordinates(self, factors: list[LoraFactors], p: Any, ctx: MergeContext) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """U and the (optionally DARE-dropped) Z_i, before trimming and weighting."""
        U, Z64 = aligned_coordinates(factors)
        Z = [z.float() for z in Z64]  # float32 from here: thresholds are exact on float32 bits
        if p.dare_density is not None and p.dare_density < 1.0:
            Z = [drop_and_rescale(z, p.dare_density, uniform_for(z, j, ctx, seeds.DARE)) for j, z in enumerate(Z)]
        return U, Z

    def merge(self, factors: list[LoraFactors], weights: list[float], params: MethodParams, ctx: MergeContext) -> MergeResult:
        p: Any = params
        U, Z = self._coordinates(factors, p, ctx)
        trimmed = []
        for j, (z, w) in enumerate(zip(Z, weights, strict=True)):
            threshold = None if ctx.state is None else ctx.state[ctx.source(j)][0]
            trimmed.append(w * trim_to_density(z, p.density, threshold))
        stack = torch.stack(trimmed)
        merged = disjoint_mean(stack, elect_sign(stack, p.majority_sign)) if p.merge_type == "ties" else stack.sum(dim=0)
        merged = merged * p.lambda_
        rank = self.output_rank([f.rank for f in factors], params, ctx.rank)
        out, kept = truncate_factors(LoraFactors(A=merged, B=U.float()), rank)
        return MergeResult(out, kept)
