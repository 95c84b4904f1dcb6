"""Where a dense method's time goes per module on a GPU (issue 22): the dense step, the rank-k refit and
its rounds, for each Llama-3-8B module shape, two rank-32 bf16 inputs, density 0.2 (0.5 for DELLA).

    PYTHONPATH=. python -m benchmarks.bench_dense_gpu [--profile]

Times are CUDA-synchronised milliseconds, median of 5 after 2 warm-ups, on whatever GPU is visible.
``--profile`` adds torch.profiler's top operators for ties on the 14336 x 4096 shape.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from soupkit.methods import REGISTRY, LoraFactors, MergeContext
from soupkit.ops import best_rank_k, linalg

SHAPES = {"q_proj/o_proj": (4096, 4096), "k_proj/v_proj": (1024, 4096), "gate/up": (14336, 4096), "down": (4096, 14336)}
PER_LAYER = {"q_proj/o_proj": 2, "k_proj/v_proj": 2, "gate/up": 2, "down": 1}  # modules of each shape in a layer
METHODS = ["ties", "dare_ties", "dare_linear", "della", "breadcrumbs", "magnitude_prune"]
LAYERS = 32
ORTHONORMAL = linalg.orthonormal_columns


def params_for(name: str):
    density = {"della": 0.5, "breadcrumbs": None}.get(name, 0.2)
    return REGISTRY[name].Params.model_validate({} if density is None else {"density": density})


def two_inputs(d_out: int, d_in: int, g: torch.Generator, dev: torch.device, bf16: bool = False) -> list[LoraFactors]:
    """Two random rank-32 inputs on ``dev``, float32 (rounded through bf16 first with ``bf16``, as read from bf16 files)."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    return [
        LoraFactors(
            A=(torch.randn(32, d_in, generator=g) / 64).to(dev, dtype).float(),
            B=(torch.randn(d_out, 32, generator=g) * 0.03).to(dev, dtype).float(),
        )
        for _ in range(2)
    ]


def timed(fn, reps: int = 5) -> tuple[float, object]:
    out = None
    times = []
    for i in range(reps + 2):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        if i >= 2:
            times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times), out


def count_rounds() -> list[int]:
    """Patch top_ritz to count the range finder's rounds (the first call is the start)."""
    calls = [0]
    original = linalg.top_ritz

    def counting(Z, rank):
        calls[0] += 1
        return original(Z, rank)

    linalg.top_ritz = counting
    return calls


def main() -> None:
    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}")
    g = torch.Generator().manual_seed(0)
    calls = count_rounds()
    totals = {m: [0.0, 0.0] for m in METHODS}
    print("| method | shape | dense step ms | refit ms | refit rounds |\n|---|---|---|---|---|")
    for label, (d_out, d_in) in SHAPES.items():
        factors = two_inputs(d_out, d_in, g, dev, bf16=True)
        start = torch.cat([f.A for f in factors]).T
        ctx = MergeContext("model.layers.0.mlp.up_proj", 32, 0, dev, sources=("a0", "a1"))
        for name in METHODS:
            method, params = REGISTRY[name], params_for(name)
            dense_ms, merged = timed(lambda m=method, f=factors, p=params, c=ctx: m.dense_merge(f, [1.0, 1.0], p, c))
            calls[0] = 0
            refit_ms, _ = timed(lambda d=merged, s=start: best_rank_k(d, 32, start=s, seed=1))
            rounds = calls[0] // 7 - 1
            totals[name][0] += dense_ms * PER_LAYER[label] * LAYERS / 1e3
            totals[name][1] += refit_ms * PER_LAYER[label] * LAYERS / 1e3
            print(f"| {name} | {label} {d_out}x{d_in} | {dense_ms:.1f} | {refit_ms:.1f} | {rounds} |", flush=True)
    print("\nWhole model (32 layers x 7 modules), seconds: dense step + refit")
    for name, (dense_s, refit_s) in totals.items():
        print(f"- {name}: {dense_s:.2f} + {refit_s:.2f} = {dense_s + refit_s:.2f} s")
    if "--profile" in sys.argv:
        profile(dev, g)
    if "--variants" in sys.argv:
        variants(dev, g)
    if "--profile-della" in sys.argv:
        profile(dev, g, "della")


