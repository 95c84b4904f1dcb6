"""``--metric lm-eval:TASK[,TASK]``: lm-evaluation-harness on the loaded model (the optional ``[eval]`` extra).

A task is a registered task name, or the path of a local task YAML (its folder is added to the
harness's include path, so offline task files work). The score is the mean over tasks of each
task's first reported metric; its standard error is the root mean square of theirs over sqrt(tasks).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from soupkit.errors import SoupkitError
from soupkit.eval.metrics import Metric
from soupkit.eval.model import ScoringModel
from soupkit.eval.result import EvalResult


def _harness() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise SoupkitError(
            "--metric lm-eval", "lm-evaluation-harness installed", "it is not", 'pip install "soupkit[eval]"'
        ) from None
    return lm_eval


def _task_names(tasks: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(task names, include paths): a path to a task YAML is named by its ``task:`` key."""
    names, include = [], []
    for task in tasks:
        path = Path(task).expanduser()
        if path.suffix in (".yaml", ".yml") and path.is_file():
            include.append(str(path.resolve().parent))
            names.append(str((yaml.safe_load(path.read_text()) or {}).get("task", path.stem)))
        else:
            names.append(task)
    return names, include


def _first_metric(result: dict) -> tuple[str, float, float | None]:
    for key, value in result.items():
        if "," in key and "_stderr" not in key and isinstance(value, int | float):
            stderr = result.get(key.replace(",", "_stderr,", 1))
            return key, float(value), float(stderr) if isinstance(stderr, int | float) else None
    raise SoupkitError("--metric lm-eval", "a numeric metric in the task's results", f"keys {sorted(result)}", "check the task")


def score_lm_eval(scoring: ScoringModel, metric: Metric, batch_size: int) -> EvalResult:
    lm_eval = _harness()
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    names, include = _task_names(metric.tasks)
    manager = TaskManager(include_path=include or None)
    lm = HFLM(pretrained=scoring.model, tokenizer=scoring.tokenizer, batch_size=batch_size)
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager)
    except (KeyError, ValueError) as err:
        raise SoupkitError(
            "--metric lm-eval", "known task names", f"{type(err).__name__}: {err}", "check the task list"
        ) from None
    per, scores, errors, n = [], [], [], 0
    for name in names:
        key, value, stderr = _first_metric(out["results"][name])
        count = int(out.get("n-samples", {}).get(name, {}).get("effective", 0))
        per.append({"task": name, "metric": key, "score": value, "stderr": stderr, "n": count})
        scores.append(value)
        errors.append(stderr or 0.0)
        n += count
    score = sum(scores) / len(scores)
    stderr = math.sqrt(sum(e * e for e in errors)) / len(errors)
    return EvalResult(metric.spec, score, n, stderr, per)
