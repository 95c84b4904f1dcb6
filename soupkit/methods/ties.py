"""TIES-merging on the dense updates (Yadav et al. 2023, arXiv 2306.01708).

Per module, with delta_i = s_i B_i A_i (d_out, d_in):
  trim:  t_i = delta_i where |delta_i| is in its top ``density`` fraction, else 0
         (per module, or over the adapter's whole task vector with ``scope: global``);
  elect: g = sign(sum_i w_i t_i)  (``majority_sign: total``) or sign(sum_i sign(w_i t_i)) (``frequency``);
  merge: delta = lambda * sum_i [sign(w_i t_i) = g] w_i t_i / max(1, #agreeing)
         (``normalize: weights``: / sum of the agreeing w_i, 1 if none; mergekit's rule).
The full-rank result is written as its best rank-k LoRA (k = merge.rank, default sum r_i).
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from soupkit.methods._dense import (
    NORMALIZE_DOC,
    SCOPE_DOC,
    SIGN_DOC,
    DenseParams,
    Density,
    Normalize,
    Scope,
    SignRule,
    TrimmedDense,
)


class TiesParams(DenseParams):
    density: Density = 0.2
    majority_sign: SignRule = Field("total", description=SIGN_DOC)
    normalize: Normalize = Field("count", description=NORMALIZE_DOC)
    scope: Scope = Field("module", description=SCOPE_DOC)


class Ties(TrimmedDense):
    name = "ties"
    paper = "TIES-Merging (Yadav et al. 2023, arXiv 2306.01708)"
    summary = "trim each delta_i to top-density |.|, elect sign, disjoint mean, x lambda; best rank-k"
    Params = TiesParams
    identity_params: ClassVar[dict] = {"density": 1.0}
    combine = "ties"
