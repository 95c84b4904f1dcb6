"""Issue 22, start-up: where a whole ``soupkit merge`` of the Llama-1B shape with ``svd`` spends its time.

    git worktree add --detach /tmp/startup-before <old commit>
    python -m benchmarks.bench_startup --before /tmp/startup-before [--runs 5]

Two parts, each run ``--runs`` times, the two trees alternating (before, after, before, ...):

- **whole process**: ``python -m soupkit merge svd.yaml -o OUT --quiet`` (the command of
  ``bench_cpu_speed``'s ``startup`` section), wall seconds; median, min, and the 1-minute load average
  before and after. Twice: with this shell's environment as it is, and with Python's bytecode cache
  on (``PYTHONDONTWRITEBYTECODE`` removed, the cache under a temporary ``PYTHONPYCACHEPREFIX``, one
  warm-up run per tree), since an environment that sets ``PYTHONDONTWRITEBYTECODE`` compiles every
  soupkit module from source on every run.
- **stages**: one process per run times, in order, ``import torch``, the rest of the merge command's
  imports, loading the recipe, planning (safetensors headers), the merge loop split into the method's
  maths and the reads of the inputs (the rest is writing), and the lock and card (hashes).

Fixtures: ``llama_shapes.ensure_fixture`` (zero-file Llama-1B base, two random rank-32 bf16 adapters
on all 7 linear modules), rank 32, dtype bfloat16.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.llama_shapes import ensure_fixture
from benchmarks.measure import machine

HERE = Path(__file__).resolve().parents[1]

# Run in a fresh interpreter with the tree on PYTHONPATH; prints one JSON line of stage seconds.
STAGES = r"""
import json, shutil, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import soupkit.cli, soupkit.execute, soupkit.merge, soupkit.io.sharded, soupkit.recipe
t2 = time.perf_counter()
from pathlib import Path
from soupkit.cli.group import keep_freed_memory
from soupkit import execute, merge
keep_freed_memory()
recipe = soupkit.recipe.load_recipe(Path(sys.argv[1]))
t3 = time.perf_counter()
plan, inputs = execute.plan_recipe(recipe)
t4 = time.perf_counter()
spent = {"maths": 0.0, "read": 0.0}
def timed(fn, key):
    def run(*args):
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            spent[key] += time.perf_counter() - start
    return run
method = type(execute.get_method(recipe.merge.method))
method.merge = timed(method.merge, "maths")
execute.load_sources = timed(execute.load_sources, "read")
out = Path(sys.argv[2]); shutil.rmtree(out, ignore_errors=True); out.mkdir(parents=True)
energy = execute.write_adapter(recipe, plan, inputs, out, out, execute.RunOptions(progress=False))
t5 = time.perf_counter()
report = merge.MergeReport(plan=plan, out=out, energy_kept=energy)
merge.write_sidecars(recipe, plan, inputs, out, out, report)
t6 = time.perf_counter()
print(json.dumps({"import torch": t1 - t0, "other imports": t2 - t1, "recipe": t3 - t2, "plan (headers)": t4 - t3,
                  "svd maths": spent["maths"], "read inputs": spent["read"],
                  "write": t5 - t4 - spent["maths"] - spent["read"], "lock + card (hashes)": t6 - t5}))
"""


def env_for(tree: Path, cache: Path | None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    if cache is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(cache / tree.name)
    return env


def whole(tree: Path, recipe: Path, out: Path, cache: Path | None) -> float:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "soupkit", "merge", str(recipe), "-o", str(out), "--quiet"]
    start = time.perf_counter()
    subprocess.run(cmd, env=env_for(tree, cache), cwd=tree, check=True, capture_output=True)
    return time.perf_counter() - start


def whole_rows(sides: list[tuple[str, Path]], recipe: Path, work: Path, runs: int, cache: Path | None) -> None:
    if cache is not None:  # one run per tree writes its bytecode cache
        for _, tree in sides:
            whole(tree, recipe, work / "warm", cache)
    times: dict[str, list[float]] = {side: [] for side, _ in sides}
    load = os.getloadavg()[0]
    for _ in range(runs):
        for side, tree in sides:
            times[side].append(whole(tree, recipe, work / f"out-{side}", cache))
    after = os.getloadavg()[0]
    label = "bytecode cache on" if cache is not None else "environment as is"
    for side, ts in times.items():
        shown = " ".join(f"{t:.2f}" for t in ts)
        print(
            f"| whole process, {label} | {side} | {statistics.median(ts):.2f} s | {min(ts):.2f} s | {shown} | {load:.2f} -> {after:.2f} |"
        )


def stage_rows(sides: list[tuple[str, Path]], recipe: Path, work: Path, runs: int) -> None:
    found: dict[str, list[dict[str, float]]] = {side: [] for side, _ in sides}
    for _ in range(runs):
        for side, tree in sides:
            cmd = [sys.executable, "-c", STAGES, str(recipe), str(work / f"stages-{side}")]
            done = subprocess.run(cmd, env=env_for(tree, None), cwd=tree, check=True, capture_output=True, text=True)
            found[side].append(json.loads(done.stdout.splitlines()[-1]))
    names = list(found[sides[0][0]][0])
    print(f"| stage (median of {runs}, ms) | " + " | ".join(side for side, _ in sides) + " |")
    print("|---|" + "---|" * len(sides))
    for name in [*names, "sum"]:
        cells = []
        for side, _ in sides:
            rows = found[side]
            values = [sum(r.values()) if name == "sum" else r[name] for r in rows]
            cells.append(f"{statistics.median(values) * 1e3:.0f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="source tree of the earlier code")
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "soupkit-bench")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sections", nargs="+", default=["whole", "cached", "stages"])
    args = parser.parse_args()
    sides = [("before", args.before.resolve()), ("after", HERE)]
    base, adapters = ensure_fixture(args.root, "llama-1b", n_adapters=2, rank=32, zero_base=True)
    work = Path(tempfile.mkdtemp(prefix="soupkit-bench-startup-"))
    recipe = work / "svd.yaml"
    spec = {"method": "svd", "rank": 32}
    recipe.write_text(
        yaml.safe_dump(
            {
                "base_model": str(base),
                "adapters": [{"name": f"a{i}", "path": str(p)} for i, p in enumerate(adapters)],
                "merge": spec,
                "dtype": "bfloat16",
            }
        )
    )
    print(f"machine: {machine()}; before = {args.before}, after = {HERE}")
    print("| run | code | median | min | each run (s) | load avg (1 min) |")
    print("|---|---|---|---|---|---|", flush=True)
    if "whole" in args.sections:
        whole_rows(sides, recipe, work, args.runs, None)
    if "cached" in args.sections:
        whole_rows(sides, recipe, work, args.runs, work / "pycache")
    if "stages" in args.sections:
        print()
        stage_rows(sides, recipe, work, args.runs)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
