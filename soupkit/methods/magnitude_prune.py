"""Magnitude prune on the dense updates (PEFT's ``magnitude_prune`` on delta W; docs/methods.md).

delta = lambda * sum_i w_i t_i, where t_i keeps the top ``density`` fraction of |delta_i|
(per module, or globally per adapter with ``scope: global``). No sign election.
The full-rank result is written as its best rank-k LoRA (k = merge.rank, default sum r_i).
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from soupkit.methods._dense import SCOPE_DOC, DenseParams, Density, Scope, TrimmedDense


class MagnitudePruneParams(DenseParams):
    density: Density = 0.5
    scope: Scope = Field("module", description=SCOPE_DOC)


class MagnitudePrune(TrimmedDense):
    name = "magnitude_prune"
    paper = "Magnitude pruning of task vectors (PEFT magnitude_prune; cf. TIES' trim step)"
    summary = "keep top-density |.| of each delta_i, weighted sum, x lambda; best rank-k"
    Params = MagnitudePruneParams
    identity_params: ClassVar[dict] = {"density": 1.0}
