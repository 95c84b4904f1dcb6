"""Global-scope trimming: one magnitude threshold per adapter over its whole task vector.

TIES and KnOTS publish top-k over the flattened whole-model task vector, not per tensor. The
threshold is found by radix selection over the float bits (``soupkit.ops.radix_keys``), streamed
module by module in two passes over the run:

1. count the high 16 bits of every |x| per adapter (32768 buckets) -> the bucket of the k-th value;
2. count the low 16 bits of the entries in that bucket (65536 buckets) -> the exact k-th value.

Memory: one module's tensors plus the bucket counts (under 1 MB per adapter and fraction),
whatever the model size. Each pass recomputes the module's values (e.g. ``B @ A``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from soupkit.methods.base import ModuleInputs, RunInputs
from soupkit.ops import RADIX_HIGH, RADIX_LOW, float_from_radix, radix_keys, select_bucket

ValuesFn = Callable[[ModuleInputs], list[torch.Tensor]]  # one non-negative tensor per input factor


def global_thresholds(run: RunInputs, magnitudes: ValuesFn, fractions: list[float]) -> dict[str, list[float]]:
    """Per adapter name, the thresholds t_f such that ``|x| >= t_f`` keeps the top ``int(f * n)``
    entries of that adapter over every module (n = its total entry count), one per fraction f.

    A fraction keeping nothing gives +inf; one keeping everything gives 0.0.
    """
    high_counts: dict[str, torch.Tensor] = {}
    for mod in run.modules():
        for j, mag in enumerate(magnitudes(mod)):
            name = mod.ctx.source(j)
            counts = torch.bincount(radix_keys(mag)[0], minlength=RADIX_HIGH).cpu()
            high_counts[name] = high_counts[name] + counts if name in high_counts else counts

    result: dict[str, list[float | None]] = {}
    pending: dict[tuple[str, int], tuple[int, int, int]] = {}  # (name, i) -> (k, bucket, above)
    for name, counts in high_counts.items():
        n = int(counts.sum())
        result[name] = []
        for i, fraction in enumerate(fractions):
            k = int(fraction * n)
            if k <= 0 or k >= n:
                result[name].append(float("inf") if k <= 0 else 0.0)
                continue
            bucket, above = select_bucket(counts, k)
            pending[(name, i)] = (k, bucket, above)
            result[name].append(None)
    if not pending:
        return result  # type: ignore[return-value]

    low_counts = {key: torch.zeros(RADIX_LOW, dtype=torch.int64) for key in pending}
    for mod in run.modules():
        for j, mag in enumerate(magnitudes(mod)):
            name = mod.ctx.source(j)
            keys = [key for key in pending if key[0] == name]
            if not keys:
                continue
            high, low = radix_keys(mag)
            for key in keys:
                selected = low[high == pending[key][1]]
                low_counts[key] += torch.bincount(selected, minlength=RADIX_LOW).cpu()
    for (name, i), (k, bucket, above) in pending.items():
        low, _ = select_bucket(low_counts[(name, i)], k - above)
        result[name][i] = float_from_radix(bucket, low)
    return result  # type: ignore[return-value]
