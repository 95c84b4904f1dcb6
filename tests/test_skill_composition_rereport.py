"""`examples.skill_composition.rereport`: a report written again with resumed rows changes those rows only."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from examples.skill_composition.config import SMOKE
from examples.skill_composition.merges import slug
from examples.skill_composition.report import METRICS
from examples.skill_composition.rereport import rereport
from examples.skill_composition.stages import select_rows

pytestmark = pytest.mark.filterwarnings("ignore")


def _row(name: str, value: float) -> dict:
    return {"name": name, "status": "ok", "metrics": {m: value for m in METRICS}}


@pytest.fixture
def report(tmp_path: Path) -> tuple[Path, list[str]]:
    """A committed report of three seeds; every row of seed s scores 0.1 * (s + 1), one row not run."""
    names = [r.name for r in select_rows(SMOKE, ("core",))][:4]
    per_seed = {}
    for seed in (0, 1, 2):
        rows = [_row(n, 0.1 * (seed + 1)) for n in names[:3]]
        rows.append({"name": names[3], "status": "not run", "reason": "not run: the run's time limit (--minutes)"})
        per_seed[str(seed)] = {"seed": seed, "rows": rows}
    results = {"config": {"base": SMOKE.base}, "run_dir": "run-x", "stages": ["core"], "device": "test", "table": []}
    out = tmp_path / "report"
    out.mkdir()
    (out / "results.json").write_text(json.dumps({**results, "per_seed": per_seed, "fitted_weights_png": "kept"}))
    return out, names


def _table(out: Path) -> dict[str, dict]:
    return {e["name"]: e for e in json.loads((out / "results.json").read_text())["table"]}


def _write_rows(root: Path, seed: int, rows: list[dict]) -> Path:
    rows_dir = root / f"seed{seed}" / "rows"
    rows_dir.mkdir(parents=True)
    for row in rows:
        (rows_dir / f"{slug(row['name'])}.json").write_text(json.dumps(row))
    return rows_dir


def test_replacing_one_row_changes_that_row_only(report: tuple[Path, list[str]], tmp_path: Path) -> None:
    out, names = report
    rereport(out, [_write_rows(tmp_path / "none", 0, [])])  # nothing replaced: the plain aggregate
    before = _table(out)
    assert before[names[0]]["composite_acc"]["mean"] == pytest.approx(statistics.fmean([0.1, 0.2, 0.3]))
    assert before[names[3]]["seeds_ok"] == 0
    # seed 1 finishes the row that was not run, and reruns row 0 with a new score
    new = _write_rows(tmp_path / "resumed", 1, [_row(names[0], 0.9), _row(names[3], 0.5)])
    results = rereport(out, [new], {"device": "test GPU"})
    after = _table(out)
    assert after[names[0]]["composite_acc"]["values"] == pytest.approx([0.1, 0.9, 0.3])
    assert after[names[3]]["composite_acc"]["values"] == pytest.approx([0.5])
    assert after[names[3]]["seeds_ok"] == 1
    for name in names[1:3]:
        assert after[name] == before[name]
    assert results["resumed_rows"][-1] == {"rows": [f"seed 1: {names[0]}", f"seed 1: {names[3]}"], "device": "test GPU"}
    assert results["fitted_weights_png"] == "kept"
    mean, std = statistics.fmean([0.1, 0.9, 0.3]), statistics.stdev([0.1, 0.9, 0.3])
    assert f"| {names[0]} | {100 * mean:.1f} ± {100 * std:.1f} |" in (out / "table.md").read_text()


def test_unknown_row_is_refused_and_nothing_is_written(report: tuple[Path, list[str]], tmp_path: Path) -> None:
    out, _ = report
    committed = (out / "results.json").read_bytes()
    rows = _write_rows(tmp_path / "resumed", 0, [_row("a row the report does not have", 0.5)])
    with pytest.raises(SystemExit, match="is not in the report; nothing was written"):
        rereport(out, [rows])
    assert (out / "results.json").read_bytes() == committed
    assert not (out / "table.md").exists()