def variants(dev: torch.device, g: torch.Generator) -> None:
    """The GPU refit with the Gram (host eigh) and the Householder (on device) bases, and the exact
    threshold by radix selection and by a sampled bracket, on each shape: ms and that they agree."""
    from soupkit.ops import sparsify
    from soupkit.ops.magprune import magnitude_order

    sorts = {}
    print(
        "\n| shape | refit: gram (host eigh) ms | householder ms | energy kept gram / householder | "
        "threshold: radix ms | bracket ms | same threshold |\n|---|---|---|---|---|---|---|"
    )
    for label, (d_out, d_in) in SHAPES.items():
        factors = two_inputs(d_out, d_in, g, dev)
        start = torch.cat([f.A for f in factors]).T
        ctx = MergeContext("model.layers.0.mlp.up_proj", 32, 0, dev, sources=("a0", "a1"))
        merged = REGISTRY["ties"].dense_merge(factors, [1.0, 1.0], params_for("ties"), ctx)
        refit = {}
        for name, basis in (("gram", linalg.gram_columns), ("householder", lambda Y, rounds=2: linalg.householder_columns(Y))):
            linalg.orthonormal_columns = basis
            refit[name] = timed(lambda d=merged, s=start: best_rank_k(d, 32, start=s, seed=1))
        linalg.orthonormal_columns = ORTHONORMAL
        mags = merged.abs()
        k = int(0.2 * mags.numel())
        bits = mags.view(torch.int32).reshape(-1)
        radix_ms, radix = timed(lambda b=bits, n=k: radix_select(b, n))
        bracket_ms, bracket = timed(lambda x=mags, n=k: sparsify.kth_largest_bracketed(x.reshape(-1), n))
        order_ms, order = timed(lambda d=merged: magnitude_order(d))
        stable_ms, stable = timed(lambda d=merged: d.abs().argsort(dim=-1, stable=True))
        sorts[label] = (order_ms, stable_ms, torch.equal(order, stable))
        print(
            f"| {label} | {refit['gram'][0]:.1f} | {refit['householder'][0]:.1f} | "
            f"{refit['gram'][1][1]:.6f} / {refit['householder'][1][1]:.6f} | {radix_ms:.1f} | {bracket_ms:.1f} | {radix == bracket} |",
            flush=True,
        )
    print("\n| shape | DELLA's order: int64 keys ms | stable float32 argsort ms | same order |\n|---|---|---|---|")
    for label, (keys_ms, stable_ms, same) in sorts.items():
        print(f"| {label} | {keys_ms:.1f} | {stable_ms:.1f} | {same} |")


def radix_select(bits: torch.Tensor, k: int) -> float:
    """kth_largest_magnitude's radix path alone (float32 bits of the magnitudes)."""
    from soupkit.ops.sparsify import RADIX_HIGH, RADIX_LOW, float_from_radix, select_bucket

    high = bits >> 16
    h, above = select_bucket(torch.bincount(high, minlength=RADIX_HIGH), k)
    low, _ = select_bucket(torch.bincount(bits[high == h] & 0xFFFF, minlength=RADIX_LOW), k - above)
    return float_from_radix(h, low)


def profile(dev: torch.device, g: torch.Generator, name: str = "ties") -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    factors = two_inputs(14336, 4096, g, dev)
    start = torch.cat([f.A for f in factors]).T
    ctx = MergeContext("model.layers.0.mlp.up_proj", 32, 0, dev, sources=("a0", "a1"))
    method, params = REGISTRY[name], params_for(name)
    for _ in range(2):
        best_rank_k(method.dense_merge(factors, [1.0, 1.0], params, ctx), 32, start=start, seed=1)
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            best_rank_k(method.dense_merge(factors, [1.0, 1.0], params, ctx), 32, start=start, seed=1)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30))
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20))


if __name__ == "__main__":
    main()
