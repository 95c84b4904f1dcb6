"""Counter-based random numbers: the same draws on every device, computed where the tensor lives.

Part of the maths layer (imports nothing from soupkit). Element ``i`` (row-major index) of a tensor
drawn under a 64-bit ``key`` (k0, k1) gets

    x = mix32(mix32(lo(i) ^ k0) ^ k1 ^ hi(i))
    u = (x >> 8) * 2**-24                                   # float32 in [0, 1), 24-bit mantissa

with ``lo``/``hi`` the low/high 32 bits of i and ``mix32`` Wellons' "lowbias32" integer hash
(a bijection of 32-bit words with low avalanche bias). Every step is 32-bit integer arithmetic, so CPU
and GPU give the same bits: with torch on int32 tensors (products wrap mod 2**32 as two's complement
does; right shifts are made logical by masking the bits the sign fills in), on the CPU with numpy's
uint32 words (a third of the time). No global RNG, no host generator, no host-device copy.

The key comes from ``stream_key(seed, module, salt, adapter name)`` (sha256 of the parts), so a
draw depends only on what it is for, never on adapter order, threads or device.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

RNG_NAME = "counter-hash-v1"  # recorded in lock files; bump when the draws change

MASK32 = 0xFFFFFFFF
LOWBIAS32 = ((16, 0x7FEB352D), (15, 0x846CA68B), (16, None))  # (xorshift, then multiplier) steps
# Elements per pass: a GPU wants long kernels. On a CPU (numpy's uint32 words), one chunk of 32768
# words stays in L2; torch's integer passes, used there before numpy, ran that grain on one thread, since
# threads that waited for each other at every pass made a 14336 x 4096 draw take 60-110 s instead of 3 s
# on the shared 2-core box (load average 20).
CHUNK = {"cpu": 1 << 15, "other": 1 << 26}


def stream_key(*parts: object) -> tuple[int, int]:
    """Two 32-bit words from sha256 of the parts joined by '|' (e.g. seed, module, salt, name)."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return tuple(int.from_bytes(digest[4 * k : 4 * k + 4], "little") for k in range(2))  # type: ignore[return-value]


def _as_int32(c: int) -> int:
    """The int32 value with c's 32 bits (c in [0, 2**32))."""
    return c - (1 << 32) if c >= 1 << 31 else c


def _mix32(x: torch.Tensor, tmp: torch.Tensor) -> None:
    """lowbias32 in place on an int32 tensor of 32-bit words (``tmp``: scratch of the same shape).
    int32 rather than int64 words: half the memory traffic, which made DARE's and DELLA's draws most
    of their dense step on an H100."""
    for shift, mult in LOWBIAS32:
        torch.bitwise_right_shift(x, shift, out=tmp).bitwise_and_((1 << (32 - shift)) - 1)
        x.bitwise_xor_(tmp)
        if mult is not None:
            x.mul_(_as_int32(mult))


def _split(start: int, count: int) -> tuple[int, int]:
    """(high, low) 32-bit words of ``start``; a range never crosses a multiple of 2**32 (callers chunk by powers of two)."""
    hi, lo = divmod(start, 1 << 32)
    if lo + count > 1 << 32:
        raise ValueError("hash_words ranges must not cross a multiple of 2**32")
    return hi, lo


def hash_words(start: int, count: int, key: tuple[int, int], device: torch.device) -> torch.Tensor:
    """32-bit hashes of element indices start .. start+count-1: an int32 tensor of ``count`` words
    (negative where the top bit is set; ``words.long() & 0xFFFFFFFF`` gives them as numbers)."""
    hi, lo = _split(start, count)
    k0, k1 = key
    x = torch.arange(count, dtype=torch.int32, device=device).add_(_as_int32(lo))  # wraps as lo + i does mod 2**32
    tmp = torch.empty_like(x)
    x.bitwise_xor_(_as_int32(k0))
    _mix32(x, tmp)
    x.bitwise_xor_(_as_int32((k1 ^ hi) & MASK32))
    _mix32(x, tmp)
    return x


def _mix32_numpy(x: np.ndarray, tmp: np.ndarray) -> None:
    """lowbias32 in place on uint32 words: numpy's uint32 products wrap mod 2**32 and its shifts are
    logical, so these are the same bits as ``_mix32``."""
    for shift, mult in LOWBIAS32:
        np.right_shift(x, shift, out=tmp)
        x ^= tmp
        if mult is not None:
            x *= np.uint32(mult)


def hash_words_numpy(start: int, count: int, key: tuple[int, int], out: np.ndarray, tmp: np.ndarray) -> None:
    """``hash_words`` on the CPU into ``out`` (uint32, ``count`` long; ``tmp`` the same): the same 32-bit
    words, 3x faster than torch's int64 passes were (measured, 8192 x 2048 draws on one core)."""
    hi, lo = _split(start, count)
    k0, k1 = key
    np.add(np.arange(count, dtype=np.uint32), np.uint32(lo), out=out)  # lo + count <= 2**32: no wrap
    out ^= np.uint32(k0)
    _mix32_numpy(out, tmp)
    out ^= np.uint32(k1 ^ (hi & MASK32))
    _mix32_numpy(out, tmp)


def counter_uniform(shape: torch.Size | tuple[int, ...], key: tuple[int, int], device: torch.device | str) -> torch.Tensor:
    """float32 U[0,1) draws of ``shape`` on ``device``: multiples of 2**-24, bit-identical on every device."""
    device = torch.device(device)
    out = torch.empty(shape, dtype=torch.float32, device=device)
    flat = out.view(-1)
    step = CHUNK["cpu" if device.type == "cpu" else "other"]
    if device.type == "cpu":  # numpy's uint32 words: the same bits (tests/test_rng.py), a third of the time
        words, tmp = np.empty(step, dtype=np.uint32), np.empty(step, dtype=np.uint32)
        flat_np = flat.numpy()
        for start in range(0, flat.numel(), step):
            n = min(step, flat.numel() - start)
            hash_words_numpy(start, n, key, words[:n], tmp[:n])
            np.right_shift(words[:n], 8, out=tmp[:n])
            np.multiply(tmp[:n], np.float32(2.0**-24), out=flat_np[start : start + n], casting="unsafe")  # exact
        return out
    for start in range(0, flat.numel(), step):
        fill_uniform_torch(flat[start : start + min(step, flat.numel() - start)], start, key)
    return out


def fill_uniform_torch(out: torch.Tensor, start: int, key: tuple[int, int]) -> None:
    """Draws of elements start .. start + len(out) - 1 into the 1-D float32 ``out``, with torch on its device."""
    words = hash_words(start, out.numel(), key, out.device)
    # top 24 bits -> float32 exactly (< 2**24), times 2**-24 exactly: no rounding anywhere
    top24 = words.bitwise_right_shift_(8).bitwise_and_(0xFFFFFF)  # a logical shift of the int32 words
    torch.mul(top24, 2.0**-24, out=out)
