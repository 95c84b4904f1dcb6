"""Elementwise merging primitives (TIES, DARE, DELLA, breadcrumbs) and exact magnitude thresholds."""

from __future__ import annotations

import math

import torch

# Inputs are dense (d_out, d_in) tensors or stacks (n, d_out, d_in); outputs keep the input's device and dtype.

RADIX_HIGH = 1 << 15  # buckets of the high 16 bits of a finite non-negative float32 (sign bit 0)
RADIX_LOW = 1 << 16
BRACKET_MIN = 1 << 20  # GPU tensors from this many entries try kth_largest_bracketed first


def radix_keys(magnitudes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 16 bits of non-negative float32 values, flattened.

    For non-negative floats the bit pattern, read as an integer, orders like the value, so
    counting high halves then low halves finds any order statistic exactly in two passes.
    """
    bits = magnitudes.float().contiguous().view(torch.int32).reshape(-1)
    return bits >> 16, bits & 0xFFFF


def select_bucket(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """The bucket holding the k-th largest entry (1-based) given ascending bucket counts.

    Returns:
        (bucket index, number of entries in the buckets above it).
    """
    from_top = counts.flip(0).cumsum(0)
    j = int(torch.searchsorted(from_top, torch.tensor([k], device=counts.device, dtype=from_top.dtype))[0])
    return counts.numel() - 1 - j, int(from_top[j - 1]) if j > 0 else 0


def float_from_radix(high: int, low: int) -> float:
    return float(torch.tensor([(high << 16) | low], dtype=torch.int32).view(torch.float32)[0])


def kth_largest_magnitude(magnitudes: torch.Tensor, k: int) -> float:
    """Exact k-th largest of non-negative finite values (any shape), 1 <= k <= numel.

    Radix selection on the float bits: two ``bincount`` passes, no sort (O(n), works on GPU).
    """
    if not 1 <= k <= magnitudes.numel():
        raise ValueError(f"k={k} outside 1..{magnitudes.numel()}")
    if magnitudes.dtype == torch.float64:
        return kth_largest_float64(magnitudes.reshape(-1), k)
    if magnitudes.device.type != "cpu" and magnitudes.numel() >= BRACKET_MIN:
        found = kth_largest_bracketed(magnitudes.float().reshape(-1), k)
        if found is not None:
            return found
    bits = magnitudes.float().contiguous().view(torch.int32).reshape(-1)
    high = bits >> 16
    h, above = select_bucket(torch.bincount(high, minlength=RADIX_HIGH), k)
    low, _ = select_bucket(torch.bincount(bits[high == h] & 0xFFFF, minlength=RADIX_LOW), k - above)
    return float_from_radix(h, low)


def kth_largest_bracketed(flat: torch.Tensor, k: int, sample: int = 1 << 16) -> float | None:
    """Exact k-th largest of non-negative finite float32 values (1-D) on a GPU, or None if the bracket misses.

    A sample of about ``sample`` entries at a prime stride brackets the answer: [lo, hi] are the sample's order
    statistics six binomial standard deviations either side of the k-th's expected place. Two counts
    over all values check the bracket (one host sync); the answer is then the (k - #above hi)-th largest
    of the few values inside it (about 2% of them), by a sort. Radix selection's ``bincount`` serialises on the
    atomics of the few buckets that hold nearly every value of a delta; these are plain passes.
    """
    n = flat.numel()
    s = flat[:: prime_at_least(max(2, n // sample))]  # a prime stride: a power-of-two one sees a few columns only
    m = s.numel()
    expected, margin = k / n * m, 6.0 * math.sqrt(k / n * (1 - k / n) * m) + 16
    hi_rank, lo_rank = int(expected - margin), min(m, int(expected + margin) + 1)  # 1-based, from the top
    top = torch.topk(s, lo_rank, sorted=True).values
    hi = top[hi_rank - 1] if hi_rank >= 1 else flat.new_tensor(math.inf)
    lo = top[lo_rank - 1] if lo_rank < m else flat.new_tensor(0.0)
    above_hi, at_least_lo = torch.stack([(flat > hi).sum(), (flat >= lo).sum()]).tolist()
    if not above_hi < k <= at_least_lo:
        return None
    inside = flat[(flat >= lo) & (flat <= hi)]  # the k-th largest is the (k - above_hi)-th largest of these
    # a sort, not kthvalue: CUDA's kthvalue gives a 1-D tensor one thread block (6 ms for 1M values on an H100)
    return float(inside.sort().values[inside.numel() - (k - above_hi)])


def prime_at_least(n: int) -> int:
    """The smallest prime >= n (n is about a thousand here)."""
    while any(n % d == 0 for d in range(2, math.isqrt(n) + 1)):
        n += 1
    return n


def kth_largest_float64(flat: torch.Tensor, k: int) -> float:
    """Exact k-th largest of non-negative finite float64 values (1-D), 1 <= k <= numel.

    Rounding to float32 is monotone, so the answer rounds to the k-th largest of the rounded values
    (radix-selected): only the entries that round to it are compared in float64 (usually a handful;
    ``torch.kthvalue`` over all of them took 4x as long on a 16M-entry delta).
    """
    rounded = flat.float()
    bucket = kth_largest_magnitude(rounded, k)
    above = int((rounded > bucket).sum())
    tied = flat[rounded == bucket]  # the k-th largest is the (k - above)-th largest of these
    return float(torch.kthvalue(tied, tied.numel() - (k - above) + 1).values)


def top_fraction_threshold(magnitudes: torch.Tensor, density: float) -> float:
    """The magnitude t such that ``magnitudes >= t`` keeps the top ``int(density * numel)`` entries.

    Returns +inf when nothing is kept and 0.0 when everything is (ties at t are all kept).
    """
    k = int(density * magnitudes.numel())
    if k <= 0:
        return float("inf")
    if k >= magnitudes.numel():
        return 0.0
    return kth_largest_magnitude(magnitudes, k)


def trim_to_density(delta: torch.Tensor, density: float, threshold: float | None = None) -> torch.Tensor:
    """TIES trim: keep the entries with the largest |.| (top ``density`` fraction), zero the rest.

    ``threshold`` (a global magnitude, see ``soupkit.methods._global``) replaces the per-tensor one.
    """
    mag = delta.abs()
    t = top_fraction_threshold(mag, density) if threshold is None else threshold
    return keep_where(mag >= t, delta) if t > 0 else delta


def keep_where(mask: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``torch.where(mask, delta, 0)`` with +0.0 for the dropped entries, for finite ``delta`` (soupkit
    refuses non-finite inputs; a NaN would survive here): ``delta * mask + 0.0``, the same bits
    (``+ 0.0`` turns the -0.0 of a dropped negative entry into +0.0), 4x faster on CPU than ``where``."""
    return (delta * mask).add_(0.0)


def elect_sign(stack: torch.Tensor, method: str = "total") -> torch.Tensor:
    """TIES sign election over a stack (n, ...): +1/-1 per entry; a tie (0) elects +1, as PEFT.

    ``total``: sign of the sum of the values; ``frequency``: sign of the sum of their signs.
    """
    votes = torch.zeros_like(stack[0])
    for x in stack:
        votes.add_(x if method == "total" else x.sign())
    return (votes >= 0).to(stack.dtype).mul_(2).sub_(1)  # +1 / -1 exactly; faster on CPU than where


def disjoint_mean(stack: torch.Tensor, sign: torch.Tensor, weights: list[float] | None = None) -> torch.Tensor:
    """TIES disjoint merge: mean over the entries whose sign equals the elected one (zeros never count).

    ``sum_i [sign(x_i) == g] x_i / max(1, #{i: sign(x_i) == g})`` per entry, with stack (n, ...). With
    ``weights`` (one per stack entry, >= 0) the divisor is the sum of the agreeing entries' weights instead,
    and 1 where none agrees: mergekit's ``normalize: true``.
    """
    total = torch.zeros_like(stack[0])
    count = torch.zeros_like(stack[0])
    for j, x in enumerate(stack):  # a loop of elementwise passes: faster on CPU than reductions over dim 0
        agree = (x * sign > 0).to(x.dtype)  # same sign as the elected one; zeros never agree
        total.addcmul_(x, agree)
        count.add_(agree, alpha=1 if weights is None else weights[j])
    if weights is None:
        return total.div_(count.clamp_min_(1))
    return total.div_(count.masked_fill_(count == 0, 1))


def drop_and_rescale(delta: torch.Tensor, keep: torch.Tensor | float, uniform: torch.Tensor) -> torch.Tensor:
    """DARE / DELLA drop: keep each entry with probability ``keep`` (scalar or per entry), rescale by 1/keep.

    Unbiased: E[result] = delta. ``uniform`` holds U[0,1) draws of delta's shape; entries with keep 0 vanish.
    """
    keep_t = torch.as_tensor(keep, dtype=delta.dtype, device=delta.device)
    kept = uniform < keep_t
    return torch.where(kept, delta / keep_t.clamp_min(1e-12), torch.zeros_like(delta))


def band_mask(magnitudes: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Breadcrumbs: True where low <= |x| < high (drop the outliers above, the small ones below)."""
    return (magnitudes >= low) & (magnitudes < high)
