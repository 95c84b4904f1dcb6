"""``soupkit sweep SWEEP.yaml -o DIR``: check everything, run the trials (one or many workers), report.

DIR is the sweep's own folder (docs/safety.md): it must be new, empty, or a sweep folder soupkit
wrote, and one run at a time holds its lock. A rerun into the same DIR continues the study.
"""

from __future__ import annotations

import json
import multiprocessing
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from soupkit.eval.data import check_disjoint_data, check_metric_fields, read_eval_records
from soupkit.eval.metrics import parse_metric
from soupkit.eval.model import pick_device
from soupkit.execute import open_inputs
from soupkit.io.output_guard import check_apart, claim, resolve_output
from soupkit.io.output_markers import SWEEP_WRITER
from soupkit.sweep import report
from soupkit.sweep.space import space_fingerprint
from soupkit.sweep.spec import Sweep, load_sweep
from soupkit.sweep.study import fail_stale_trials, grid_size, open_study, storage_url
from soupkit.sweep.trial import TrialRunner, budget_used, run_trials


@dataclass
class SweepOutcome:
    """What the CLI prints: the folder, trial counts and the best trial's row."""

    out: Path
    trials: int
    failed: int
    best: dict[str, Any] | None


def check_sweep_inputs(sweep: Sweep) -> None:
    """Every data problem is found before a model loads: readable, non-empty, prompts, test apart from validation."""
    metric = parse_metric(sweep.search.metric, "search.metric")
    for name in ("validation", "test"):
        if getattr(sweep.search.data, name) and metric.kind != "lm-eval":
            records = read_eval_records(sweep.data_path(name), f"search.data.{name}")
            check_metric_fields(records, f"search.data.{name}", metric.kind)
    if sweep.search.data.test:
        check_disjoint_data(sweep.data_path("validation"), sweep.data_path("test"), "search.data")


def worker_devices(device: str, workers: int) -> list[str]:
    """One device per worker: GPUs round-robin (several workers may share one), else the CPU."""
    if device == "auto":
        count = torch.cuda.device_count()
        return [f"cuda:{i % count}" if count else "cpu" for i in range(workers)]
    return [device] * workers


def _worker(path: str, url: str, direction: str, fingerprint: dict, device: str, total: int, index: int) -> None:
    """A worker process: its own model on its device, the shared study, trials until the budget is used."""
    sweep = load_sweep(Path(path))
    study = open_study(sweep, url, direction, fingerprint, worker=index)
    run_trials(TrialRunner(sweep, pick_device(device)), study, total)


def _run_workers(sweep: Sweep, url: str, direction: str, fingerprint: dict, devices: list[str], total: int) -> None:
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    procs = [
        context.Process(target=_worker, args=(str(sweep.path), url, direction, fingerprint, d, total, i), daemon=True)
        for i, d in enumerate(devices)
    ]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join()
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join()
    bad = [i for i, p in enumerate(procs) if p.exitcode != 0]
    if bad:
        raise RuntimeError(f"sweep worker(s) {bad} failed (exit codes {[procs[i].exitcode for i in bad]}); see above")


def _progress(total: int, study: Any) -> Any:
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    bar = tqdm(total=total, initial=budget_used(study), desc="sweep", unit="trial", leave=False)
    return lambda: bar.update(1)


def _state(out: Path) -> dict:
    marker = out / "sweep.json"
    return json.loads(marker.read_text()) if marker.is_file() else {}


def _write_state(out: Path, fingerprint: dict, tests: dict[str, float]) -> None:
    """sweep.json: the folder's marker, the study's fingerprint, and the test scores already taken."""
    payload = {"written_by": SWEEP_WRITER, "fingerprint": fingerprint, "test": tests}
    report.write_text(out / "sweep.json", json.dumps(payload, indent=2) + "\n")


def run_sweep(
    path: Path, out: Path, trials: int | None = None, workers: int = 1, storage: str | None = None, device: str = "auto"
) -> SweepOutcome:
    """Run (or continue) the sweep of ``path`` into ``out``; every user error is raised before a model loads."""
    sweep = load_sweep(path)
    check_sweep_inputs(sweep)
    metric = parse_metric(sweep.search.metric, "search.metric")
    total = trials or sweep.search.trials
    if sweep.search.sampler == "grid":
        total = min(total, grid_size(sweep))
    target = resolve_output(out, "-o", "sweep")
    inputs = open_inputs(sweep.recipe)
    folders = [("base model", inputs.base.directory)] + [(f"adapter '{a.name}'", a.directory) for a in inputs.adapters]
    files = [("sweep file", path)] + [
        (f"{n} data", Path(sweep.data_path(n))) for n in ("validation", "test") if getattr(sweep.search.data, n)
    ]
    check_apart(target, folders, files)
    devices = worker_devices(device, workers)
    for d in set(devices):
        pick_device(d)
    fingerprint = space_fingerprint(sweep)
    with claim([target], True, "soupkit sweep"):
        dir_ = target.path
        dir_.mkdir(exist_ok=True)
        state = _state(dir_)
        if state and state.get("fingerprint") != fingerprint and storage is None:
            open_study(sweep, storage_url(dir_, None), metric.direction, fingerprint)  # raises with what changed
        _write_state(dir_, fingerprint, state.get("test", {}))
        url = storage_url(dir_, storage)
        study = open_study(sweep, url, metric.direction, fingerprint)
        if storage is None:
            fail_stale_trials(study)
        if workers == 1:
            run_trials(TrialRunner(sweep, pick_device(devices[0])), study, total, _progress(total, study))
        else:
            _run_workers(sweep, url, metric.direction, fingerprint, devices, total)
        return finish(sweep, study, dir_, fingerprint, state.get("test", {}), devices[0])


def finish(sweep: Sweep, study: Any, out: Path, fingerprint: dict, tests: dict[str, float], device: str) -> SweepOutcome:
    """Score the top k on test (once each), then write the leaderboard, best.yaml and the plots."""
    metric = parse_metric(sweep.search.metric, "search.metric")
    rows = report.trial_rows(study, tests)
    top = report.ranked(rows, metric.direction)[: sweep.search.top_k]
    missing = [r for r in top if r["test"] is None]
    if sweep.search.data.test and missing:
        runner = TrialRunner(sweep, pick_device(device))
        for row in missing:
            result, _ = runner.score(report.candidate_of(row), "test")
            tests[str(row["number"])] = row["test"] = result.score
        _write_state(out, fingerprint, tests)
    rows = report.trial_rows(study, tests)
    best = (report.ranked(rows, metric.direction) or [None])[0]
    report.write_text(out / "leaderboard.json", report.leaderboard_json(rows, metric.spec, metric.direction, best))
    report.write_text(out / "leaderboard.md", report.markdown(rows, metric.spec, metric.direction))
    if best is not None:
        report.write_text(out / "best.yaml", report.best_yaml(sweep, best, out, metric.spec))
    report.plots(rows, metric.spec, metric.direction, out)
    failed = sum(r["state"] == "fail" for r in rows)
    return SweepOutcome(out, len(rows), failed, best)
