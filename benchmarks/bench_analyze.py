"""``soupkit analyze`` benchmark: whole processes on Llama-shaped random adapters (two, rank 32, all 7
linear modules), CPU.

    python -m benchmarks.bench_analyze [--root /tmp/soupkit-bench] [--shapes llama3-8b llama-1b]

Rows per shape: factors only (``--no-base``), and, where the shape's fixture has a random base, with
``||delta||/||W||`` (reads every targeted base weight once), and with ``--dense`` (sign conflicts).
The 8B-shaped base is built as sparse zero files (its weights would be 16 GB of random data), so only
the factor-only row is run there. Each row: wall seconds (start-up and imports included), peak RSS.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

from benchmarks.bench_adapter_merge import fmt
from benchmarks.llama_shapes import ensure_fixture
from benchmarks.measure import machine, measure


def analyze_row(base: Path, adapters: list[Path], work: Path, flags: list[str]) -> tuple[float, float, int]:
    recipe = {
        "base_model": str(base),
        "adapters": [{"name": f"a{i}", "path": str(p)} for i, p in enumerate(adapters)],
        "merge": {"method": "ties", "density": 0.2},
    }
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = work / "analysis"
    result = measure([sys.executable, "-m", "soupkit", "analyze", str(path), "-o", str(out), *flags])
    shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "soupkit-bench")
    parser.add_argument("--shapes", nargs="+", default=["llama3-8b", "llama-1b"])
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print("| shape | run | wall | peak RSS |")
    print("|---|---|---|---|", flush=True)
    work = Path(tempfile.mkdtemp(prefix="soupkit-bench-analyze-"))
    for shape in args.shapes:
        random_base = shape != "llama3-8b"
        base, adapters = ensure_fixture(args.root, shape, n_adapters=2, rank=32, zero_base=not random_base)
        runs = [("factors only (--no-base)", ["--no-base"])]
        if random_base:
            runs += [
                ("with ||delta||/||W|| (reads the targeted base weights)", []),
                ("--dense --no-base", ["--dense", "--no-base"]),
            ]
        for label, flags in runs:
            print(f"| {shape} | {label} | {fmt(*analyze_row(base, adapters, work, flags))} |", flush=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
