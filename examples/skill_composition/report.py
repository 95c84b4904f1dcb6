"""Aggregate the per-seed rows into results.json, a markdown table and a bar chart."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

METRICS = ["composite_acc", "composite_valid", "composite_ops", "composite_numbers", "math_acc", "code_acc"]


def _mean_std(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
        "values": values,
    }


def collect(run_dir: Path, cfg, stages: tuple[str, ...] = ("core",)) -> dict[int, dict]:
    """Per seed: the adapter stage's info and every row in table order (``not run`` where no file)."""
    from examples.skill_composition.merges import slug
    from examples.skill_composition.stages import select_rows

    per_seed = {}
    for seed in cfg.seeds:
        sdir = run_dir / f"seed{seed}"
        info = json.loads((sdir / "adapters.json").read_text()) if (sdir / "adapters.json").is_file() else {}
        entries = []
        for row in select_rows(cfg, stages):
            path = sdir / "rows" / f"{slug(row.name)}.json"
            missing = {"name": row.name, "status": "not run", "reason": "not run: the run's time limit (--minutes)"}
            entries.append(json.loads(path.read_text()) if path.is_file() else missing)
        per_seed[seed] = {"seed": seed, **info, "rows": entries}
    return per_seed


def aggregate(per_seed: dict[int, dict]) -> list[dict]:
    """One entry per row name, in table order: metrics as mean/std over the seeds that ran it."""
    order: list[str] = []
    runs: dict[str, list[dict]] = {}
    for seed in sorted(per_seed):
        for row in per_seed[seed]["rows"]:
            if row["name"] not in runs:
                order.append(row["name"])
            runs.setdefault(row["name"], []).append(row)
    table = []
    for name in order:
        done = [r for r in runs[name] if r["status"] == "ok"]
        entry: dict = {"name": name, "seeds_ok": len(done), "seeds": len(runs[name])}
        if done:
            keys = [m for m in done[0]["metrics"] if all(m in r["metrics"] for r in done)]
            entry.update({m: _mean_std([r["metrics"][m] for r in done]) for m in keys})
            fitted = [r["fitted_weights"] for r in done if r.get("fitted_weights")]
            if fitted:
                entry["fitted_weights"] = fitted
        failed = [r["reason"] for r in runs[name] if r["status"] != "ok"]
        if failed:
            entry["not_available"] = failed[0]
        table.append(entry)
    return table


def _cell(entry: dict, metric: str) -> str:
    if metric not in entry:
        return "n/a"
    m = entry[metric]
    return f"{100 * m['mean']:.1f} ± {100 * m['std']:.1f}"


