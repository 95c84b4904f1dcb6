"""DARE drop-and-rescale, then TIES sign election and disjoint mean (Yu et al., ICML 2024).

t_i = (m_i * delta_i) / density with m_i ~ Bernoulli(density); g = elected sign of w_i t_i;
delta = lambda * sum_i [sign(w_i t_i) = g] w_i t_i / max(1, #agreeing) (or / the agreeing w_i's sum with
``normalize: weights``). Seeded per (seed, module,
adapter name). The full-rank result is written as its best rank-k LoRA (k default sum r_i).
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from soupkit.methods._dense import NORMALIZE_DOC, SIGN_DOC, DareDropped, DenseParams, Density, Normalize, SignRule


class DareTiesParams(DenseParams):
    density: Density = 0.5
    majority_sign: SignRule = Field("total", description=SIGN_DOC)
    normalize: Normalize = Field("count", description=NORMALIZE_DOC)


class DareTies(DareDropped):
    name = "dare_ties"
    paper = "DARE (Yu et al., ICML 2024, arXiv 2311.03099) + TIES sign election (arXiv 2306.01708)"
    summary = "DARE drop-rescale each delta_i, elect sign, disjoint mean, x lambda; best rank-k"
    Params = DareTiesParams
    identity_params: ClassVar[dict] = {"density": 1.0}
    combine = "ties"
