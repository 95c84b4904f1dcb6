"""Issue 22 on the CPU: start-up, dense methods, ``analyze --dense`` and adapter-count scaling, with the
code before and after side by side in one run.

    git worktree add --detach /tmp/soupkit-before <old commit>
    python -m benchmarks.bench_cpu_speed --before /tmp/soupkit-before [--root /tmp/soupkit-bench]

Every row is one whole process (python start-up and imports included) under GNU ``time``: wall
seconds, CPU seconds (user + system, all threads) and peak RSS, with the 1-minute load average
before and after it. A row marked *before* runs the same command with ``PYTHONPATH`` set to the
``--before`` tree, *after* with this tree; the two sides of a pair run back to back. Fixtures
(``benchmarks/llama_shapes.py``): zero-file bases (adapter merges read their headers only) and
random rank-32 bf16 adapters on all 7 linear modules.

Sections (``--sections``, in this order):
- ``module`` (not in the default list): one Llama-1B MLP module in-process on one thread, CPU seconds
  of each dense method's dense step and of its rank-32 refit, before and after;
- ``startup``: ``soupkit --help``, and ``svd`` (rank 32) on the Llama-1B shape;
- ``ties``: full-space ``ties`` (density 0.5, rank 32) on the Llama-1B shape;
- ``dense``: every dense method (density 0.5 where it has one, rank 32) and ``ties`` again, on a
  ``--slice``-layer model of the Llama-1B module shapes, after only (their ratio to ``ties``);
- ``analyze``: ``analyze --dense --no-base`` on the Llama-1B shape, after only;
- ``analyze-slice``: the same on the ``--slice``-layer model, before and after;
- ``scaling``: ``svd`` and core-space ``ties`` with 2, 4, 8 and 16 adapters, after only;
- ``ties-before``: the ``ties`` row of the earlier code (last: it is the slowest row).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

import benchmarks.measure as measured
from benchmarks.llama_shapes import SHAPES, ensure_fixture
from benchmarks.measure import machine, measure

HERE = Path(__file__).resolve().parents[1]
DENSE = ["ties", "dare_ties", "dare_linear", "della", "breadcrumbs", "magnitude_prune"]
DENSITY = {"ties": 0.5, "dare_ties": 0.5, "dare_linear": 0.5, "magnitude_prune": 0.5, "della": 0.5}


MODULE_CHILD = """
import sys, time, torch
import importlib
cli = importlib.import_module("soupkit.cli")
print("tree", cli.__file__, file=sys.stderr)
for where in ("soupkit.cli.group", "soupkit.cli"):  # a package since 72a6472, one module before
    try:
        importlib.import_module(where).keep_freed_memory()  # what `soupkit merge` does in this version
        break
    except (ImportError, AttributeError):
        pass
torch.set_num_threads(1)
from soupkit.methods import REGISTRY, LoraFactors, MergeContext
from soupkit.ops import best_rank_k
g = torch.Generator().manual_seed(0)
factors = [LoraFactors(A=torch.randn(32, 2048, generator=g) / 45, B=torch.randn(8192, 32, generator=g) * 0.03) for _ in range(2)]
start = torch.cat([f.A for f in factors]).T
ctx = MergeContext("model.layers.0.mlp.up_proj", 32, 0, sources=("a0", "a1"))
for name in sys.argv[1:]:
    method = REGISTRY[name]
    params = method.Params.model_validate({"density": 0.5} if name in ("ties", "dare_ties", "magnitude_prune") else {})
    dense, refit = [], []
    for _ in range(3):
        t = time.process_time()
        merged = method.dense_merge(factors, [1.0, 1.0], params, ctx)
        dense.append(time.process_time() - t)
        t = time.process_time()
        best_rank_k(merged, 32, start=start, seed=1)
        refit.append(time.process_time() - t)
    print(f"{name} {min(dense):.3f} {min(refit):.3f}")
