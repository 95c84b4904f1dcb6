"""What a sweep leaves in its folder: leaderboard.json / .md, best.yaml and three plots."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from soupkit.sweep.space import Candidate, candidate_recipe
from soupkit.sweep.spec import Sweep


def write_text(path: Path, text: str | bytes) -> None:
    """Write beside, then rename over: a reader never sees half a file (the folder is the sweep's own)."""
    tmp = path.with_name(f".{path.name}.soupkit-tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(text.encode() if isinstance(text, str) else text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def trial_rows(study: Any, tests: dict[str, float]) -> list[dict[str, Any]]:
    """One row per trial, in trial order (running trials of other workers included, as running)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        attrs = t.user_attrs
        rows.append(
            {
                "number": t.number,
                "method": attrs.get("method"),
                "space": attrs.get("space"),
                "params": attrs.get("params", {}),
                "weights": attrs.get("weights", {}),
                "validation": t.value if t.state.name == "COMPLETE" else None,
                "validation_stderr": attrs.get("stderr"),
                "test": tests.get(str(t.number)),
                "seconds": attrs.get("seconds"),
                "merge_seconds": attrs.get("merge_seconds"),
                "state": t.state.name.lower(),
                "error": attrs.get("error"),
            }
        )
    return rows


def ranked(rows: list[dict[str, Any]], direction: str) -> list[dict[str, Any]]:
    """Completed trials, best validation first (ties: the earlier trial)."""
    done = [r for r in rows if r["state"] == "complete"]
    sign = 1 if direction == "minimize" else -1
    return sorted(done, key=lambda r: (sign * r["validation"], r["number"]))


def candidate_of(row: dict[str, Any]) -> Candidate:
    return Candidate(row["method"], row["space"], row["params"], row["weights"])


def best_yaml(sweep: Sweep, best: dict[str, Any], out: Path, metric: str) -> str:
    recipe = candidate_recipe(sweep, candidate_of(best), out_dir=out)
    test = f", test {best['test']:.6g}" if best.get("test") is not None else ""
    header = (
        f"# best of the sweep {sweep.path.name} by validation {metric}: trial {best['number']}, "
        f"validation {best['validation']:.6g}{test}\n# merge it with: soupkit merge {out.name}/best.yaml -o merged\n"
    )
    return header + yaml.safe_dump(recipe, sort_keys=False)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_cell(v)}" for k, v in value.items())
    return str(value)


def markdown(rows: list[dict[str, Any]], metric: str, direction: str) -> str:
    order = ranked(rows, direction) + [r for r in rows if r["state"] != "complete"]
    lines = [
        f"# Sweep leaderboard ({metric}, {'lower' if direction == 'minimize' else 'higher'} is better)",
        "",
        "| rank | trial | method | space | params | weights | validation | test | seconds | state |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(order, start=1):
        rank = str(i) if r["state"] == "complete" else ""
        state = r["state"] + (f": {r['error']}" if r.get("error") else "")
        cells = [rank, str(r["number"]), r["method"], r["space"], r["params"], r["weights"]]
        cells += [r["validation"], r["test"], r["seconds"], state]
        lines.append("| " + " | ".join(_cell(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def leaderboard_json(rows: list[dict[str, Any]], metric: str, direction: str, best: dict | None) -> str:
    payload = {
        "metric": metric,
        "direction": direction,
        "best": best["number"] if best else None,
        "trials": rows,
    }
    return json.dumps(payload, indent=2) + "\n"


def plots(rows: list[dict[str, Any]], metric: str, direction: str, out: Path) -> None:
    """validation.png (by trial, best so far), weights.png (score against each weight), methods.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["state"] == "complete"]
    if not done:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.scatter([r["number"] for r in done], [r["validation"] for r in done], s=14, label="trial")
    best, line = None, []
    pick = min if direction == "minimize" else max
    for r in sorted(done, key=lambda r: r["number"]):
        best = r["validation"] if best is None else pick(best, r["validation"])
        line.append(best)
    ax.plot(sorted(r["number"] for r in done), line, color="black", lw=1, label="best so far")
    ax.set(xlabel="trial", ylabel=f"validation {metric}")
    ax.legend()
    fig.tight_layout()
    write_text(out / "validation.png", _png(fig, plt))
    names = sorted({k for r in done for k, v in r["weights"].items() if isinstance(v, int | float)})
    if names:
        fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3), squeeze=False)
        for ax, name in zip(axes[0], names):
            ax.scatter([r["weights"][name] for r in done], [r["validation"] for r in done], s=12)
            ax.set(xlabel=f"weight of {name}", ylabel=f"validation {metric}")
        fig.tight_layout()
        write_text(out / "weights.png", _png(fig, plt))
    methods = sorted({f"{r['method']}" + (f" ({r['space']})" if r["space"] else "") for r in done})
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(methods)), 3.5))
    for i, m in enumerate(methods):
        ys = [r["validation"] for r in done if f"{r['method']}" + (f" ({r['space']})" if r["space"] else "") == m]
        ax.scatter([i] * len(ys), ys, s=14)
    ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
    ax.set(ylabel=f"validation {metric}")
    fig.tight_layout()
    write_text(out / "methods.png", _png(fig, plt))


def _png(fig: Any, plt: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()
