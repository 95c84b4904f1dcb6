"""Rewrite a committed report with the rows that ``resume`` finished, and nothing else changed.

A lent GPU machine is bare after each lease, so a row finished later by ``resume`` comes back as one
``rows/<row>.json`` per seed. This puts those rows in place of the report's entries of the same name and
writes results.json, table.md, questions.md and the charts again through ``report.write_report``, the
code the run itself used, so the other rows' numbers stay exactly as committed.

    python -m examples.skill_composition.rereport results/smollm2-questions --rows RUN/seed0/rows ... --note resume.json
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from dataclasses import replace
from pathlib import Path

from examples.skill_composition.config import SMOKE, SMOLLM2
from examples.skill_composition.merges import slug
from examples.skill_composition.report import write_report

REPORT_KEYS = ("table", "per_seed", "fitted_weights_png")  # what write_report computes again


def rebuild_run_dir(results: dict, run_dir: Path) -> None:
    """The per-seed files that ``report.collect`` reads, from a results.json's ``per_seed``."""
    for seed, info in results["per_seed"].items():
        sdir = run_dir / f"seed{seed}"
        (sdir / "rows").mkdir(parents=True)
        adapters = {k: v for k, v in info.items() if k not in ("seed", "rows")}
        (sdir / "adapters.json").write_text(json.dumps(adapters))
        for row in info["rows"]:
            if row.get("status") != "not run":  # collect marks a row with no file as not run
                (sdir / "rows" / f"{slug(row['name'])}.json").write_text(json.dumps(row))


def replace_rows(results: dict, rows_dirs: list[Path], run_dir: Path) -> list[str]:
    """Copy each ``seedN/rows/*.json`` in place of the same row of seed N; return what was replaced."""
    replaced = []
    for rows_dir in rows_dirs:
        seed = re.fullmatch(r"seed(\d+)", rows_dir.resolve().parent.name)
        if seed is None or seed.group(1) not in results["per_seed"]:
            raise SystemExit(f"{rows_dir}: expected a seedN/rows folder of a seed in the report")
        for path in sorted(rows_dir.glob("*.json")):
            row = json.loads(path.read_text())
            known = {r["name"] for r in results["per_seed"][seed.group(1)]["rows"]}
            if row["name"] not in known:
                raise SystemExit(f"{path}: row {row['name']!r} is not in the report; nothing was written")
            (run_dir / f"seed{seed.group(1)}" / "rows" / path.name).write_text(json.dumps(row))
            replaced.append(f"seed {seed.group(1)}: {row['name']}")
    return replaced


def rereport(report_dir: Path, rows_dirs: list[Path], note: dict | None = None) -> dict:
    """Write the report in ``report_dir`` again with the rows in ``rows_dirs``; return the new results."""
    results = json.loads((report_dir / "results.json").read_text())
    cfg = SMOKE if results["config"]["base"] == SMOKE.base else SMOLLM2
    cfg = replace(cfg, seeds=tuple(int(s) for s in results["per_seed"]))  # the report's seeds, not the default's
    payload = {k: v for k, v in results.items() if k not in REPORT_KEYS}
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / results["run_dir"]
        rebuild_run_dir(results, run_dir)
        replaced = replace_rows(results, rows_dirs, run_dir)
        resumed = [*payload.get("resumed_rows", []), {"rows": replaced, **(note or {})}]
        new = write_report(report_dir, {**payload, "resumed_rows": resumed}, run_dir, cfg, tuple(results["stages"]))
    # the fitted-weights PNG came from the run's folder, which is gone: keep the committed one and its label
    new["fitted_weights_png"] = results.get("fitted_weights_png")
    (report_dir / "results.json").write_text(json.dumps(new, indent=1, sort_keys=False) + "\n")
    return new


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("report", type=Path, help="the folder with results.json (it is rewritten)")
    parser.add_argument("--rows", type=Path, nargs="+", required=True, help="seedN/rows folders that resume wrote")
    parser.add_argument("--note", type=Path, help="a JSON object kept with the replaced rows (how they were run)")
    args = parser.parse_args(argv)
    note = json.loads(args.note.read_text()) if args.note else None
    for line in rereport(args.report, args.rows, note)["resumed_rows"][-1]["rows"]:
        print("replaced", line)


if __name__ == "__main__":
    main()
