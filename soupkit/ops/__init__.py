"""Shared tensor maths: pure functions on torch tensors. Imports nothing from the rest of soupkit.

- ``linalg``: ``LoraFactors`` and low-rank algebra (factor SVD, truncation, best rank-k, padding);
- ``sparsify``: elementwise merging primitives (trim, sign election, disjoint mean, drops) and
  exact magnitude thresholds;
- ``magprune``: DELLA's rank-based keep probabilities and drop (blocked on the CPU);
- ``cluster``: k-means for LoRA-LEGO.

Everything is importable from here (``from soupkit.ops import truncate_factors``).
"""

from __future__ import annotations

from soupkit.ops.cluster import (
    kmeans,
    refill_empty_clusters,
)
from soupkit.ops.linalg import (
    LoraFactors,
    all_finite,
    best_rank_k,
    concat_factors,
    dense_delta,
    eigh,
    energy_fraction,
    factor_svd,
    frobenius_norm,
    gram_basis,
    orthonormal_columns,
    pad_rank,
    single_thread,
    small_lapack,
    split_balanced,
    svd,
    truncate_dense,
    truncate_factors,
)
from soupkit.ops.magprune import della_drop, della_keep_probability, rank_probabilities
from soupkit.ops.sparsify import (
    RADIX_HIGH,
    RADIX_LOW,
    band_mask,
    disjoint_mean,
    drop_and_rescale,
    elect_sign,
    float_from_radix,
    keep_where,
    kth_largest_magnitude,
    radix_keys,
    select_bucket,
    top_fraction_threshold,
    trim_to_density,
)

__all__ = [
    "LoraFactors",
    "RADIX_HIGH",
    "RADIX_LOW",
    "all_finite",
    "band_mask",
    "best_rank_k",
    "concat_factors",
    "della_drop",
    "della_keep_probability",
    "dense_delta",
    "disjoint_mean",
    "drop_and_rescale",
    "eigh",
    "elect_sign",
    "energy_fraction",
    "factor_svd",
    "float_from_radix",
    "frobenius_norm",
    "gram_basis",
    "keep_where",
    "kmeans",
    "kth_largest_magnitude",
    "orthonormal_columns",
    "pad_rank",
    "radix_keys",
    "rank_probabilities",
    "refill_empty_clusters",
    "select_bucket",
    "single_thread",
    "small_lapack",
    "split_balanced",
    "svd",
    "top_fraction_threshold",
    "trim_to_density",
    "truncate_dense",
    "truncate_factors",
]
