"""``soupkit eval``: score a recipe (merged in memory), a merged adapter or a full model on data.

Layers inside the package: ``metrics``, ``data``, ``model`` (a base with swappable low-rank
updates), ``generate`` and ``loss`` (the raw scores), ``run`` (a score with its standard error),
``target`` (what TARGET names), ``command`` (the whole command). ``soupkit sweep`` reuses all of them.
"""

from soupkit.eval.generate import generate
from soupkit.eval.metrics import Metric, parse_metric
from soupkit.eval.result import EvalResult
from soupkit.eval.run import EvalOptions, score_model

__all__ = ["EvalOptions", "EvalResult", "Metric", "generate", "parse_metric", "score_model"]
