"""Which outputs soupkit wrote itself: the markers it writes, and how ``--overwrite`` recognises them.

Each output kind starts with a marker (a header line or a first JSON key) that soupkit writes and
checks by content, never by file name alone; :data:`OWNERSHIP` maps each kind to a check that returns
None for soupkit's own output, else a short description of what the path holds instead.
Used by :mod:`soupkit.io.output_guard` (rule 3 of docs/safety.md).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

import yaml

LOCK_NAME = "soupkit.lock.yaml"
LOCK_HEADER = "# Written by soupkit: the resolved recipe, input hashes and versions."
FITTED_HEADER = "# fitted by soupkit fit-alpha"  # first line of every fitted recipe
REPORT_MARKER = '{\n  "written_by": "soupkit fit-alpha"'  # how every fit_report.json starts
REPORT_FILES = ("fit_report.json", "weights.png", "loss.png")
ANALYSIS_MARKER = "soupkit analyze"  # the first key of every analysis.json: {"written_by": ...}
EVAL_HEADER = "soupkit eval"  # the first line of every --out file: {"written_by": "soupkit eval", ...}
SWEEP_WRITER = "soupkit sweep"  # the first key of every sweep.json: {"written_by": ...}
SWEEP_FILES = ("sweep.json", "study.db", "best.yaml", "leaderboard.json", "leaderboard.md")
MARKER_BYTES = 8 << 20  # a lock file larger than this is not one soupkit wrote

Kind = Literal["merge", "fitted-recipe", "fit-report", "analysis", "eval-results", "sweep"]


def _regular(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _head(path: Path, n: int) -> str:
    with open(path, "rb") as fh:
        return fh.read(n).decode("utf-8", errors="replace")


def _merge_output_problem(folder: Path) -> str | None:
    """None if ``folder`` is an output of ``soupkit merge`` (and nothing else), else what it holds."""
    lock = folder / LOCK_NAME
    if not _regular(lock) or lock.stat().st_size > MARKER_BYTES or _head(lock, len(LOCK_HEADER)) != LOCK_HEADER:
        return f"a folder soupkit did not write (no {LOCK_NAME} written by soupkit)"
    try:
        meta = yaml.safe_load(lock.read_text()).get("soupkit_lock")
        outputs = meta.get("outputs") or {}
        written_by_soupkit = "soupkit" in meta["versions"]
    except (yaml.YAMLError, UnicodeDecodeError, AttributeError, KeyError, TypeError):
        written_by_soupkit = False
    if not written_by_soupkit:
        return f"a folder whose {LOCK_NAME} soupkit did not write"
    extra = sorted(str(f.relative_to(folder)) for f in folder.rglob("*") if not f.is_dir() or f.is_symlink())
    extra = [name for name in extra if name != LOCK_NAME and (outputs and name not in outputs)]
    return f"files soupkit did not write ({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''})" if extra else None


def _fit_report_problem(folder: Path) -> str | None:
    report = folder / REPORT_FILES[0]
    if not _regular(report) or _head(report, len(REPORT_MARKER)) != REPORT_MARKER:
        return f"a folder soupkit did not write (no {REPORT_FILES[0]} written by soupkit fit-alpha)"
    extra = sorted(f.name for f in folder.iterdir() if f.name not in REPORT_FILES or not _regular(f))
    return f"files soupkit did not write ({', '.join(extra[:3])})" if extra else None


def _analysis_problem(folder: Path) -> str | None:
    report = folder / "analysis.json"
    marker = f'{{"written_by":"{"".join(ANALYSIS_MARKER.split())}"'  # compared without whitespace: write_json indents
    if not _regular(report) or not "".join(_head(report, 100).split()).startswith(marker):
        return "a folder soupkit did not write (no analysis.json written by soupkit analyze)"
    extra = sorted(
        f.name for f in folder.iterdir() if not _regular(f) or not (f.name in ("analysis.json", "table.md") or f.suffix == ".png")
    )
    return f"files soupkit did not write ({', '.join(extra[:3])})" if extra else None


def _fitted_recipe_problem(path: Path) -> str | None:
    if _regular(path) and _head(path, len(FITTED_HEADER)) == FITTED_HEADER:
        return None
    return "a file soupkit fit-alpha did not write"


def _eval_results_problem(path: Path) -> str | None:
    marker = f'{{"written_by": "{EVAL_HEADER}"'
    if _regular(path) and _head(path, len(marker)) == marker:
        return None
    return "a file soupkit eval did not write"


def _sweep_problem(folder: Path) -> str | None:
    """None for a sweep folder (resumed in place), else what the folder holds instead."""
    marker = folder / SWEEP_FILES[0]
    expected = f'{{"written_by":"{"".join(SWEEP_WRITER.split())}"'  # compared without whitespace, as analysis.json
    if not _regular(marker) or not "".join(_head(marker, 100).split()).startswith(expected):
        return f"a folder soupkit did not write (no {SWEEP_FILES[0]} written by soupkit sweep)"
    extra = sorted(
        f.name
        for f in folder.iterdir()
        if not _regular(f) or not (f.name in SWEEP_FILES or f.suffix == ".png" or f.name.startswith("study.db-"))
    )
    return f"files soupkit did not write ({', '.join(extra[:3])})" if extra else None


OWNERSHIP: dict[Kind, Callable[[Path], str | None]] = {
    "merge": _merge_output_problem,
    "fit-report": _fit_report_problem,
    "fitted-recipe": _fitted_recipe_problem,
    "analysis": _analysis_problem,
    "eval-results": _eval_results_problem,
    "sweep": _sweep_problem,
}
