"""The salt of every random draw a merge method makes, in one place.

Per-element draws (DARE, DELLA masks) are keyed by (recipe seed, module path, salt, adapter name)
(``MergeContext.uniform``, counter-based, ``soupkit.rng``); the few small draws that need torch's
samplers use a CPU generator seeded by sha256 of (recipe seed, module path, salt)
(``MergeContext.generator``). Neither depends on adapter order. Lock files record outputs made with these values: changing one silently
changes every output of that method. Never edit a value; add a new name for a new draw.
"""

from __future__ import annotations

DARE = "dare"  # Bernoulli(density) keep masks: dare_linear, dare_ties, knots' dare_density
DELLA = "della"  # magnitude-ranked keep masks of della
RANGE_FINDER = "range-finder"  # start vectors of best_rank_k's randomised range finder (dense methods)
LEGO_KMEANS = "lego-kmeans"  # k-means++ initial centres of lego
PEFT_MASKS = "peft"  # PEFT's random_pruning masks of peft_dare_linear / peft_dare_ties
