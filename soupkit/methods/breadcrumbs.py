"""Model Breadcrumbs on the dense updates (Davari & Belilovsky, ECCV 2024, arXiv 2312.06795).

For each delta_i: drop the largest ``gamma`` fraction of |.| (outliers) and the smallest entries,
keeping the ``density`` fraction ranked just below the outliers (per module, or over the adapter's
whole task vector with ``scope: global``). delta = lambda * sum_i w_i masked_i; best rank-k LoRA.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from soupkit.methods._dense import SCOPE_DOC, DenseMethod, DenseParams, Density, Scope, module_threshold
from soupkit.methods.base import MergeContext
from soupkit.ops import band_mask, keep_where, top_fraction_threshold


class BreadcrumbsParams(DenseParams):
    density: Density = 0.9
    gamma: float = Field(0.01, ge=0.0, lt=1.0, description="Fraction of largest-|.| entries dropped as outliers.")
    scope: Scope = Field("module", description=SCOPE_DOC)

    @model_validator(mode="after")
    def _fits(self) -> BreadcrumbsParams:
        if self.gamma + self.density > 1.0 + 1e-12:
            raise PydanticCustomError(  # read by recipe.messages (type "recipe_rule"): one line, the field named
                "recipe_rule",
                "{found}",
                {
                    "expected": "gamma + density <= 1 (the outliers dropped and the entries kept do not overlap)",
                    "found": f"{self.gamma:g} + {self.density:g} = {self.gamma + self.density:g}",
                    "fix": "lower merge.gamma or merge.density",
                    "at": "merge.gamma",
                },
            )
        return self


class Breadcrumbs(DenseMethod):
    name = "breadcrumbs"
    paper = "Model Breadcrumbs (Davari & Belilovsky, ECCV 2024, arXiv 2312.06795)"
    summary = "drop the top-gamma outliers and the small entries of each delta_i (keep density), weighted sum; best rank-k"
    Params = BreadcrumbsParams
    identity_params = {"density": 1.0, "gamma": 0.0}

    def global_fractions(self, params: Any) -> list[float] | None:
        return [params.gamma, params.gamma + params.density] if params.scope == "global" else None

    def sparsify(self, delta: torch.Tensor, j: int, params: Any, ctx: MergeContext) -> torch.Tensor:
        mag = delta.abs()
        high, low = module_threshold(ctx, j, 0), module_threshold(ctx, j, 1)
        if high is None or low is None:
            high = top_fraction_threshold(mag, params.gamma)
            low = top_fraction_threshold(mag, params.gamma + params.density)
        return keep_where(band_mask(mag, low, high), delta)
