"""Magnitude prune on the dense updates (PEFT's ``magnitude_prune`` on delta W; reference/methods.md 4.6).

delta = lambda * sum_i w_i t_i, where t_i keeps the top ``density`` fraction of |delta_i|
(per module, or globally per adapter with ``scope: global``). No sign election.
The full-rank result is written as its best rank-k LoRA (k = merge.rank, default sum r_i).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from soupkit.methods._dense import SCOPE_DOC, DenseMethod, DenseParams, Density, Scope, module_threshold
from soupkit.methods.base import MergeContext
from soupkit.ops import trim_to_density


class MagnitudePruneParams(DenseParams):
    density: Density = 0.5
    scope: Scope = Field("module", description=SCOPE_DOC)


class MagnitudePrune(DenseMethod):
    name = "magnitude_prune"
    paper = "Magnitude pruning of task vectors (PEFT magnitude_prune; cf. TIES' trim step)"
    summary = "keep top-density |.| of each delta_i, weighted sum, x lambda; best rank-k"
    Params = MagnitudePruneParams
    identity_params = {"density": 1.0}

    def global_fractions(self, params: Any) -> list[float] | None:
        return [params.density] if params.scope == "global" else None

    def sparsify(self, delta: torch.Tensor, j: int, params: Any, ctx: MergeContext) -> torch.Tensor:
        return trim_to_density(delta, params.density, module_threshold(ctx, j))
