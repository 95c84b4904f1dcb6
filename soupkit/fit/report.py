"""What a fit leaves for people: ``fit_report.json``, a weight heatmap and a loss curve (PNG).

The heatmap has one panel per adapter: rows are layers, columns are module kinds (q_proj, ...),
each cell the learned weight (grey where the adapter does not adapt that module).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from soupkit.fit.model import TargetModule

REPORT_NAME, HEATMAP_NAME, CURVE_NAME = "fit_report.json", "weights.png", "loss.png"
MODULE_ORDER = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # data flow order


def weights_by_module(weights: torch.Tensor, targets: list[TargetModule], names: list[str]) -> dict[str, dict[str, float]]:
    """{module path: {adapter name: weight}} for the adapters present in each module (plain floats)."""
    return {t.path: {names[a]: float(weights[m, a]) for a in t.adapters} for m, t in enumerate(targets)}


def write_report(
    directory: Path, report: dict[str, Any], weights: torch.Tensor, targets: list[TargetModule], names: list[str]
) -> list[Path]:
    """Write fit_report.json and the two PNGs into ``directory``; return the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / REPORT_NAME
    path.write_text(json.dumps(report, indent=2) + "\n")
    heatmap = plot_weights(weights, targets, names, directory / HEATMAP_NAME, report.get("constraint", "softmax"))
    xlabel = "loss evaluation (lorahub search)" if report.get("search") == "lorahub" else "optimizer step"
    curve = plot_curve(report["loss_curve"], report["heldout_loss"], directory / CURVE_NAME, xlabel)
    return [path, heatmap, curve]


def weight_grid(
    weights: torch.Tensor, targets: list[TargetModule], adapter: int
) -> tuple[list[str], list[str], list[list[float]]]:
    """Rows (layers), columns (module leaf names, first-seen order) and cell values (NaN if absent)."""
    rows = sorted({t.layer for t in targets if t.layer is not None})
    row_labels = [str(r) for r in rows] + (["other"] if any(t.layer is None for t in targets) else [])
    leaves = list(dict.fromkeys(t.leaf for t in targets))
    cols = [c for c in MODULE_ORDER if c in leaves] + [c for c in leaves if c not in MODULE_ORDER]
    grid = [[math.nan] * len(cols) for _ in row_labels]
    for m, t in enumerate(targets):
        if adapter in t.adapters:
            r = rows.index(t.layer) if t.layer is not None else len(rows)
            grid[r][cols.index(t.leaf)] = float(weights[m, adapter])
    return row_labels, cols, grid


def plot_weights(weights: torch.Tensor, targets: list[TargetModule], names: list[str], out: Path, constraint: str) -> Path:
    """Heatmap PNG: one panel per adapter, layers x modules, shared colour scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grids = [weight_grid(weights, targets, a) for a in range(len(names))]
    values = np.array([g[2] for g in grids], dtype=float)
    lo, hi = (0.0, 1.0) if constraint == "softmax" else (float(np.nanmin(values)), float(np.nanmax(values)))
    rows, cols = grids[0][0], grids[0][1]
    fig, axes = plt.subplots(1, len(names), figsize=(1.2 + 0.8 * len(cols) * len(names), 1.5 + 0.28 * len(rows)), squeeze=False)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#d9d9d9")  # grey: the adapter does not adapt this module
    for a, ax in enumerate(axes[0]):
        image = ax.imshow(np.ma.masked_invalid(values[a]), cmap=cmap, vmin=lo, vmax=hi if hi > lo else lo + 1, aspect="auto")
        ax.set_title(names[a])
        ax.set_xticks(range(len(cols)), [c.removesuffix("_proj") for c in cols], rotation=45, ha="right")
        ax.set_yticks(range(len(rows)), rows if len(rows) <= 40 else [r if i % 4 == 0 else "" for i, r in enumerate(rows)])
        ax.set_xlabel("module")
        if a == 0:
            ax.set_ylabel("layer")
        if len(rows) * len(cols) <= 64:  # small grids: print the numbers too
            for (r, c), v in np.ndenumerate(values[a]):
                if not np.isnan(v):
                    ax.text(
                        c, r, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < (lo + hi) / 2 else "black"
                    )
    fig.colorbar(image, ax=axes[0].tolist(), label="weight", shrink=0.9)
    fig.suptitle(f"fitted CAT weights ({constraint}); grey: adapter absent", y=1.06)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out


def plot_curve(curve: list[dict[str, float]], heldout: dict[str, float], out: Path, xlabel: str = "optimizer step") -> Path:
    """Loss PNG: training loss per step, held-out loss at each evaluation, reference losses dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    train = [(p["step"], p["train_loss"]) for p in curve if "train_loss" in p]
    evals = [(p["step"], p["eval_loss"]) for p in curve if "eval_loss" in p]
    if train:
        ax.plot(*zip(*train), color="#9ecae1", lw=1, label="train batch (lorahub: objective)")
    if evals:
        ax.plot(*zip(*evals), "o-", color="#08519c", ms=3, label="held-out")
    styles = {"uniform": "#d95f02", "recipe": "#7570b3"}
    for key, color in styles.items():
        if key in heldout:
            ax.axhline(heldout[key], ls="--", lw=1, color=color, label=f"held-out, {key} weights")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss per token (nats)")
    ax.legend(fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out
