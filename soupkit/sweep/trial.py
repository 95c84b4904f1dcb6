"""One worker's trials: the base loaded once, each trial merged in memory, swapped in and scored.

A trial that fails for a reason the user can act on (a parameter the method refuses, a merge that
overflows, a score that is not finite) is told to the study as failed, with its reason; the sweep
goes on. Any other exception is an internal bug: the trial is told failed and the error raised.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from soupkit.errors import SoupkitError
from soupkit.eval.data import read_eval_records
from soupkit.eval.metrics import parse_metric
from soupkit.eval.result import EvalResult
from soupkit.eval.run import EvalOptions, score_model
from soupkit.eval.target import RecipeScorer
from soupkit.recipe.schema import validate_recipe
from soupkit.sweep.space import Candidate, candidate_recipe, suggest
from soupkit.sweep.spec import Sweep

COUNTED = ("COMPLETE", "FAIL", "RUNNING")  # trial states that use up the budget (a running one will finish)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TrialRunner:
    """Scores candidates of one sweep on one device."""

    def __init__(self, sweep: Sweep, device: torch.device) -> None:
        self.sweep, self.device = sweep, device
        self.metric = parse_metric(sweep.search.metric, "search.metric")
        s = sweep.search
        self.options = EvalOptions(s.max_new_tokens, tuple(s.stop), s.batch_size, s.seq_len)
        self.records = {
            name: read_eval_records(sweep.data_path(name), f"search.data.{name}")
            for name in ("validation", "test")
            if getattr(s.data, name)
        }
        self.scorer = RecipeScorer(sweep.recipe, device, fused=True)  # cat trials: weights only, no merge

    def score(self, candidate: Candidate, split: str) -> tuple[EvalResult, float]:
        """(the candidate's score on ``split``, seconds spent merging and swapping it in)."""
        recipe = validate_recipe(candidate_recipe(self.sweep, candidate), self.sweep.root, label="trial recipe")
        start = time.perf_counter()
        self.scorer.apply(recipe)
        _sync(self.device)
        merge_seconds = time.perf_counter() - start
        result = score_model(self.scorer.scoring, self.records[split], self.metric, f"search.data.{split}", self.options)
        if not math.isfinite(result.score):
            raise SoupkitError("trial", "a finite score", repr(result.score), "this candidate diverges; it is skipped")
        return result, merge_seconds


def budget_used(study: Any) -> int:
    import optuna

    states = tuple(getattr(optuna.trial.TrialState, s) for s in COUNTED)
    return len(study.get_trials(deepcopy=False, states=states))


def run_one_trial(runner: TrialRunner, study: Any) -> None:
    """Ask the study for a trial, score it on validation, tell the result (failed trials with their reason)."""
    import optuna

    trial = study.ask()
    start = time.perf_counter()
    try:
        candidate = suggest(trial, runner.sweep)
        for key, value in candidate.as_dict().items():
            trial.set_user_attr(key, value)
        result, merge_seconds = runner.score(candidate, "validation")
    except SoupkitError as err:
        trial.set_user_attr("error", err.line())
        trial.set_user_attr("seconds", time.perf_counter() - start)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return
    except BaseException:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise
    trial.set_user_attr("seconds", time.perf_counter() - start)
    trial.set_user_attr("merge_seconds", merge_seconds)
    trial.set_user_attr("stderr", result.stderr)
    trial.set_user_attr("n", result.n)
    study.tell(trial, result.score)


def run_trials(runner: TrialRunner, study: Any, total: int, on_trial: Any = None) -> None:
    """Run trials until the study holds ``total`` (finished or running) trials."""
    while budget_used(study) < total:
        run_one_trial(runner, study)
        if on_trial is not None:
            on_trial()
