"""``soupkit eval TARGET --data FILE``: load, score, optionally write per-example results (JSON lines)."""

from __future__ import annotations

import json
from pathlib import Path

from soupkit.errors import SoupkitError
from soupkit.eval.data import check_metric_fields, read_eval_records
from soupkit.eval.metrics import parse_metric
from soupkit.eval.model import pick_device
from soupkit.eval.result import EvalResult
from soupkit.eval.run import EvalOptions, score_model
from soupkit.eval.target import load_target
from soupkit.io.output_guard import atomic_file, check_apart, check_replaceable, claim, resolve_output
from soupkit.io.output_markers import EVAL_HEADER


def results_text(result: EvalResult, target: Path) -> str:
    """Per-example results as JSON lines, after one header line that marks the file as soupkit's."""
    header = {"written_by": EVAL_HEADER, "target": str(target), **result.summary()}
    lines = [json.dumps(header)] + [json.dumps(e, ensure_ascii=False) for e in result.examples]
    return "\n".join(lines) + "\n"


def run_eval(
    target: Path,
    data: str | None,
    metric_spec: str,
    options: EvalOptions,
    device: str = "auto",
    base: Path | None = None,
    out: Path | None = None,
    overwrite: bool = False,
) -> EvalResult:
    """Score ``target`` on ``data``; every user error is raised before the model loads or a file is written."""
    metric = parse_metric(metric_spec)
    if data is None and metric.kind != "lm-eval":
        raise SoupkitError("--data", "a data file for --metric " + metric.spec, "none", "pass --data FILE.jsonl")
    records = read_eval_records(data, "--data") if data is not None and metric.kind != "lm-eval" else []
    check_metric_fields(records, "--data", metric.kind)
    out_target = None
    if out is not None:
        out_target = resolve_output(out, "--out", "eval-results")
        inputs = [("eval target", target)] if target.is_dir() else []
        files = [("data file", Path(data))] if data is not None else []
        files += [("recipe file", target)] if target.is_file() else []
        check_apart(out_target, inputs, files)
        check_replaceable(out_target, overwrite)
    scoring, _ = load_target(target, pick_device(device), base)
    result = score_model(scoring, records, metric, "--data", options)
    if out_target is not None:
        with claim([out_target], overwrite, "soupkit eval"):
            atomic_file(out_target, overwrite, results_text(result, target))
    return result
