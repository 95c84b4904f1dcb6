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


@dataclass(frozen=True)
class Row:
    """One line of the table.

    kind: ``base`` (no adapter), ``adapter`` (a trained LoRA, ``sources[0]``), ``merge`` (recipe +
    ``soupkit merge``) or ``fit`` (recipe + ``soupkit fit-alpha`` + ``soupkit merge``).
    sources: adapter keys (directories under the seed's ``adapters/``), aligned with ``weights``.
    """

    name: str
    kind: str
    sources: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()
    method: str = "cat"
    params: dict = field(default_factory=dict)
    rank: int | None = None
    fit: dict = field(default_factory=dict)


def rows(cfg: Config) -> list[Row]:
    d, r2 = cfg.density, 2 * cfg.rank
    skills, one = ("math", "code"), (1.0, 1.0)
    return [
        Row("base", "base"),
        Row("math LoRA", "adapter", ("math",)),
        Row("code LoRA", "adapter", ("code",)),
        Row("data-mix LoRA", "adapter", ("mix",)),
        Row("calib LoRA (control)", "adapter", ("calib",)),
        Row("linear 0.5/0.5 r8", "merge", skills, (0.5, 0.5), "linear", rank=cfg.rank),
        Row("linear 1/1 r8", "merge", skills, one, "linear", rank=cfg.rank),
        Row("cat 0.5/0.5", "merge", skills, (0.5, 0.5), "cat"),
        Row("cat 1/1", "merge", skills, one, "cat"),
        Row("ties", "merge", skills, one, "ties", {"density": d}, rank=r2),
        Row("dare_ties", "merge", skills, one, "dare_ties", {"density": d}, rank=r2),
        Row("peft_ties", "merge", skills, one, "peft_ties", {"density": d}),
        Row("peft_dare_ties", "merge", skills, one, "peft_dare_ties", {"density": d}),
        Row("knots (ties)", "merge", skills, one, "knots", {"density": d}),
        Row("lego k=2r", "merge", skills, one, "lego", rank=r2),
        Row("lorahub", "fit", skills, one, "cat", fit={"search": "lorahub"}),
        Row("cat fitted (softmax)", "fit", skills, (0.5, 0.5), "cat", fit={"constraint": "softmax"}),
        Row("cat fitted (free)", "fit", skills, (0.5, 0.5), "cat", fit={"constraint": "free"}),
        Row("cat fitted on random LoRAs (control)", "fit", ("rand_a", "rand_b"), (0.5, 0.5), fit={"constraint": "softmax"}),
    ]


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_").replace("__", "_")


class NotAvailable(Exception):
    """This soupkit cannot run the row (method or command missing, or the command failed)."""


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
    rel = lambda p: os.path.relpath(p, recipes)  # noqa: E731
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
    """``soupkit fit-alpha`` arguments for this row, using only options this soupkit has."""
    from soupkit.cli import main

    command = main.commands.get("fit-alpha")
    if command is None:
        raise NotAvailable("`soupkit fit-alpha` does not exist in this soupkit")
    options = {opt for param in command.params for opt in getattr(param, "opts", [])}
    args = ["fit-alpha", str(recipe), "--data", str(calib), "-o", str(fitted)]
    wanted = {"--seed": seed, "--lr": cfg.fit_lr, "--epochs": cfg.fit_epochs, "--device": device, "--overwrite": None}
    if "search" in row.fit:
        wanted = {"--search": row.fit["search"], "--budget": cfg.lorahub_budget, "--seed": seed, "--device": device}
        wanted["--overwrite"] = None
    else:
        wanted.update({"--granularity": "module", "--constraint": row.fit["constraint"], "--init": "uniform"})
    for opt, value in wanted.items():
        if opt in options:
            args += [opt] if value is None else [opt, str(value)]
        elif opt in ("--search", "--constraint", "--data"):
            raise NotAvailable(f"`soupkit fit-alpha` has no {opt} option")
    return args


def run_row(
    row: Row, seed_dir: Path, base_dir: Path, calib: Path, cfg: Config, seed: int, device: str
) -> tuple[Path, list[str], Path]:
    """Write the recipe, run the commands (fit-alpha on ``device``, merges on CPU).

    Returns the merged adapter directory, the commands as a user would type them, and the recipe
    that was merged (the fitted one for ``fit`` rows)."""
    recipe = write_recipe(row, seed_dir, base_dir, seed)
    out = seed_dir / "merged" / slug(row.name)
    commands = []
    if row.kind == "fit":
        fitted = recipe.with_name(recipe.stem + ".fitted.yaml")
        args = fit_args(row, recipe, calib, fitted, cfg, seed, device)
        commands.append("soupkit " + shlex.join(args))
        invoke(args)
        recipe = fitted
    args = ["merge", str(recipe), "-o", str(out), "--overwrite", "--quiet"]
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
    return {k: {"mean": sum(v) / len(v), "min": min(v), "max": max(v), "n": len(v)} for k, v in values.items()}