"""


def module_rows(sides: list[tuple[str, Path]]) -> None:
    """One 8192 x 2048 module (Llama-1B's up_proj), two rank-32 inputs, one thread: CPU seconds of the
    dense step and of the rank-32 refit, min of 3, in a child process per side."""
    import subprocess

    for side, tree in sides:
        cmd = [sys.executable, "-c", MODULE_CHILD, *DENSE]  # `-c` puts the cwd first on sys.path: run in the tree
        done = subprocess.run(cmd, env=soupkit_env(tree), cwd=tree, capture_output=True, text=True)
        for line in done.stdout.splitlines() or [done.stderr[-300:]]:
            name, dense, refit = (line.split() + ["", "", ""])[:3]
            print(
                f"| {name}: one 8192 x 2048 module, 1 thread, dense step + refit | {side} | | {dense} + {refit} s | | | |",
                flush=True,
            )


def soupkit_env(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree)}


def row(label: str, side: str, cmd: list[str], tree: Path, note: str = "") -> None:
    """Measure one whole process and print its table row."""
    load = os.getloadavg()[0]
    wall, rss, status = measure(cmd, env=soupkit_env(tree), cwd=tree)  # `-m` puts the cwd first on sys.path
    after = os.getloadavg()[0]
    shown = f"{wall:.2f} s" if status == 0 else f"failed ({status})"
    print(
        f"| {label} | {side} | {shown} | {measured.LAST_CPU:.2f} s | {rss:.0f} MB | {load:.1f} -> {after:.1f} | {note} |",
        flush=True,
    )


def merge_cmd(work: Path, base: Path, adapters: list[Path], merge: dict, name: str) -> list[str]:
    recipe = {
        "base_model": str(base),
        "adapters": [{"name": f"a{i}", "path": str(p)} for i, p in enumerate(adapters)],
        "merge": merge,
        "dtype": "bfloat16",
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = work / f"out-{name}"
    shutil.rmtree(out, ignore_errors=True)
    return [sys.executable, "-m", "soupkit", "merge", str(path), "-o", str(out), "--quiet", "--overwrite"]


def analyze_cmd(work: Path, base: Path, adapters: list[Path]) -> list[str]:
    recipe = merge_cmd(work, base, adapters, {"method": "ties", "density": 0.2}, "analyze")[4]
    out = work / "analysis"
    shutil.rmtree(out, ignore_errors=True)
    return [sys.executable, "-m", "soupkit", "analyze", recipe, "-o", str(out), "--dense", "--no-base"]


def dense_merge(method: str) -> dict:
    extra = {"density": DENSITY[method]} if method in DENSITY else {}
    return {"method": method, "rank": 32, **extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--before", type=Path, required=True, help="source tree of the earlier code")
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "soupkit-bench")
    parser.add_argument("--slice", type=int, default=2, help="layers of the dense-methods model")
    parser.add_argument(
        "--sections", nargs="+", default=["startup", "ties", "dense", "analyze", "scaling", "analyze-slice", "ties-before"]
    )
    args = parser.parse_args()
    sides = [("before", args.before.resolve()), ("after", HERE)]
    sliced = f"llama-1b-{args.slice}layers"
    SHAPES[sliced] = {**SHAPES["llama-1b"], "layers": args.slice}
    print(f"machine: {machine()}; before = {args.before}, after = {HERE}")
    print("| run | code | wall | CPU (user+sys) | peak RSS | load avg (1 min) | note |")
    print("|---|---|---|---|---|---|---|", flush=True)
    work = Path(tempfile.mkdtemp(prefix="soupkit-bench-speed-"))
    base, adapters = ensure_fixture(args.root, "llama-1b", n_adapters=2, rank=32, zero_base=True)
    script = shutil.which("soupkit")
    for section in args.sections:
        if section == "module":
            module_rows(sides)
        elif section == "startup":
            for side, tree in sides:  # the console script; `python -m soupkit` where it is not installed
                row("`soupkit --help`", side, [script, "--help"] if script else [sys.executable, "-m", "soupkit", "--help"], tree)
            for side, tree in sides:
                row(
                    "svd, Llama-1B (16 layers)", side, merge_cmd(work, base, adapters, {"method": "svd", "rank": 32}, "svd"), tree
                )
        elif section in ("ties", "ties-before"):
            side, tree = sides[1] if section == "ties" else sides[0]
            row("ties, Llama-1B (16 layers)", side, merge_cmd(work, base, adapters, dense_merge("ties"), "ties"), tree)
        elif section == "dense":
            b, a = ensure_fixture(args.root, sliced, n_adapters=2, rank=32, zero_base=True)
            for method in DENSE:
                row(
                    f"{method}, {args.slice} layers of Llama-1B",
                    "after",
                    merge_cmd(work, b, a, dense_merge(method), method),
                    HERE,
                )
        elif section == "analyze":
            row("analyze --dense --no-base, Llama-1B", "after", analyze_cmd(work, base, adapters), HERE)
        elif section == "analyze-slice":
            b, a = ensure_fixture(args.root, sliced, n_adapters=2, rank=32, zero_base=True)
            for side, tree in sides:
                row(f"analyze --dense --no-base, {args.slice} layers of Llama-1B", side, analyze_cmd(work, b, a), tree)
        elif section == "scaling":
            _, many = ensure_fixture(args.root, "llama-1b", n_adapters=16, rank=32, zero_base=True)
            for name, merge in [
                ("svd", {"method": "svd", "rank": 32}),
                ("ties_core", {"method": "ties", "space": "core", "density": 0.5, "rank": 32}),
            ]:
                for n in (2, 4, 8, 16):
                    row(f"{name}, {n} adapters, Llama-1B", "after", merge_cmd(work, base, many[:n], merge, f"{name}-{n}"), HERE)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
