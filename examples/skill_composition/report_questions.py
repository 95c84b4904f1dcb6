"""The open questions' tables and charts (issues 23 and 19): pool, granularity, calibration size, search.

Written beside the run's own ``table.md`` as ``questions.md`` and one PNG per question. Every number is a
mean ± std over the seeds that ran the row, read from the aggregated table.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from examples.skill_composition.stages import FIXED_TWO, SKILLS, size_regime

COMMITTED = Path(__file__).parent / "results" / "smollm2" / "results.json"


def _pct(entry: dict | None, metric: str) -> str:
    if not entry or metric not in entry:
        return "not run"
    m = entry[metric]
    return f"{100 * m['mean']:.1f} ± {100 * m['std']:.1f}"


def _mean(entry: dict | None, metric: str) -> float | None:
    return None if not entry or metric not in entry else 100 * entry[metric]["mean"]


def _std(entry: dict | None, metric: str) -> float:
    return 0.0 if not entry or metric not in entry else 100 * entry[metric]["std"]


def mass_on_skills(entry: dict | None) -> str:
    """Share of the fitted |weight| (mean over modules, then seeds) that lands on math + code."""
    if not entry or not entry.get("fitted_weights"):
        return "-"
    shares = []
    for fitted in entry["fitted_weights"]:
        absw = {k: v.get("abs_mean", abs(v["mean"])) for k, v in fitted.items()}
        total = sum(absw.values())
        if total > 0:
            shares.append(sum(absw.get(s, 0.0) for s in SKILLS) / total)
    if not shares:
        return "-"
    spread = statistics.stdev(shares) if len(shares) > 1 else 0.0
    return f"{100 * statistics.fmean(shares):.0f} ± {100 * spread:.0f}"


def distractor_mean(entry: dict | None, cfg) -> str:
    if not entry or not all(f"{d}_acc" in entry for d in cfg.distractors) or not cfg.distractors:
        return "-"
    return f"{statistics.fmean(100 * entry[f'{d}_acc']['mean'] for d in cfg.distractors):.1f}"


def pool_table(by: dict, cfg) -> str:
    n = 2 + len(cfg.distractors)
    lines = [
        "Each LoRA on its own task (the pool's members):",
        "",
        "| LoRA | its own task acc % | composite % | mean over the distractor tasks % |",
        "|---|---|---|---|",
    ]
    for name in (*SKILLS, *cfg.distractors):
        e = by.get(f"{name} LoRA")
        lines.append(f"| {name} | {_pct(e, f'{name}_acc')} | {_pct(e, 'composite_acc')} | {distractor_mean(e, cfg)} |")
    head = "| row | composite % | math % | code % | distractor tasks, mean % | weight share on math + code % |"
    lines += [
        "",
        f"Rows over the pool ({n} LoRAs; uniform weights put {200 / n:.0f}% on math + code):",
        "",
        head,
        "|---|---|---|---|---|---|",
    ]
    names = [f"pool: cat uniform 1/{n}", *FIXED_TWO]
    for regime in cfg.pool_regimes:
        names += [
            f"pool: {kind} [{regime}]"
            for kind in ("cat fit softmax", "cat fit free", "lorahub", "soupkit sweep, cat weights, TPE")
        ]
        names += [f"cat fit softmax [{regime}]", f"control: fresh LoRA [{regime}]"]
    for name in names:
        e = by.get(name)
        cells = [_pct(e, m) for m in ("composite_acc", "math_acc", "code_acc")]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {distractor_mean(e, cfg)} | {mass_on_skills(e)} |")
    return "\n".join(lines) + "\n"


def granularity_table(by: dict, cfg) -> str:
    lines = ["| regime | constraint | granularity | composite % | math % | code % |", "|---|---|---|---|---|---|"]
    for regime in cfg.pool_regimes:
        for constraint in ("softmax", "free"):
            for gran in cfg.granularities:
                name = f"cat fit {constraint}" + ("" if gran == "module" else f", per {gran}") + f" [{regime}]"
                e = by.get(name)
                cells = " | ".join(_pct(e, m) for m in ("composite_acc", "math_acc", "code_acc"))
                lines.append(f"| {regime} | {constraint} | {gran} | {cells} |")
    return "\n".join(lines) + "\n"


def calib_table(by: dict, cfg) -> str:
    lines = [
        "| skill data | + target | fit-alpha softmax: composite % | math % | code % | fresh LoRA: composite % | math % | code % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k in cfg.calib_size_k:
        for f in cfg.calib_fractions:
            regime = size_regime(f, k)
            fit, fresh = by.get(f"cat fit softmax [{regime}]"), by.get(f"control: fresh LoRA [{regime}]")
            cells = [_pct(e, m) for e in (fit, fresh) for m in ("composite_acc", "math_acc", "code_acc")]
            lines.append(f"| {100 * f:g}% | k={k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def search_names(cfg) -> list[str]:
    n_val = cfg.val_composite
    names = [
        f"soupkit sweep: every method, TPE (chosen with {n_val} target examples)",
        f"cat sweep (chosen with {n_val} target examples)",
    ]
    names += [*FIXED_TWO, "data-mix LoRA"]
    return names + [f"cat fit {c} [{r}]" for r in cfg.pool_regimes for c in ("softmax", "free")]


def search_table(by: dict, cfg, per_seed: dict) -> str:
    lines = ["| row | composite % | math % | code % |", "|---|---|---|---|"]
    for name in search_names(cfg):
        e = by.get(name)
        lines.append(f"| {name} | " + " | ".join(_pct(e, m) for m in ("composite_acc", "math_acc", "code_acc")) + " |")
    picks = []
    for seed in sorted(per_seed):
        for r in per_seed[seed]["rows"]:
            if r.get("search") and r["name"].startswith("soupkit sweep: every method"):
                b = r["search"]["best"]
                weights = ", ".join(f"{k} {v:.2f}" for k, v in b["weights"].items())
                picks.append(
                    f"- seed {seed}: {r['search']['trials']} trials ({len(r['search']['failed'])} failed); chose "
                    f"`{b['method']}` ({b.get('space') or 'full'}) {weights}, params {b.get('params') or {}}: "
                    f"validation {100 * b['validation']:.0f}%, its test score {100 * (b.get('test') or 0):.1f}%"
                )
    return "\n".join(lines) + "\n" + ("\nWhat each seed's sweep chose:\n\n" + "\n".join(picks) + "\n" if picks else "")


def spread_table(table: list[dict]) -> str:
    """Rows this run shares with the committed run (H200, no determinism settings): both means and the
    per-seed absolute differences, beside each run's seed spread."""
    if not COMMITTED.is_file():
        return ""
    old = {e["name"]: e for e in json.loads(COMMITTED.read_text())["table"] if e.get("seeds_ok")}
    lines = [
        "| row | committed run: composite % | this run: composite % | per-seed abs difference, mean (max) |",
        "|---|---|---|---|",
    ]
    for e in table:
        o = old.get(e["name"])
        if not o or "composite_acc" not in e:
            continue
        diffs = [abs(a - b) for a, b in zip(o["composite_acc"]["values"], e["composite_acc"]["values"])]
        lines.append(
            f"| {e['name']} | {_pct(o, 'composite_acc')} | {_pct(e, 'composite_acc')} | "
            f"{100 * statistics.fmean(diffs):.1f} ({100 * max(diffs):.1f}) |"
        )
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def _bars(ax, labels: list[str], entries: list, metrics: dict[str, str]) -> None:
    height = 0.8 / len(metrics)
    for k, (metric, color) in enumerate(metrics.items()):
        ys = [i + (k - (len(metrics) - 1) / 2) * height for i in range(len(labels))]
        xs = [_mean(e, metric) or 0.0 for e in entries]
        ax.barh(
            ys, xs, height, xerr=[_std(e, metric) for e in entries], capsize=1.5, color=color, label=metric.replace("_acc", "")
        )
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_ylim(len(labels) - 0.5, -0.5)
    ax.set_xlim(0, 105)
    ax.set_xlabel("accuracy % (mean ± std over seeds)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))


COLORS = {"composite_acc": "#c0392b", "math_acc": "#2e86c1", "code_acc": "#28b463"}


def charts(out: Path, by: dict, cfg, stages: tuple[str, ...], device: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def bar_figure(name: str, title: str, labels: list[str], metrics: dict[str, str]) -> None:
        fig, ax = plt.subplots(figsize=(11, 0.42 * len(labels) + 1.6), dpi=90)
        _bars(ax, labels, [by.get(label) for label in labels], metrics)
        ax.set_title(f"{title} ({device})", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)
        written.append(name)

    n = 2 + len(cfg.distractors)
    if "pool" in stages:
        labels = [f"pool: cat uniform 1/{n}", *FIXED_TWO]
        for regime in cfg.pool_regimes:
            labels += [
                f"pool: {k} [{regime}]" for k in ("cat fit softmax", "cat fit free", "lorahub", "soupkit sweep, cat weights, TPE")
            ]
            labels += [f"cat fit softmax [{regime}]", f"control: fresh LoRA [{regime}]"]
        bar_figure("pool.png", f"Pool of {n} LoRAs (math, code, {len(cfg.distractors)} distractors)", labels, COLORS)
    if "granularity" in stages:
        labels = [
            f"cat fit {c}" + ("" if g == "module" else f", per {g}") + f" [{r}]"
            for r in cfg.pool_regimes
            for c in ("softmax", "free")
            for g in cfg.granularities
        ]
        bar_figure("granularity.png", "Weight granularity (math + code)", labels, COLORS)
    if "search" in stages:
        bar_figure("search.png", "soupkit sweep beside the fixed, swept and fitted rows", search_names(cfg), COLORS)
    if "calib" in stages:
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=90)
        xs = [100 * f for f in cfg.calib_fractions]
        for k in cfg.calib_size_k:
            for kind, style in (("cat fit softmax", "-o"), ("control: fresh LoRA", "--s")):
                es = [by.get(f"{kind} [{size_regime(f, k)}]") for f in cfg.calib_fractions]
                ys = [_mean(e, "composite_acc") for e in es]
                if any(y is not None for y in ys):
                    ax.errorbar(
                        xs,
                        [y if y is not None else float("nan") for y in ys],
                        [_std(e, "composite_acc") for e in es],
                        fmt=style,
                        capsize=2,
                        label=f"{kind}, k={k}",
                    )
        ax.set_xscale("log")
        ax.set_xticks(xs, [f"{x:g}%" for x in xs])
        ax.set_xlabel("calibration data: share of each skill's training data")
        ax.set_ylabel("composite accuracy % (mean ± std)")
        ax.set_ylim(0, 105)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(f"Calibration size (math + code; {device})", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "calibration_size.png")
        plt.close(fig)
        written.append("calibration_size.png")
    return written


def write_questions(out: Path, table: list[dict], per_seed: dict, cfg, stages: tuple[str, ...], device: str) -> None:
    by = {e["name"]: e for e in table if e.get("seeds_ok")}
    parts = [f"# Open questions (issues 23 and 19): {device}\n"]
    if "pool" in stages:
        parts += ["## A pool of LoRAs\n", pool_table(by, cfg)]
    if "granularity" in stages:
        parts += ["## Weight granularity (math + code)\n", granularity_table(by, cfg)]
    if "calib" in stages:
        parts += ["## Calibration size (math + code)\n", calib_table(by, cfg)]
    if "search" in stages:
        parts += ["## soupkit sweep beside the other rows\n", search_table(by, cfg, per_seed)]
    spread = spread_table(table) if cfg.base == "smollm2" else ""  # the committed run is SmolLM2's
    if spread:
        parts += ["## Against the committed run (same row names)\n", spread]
    (out / "questions.md").write_text("\n".join(parts))
    charts(out, by, cfg, stages, device)
