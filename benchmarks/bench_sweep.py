"""soupkit sweep's speed: trials per minute, the share of a trial spent outside scoring, and the
in-memory merge time per method on the Llama-3-8B shape (issue 19). One run, every row side by side.

    PYTHONPATH=. python -m benchmarks.bench_sweep --out results/bench_sweep.md          # a GPU machine
    PYTHONPATH=. python -m benchmarks.bench_sweep --quick --device cpu                  # a smoke run

Part 1 runs real ``soupkit sweep`` studies (the product path: one base load per sweep, each trial
merged in memory, swapped in and scored) on a SmolLM2-135M-shaped Llama (its config: 30 layers,
hidden 576, 9/3 heads, vocab 49152) with random bf16 weights and two random rank-16 all-linear
adapters; 50 validation examples; metric ``loss`` and ``contains`` (greedy generation of 64 new
tokens: random weights never emit eos, so every prompt generates all 64, the worst case). A trial's
"outside scoring" share is its merge-and-swap seconds over its whole seconds.

Part 2 times ``InMemoryMerger.merged`` (the trial's merge: cached factors on the GPU, no disk, no
process start) for every registry method on the Llama-3-8B shape with two rank-32 all-linear
adapters (density 0.2, output rank 32 where a method takes one), after one warm-up merge.
"""

from __future__ import annotations

import argparse
import json
import random
import string
import time
from pathlib import Path

import torch
import yaml

from benchmarks.llama_shapes import SHAPES, build_adapter, build_base, ensure_fixture
from benchmarks.measure import machine

SHAPES.setdefault("smollm2-135m", {"hidden": 576, "layers": 30, "intermediate": 1536, "heads": 9, "kv_heads": 3, "vocab": 49152})
SWEEP_METHODS = ["cat", "linear", "ties", "dare_ties", "tsv"]
DENSE_PARAMS = {"density": 0.2}


def smollm2_fixture(root: Path, n_examples: int, shape: str = "smollm2-135m") -> Path:
    """Base + 2 adapters + validation data for part 1 (built once under ``root``)."""
    from soupkit.testing import char_tokenizer

    home = root / shape
    if not (home / "base" / "config.json").is_file():
        build_base(home / "base", shape)
        char_tokenizer().save_pretrained(home / "base")
        for i in range(2):
            build_adapter(home / f"adapter{i}", shape, rank=16, alpha=32, seed=200 + i)
    rng = random.Random(0)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 8))) for _ in range(400)]
    with open(home / "val.jsonl", "w") as fh:
        for _ in range(n_examples):
            prompt = " ".join(rng.choices(words, k=12))
            fh.write(
                json.dumps({"prompt": prompt, "completion": " " + " ".join(rng.choices(words, k=12)), "reference": "x"}) + "\n"
            )
    return home


def sweep_row(home: Path, method: str, metric: str, trials: int, device: str, out: Path) -> dict:
    from soupkit.sweep.run import run_sweep

    params = {"density": [0.1, 0.5]} if method in ("ties", "dare_ties") else {}
    spec = {
        "base_model": "base",
        "adapters": [{"name": "a", "path": "adapter0"}, {"name": "b", "path": "adapter1"}],
        "merge": {"method": method},
        "search": {"data": {"validation": "val.jsonl"}, "metric": metric, "trials": trials, "weights": [0.0, 1.5],
                   "params": params, "max_new_tokens": 64, "batch_size": 50, "top_k": 0},
    }  # fmt: skip
    path = home / f"sweep-{method}-{metric}.yaml"
    path.write_text(yaml.safe_dump(spec))
    start = time.perf_counter()
    run_sweep(path, out / f"{method}-{metric}", device=device)
    wall = time.perf_counter() - start
    rows = json.loads((out / f"{method}-{metric}" / "leaderboard.json").read_text())["trials"]
    warm = [r for r in rows[1:] if r["state"] == "complete"] or rows  # trial 0 also reads the factors from disk
    seconds = sum(r["seconds"] for r in warm) / len(warm)
    merge = sum(r["merge_seconds"] for r in warm) / len(warm)
    return {"method": method, "metric": metric, "trials": len(rows), "trial_s": seconds, "merge_s": merge,
            "per_min": 60 / seconds, "outside": merge / seconds, "first_s": rows[0]["seconds"], "wall_s": wall}  # fmt: skip


