"""``soupkit sweep`` rows (issues 19 and 23): the sweep file, its data, the command, the chosen recipe.

The row's recipe plus a ``search:`` block (docs/sweep.md) is written beside the seed's other recipes;
validation data is the row's calibration set (or the validation composite prompts), test data the
composite test prompts; the metric is the experiment's own scorer (``scoring.score``) as a ``python:``
metric. ``python -m soupkit sweep`` runs as a user would run it, ``cfg.search_chunk`` trials at a time
(the study resumes), so a deadline stops it between chunks with every finished trial kept. The chosen
``best.yaml`` is merged by ``soupkit merge`` and scored on every test set like any other row.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

from examples.skill_composition.merges import Deferred, NotAvailable, Row, invoke, slug, write_recipe

METRIC = "python:examples.skill_composition.scoring:score"
REPO = Path(__file__).resolve().parents[2]  # the scorer module is imported from here (the sweep's cwd)
CHUNK_MARGIN_S = 60  # no new chunk of trials this close to the deadline: in-flight work must end in the call


def _records(codec, examples) -> str:
    return "".join(json.dumps({**codec.calib_record(e.prompt, e.completion), "reference": e.completion}) + "\n" for e in examples)


def sweep_file(ctx, seed: int, row: Row, folder: Path) -> Path:
    """Write validation/test JSONL and ``sweep.yaml`` (absolute paths: the sweep's outputs live elsewhere)."""
    sets, cfg = ctx.sets(seed), ctx.cfg
    validation = sets["val_composite"] if row.regime == "validation" else sets[f"calib:{row.regime}"]
    (folder / "validation.jsonl").write_text(_records(ctx.codec, validation))
    (folder / "test.jsonl").write_text(_records(ctx.codec, sets["eval_composite"]))
    recipe_path = write_recipe(
        Row(row.name, "merge", row.sources, row.weights, row.method), ctx.run_dir / f"seed{seed}", ctx.base_dir, seed
    )
    recipe = yaml.safe_load(recipe_path.read_text())
    recipe["base_model"] = str(ctx.base_dir.resolve())
    for spec in recipe["adapters"]:
        spec["path"] = str((recipe_path.parent / spec["path"]).resolve())
    search = {
        "data": {"validation": str((folder / "validation.jsonl").resolve()), "test": str((folder / "test.jsonl").resolve())},
        "metric": METRIC,
        "trials": cfg.search_trials,
        "sampler": "tpe",
        "methods": list(row.fit["methods"]),
        "weights": list(row.fit["weights"]),
        "max_new_tokens": cfg.max_new,
        "batch_size": cfg.gen_batch,
        "top_k": 1,
        "seed": seed,
    }
    if row.fit.get("space"):
        search["space"] = list(row.fit["space"])
    stops = [s for s in getattr(ctx.codec, "STOPS", ()) if s != getattr(ctx.codec.tokenizer, "eos_token", None)]
    if stops:
        search["stop"] = stops
    path = folder / "sweep.yaml"
    path.write_text(
        f"# {row.name}: written by examples/skill_composition/sweeps.py\n"
        + yaml.safe_dump({**recipe, "search": search}, sort_keys=False)
    )
    return path


def run_sweep(ctx, seed: int, row: Row, entry: dict) -> Path:
    """Run the sweep in chunks until ``cfg.search_trials`` or the deadline; merge its ``best.yaml``."""
    from soupkit.cli import main

    if "sweep" not in main.commands:
        raise NotAvailable("`soupkit sweep` does not exist in this soupkit")
    cfg, sdir = ctx.cfg, ctx.run_dir / f"seed{seed}"
    folder = sdir / "search" / slug(row.name)
    folder.mkdir(parents=True, exist_ok=True)
    spec, out = sweep_file(ctx, seed, row, folder), folder / "out"
    done, t0 = _trials_so_far(out), time.time()  # a deferred row resumes its study where it stopped
    last_start = getattr(ctx, "deadline", float("inf")) - CHUNK_MARGIN_S
    first = True
    while done < cfg.search_trials and (first or time.time() < last_start):
        first = False
        done = min(cfg.search_trials, done + cfg.search_chunk)
        args = ["sweep", str(spec), "-o", str(out), "--trials", str(done), "--device", ctx.device.type]
        args += ["--workers", str(cfg.search_workers)] if cfg.search_workers > 1 else []
        entry["commands"] = ["soupkit " + shlex.join(args)]  # the last one: the study it resumed holds every trial
        result = subprocess.run([sys.executable, "-m", "soupkit", *args], cwd=REPO, capture_output=True, text=True, check=False)
        with (folder / "sweep.log").open("a") as log:  # the sweep's own output, for a failure's cause
            log.write(f"$ soupkit {shlex.join(args)}\n{result.stdout}{result.stderr}\n")
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise NotAvailable(f"`soupkit sweep` failed (exit {result.returncode}): {tail[0][:300]}")
    if done < cfg.search_trials:  # the deadline came first: the next run resumes the study
        raise Deferred(f"{done} of {cfg.search_trials} trials before the deadline")
    board = json.loads((out / "leaderboard.json").read_text())
    trials = board["trials"]
    best = next(t for t in trials if t["number"] == board["best"])
    entry["search"] = {
        "trials": len(trials),
        "complete": sum(t["state"] == "COMPLETE" or t["state"] == "complete" for t in trials),
        "failed": [{"number": t["number"], "method": t["method"], "error": t.get("error")} for t in trials if t.get("error")],
        "best": best,
        "seconds": time.time() - t0,
        "validation_by_method": _by_method(trials),
    }
    merged = sdir / "merged" / slug(row.name)
    args = ["merge", str(out / "best.yaml"), "-o", str(merged), "--overwrite", "--quiet", "--device", ctx.device.type]
    entry["commands"].append("soupkit " + shlex.join(args))
    invoke(args)
    entry["fitted_weights"] = {
        k: {"mean": float(w), "min": float(w), "max": float(w), "abs_mean": abs(float(w)), "n": 1}
        for k, w in best["weights"].items()
    }
    return merged


def _trials_so_far(out: Path) -> int:
    board = out / "leaderboard.json"
    return len(json.loads(board.read_text())["trials"]) if board.is_file() else 0


def _by_method(trials: list[dict]) -> dict:
    """Best validation score per (method, space) over the finished trials."""
    out: dict[str, float] = {}
    for t in trials:
        if t.get("validation") is None:
            continue
        key = t["method"] + (f" {t['space']}" if t.get("space") and t["space"] != "full" else "")
        out[key] = max(out.get(key, float("-inf")), float(t["validation"]))
    return out
