"""Merge-method benchmark: soupkit ties / dare_ties / lego vs PEFT's ties_svd / dare_ties_svd.

    python -m benchmarks.bench_methods [--root /tmp/soupkit-bench] [--peft-timeout 600] [--no-full-peft]

Llama-1B shape (hidden 2048, 16 layers, intermediate 8192), two rank-32 bf16 adapters on all 7 linear
modules, density 0.2, output rank 32 (PEFT's default for *_svd: the largest input rank). Each row is one
whole process (start-up, imports, reading, merging, writing), measured with os.wait4 (wall, peak RSS).

PEFT's *_svd paths run a full SVD of every dense delta; on the whole model they are given
``--peft-timeout`` seconds and reported as '> N s' when stopped. To give a figure anyway, both PEFT
and soupkit are also timed on a ONE-LAYER model of the same module shapes (measured), and PEFT's
whole-model time is extrapolated as 16 x that: such rows are labelled 'extrapolated'.

Accuracy line: for soupkit's ties on two modules of layer 0, the energy kept by the best rank-32
re-factorisation (``ops.best_rank_k``) next to the exact optimum from a float64 eigendecomposition.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

from benchmarks.bench_adapter_merge import fmt, peft_row
from benchmarks.llama_shapes import SHAPES, ensure_fixture
from benchmarks.measure import machine, measure

DENSITY, RANK = 0.2, 32
METHODS = {"ties": {"density": DENSITY}, "dare_ties": {"density": DENSITY}, "lego": {}}
PEFT = ("ties_svd", "dare_ties_svd")
SHAPES["llama-1b-1layer"] = {**SHAPES["llama-1b"], "layers": 1}


def soupkit_row(base: Path, adapters: list[Path], method: str, work: Path) -> tuple[float, float, int, str]:
    """(wall s, peak RSS MB, status, energy note) of one ``soupkit merge`` process."""
    recipe = {
        "base_model": str(base),
        "adapters": [{"name": f"a{i}", "path": str(p)} for i, p in enumerate(adapters)],
        "merge": {"method": method, "rank": RANK, **METHODS[method]},
        "dtype": "bfloat16",
    }
    path = work / f"{method}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = work / f"soupkit-{method}"
    wall, rss, status = measure([sys.executable, "-m", "soupkit", "merge", str(path), "-o", str(out), "--quiet"])
    note = ""
    lock = out / "soupkit.lock.yaml"
    if lock.is_file():
        summary = yaml.safe_load(lock.read_text()).get("soupkit_lock", {}).get("report", {})
        kept = list((summary.get("energy_kept") or {}).values())
        if kept:
            note = f"energy kept: min {min(kept):.3f}, mean {sum(kept) / len(kept):.3f}"
    shutil.rmtree(out, ignore_errors=True)
    return wall, rss, status, note


def accuracy_line(base: Path, adapters: list[Path]) -> str:
    """best_rank_k's energy vs the exact optimum on layer 0's up_proj and q_proj (ties merge)."""
    import torch

    from soupkit.io.adapter import LoraAdapter
    from soupkit.methods import REGISTRY, LoraFactors, MergeContext
    from soupkit.ops import best_rank_k, eigh

    method = REGISTRY["ties"]
    params = method.Params.model_validate({"density": DENSITY})
    opened = [LoraAdapter(f"a{i}", p) for i, p in enumerate(adapters)]
    parts = []
    for path in ("model.layers.0.mlp.up_proj", "model.layers.0.self_attn.q_proj"):
        factors = [LoraFactors(A=f.A, B=f.B, scale=a.modules[path].scale) for a in opened for f in [a.load(path)]]
        ctx = MergeContext(path, RANK, 0, sources=tuple(a.name for a in opened))
        dense = method.dense_merge(factors, [1.0] * len(factors), params, ctx)
        _, kept = best_rank_k(dense, RANK, start=torch.cat([f.A for f in factors]).T)
        d = dense.double()
        gram = d @ d.T if d.shape[0] <= d.shape[1] else d.T @ d
        evals = eigh(gram)[0].flip(0).clamp_min(0)
        exact = float(evals[:RANK].sum() / evals.sum())
        parts.append(f"{path.split('.', 3)[-1]} {tuple(dense.shape)}: {kept:.7f} vs exact {exact:.7f}")
    return "best rank-32 energy kept (ties, layer 0): " + "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "soupkit-bench")
    parser.add_argument("--peft-timeout", type=float, default=600.0)
    parser.add_argument("--no-full-peft", action="store_true", help="skip PEFT on the whole model")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    base, adapters = ensure_fixture(args.root, "llama-1b", n_adapters=2, rank=32)
    small_base, small_adapters = ensure_fixture(args.root, "llama-1b-1layer", n_adapters=2, rank=32)
    work = Path(tempfile.mkdtemp(prefix="soupkit-bench-methods-"))
    print("| run | model | wall | peak RSS | note |")
    print("|---|---|---|---|---|")
    for method in METHODS:
        wall, rss, status, note = soupkit_row(base, adapters, method, work)
        print(f"| soupkit {method} | Llama-1B shape, 16 layers | {fmt(wall, rss, status)} | {note} |", flush=True)
    for method in ("ties", "dare_ties"):
        wall, rss, status, _ = soupkit_row(small_base, small_adapters, method, work)
        print(f"| soupkit {method} | 1 layer (same module shapes) | {fmt(wall, rss, status)} | |", flush=True)
    for combo in PEFT:
        wall, rss, status = peft_row(small_base, small_adapters, combo, work, None)
        note = f"x16 layers: ~{16 * wall:.0f} s EXTRAPOLATED (not measured)" if status == 0 else ""
        print(f"| PEFT {combo} | 1 layer (same module shapes) | {fmt(wall, rss, status)} | {note} |", flush=True)
    print(accuracy_line(base, adapters), flush=True)
    if not args.no_full_peft:
        for combo in PEFT:
            wall, rss, status = peft_row(base, adapters, combo, work, args.peft_timeout)
            print(f"| PEFT {combo} | Llama-1B shape, 16 layers | {fmt(wall, rss, status)} | |", flush=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