def merge_rows(root: Path, device: str, shape: str) -> list[dict]:
    from soupkit.eval.target import InMemoryMerger
    from soupkit.methods.registry import REGISTRY
    from soupkit.recipe import Recipe

    base, adapters = ensure_fixture(root, shape, n_adapters=2, rank=32, zero_base=True)

    def recipe(method: str, space: str | None = None) -> Recipe:
        fields = REGISTRY[method].Params.model_fields
        merge = {"method": method, **{k: v for k, v in DENSE_PARAMS.items() if k in fields}}
        if REGISTRY[method].uses_rank:
            merge["rank"] = 32
        if space:
            merge["space"] = space
        adapters_ = [{"name": f"a{i}", "path": str(p), "weight": w} for i, (p, w) in enumerate(zip(adapters, (0.6, 0.4)))]
        return Recipe.from_dict({"base_model": str(base), "adapters": adapters_, "merge": merge})

    merger = InMemoryMerger(recipe("cat"), torch.device(device))
    for _ in merger.merged(recipe("cat")):  # warm-up: reads every factor into the cache
        pass
    rows = []
    for method in sorted(REGISTRY):
        spaces = [None] + (["core"] if "space" in REGISTRY[method].Params.model_fields else [])
        for space in spaces:
            r = recipe(method, space)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            n = sum(1 for _ in merger.merged(r))
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            rows.append({"method": method + (" (core)" if space else ""), "seconds": time.perf_counter() - start, "modules": n})
            print(f"  merge {rows[-1]['method']}: {rows[-1]['seconds']:.2f} s", flush=True)
    return rows


def report(sweeps: list[dict], merges: list[dict], device: str) -> str:
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else "no GPU"
    lines = [f"Machine: {machine()}; {gpu}. One run of benchmarks/bench_sweep.py.", ""]
    lines += [
        "| method | metric | trials/min | trial s | merge+swap s | outside scoring | first trial s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sweeps:
        lines.append(
            f"| {r['method']} | {r['metric']} | {r['per_min']:.1f} | {r['trial_s']:.3f} | {r['merge_s']:.3f} | {100 * r['outside']:.1f}% | {r['first_s']:.2f} |"
        )
    lines += ["", "| method (Llama-3-8B shape, 2 x rank 32) | in-memory merge s |", "|---|---|"]
    lines += [f"| {r['method']} | {r['seconds']:.2f} |" for r in merges]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/soupkit-bench"))
    parser.add_argument("--out", type=Path, help="write the markdown tables here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 3 trials, 8 examples: a smoke run")
    parser.add_argument("--skip-merge", action="store_true", help="part 1 only")
    parser.add_argument("--skip-sweeps", action="store_true", help="part 2 only")
    parser.add_argument("--methods", nargs="+", help="part 1's methods (default: all of SWEEP_METHODS)")
    parser.add_argument("--metrics", nargs="+", default=["loss", "contains"], help="part 1's metrics")
    args = parser.parse_args()
    n_examples = 8 if args.quick else 50
    trials = 3 if args.quick else args.trials
    runs = args.root / f"sweeps-{int(time.time())}"
    sweeps = []
    if not args.skip_sweeps:
        home = smollm2_fixture(args.root, n_examples, "llama-tiny" if args.quick else "smollm2-135m")
    methods = args.methods or (SWEEP_METHODS if not args.quick else ["cat", "ties"])
    for metric in () if args.skip_sweeps else args.metrics:
        for method in methods:
            sweeps.append(sweep_row(home, method, metric, trials, args.device, runs))
            print(json.dumps(sweeps[-1]), flush=True)
    merges = [] if args.skip_merge else merge_rows(args.root, args.device, "llama-tiny" if args.quick else "llama3-8b")
    text = report(sweeps, merges, args.device)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
