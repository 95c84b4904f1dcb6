"""DELLA's MagPrune: keep probabilities ranked by |.| within each row, and the drop they drive.

Per row of n entries, rank 0 is the smallest |x| (ties broken by position), and the entry of rank r is
kept with probability p(r) = (density - eps) + 2 eps * r / (n - 1), clamped to [0, 1], then divided by
it. On the CPU (float32, 2-D) the ranks come from one ascending sort per row of the unique int64 keys
``|x|'s bits << 32 | position`` (numpy's vectorised sort, about 5x torch's argsort), and p from a
scatter of the n-entry table p(r), one block of rows at a time so that keys, p and the mask stay in
cache; blocks are shared among ``torch.get_num_threads()`` threads. Elsewhere: torch's argsort.
Every path gives the same bits (tests/test_magprune.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from soupkit.ops.sparsify import drop_and_rescale

BLOCK_ELEMENTS = 1 << 17  # per block: int64 keys 1 MiB, float32 |x|, p and int32 mask 512 KiB each: in L2
MIN_PROBABILITY = 1e-12  # drop_and_rescale's floor under the divisor


def magnitude_order(delta: torch.Tensor) -> torch.Tensor:
    """Per row (last dim), the positions sorted by |.| ascending, ties by position: the same order on every device.

    For float32, the keys (|x|'s bits << 32 | position) are unique, so an unstable sort gives exactly
    the stable order, 1.5x faster on CPU than a stable argsort of |x| (measured, 8192 x 2048). On a GPU
    the other way round: the stable argsort of the float32 |x| takes 0.43x the time of the int64 keys'
    (H100, 4096 x 14336; benchmarks/bench_dense_gpu.py --variants checks that the orders are equal).
    """
    if delta.dtype != torch.float32 or delta.device.type != "cpu":
        return delta.abs().argsort(dim=-1, stable=True)
    bits = delta.abs().view(torch.int32).long()  # non-negative floats order as their bit patterns
    position = torch.arange(delta.shape[-1], device=delta.device)
    return bits.bitwise_left_shift_(32).bitwise_or_(position).argsort(dim=-1)


def rank_probabilities(n: int, density: float, epsilon: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """p(r) for ranks r = 0 .. n-1, (n,): the very operations della_keep_probability applies per entry."""
    # Divide by a tensor on the device, not a Python number: CUDA turns division by a host scalar into
    # multiplication by its reciprocal (other rounding), the CPU divides; a device tensor divides on both.
    rn = torch.arange(n, device=device).to(dtype) / torch.full((), max(n - 1, 1), dtype=dtype, device=device)
    return ((density - epsilon) + 2 * epsilon * rn).clamp(0.0, 1.0)


def della_keep_probability(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA MagPrune keep probabilities: per row, ranked by |.|, linear from density-eps to density+eps.

    p = (density - eps) + 2 eps * rn with rn = rank / (n - 1) in [0, 1] (rank 0 = smallest |x| of
    the row), clamped to [0, 1]. The row mean is ``density`` before clamping.
    """
    table = rank_probabilities(delta.shape[-1], density, epsilon, delta.dtype, delta.device)
    if _blocked(delta):
        out = torch.empty_like(delta)
        d, p = delta.numpy(), out.numpy()
        _by_row_blocks(delta, table.numpy(), lambda rows, scratch: _keep_block(d[rows], scratch, p[rows]))
        return out
    order = magnitude_order(delta)
    return torch.empty_like(delta).scatter_(-1, order, table.expand_as(delta))


def della_drop(delta: torch.Tensor, density: float, epsilon: float, uniform: torch.Tensor) -> torch.Tensor:
    """``drop_and_rescale(delta, della_keep_probability(delta, density, epsilon), uniform)``, the same
    bits; on the CPU without the full-size keys and probabilities (one block of rows at a time).
    ``uniform``: U[0, 1) draws of delta's shape."""
    if not (_blocked(delta) and uniform.dtype == torch.float32 and uniform.is_contiguous()):
        return drop_and_rescale(delta, della_keep_probability(delta, density, epsilon), uniform)
    # + 0.0: a -0.0 in the table would read as a negative integer below; it compares and divides as +0.0
    table = (rank_probabilities(delta.shape[-1], density, epsilon, delta.dtype, delta.device) + 0.0).numpy()
    floored = bool(table.min() < MIN_PROBABILITY)  # else max(p, 1e-12) is p itself: skip that pass
    d, u = delta.numpy(), uniform.numpy()
    out = torch.empty_like(delta)
    o = out.numpy()

    def block(rows: slice, scratch: _Scratch) -> None:
        m = rows.stop - rows.start
        p, keep, result = scratch.p[:m], scratch.keep[:m], o[rows]
        _keep_block(d[rows], scratch, p)
        # drop_and_rescale's where(u < p, d / max(p, 1e-12), +0.0), as separate IEEE ops: the same bits
        np.divide(d[rows], np.maximum(p, np.float32(MIN_PROBABILITY), out=result) if floored else p, out=result)
        # u and p are >= +0.0, so their bits order as their values: bits(u) - bits(p) (no overflow in
        # int32) is negative exactly where u < p, and >> 31 makes it all ones (keep) or all zeros (+0.0)
        np.subtract(u[rows].view(np.int32), p.view(np.int32), out=keep)
        np.right_shift(keep, 31, out=keep)
        np.bitwise_and(result.view(np.int32), keep, out=result.view(np.int32))

    _by_row_blocks(delta, table, block)
    return out


def _blocked(delta: torch.Tensor) -> bool:
    """The CPU block path applies: a contiguous float32 matrix on the CPU."""
    return delta.device.type == "cpu" and delta.dtype == torch.float32 and delta.dim() == 2 and delta.is_contiguous()


class _Scratch:
    """One thread's buffers for a block of ``rows`` rows of n entries, reused from block to block."""

    def __init__(self, rows: int, n: int, table: np.ndarray) -> None:
        self.magnitude = np.empty((rows, n), dtype=np.float32)
        self.keys = np.empty((rows, n), dtype=np.int64)
        self.p = np.empty((rows, n), dtype=np.float32)
        self.keep = np.empty((rows, n), dtype=np.int32)
        self.flat_position = np.arange(rows * n, dtype=np.int64).reshape(rows, n)  # below 2**32 (BLOCK_ELEMENTS)
        self.flat_table = np.tile(table, rows)  # p(r) at flat position row * n + r


def _keep_block(d: np.ndarray, scratch: _Scratch, p: np.ndarray) -> None:
    """p (m, n) float32 = table[rank of |d| in its row] for the block d (m, n) float32."""
    m, n = d.shape
    keys = scratch.keys[:m]
    # |x|'s bits (non-negative floats order as their bits) above the flat position in the block: unique
    # and, within a row, ordered as the stable argsort of |x|; the low 32 bits of the sorted keys are that order
    np.left_shift(np.abs(d, out=scratch.magnitude[:m]).view(np.int32), 32, out=keys, dtype=np.int64)
    np.bitwise_or(keys, scratch.flat_position[:m], out=keys)
    keys.sort(axis=-1)
    keys &= 0xFFFFFFFF
    p.reshape(-1)[keys.reshape(-1)] = scratch.flat_table[: m * n]  # the entry of rank r gets p(r)


def _by_row_blocks(delta: torch.Tensor, table: np.ndarray, block: Callable[[slice, _Scratch], None]) -> None:
    """Call ``block(rows, scratch)`` for every block of rows of delta (d_out, n), on up to
    ``torch.get_num_threads()`` threads that each take the next block when done (a thread that the
    machine deschedules holds up nobody); numpy's sort and ufuncs release the GIL."""
    total, n = delta.shape
    rows = max(1, BLOCK_ELEMENTS // max(n, 1))
    starts = iter(range(0, total, rows))
    lock = threading.Lock()

    def worker() -> None:
        scratch = _Scratch(rows, n, table)
        while True:
            with lock:
                r0 = next(starts, None)
            if r0 is None:
                return
            block(slice(r0, min(r0 + rows, total)), scratch)

    threads = min(torch.get_num_threads(), -(-total // rows))
    if threads <= 1:
        worker()
        return
    with ThreadPoolExecutor(threads) as pool:
        for done in [pool.submit(worker) for _ in range(threads)]:
            done.result()  # re-raises a worker's error here
