"""What ``soupkit analyze`` prints and writes: a short per-layer table, analysis.json, one PNG
heatmap (layers x modules) per statistic, one panel per adapter or adapter pair."""

from __future__ import annotations

import json
import math
from pathlib import Path

PER_ADAPTER = {"norm": "||delta_i||_F", "relative_norm": "||delta_i||_F / ||W||_F"}
PER_PAIR = {
    "cosine": "cosine <delta_i, delta_j> / (||delta_i|| ||delta_j||)",
    "col_overlap": "column spaces: mean cos^2 of principal angles",
    "row_overlap": "row spaces: mean cos^2 of principal angles",
}
PER_MODULE = {
    "cat_rank": "rank written by cat (sum r_i)",
    "core_rank": "core-space rank",
    "sign_conflict": "TIES sign-conflict fraction",
}


def _num(x: float, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}g}" if abs(x) < 1e-3 and x != 0 else f"{x:.{digits}f}"


def format_table(result: dict) -> str:
    """One row per layer and one for the whole model (Markdown)."""
    names = result["adapters"]
    pairs = [s["pair"] for s in result["model"]["pairs"]]
    rel = "relative_norm" in result["model"]
    conflict = "sign_conflict" in result["model"]
    head = ["layer", *[f"norm {n}" for n in names]]
    head += [f"rel {n}" for n in names] if rel else []
    for a, b in pairs:
        head += [f"cos {a}/{b}", f"col ovl {a}/{b}", f"row ovl {a}/{b}"]
    head += ["cat/core rank"] + (["sign conflict"] if conflict else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in [*result["layers"], result["model"]]:
        cells = [str(row["layer"]), *[_num(row["norm"].get(n, 0.0)) for n in names]]
        cells += [_num(row["relative_norm"][n], 3) for n in names] if rel else []
        for p in row["pairs"]:
            cells += [_num(p["cosine"]), _num(p["col_overlap"]), _num(p["row_overlap"])]
        cells.append(f"{row['cat_rank']}/{row['core_rank']}")
        cells += [_num(row["sign_conflict"])] if conflict else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def grid(records: list[dict], value) -> tuple[list, list[str], list[list[float]]]:
    """(layer labels, module leaf names, matrix) of ``value(record)`` over the layered modules."""
    layers = sorted({r["layer"] for r in records if r["layer"] is not None})
    leaves = list(dict.fromkeys(r["leaf"] for r in records if r["layer"] is not None))
    matrix = [[float("nan")] * len(leaves) for _ in layers]
    for r in records:
        if r["layer"] is not None:
            v = value(r)
            matrix[layers.index(r["layer"])][leaves.index(r["leaf"])] = float("nan") if v is None else v
    return layers, leaves, matrix


def _panels(records: list[dict], stat: str, names: list[str]) -> list[tuple[str, object]]:
    """(panel title, record -> value) for one statistic."""
    if stat in PER_ADAPTER:
        return [(n, lambda r, n=n: r.get(stat, {}).get(n)) for n in names]
    if stat in PER_PAIR:
        pairs = list(dict.fromkeys(tuple(p["pair"]) for r in records for p in r["pairs"]))

        def pick(r: dict, pair: tuple) -> float | None:
            return next((p[stat] for p in r["pairs"] if tuple(p["pair"]) == pair), None)

        return [(f"{a} / {b}", lambda r, pair=(a, b): pick(r, pair)) for a, b in pairs]
    return [("", lambda r: r.get(stat))]


def write_heatmaps(result: dict, out: Path) -> list[Path]:
    """One PNG per statistic present in the result."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records, names, written = result["modules"], result["adapters"], []
    for stat, title in {**PER_ADAPTER, **PER_PAIR, **PER_MODULE}.items():
        if not any(stat in r for r in records) and stat not in PER_PAIR:
            continue
        panels = _panels(records, stat, names)
        values = [v for _, value in panels for r in records for v in [value(r)] if v is not None and not math.isnan(v)]
        if not values or not any(r["layer"] is not None for r in records):
            continue  # nothing to draw (e.g. sign conflicts with one adapter)
        fig, axes = plt.subplots(
            1, len(panels), figsize=(2.2 + 2.6 * len(panels), 1.6 + 0.22 * len({r["layer"] for r in records})), squeeze=False
        )
        for ax, (label, value) in zip(axes[0], panels, strict=True):
            layers, leaves, matrix = grid(records, value)
            image = ax.imshow(matrix, aspect="auto", cmap="viridis", interpolation="nearest")
            ax.set_xticks(range(len(leaves)), leaves, rotation=60, ha="right", fontsize=7)
            ax.set_yticks(range(len(layers)), [str(x) for x in layers], fontsize=6)
            ax.set_ylabel("layer")
            ax.set_title(label, fontsize=9)
            fig.colorbar(image, ax=ax, fraction=0.046)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        path = out / f"{stat}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_json(result: dict, path: Path) -> None:
    """analysis.json (NaN written as null, so any JSON reader takes it)."""

    def clean(x: object) -> object:
        if isinstance(x, float) and math.isnan(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    path.write_text(json.dumps(clean(result), indent=1) + "\n")
