"""Thread-count benchmark: torch's default thread count against one forced thread, on the CPU.

    python -m benchmarks.bench_threads [--root /tmp/soupkit-bench] [--shape llama-1b] [--methods ties svd]

Two tables, each row measured with torch's default thread count ("default", as soupkit runs: only
LAPACK calls on small matrices, ``ops.linalg.SMALL_MATRIX``, drop to one thread) and with one thread
forced for the whole process (``OMP_NUM_THREADS=1``):

1. LAPACK: ``torch.linalg.eigh`` and thin ``torch.linalg.svd`` of n x n float64 matrices (the R x R
   core maths is n <= a few hundred), median of 3 calls, each thread count set with
   ``torch.set_num_threads``; this is what ``SMALL_MATRIX`` is chosen from.
2. Whole merges: one ``soupkit merge`` process per row (start-up, reading, merging, writing) of two
   rank-32 bf16 adapters on all 7 linear modules of the ``--shape`` model (default the Llama-1B shape,
   16 layers), output rank 32; ties at density 0.2 (dense deltas) and svd (factor space).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.llama_shapes import SHAPES, ensure_fixture
from benchmarks.measure import machine, measure

MERGES = {"ties": {"method": "ties", "density": 0.2, "rank": 32}, "svd": {"method": "svd", "rank": 32}}
SIZES = (32, 64, 128, 256, 512, 1024, 2048)


def lapack_ms(op: str, n: int, threads: int) -> float:
    """Median ms of 3 calls of ``op`` (eigh or svd) on an n x n float64 matrix with ``threads`` threads."""
    import torch

    gen = torch.Generator().manual_seed(n)
    M = torch.randn(n, n, generator=gen, dtype=torch.float64)
    M = M @ M.T if op == "eigh" else M
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            torch.linalg.eigh(M) if op == "eigh" else torch.linalg.svd(M, full_matrices=False)
            times.append((time.perf_counter() - start) * 1000)
    finally:
        torch.set_num_threads(before)
    return statistics.median(times)


def lapack_table(default_threads: int, sizes: list[int]) -> None:
    print(f"\n| op | n | {default_threads} threads (default) | 1 thread |")
    print("|---|---|---|---|")
    for op in ("eigh", "svd"):
        for n in sizes:
            many, one = lapack_ms(op, n, default_threads), lapack_ms(op, n, 1)
            print(f"| {op} | {n} | {many:.2f} ms | {one:.2f} ms |", flush=True)


def merge_table(root: Path, shape: str, methods: list[str]) -> None:
    base, adapters = ensure_fixture(root, shape, n_adapters=2, rank=32, zero_base=True)
    work = Path(tempfile.mkdtemp(prefix="soupkit-bench-threads-"))
    print(f"\n| merge ({shape}, 2 x rank 32) | default threads | 1 thread (OMP_NUM_THREADS=1) |")
    print("|---|---|---|")
    for method in methods:
        recipe = {
            "base_model": str(base),
            "adapters": [{"name": f"a{i}", "path": str(p)} for i, p in enumerate(adapters)],
            "merge": MERGES[method],
            "dtype": "bfloat16",
        }
        path = work / f"{method}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        cells = []
        for threads in (None, "1"):
            env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
            env.update({"OMP_NUM_THREADS": threads} if threads else {})
            out = work / f"out-{method}"
            cmd = [sys.executable, "-m", "soupkit", "merge", str(path), "-o", str(out), "--quiet", "--overwrite"]
            wall, _, status = measure(cmd, env=env)
            cells.append(f"{wall:.2f} s" if status == 0 else f"failed ({status})")
            shutil.rmtree(out, ignore_errors=True)
        print(f"| {method} | {cells[0]} | {cells[1]} |", flush=True)
    shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "soupkit-bench")
    parser.add_argument("--shape", default="llama-1b", choices=sorted(SHAPES))
    parser.add_argument("--methods", nargs="*", default=list(MERGES), choices=list(MERGES))
    parser.add_argument("--sizes", nargs="*", type=int, default=list(SIZES), help="LAPACK matrix sizes (none: no table)")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    print(f"machine: {machine()}; torch default threads {torch.get_num_threads()}; load average {load:.1f}")
    if args.sizes:
        lapack_table(torch.get_num_threads(), args.sizes)
    if args.methods:
        merge_table(args.root, args.shape, args.methods)


if __name__ == "__main__":
    main()