def markdown_table(table: list[dict]) -> str:
    lines = [
        (
            "| row | composite acc % | composite: valid program % | composite: operators right % "
            "| composite: numbers right % | skill A math acc % | skill B code acc % | seeds |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for e in table:
        cells = [_cell(e, m) for m in METRICS]
        if "not_available" in e and e["seeds_ok"] == 0:
            cells = ["not run" if e["not_available"].startswith("not run") else "not available"] * len(METRICS)
            notes.append(f"- **{e['name']}**: {e['not_available']}")
        lines.append(f"| {e['name']} | " + " | ".join(cells) + f" | {e['seeds_ok']}/{e['seeds']} |")
    text = "\n".join(lines) + "\n"
    if notes:
        text += "\nNot available in this run:\n" + "\n".join(notes) + "\n"
    return text


def adapter_table(per_seed: dict[int, dict]) -> str:
    """Delta/weight norm ratio per adapter and math-code cosine, mean over seeds (max / range)."""
    seeds = [per_seed[s]["adapter_stats"] for s in sorted(per_seed) if "adapter_stats" in per_seed[s]]
    if not seeds:
        return "(no adapters trained)\n"
    lines = ["| adapter | ‖dW‖_F / ‖W‖_F, mean over modules | max over modules |", "|---|---|---|"]
    for name in seeds[0]["ratio"]:
        mean = statistics.fmean(s["ratio"][name]["mean"] for s in seeds)
        top = max(s["ratio"][name]["max"] for s in seeds)
        lines.append(f"| {name} | {mean:.3f} | {top:.3f} |")
    cos = [s["cosine"] for s in seeds]
    pair = " / ".join(cos[0]["pair"])
    lines.append("")
    lines.append(
        f"Cosine between the {pair} deltas per module: mean {statistics.fmean(c['mean'] for c in cos):.3f}, "
        f"range [{min(c['min'] for c in cos):.3f}, {max(c['max'] for c in cos):.3f}] over {len(cos)} seed(s)."
    )
    return "\n".join(lines) + "\n"


def fitted_table(table: list[dict]) -> str:
    """Mean fitted weight per adapter (and its range over modules and seeds) for fitted rows."""
    lines = ["| row | adapter | mean weight | min | max |", "|---|---|---|---|---|"]
    for e in table:
        for name in (e.get("fitted_weights") or [{}])[0]:
            runs = [f[name] for f in e["fitted_weights"]]
            mean = statistics.fmean(r["mean"] for r in runs)
            lo, hi = min(r["min"] for r in runs), max(r["max"] for r in runs)
            lines.append(f"| {e['name']} | {name} | {mean:.3f} | {lo:.3f} | {hi:.3f} |")
    return "\n".join(lines) + "\n"


def bar_chart(table: list[dict], path: Path, title: str) -> None:
    """Horizontal bars, one group per row (top to bottom in table order), so 90 rows stay readable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [e for e in table if e["seeds_ok"]]
    if not shown:
        return
    names = [e["name"] for e in shown]
    fig, ax = plt.subplots(figsize=(12, 0.36 * len(names) + 1.6), dpi=90)
    height = 0.2
    colors = {"composite_acc": "#c0392b", "composite_valid": "#f5b7b1", "math_acc": "#2e86c1", "code_acc": "#28b463"}
    labels = {
        "composite_acc": "composite (held out): accuracy",
        "composite_valid": "composite: valid program",
        "math_acc": "skill A (math): accuracy",
        "code_acc": "skill B (code): accuracy",
    }
    for k, metric in enumerate(colors):
        ys = [i + (k - 1.5) * height for i in range(len(shown))]
        xs = [100 * e[metric]["mean"] for e in shown]
        errs = [100 * e[metric]["std"] for e in shown]
        ax.barh(ys, xs, height, xerr=errs, capsize=1.5, color=colors[metric], label=labels[metric])
    ax.set_yticks(range(len(shown)), names, fontsize=7)
    ax.set_ylim(len(shown) - 0.5, -0.5)  # first row at the top
    ax.set_xlabel("accuracy % (mean ± std over seeds)")
    ax.set_xlim(0, 105)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def sweep_table(per_seed: dict[int, dict]) -> str:
    """Validation composite accuracy over the CAT grid, mean over seeds, and the pair each seed chose."""
    sweeps = [r["sweep"] for s in sorted(per_seed) for r in per_seed[s]["rows"] if r.get("sweep")]
    if not sweeps:
        return ""
    cells: dict[tuple, list[float]] = {}
    for sw in sweeps:
        for g in sw["grid"]:
            cells.setdefault((g["w_code"], g["w_math"]), []).append(g["val_composite_acc"])
    w_maths = sorted({wm for _, wm in cells})
    lines = ["| w_code \\ w_math | " + " | ".join(f"{w:g}" for w in w_maths) + " |", "|---" * (len(w_maths) + 1) + "|"]
    for wc in sorted({wc for wc, _ in cells}):
        lines.append(f"| {wc:g} | " + " | ".join(f"{100 * statistics.fmean(cells[(wc, wm)]):.0f}" for wm in w_maths) + " |")
    chosen = ", ".join(f"({s['chosen']['w_math']:g}, {s['chosen']['w_code']:g})" for s in sweeps)
    return "\n".join(lines) + f"\n\nChosen (w_math, w_code) per seed: {chosen}.\n"


def copy_fit_png(run_dir: Path, per_seed: dict[int, dict], out: Path) -> str | None:
    """The fitted-weights PNG that fit-alpha wrote for the first seed's softmax fit, the paper's regime first."""
    import shutil

    for wanted in ("cat fit softmax [5% skill data]", "cat fit softmax ["):
        for seed in sorted(per_seed):
            for r in per_seed[seed]["rows"]:
                png = run_dir / r.get("fit_report", "-") / "weights.png"
                if r["name"].startswith(wanted) and r.get("fit_report") and png.is_file():
                    shutil.copyfile(png, out / "fitted_weights.png")
                    return f"seed {seed}, {r['name']}"
    return None


def write_report(out: Path, payload: dict, run_dir: Path, cfg, stages: tuple[str, ...] = ("core",)) -> dict:
    """Write results.json, table.md, chart.png (and fitted_weights.png) into ``out``; return the results."""
    per_seed = collect(run_dir, cfg, stages)
    table = aggregate(per_seed)
    results = {**payload, "table": table, "per_seed": {str(s): per_seed[s] for s in sorted(per_seed)}}
    results["fitted_weights_png"] = copy_fit_png(run_dir, per_seed, out)
    (out / "results.json").write_text(json.dumps(results, indent=1, sort_keys=False) + "\n")
    text = markdown_table(table) + "\n" + adapter_table(per_seed) + "\nFitted weights (mean per adapter over modules):\n\n"
    text += fitted_table(table) + "\nCAT sweep, validation composite accuracy % (mean over seeds):\n\n" + sweep_table(per_seed)
    (out / "table.md").write_text(text)
    seeds = ", ".join(str(s) for s in sorted(per_seed))
    bar_chart(table, out / "chart.png", f"Skill composition: mean ± std over seeds {seeds}")
    if set(stages) - {"core"}:
        from examples.skill_composition.report_questions import write_questions

        write_questions(out, table, per_seed, cfg, stages, payload.get("device", ""))
    return results
