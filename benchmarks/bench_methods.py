"""Merge-method benchmark: soupkit ties / dare_ties / lego vs PEFT's ties_svd / dare_ties_svd.

    python -m benchmarks.bench_methods [--root /tmp/soupkit-bench] [--peft-timeout 600] [--no-full-peft]
    python -m benchmarks.bench_methods --rows --shape llama3-8b-4layers --device cuda --zero-base \
        --methods ties dare_ties ties_core tsv --peft ties_svd dare_ties_svd

``--rows`` mode: one whole-process row per run in ``--methods`` (names of ``RUNS``: a method, or a method
in core space such as ``ties_core``) and per PEFT combination in ``--peft``, all on ``--shape``, with the
maths on ``--device``; PEFT rows also give PEFT's merge call alone (``add_weighted_adapter``).
``--zero-base`` builds the base as sparse zero files: adapter merges read only its headers (PEFT loads
the zeros), so the figures are the same and the fixture costs seconds.

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
RUNS: dict[str, dict] = {  # name -> merge: section (rank RANK added, except for cat, which writes sum r_i)
    "cat": {"method": "cat"},
    "ties": {"method": "ties", "density": DENSITY, "rank": RANK},
    "dare_ties": {"method": "dare_ties", "density": DENSITY, "rank": RANK},
    "dare_linear": {"method": "dare_linear", "density": DENSITY, "rank": RANK},
    "della": {"method": "della", "density": 0.5, "epsilon": 0.1, "rank": RANK},  # DELLA's own default density
    "breadcrumbs": {"method": "breadcrumbs", "rank": RANK},
    "magnitude_prune": {"method": "magnitude_prune", "density": DENSITY, "rank": RANK},
    "lego": {"method": "lego", "rank": RANK},
    "ties_core": {"method": "ties", "space": "core", "density": DENSITY, "rank": RANK},
    "tsv": {"method": "tsv", "rank": RANK},
    "tsv_core": {"method": "tsv", "space": "core", "rank": RANK},
    "iso_c": {"method": "iso_c", "rank": RANK},
}
PEFT = ("ties_svd", "dare_ties_svd")
SHAPES["llama-1b-1layer"] = {**SHAPES["llama-1b"], "layers": 1}


def soupkit_row(
    base: Path, adapters: list[Path], method: str, work: Path, merge: dict | None = None, device: str = "cpu"
) -> tuple[float, float, int, str]:
    """(wall s, peak RSS MB, status, energy note) of one ``soupkit merge`` process."""
    recipe = {
        "base_model": str(base),
        "adapters": [{"name": f"a{i}", "path": str(p)} for i, p in enumerate(adapters)],
        "merge": merge or {"method": method, "rank": RANK, **METHODS[method]},
        "dtype": "bfloat16",
    }
    path = work / f"{method}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = work / f"soupkit-{method}"
    cmd = [sys.executable, "-m", "soupkit", "merge", str(path), "-o", str(out), "--quiet", "--device", device]
    wall, rss, status = measure(cmd)
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


def rows(args: argparse.Namespace) -> None:
    """``--rows`` mode: the requested runs on one shape, side by side."""
    import benchmarks.measure as measured

    print(f"machine: {machine()}; device {args.device}; shape {args.shape} {SHAPES[args.shape]}")
    base, adapters = ensure_fixture(args.root, args.shape, n_adapters=2, rank=32, zero_base=args.zero_base)
    work = Path(tempfile.mkdtemp(prefix="soupkit-bench-rows-"))
    print("| run | merge section | wall | peak RSS | note |")
    print("|---|---|---|---|---|", flush=True)
    cat_wall = None
    for name in args.methods:
        merge = RUNS[name]
        wall, rss, status, note = soupkit_row(base, adapters, name, work, merge, args.device)
        if name == "cat" and status == 0:
            cat_wall = wall
        elif cat_wall is not None and status == 0:  # issue 22: every method within 2x of cat
            note = f"**{wall / cat_wall:.2f}x cat**; {note}"
        print(f"| soupkit {name} | `{merge}` | {fmt(wall, rss, status)} | {note} |", flush=True)
    for combo in args.peft:
        wall, rss, status = peft_row(base, adapters, combo, work, args.peft_timeout, args.device)
        call = [line.split()[1] for line in measured.LAST_STDERR.splitlines() if line.startswith("merge-call-s ")]
        note = f"add_weighted_adapter alone: {call[-1]} s" if call else ""
        print(
            f"| PEFT {combo} (load, merge, save) | density {DENSITY}, density-free for svd | {fmt(wall, rss, status)} | {note} |",
            flush=True,
        )
    shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "soupkit-bench")
    parser.add_argument("--peft-timeout", type=float, default=600.0)
    parser.add_argument("--no-full-peft", action="store_true", help="skip PEFT on the whole model")
    parser.add_argument("--rows", action="store_true", help="side-by-side rows on one shape (see the module doc)")
    parser.add_argument("--shape", default="llama-1b", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--zero-base", action="store_true")
    parser.add_argument("--methods", nargs="*", default=["cat", "ties", "ties_core"], choices=sorted(RUNS))
    parser.add_argument("--peft", nargs="*", default=[], choices=list(PEFT))
    args = parser.parse_args()
    if args.rows:
        rows(args)
        return
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
