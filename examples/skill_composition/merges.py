"""The rows of the table: each merge is a recipe file plus a ``soupkit merge`` (or ``fit-alpha``) call.

The commands are invoked in-process through soupkit's own click group (``CliRunner``), so they are
exactly the CLI a user runs, without paying a Python start-up per row. A row whose method is not
registered, or whose command does not exist in this soupkit, is reported as not available with
the reason; a command that fails is reported with its one-line error. Nothing is faked.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from examples.skill_composition.config import Config

REGIMES = {  # calibration regime -> (fraction of each skill's training data, k target examples)
    "5% skill data": (True, 0),
    "k=4 target": (False, 4),
    "k=16 target": (False, 16),
    "k=64 target": (False, 64),
    "5% skill data + k=16 target": (True, 16),
}


@dataclass(frozen=True)
class Row:
    """One line of the table.

    kind: ``base`` (no adapter), ``adapter`` (a trained LoRA, ``sources[0]``), ``merge`` (recipe +
    ``soupkit merge``), ``sweep`` (CAT weight sweep, pair chosen on the validation prompts), ``fit``
    (recipe + ``soupkit fit-alpha`` on ``regime``'s data + ``soupkit merge``), ``train`` (a control
    LoRA trained on ``regime``'s data: fresh, or ``sources[0]`` trained further) or ``moe`` (the
    paper's MoE baseline: a router per layer trained on ``regime``'s data; inference only, see moe.py).
    sources: adapter keys (directories under the seed's ``adapters/``), aligned with ``weights``.
    priority: order in which the runner takes rows (lower first), so a run cut short keeps the core.
    """

    name: str
    kind: str
    sources: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()
    method: str = "cat"
    params: dict = field(default_factory=dict)
    rank: int | None = None
    fit: dict = field(default_factory=dict)
    regime: str | None = None
    priority: int = 0


def rows(cfg: Config) -> list[Row]:
    """Every row, in table order: base and trained LoRAs, every registered method at fixed weights, the
    CAT sweep, then per calibration regime the fitted CATs and their controls."""
    from soupkit.methods import REGISTRY

    skills, regimes = ("math", "code"), [r for r in REGIMES if REGIMES[r][1] in (0, *cfg.calib_k)]
    regimes = [r for r in regimes if cfg.regimes is None or r in cfg.regimes]
    out = [
        Row("base", "base"),
        Row("math LoRA", "adapter", ("math",)),
        Row("code LoRA", "adapter", ("code",)),
        Row("data-mix LoRA", "adapter", ("mix",), priority=1),
    ]
    core = ("cat", "linear", "ties")
    for method in sorted(REGISTRY, key=lambda m: (m not in core, m)):
        for weights in cfg.fixed_weights:
            label = "/".join(f"{w:g}" for w in weights)
            out.append(Row(f"{method} {label}", "merge", skills, weights, method, priority=2 if method in core else 6))
    for method in sorted(m for m in REGISTRY if "space" in REGISTRY[m].Params.model_fields):
        for weights in cfg.fixed_weights:  # the same method in core space (merge.space: core)
            label = "/".join(f"{w:g}" for w in weights)
            out.append(Row(f"{method} core {label}", "merge", skills, weights, method, {"space": "core"}, priority=7))
    n_val = cfg.val_composite
    out.append(Row(f"cat sweep (chosen with {n_val} target examples)", "sweep", skills, priority=2))
    for regime in regimes:
        first = 3 if regime in ("5% skill data", "k=16 target") else 4
        out += [
            Row(
                f"cat fit softmax [{regime}]",
                "fit",
                skills,
                (0.5, 0.5),
                fit={"constraint": "softmax"},
                regime=regime,
                priority=first,
            ),
            Row(f"cat fit free [{regime}]", "fit", skills, (0.5, 0.5), fit={"constraint": "free"}, regime=regime, priority=first),
            Row(f"control: fresh LoRA [{regime}]", "train", (), regime=regime, priority=first),
            Row(f"control: code LoRA trained further [{regime}]", "train", ("code",), regime=regime, priority=first),
            Row(f"moe router, inference only [{regime}]", "moe", skills, regime=regime, priority=first),
            Row(
                f"control: cat fit over random LoRAs [{regime}]",
                "fit",
                ("rand_a", "rand_b"),
                (0.5, 0.5),
                fit={"constraint": "softmax"},
                regime=regime,
                priority=first + 1,
            ),
        ]
        if regime == "k=16 target":
            out.append(
                Row(f"lorahub [{regime}]", "fit", skills, (1.0, 1.0), fit={"search": "lorahub"}, regime=regime, priority=5)
            )
    return out


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_").replace("__", "_")


class NotAvailable(Exception):
    """This soupkit cannot run the row (method or command missing, or the command failed)."""


class Deferred(Exception):
    """The row stopped at the run's deadline before it was complete: no result is saved, so the next
    run (same ``--out``) takes it again and resumes it (a sweep's study keeps its finished trials)."""


def method_check(row: Row) -> dict:
    """The row's params restricted to what the method accepts; NotAvailable if unregistered."""
    from soupkit.methods import REGISTRY

    if row.method not in REGISTRY:
        raise NotAvailable(f"method '{row.method}' is not registered in this soupkit")
    accepted = set(REGISTRY[row.method].Params.model_fields)
    unknown = sorted(set(row.params) - accepted)
    if unknown:
        raise NotAvailable(f"method '{row.method}' does not take parameter(s) {unknown}")
    return dict(row.params)


def write_recipe(row: Row, seed_dir: Path, base_dir: Path, seed: int) -> Path:
    """Write ``recipes/<row>.yaml`` with paths relative to the recipe file."""
    recipes = seed_dir / "recipes"
    recipes.mkdir(parents=True, exist_ok=True)
    path = recipes / f"{slug(row.name)}.yaml"

    def rel(p: Path) -> str:
        return os.path.relpath(p, recipes)

    merge: dict = {"method": row.method, **method_check(row)}
    if row.rank is not None:
        merge["rank"] = row.rank
    recipe = {
        "base_model": rel(base_dir),
        "adapters": [
            {"name": src, "path": rel(seed_dir / "adapters" / src), "weight": w} for src, w in zip(row.sources, row.weights)
        ],
        "merge": merge,
        "output": "adapter",
        "dtype": "float32",
        "seed": seed,
    }
    path.write_text(f"# {row.name}: written by examples/skill_composition/run.py\n" + yaml.safe_dump(recipe, sort_keys=False))
    return path


def invoke(args: list[str]) -> str:
    """Run ``soupkit ARGS`` in-process; return its output, or raise NotAvailable with its error."""
    from click.testing import CliRunner

    from soupkit.cli import main

    result = CliRunner().invoke(main, args, catch_exceptions=True)
    output = result.output  # click >= 8.2: stdout and stderr as the terminal shows them
    if result.exit_code != 0:
        err = result.exception
        detail = output.strip().splitlines()[-1] if output.strip() else f"{type(err).__name__}: {err}"
        raise NotAvailable(f"`soupkit {args[0]}` failed (exit {result.exit_code}): {detail[:300]}")
    return output


def fit_args(row: Row, recipe: Path, calib: Path, fitted: Path, cfg: Config, seed: int, device: str) -> list[str]:
    """``soupkit fit-alpha`` arguments for this row: ``cfg.fit_steps`` steps, scored on the same data
    at the end only (the few-shot regimes have no examples to spare for a held-out split)."""
    from soupkit.cli import main

    if "fit-alpha" not in main.commands:
        raise NotAvailable("`soupkit fit-alpha` does not exist in this soupkit")
    args = ["fit-alpha", str(recipe), "--data", str(calib), "--eval-data", str(calib), "-o", str(fitted), "--seed", str(seed)]
    args += ["--device", device, "--overwrite", "--seq-len", "256"]
    if "search" in row.fit:
        n = sum(1 for _ in calib.open())
        return args + ["--search", row.fit["search"], "--budget", str(cfg.lorahub_budget), "--lorahub-examples", str(min(n, 16))]
    from examples.skill_composition.stages import calib_steps

    steps = calib_steps(cfg, sum(1 for _ in calib.open()))
    args += ["--steps", str(steps), "--batch-size", str(cfg.fit_batch), "--lr", str(cfg.fit_lr)]
    args += ["--eval-every", str(steps), "--patience", "1000", "--granularity", row.fit.get("granularity", "module")]
    return args + ["--constraint", row.fit["constraint"], "--init", "uniform"]


def run_row(row: Row, seed_dir: Path, base_dir: Path, cfg: Config, seed: int, device: str) -> tuple[Path, list[str], Path]:
    """Write the recipe, run the commands (fit-alpha and merge on ``device``; fit rows use the
    seed's ``calib_<regime>.jsonl``).

    Returns the merged adapter directory, the commands as a user would type them, and the recipe
    that was merged (the fitted one for ``fit`` rows)."""
    recipe = write_recipe(row, seed_dir, base_dir, seed)
    out = seed_dir / "merged" / slug(row.name)
    commands = []
    if row.kind == "fit":
        calib = seed_dir / f"calib_{slug(row.regime)}.jsonl"
        fitted = recipe.with_name(recipe.stem + ".fitted.yaml")
        args = fit_args(row, recipe, calib, fitted, cfg, seed, device)
        commands.append("soupkit " + shlex.join(args))
        invoke(args)
        recipe = fitted
    args = ["merge", str(recipe), "-o", str(out), "--overwrite", "--quiet", "--device", device]
    commands.append("soupkit " + shlex.join(args))
    invoke(args)
    return out, commands, recipe


def fitted_weight_stats(recipe: Path) -> dict:
    """Mean / min / max of the fitted weights per adapter: the per-module overrides where the
    fitted recipe has them (they replace the top-level weight), else the top-level weight."""
    data = yaml.safe_load(recipe.read_text())
    values: dict[str, list[float]] = {}

    def add(name: str, w: object) -> None:
        for v in w if isinstance(w, list) else [w]:
            if isinstance(v, (int, float)):
                values.setdefault(name, []).append(float(v))

    overrides = (data.get("merge") or {}).get("modules", []) or []
    for override in overrides:
        for name, w in override.get("weights", {}).items():
            add(name, w)
    if not overrides:
        for spec in data.get("adapters", []):
            add(spec["name"], spec.get("weight", 1.0))
    return {
        k: {"mean": sum(v) / len(v), "min": min(v), "max": max(v), "abs_mean": sum(map(abs, v)) / len(v), "n": len(v)}
        for k, v in values.items()
    }
