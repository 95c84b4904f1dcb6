"""DELLA-merging: MagPrune drop, TIES election, disjoint mean (Deep, Bhardwaj, Poria 2024, arXiv 2406.11617).

Per row of delta_i, entries ranked by |.| get keep probability p = (density - eps) + 2 eps * rn,
rn = rank / (n - 1) in [0, 1] (larger entries are kept more often; the row mean is density).
Kept entries are rescaled by 1/p (per entry: unbiased). Then sign election on w_i t_i, disjoint
mean (``normalize``: by count or by the agreeing weights), x lambda. Seeded per (seed, module, adapter name). Best rank-k LoRA of the result.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from soupkit.methods import seeds
from soupkit.methods._dense import NORMALIZE_DOC, SIGN_DOC, DenseMethod, DenseParams, Density, Normalize, SignRule, uniform_for
from soupkit.methods.base import MergeContext
from soupkit.ops import della_drop


class DellaParams(DenseParams):
    density: Density = 0.5
    epsilon: float = Field(0.05, ge=0.0, description="Half-width of the keep-probability range around density.")
    majority_sign: SignRule = Field("total", description=SIGN_DOC)
    normalize: Normalize = Field("count", description=NORMALIZE_DOC)

    @model_validator(mode="after")
    def _probabilities_in_range(self) -> DellaParams:
        if self.epsilon > min(self.density, 1.0 - self.density) + 1e-12:
            limit = min(self.density, 1 - self.density)
            raise PydanticCustomError(  # read by recipe.messages (type "recipe_rule"): one line, the field named
                "recipe_rule",
                "{found}",
                {
                    "expected": f"at most min(density, 1 - density) = {limit:g} (keep probabilities in [0, 1])",
                    "found": f"{self.epsilon:g}",
                    "fix": f"set merge.epsilon <= {limit:g}",
                    "at": "merge.epsilon",
                },
            )
        return self


class Della(DenseMethod):
    name = "della"
    paper = "DELLA-Merging (Deep, Bhardwaj, Poria 2024, arXiv 2406.11617)"
    summary = "drop w.p. 1-p with p ranked by |.| in [density-eps, density+eps], rescale 1/p, TIES; best rank-k"
    Params = DellaParams
    identity_params = {"density": 1.0, "epsilon": 0.0}
    combine = "ties"

    def sparsify(self, delta: torch.Tensor, j: int, params: Any, ctx: MergeContext) -> torch.Tensor:
        if params.density >= 1.0:
            return delta
        return della_drop(delta, params.density, params.epsilon, uniform_for(delta, j, ctx, seeds.DELLA))
