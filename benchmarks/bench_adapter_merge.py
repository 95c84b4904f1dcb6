"""Adapter merge benchmark: soupkit vs PEFT's load + add_weighted_adapter + save, vs the floor.

    python -m benchmarks.bench_adapter_merge --shapes llama-1b llama-7b --peft-svd llama-1b [--root /tmp/soupkit-bench]

Each row is one whole process (python start-up and imports included), measured with os.wait4:
wall seconds and peak RSS. Two rank-32 bf16 adapters on all 7 linear modules.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

from benchmarks.llama_shapes import ensure_fixture
from benchmarks.measure import machine, measure

HERE = Path(__file__).resolve().parent


def soupkit_row(base: Path, adapters: list[Path], method: str, work: Path, extra: dict | None = None) -> tuple:
    recipe = {
        "base_model": str(base),
        "adapters": [{"name": f"a{i}", "path": str(p)} for i, p in enumerate(adapters)],
        "merge": {"method": method, **(extra or {})},
        "dtype": "bfloat16",
    }
    path = work / f"{method}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = work / f"soupkit-{method}"
    result = measure([sys.executable, "-m", "soupkit", "merge", str(path), "-o", str(out), "--quiet"])
    nbytes = (out / "adapter_model.safetensors").stat().st_size if out.exists() else 0
    shutil.rmtree(out, ignore_errors=True)
    return (*result, nbytes)


def peft_row(base: Path, adapters: list[Path], combination: str, work: Path, timeout: float | None, device: str = "cpu") -> tuple:
    out = work / f"peft-{combination}"
    where = ["--device", device] if device != "cpu" else []
    cmd = [sys.executable, str(HERE / "peft_merge_child.py"), *where, str(base), str(out), combination, *map(str, adapters)]
    result = measure(cmd, timeout=timeout)
    shutil.rmtree(out, ignore_errors=True)
    return result


def floor_row(adapters: list[Path], nbytes: int, work: Path) -> tuple:
    out = work / "floor.safetensors"
    result = measure([sys.executable, str(HERE / "floor_child.py"), str(out), str(nbytes), *map(str, adapters)])
    out.unlink(missing_ok=True)
    return result


def fmt(wall: float, rss: float, status: int) -> str:
    if status == -1:
        return f"> {wall:.0f} s (stopped) | -"
    return f"{wall:.2f} s | {rss:.0f} MB" if status == 0 else "failed | -"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", nargs="+", default=["llama-1b"])
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "soupkit-bench")
    parser.add_argument("--peft-svd", nargs="*", default=[], help="shapes on which to time PEFT's dense svd (minutes)")
    parser.add_argument("--peft-timeout", type=float, default=900.0)
    parser.add_argument("--skip-peft", nargs="*", default=[], help="shapes on which PEFT is not run")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print("| shape | run | wall | peak RSS | vs floor (time) | vs PEFT (time / RSS) |")
    print("|---|---|---|---|---|---|")
    for shape in args.shapes:
        base, adapters = ensure_fixture(args.root, shape, n_adapters=2, rank=32)
        work = Path(tempfile.mkdtemp(prefix="soupkit-bench-"))
        cat = soupkit_row(base, adapters, "cat", work)
        svd = soupkit_row(base, adapters, "svd", work)
        floor = floor_row(adapters, cat[3], work)
        print(f"| {shape} | floor (import torch, read + write the same bytes) | {fmt(*floor)} | 1.00x | |")
        for name, row, combo in (("cat", cat, "cat"), ("svd", svd, "svd")):
            run_peft = shape not in args.skip_peft and (combo == "cat" or shape in args.peft_svd)
            peft = peft_row(base, adapters, combo, work, args.peft_timeout) if run_peft else None
            ratio = f"{row[0] / floor[0]:.2f}x"
            versus = f"{peft[0] / row[0]:.1f}x faster / {row[1] / peft[1]:.2f}x RSS" if peft and peft[2] == 0 else ""
            if peft and peft[2] == -1:
                versus = f"> {peft[0] / row[0]:.0f}x faster (PEFT stopped at {peft[0]:.0f} s)"
            print(f"| {shape} | soupkit {name} | {fmt(*row[:3])} | {ratio} | {versus} |")
            if peft:
                print(
                    f"| {shape} | PEFT {combo} (load, add_weighted_adapter, save) | {fmt(*peft)} | {peft[0] / floor[0]:.2f}x | |"
                )
            elif combo == "svd" or shape in args.skip_peft:
                print(f"| {shape} | PEFT {combo} | not run | | | |")
        sys.stdout.flush()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
