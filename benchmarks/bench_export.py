"""Full-model export: soupkit's streamed export vs PEFT's merge_and_unload, with a plain copy as the floor.

For each shape (random bf16 Llama bases and two rank-32 adapters from ``llama_shapes``), three
measurements, each in its own fresh Python process so that peak RSS is that of the job alone:

- copy:    copy every base file and fsync it (the floor: export must read and write as many bytes);
- soupkit: ``merge_recipe`` with ``output: model`` (cat of both adapters, weight 1 each);
- peft:    ``from_pretrained`` + both adapters + ``merge_and_unload`` + ``save_pretrained``, fsynced.

Times exclude interpreter start and imports (the same for every row); peak RSS is the process's
``ru_maxrss``, imports included. PEFT's path holds the whole model in RAM, so it runs only if the
machine has room (``--peft auto``). One run; the table is printed as Markdown.

    python -m benchmarks.bench_export --shapes llama-1b llama-7b
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

GiB = 1024**3


def fsync_tree(directory: Path) -> None:
    for f in directory.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def job_copy(base: Path, adapters: list[Path], out: Path) -> dict:
    out.mkdir(parents=True)
    for f in base.iterdir():
        shutil.copyfile(f, out / f.name)
    fsync_tree(out)
    return {}


def job_soupkit(base: Path, adapters: list[Path], out: Path, device: str = "cpu") -> dict:
    import soupkit.merge
    from soupkit.execute import RunOptions
    from soupkit.merge import merge_recipe
    from soupkit.recipe import Recipe

    sidecars = soupkit.merge.write_sidecars
    spent = {"lock_seconds": 0.0}

    def timed_sidecars(*args: object) -> None:  # the lock file hashes every input and output byte
        start = time.perf_counter()
        sidecars(*args)  # type: ignore[arg-type]
        spent["lock_seconds"] += time.perf_counter() - start

    soupkit.merge.write_sidecars = timed_sidecars  # type: ignore[assignment]

    recipe = {
        "base_model": str(base),
        "adapters": [{"name": f"a{i}", "path": str(a), "weight": 1.0} for i, a in enumerate(adapters)],
        "merge": {"method": "cat"},
        "output": "model",
        "dtype": "bfloat16",
    }
    merge_recipe(Recipe.from_dict(recipe, out.parent), out, RunOptions(device=device, progress=False))
    return spent


def job_peft(base: Path, adapters: list[Path], out: Path) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    names = [f"a{i}" for i in range(len(adapters))]
    model = PeftModel.from_pretrained(model, adapters[0], adapter_name=names[0])
    for name, path in zip(names[1:], adapters[1:]):
        model.load_adapter(path, adapter_name=name)
    merged = model.merge_and_unload(adapter_names=names)  # both adapters at weight 1: the cat result
    merged.save_pretrained(out)
    fsync_tree(out)
    return {}


JOBS = {"copy": job_copy, "soupkit": job_soupkit, "peft": job_peft}


def child(job: str, base: Path, adapters: list[Path], out: Path, device: str) -> None:
    """Run one job in this process and print {seconds, peak_rss_mb} as the last line."""
    if job == "soupkit":  # each job's own imports, outside the timed region
        import soupkit.execute  # noqa: F401
        import soupkit.recipe  # noqa: F401
    elif job == "peft":
        import peft  # noqa: F401
        import transformers  # noqa: F401
    start = time.perf_counter()
    extra = job_soupkit(base, adapters, out, device) if job == "soupkit" else JOBS[job](base, adapters, out)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB -> MiB
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak, **extra}))


def measure(job: str, base: Path, adapters: list[Path], out: Path, device: str = "cpu") -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.bench_export",
        "--child",
        job,
        "--base",
        str(base),
        "--out",
        str(out),
        "--device",
        device,
    ]
    cmd += ["--adapters", *map(str, adapters)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def bf16_agreement(ours: Path, theirs: Path, key: str = "model.layers.0.self_attn.q_proj.weight") -> str:
    """Max |soupkit - peft| on one merged tensor, relative to its max magnitude (a sanity check)."""
    from soupkit.io.tensor_index import TensorIndex

    tensors = []
    for directory in (ours, theirs):
        index = TensorIndex.from_dir(directory, "model")
        tensors.append(index.get(key).float() if index else None)
    if tensors[0] is None or tensors[1] is None:
        return "n/a"
    return f"{float((tensors[0] - tensors[1]).abs().max() / tensors[1].abs().max()):.1e}"


def peft_fits(base: Path) -> tuple[bool, str]:
    import psutil

    need = sum(f.stat().st_size for f in base.glob("*.safetensors")) * 1.3 + 2 * GiB
    avail = psutil.virtual_memory().available
    spare = 4 * GiB  # left for the other processes of this shared machine
    return avail > need + spare, f"needs ~{need / GiB:.0f} GiB RAM + {spare / GiB:.0f} GiB spare, {avail / GiB:.0f} GiB available"


def run_shape(root: Path, shape: str, peft_mode: str, device: str) -> dict:
    from benchmarks.llama_shapes import ensure_fixture, remove_fixture

    existed = (root / shape / "base" / "config.json").is_file()
    base, adapters = ensure_fixture(root, shape, n_adapters=2, rank=32)
    size = sum(f.stat().st_size for f in base.iterdir())
    work = root / f"{shape}-export-bench"
    row: dict = {"shape": shape, "base_gb": size / 1e9, "load_before": os.getloadavg()[0]}
    row["copy"] = measure("copy", base, adapters, work / "copy")
    shutil.rmtree(work / "copy", ignore_errors=True)
    row["soupkit"] = measure("soupkit", base, adapters, work / "soupkit", device)
    fits, why = peft_fits(base)
    if peft_mode == "yes" or (peft_mode == "auto" and fits):
        row["peft"] = measure("peft", base, adapters, work / "peft")
        row["agreement"] = bf16_agreement(work / "soupkit", work / "peft")
    else:
        row["peft"] = {"error": "not run: --peft no" if peft_mode == "no" else f"not run: {why}"}
    row["load_after"] = os.getloadavg()[0]
    shutil.rmtree(work, ignore_errors=True)
    if not existed and shape == "llama-7b":
        remove_fixture(root, shape)  # 13.5 GB of disk
    return row


def fmt(result: dict, key: str, spec: str) -> str:
    return "not run" if "error" in result else format(result[key], spec)


def table(rows: list[dict]) -> str:
    lines = [
        "| shape | base (GB) | copy floor (s) | soupkit (s) | of which lock hashes (s) | soupkit / copy "
        "| soupkit peak RSS (MiB) | PEFT (s) | PEFT peak RSS (MiB) | soupkit vs PEFT, max rel diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c, s, p = r["copy"], r["soupkit"], r["peft"]
        ratio = "n/a" if "error" in c or "error" in s else f"{s['seconds'] / c['seconds']:.2f}x"
        lines.append(
            f"| {r['shape']} | {r['base_gb']:.2f} | {fmt(c, 'seconds', '.1f')} | {fmt(s, 'seconds', '.1f')} "
            f"| {fmt(s, 'lock_seconds', '.1f')} | {ratio} | "
            f"{fmt(s, 'peak_rss_mb', '.0f')} | {fmt(p, 'seconds', '.1f')} | {fmt(p, 'peak_rss_mb', '.0f')} | {r.get('agreement', 'n/a')} |"
        )
    notes = [f"{r['shape']} {k}: {v['error']}" for r in rows for k, v in r.items() if isinstance(v, dict) and "error" in v]
    loads = ", ".join(f"{r['shape']} {r['load_before']:.1f} -> {r['load_after']:.1f}" for r in rows)
    return "\n".join(lines + [""] + notes + [f"load average (1 min) before -> after: {loads}"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["llama-1b", "llama-7b"])
    parser.add_argument("--root", type=Path, default=Path("/tmp/soupkit-bench"))
    parser.add_argument("--peft", choices=["auto", "yes", "no"], default="auto", help="run PEFT's in-RAM path")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where soupkit's maths runs")
    parser.add_argument("--child", choices=list(JOBS), help=argparse.SUPPRESS)
    parser.add_argument("--base", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--adapters", type=Path, nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.base, args.adapters, args.out, args.device)
        return
    rows = []
    for shape in args.shapes:
        rows.append(run_shape(args.root, shape, args.peft, args.device))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, soupkit maths on {args.device}, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GiB:.0f} GiB RAM; python {platform.python_version()}"
    )
    print(table(rows))


if __name__ == "__main__":
    main()
