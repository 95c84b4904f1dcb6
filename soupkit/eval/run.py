"""Score a loaded model on records with one metric: the score, its standard error, and per-example results."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from soupkit.eval.data import EvalRecord, eval_records
from soupkit.eval.generate import generate
from soupkit.eval.loss import example_nll
from soupkit.eval.metrics import Metric, checked_score
from soupkit.eval.model import ScoringModel
from soupkit.eval.result import EvalResult
from soupkit.fit.data import tokenize_record


@dataclass(frozen=True)
class EvalOptions:
    """How to score: generation length and stops, batch size, tokens kept per example (loss)."""

    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    batch_size: int = 8
    seq_len: int = 2048
    progress: bool = False


def mean_and_stderr(values: list[float]) -> tuple[float, float | None]:
    """Mean and standard error of the mean (sample standard deviation / sqrt(n)); None below 2 values."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def ratio_and_stderr(sums: list[float], counts: list[int]) -> tuple[float, float | None]:
    """Per-token mean sum(s)/sum(t) and its standard error by the delta method (examples as the units)."""
    n, total = len(sums), sum(counts)
    ratio = sum(sums) / total
    if n < 2:
        return ratio, None
    residual = sum((s - ratio * t) ** 2 for s, t in zip(sums, counts))
    return ratio, math.sqrt(n / (n - 1) * residual) / total


@contextmanager
def progress_bar(total: int, desc: str, show: bool) -> Iterator[Any]:
    """A tqdm bar on a terminal only (never frames in a redirected log); yields its update function."""
    if not (show and sys.stderr.isatty()):
        yield lambda _: None
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="ex", leave=False) as bar:
        yield bar.update


def score_loss(scoring: ScoringModel, records: list[dict], where: str, options: EvalOptions) -> EvalResult:
    """Mean negative log-likelihood per scored token over every record (lower is better)."""
    tokenizer = scoring.tokenizer
    examples = [tokenize_record(r, tokenizer, options.seq_len, f"{where} record {i}") for i, r in enumerate(records)]
    kept = [i for i, e in enumerate(examples) if e.n_target > 0]
    if not kept:
        from soupkit.errors import SoupkitError

        raise SoupkitError(where, "at least one example with scored tokens", "none", "check the data (too short?)")
    with progress_bar(len(kept), "loss", options.progress) as advance:
        nll = example_nll(scoring.model, [examples[i] for i in kept], tokenizer.pad_token_id, options.batch_size, advance)
    score, stderr = ratio_and_stderr([s for s, _ in nll], [t for _, t in nll])
    per = [{"index": i, "nll": s, "tokens": t, "loss": s / t} for i, (s, t) in zip(kept, nll)]
    return EvalResult("loss", score, len(kept), stderr, per)


def score_generation(
    scoring: ScoringModel, records: list[EvalRecord], metric: Metric, where: str, options: EvalOptions
) -> EvalResult:
    """Greedy generations scored one by one with the metric's scorer; the mean and its standard error."""
    assert metric.scorer is not None
    prompts = [r.prompt or "" for r in records]
    with progress_bar(len(prompts), "generate", options.progress) as advance:
        outputs = generate(
            scoring.model, scoring.tokenizer, prompts, options.max_new_tokens, options.stop, options.batch_size, advance
        )
    per = []
    for i, (record, generation) in enumerate(zip(records, outputs)):
        value = checked_score(metric.scorer(record.prompt or "", generation, record.reference), f"{where} record {i}")
        per.append({"index": i, "prompt": record.prompt, "generation": generation, "reference": record.reference, "score": value})
    score, stderr = mean_and_stderr([p["score"] for p in per])
    return EvalResult(metric.spec, score, len(per), stderr, per)


def score_model(scoring: ScoringModel, records: list[dict], metric: Metric, where: str, options: EvalOptions) -> EvalResult:
    """Score the model as it stands (its current low-rank updates included) on ``records``."""
    if metric.kind == "loss":
        return score_loss(scoring, records, where, options)
    if metric.kind == "lm-eval":
        from soupkit.eval.harness import score_lm_eval

        return score_lm_eval(scoring, metric, options.batch_size)
    prepared = eval_records(records, scoring.tokenizer, where, need_prompt=True)
    return score_generation(scoring, prepared, metric, where, options)
