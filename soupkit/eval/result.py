"""The result of scoring: a score, its standard error, and each example's own result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class EvalResult:
    """A score (mean over examples, or per token for loss), its standard error, and each example's result."""

    metric: str
    score: float
    n: int
    stderr: float | None
    examples: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"metric": self.metric, "score": self.score, "n": self.n, "stderr": self.stderr}
