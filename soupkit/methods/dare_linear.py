"""DARE + task arithmetic on the dense updates (Yu et al., ICML 2024, arXiv 2311.03099).

delta = lambda * sum_i w_i (m_i * delta_i) / density, m_i ~ Bernoulli(density) elementwise.
Unbiased: E[delta] = lambda * sum_i w_i delta_i. The draws come from a generator seeded by
(recipe seed, module, adapter name), never the global RNG.
The full-rank result is written as its best rank-k LoRA (k = merge.rank, default sum r_i).
"""

from __future__ import annotations

from typing import ClassVar

from soupkit.methods._dense import DareDropped, DenseParams, Density


class DareParams(DenseParams):
    density: Density = 0.5


class DareLinear(DareDropped):
    name = "dare_linear"
    paper = "DARE, Language Models are Super Mario (Yu et al., ICML 2024, arXiv 2311.03099)"
    summary = "drop entries of each delta_i w.p. 1-density, rescale 1/density, weighted sum; best rank-k"
    Params = DareParams
    identity_params: ClassVar[dict] = {"density": 1.0}
