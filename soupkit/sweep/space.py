"""The search space: what one trial picks (method, merge.space, parameters, weights) and the recipe it makes.

Optuna parameter names: ``method``, ``space``, each method parameter by its own name (shared by the
methods that take it), and ``weight.<adapter>``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from soupkit.methods.registry import REGISTRY
from soupkit.sweep.spec import Domain, Sweep, Value


@dataclass(frozen=True)
class Candidate:
    """One trial's choice. ``weights`` maps every adapter to its weight (searched, or the recipe's own)."""

    method: str
    space: str | None
    params: dict[str, Value]
    weights: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "space": self.space, "params": self.params, "weights": self.weights}


def _is_range(domain: Domain) -> bool:
    return (
        isinstance(domain, list)
        and len(domain) == 2
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in domain)
    )


def _suggest(trial: Any, name: str, domain: Domain) -> Value:
    if _is_range(domain):
        lo, hi = domain  # type: ignore[misc]
        if isinstance(lo, int) and isinstance(hi, int):
            return trial.suggest_int(name, lo, hi)
        return trial.suggest_float(name, float(lo), float(hi))
    if isinstance(domain, list):
        return trial.suggest_categorical(name, domain)
    return domain


def weight_domains(sweep: Sweep) -> dict[str, Domain | None]:
    """Adapter name -> its searched domain, or None where the recipe's own weight stays."""
    names = [a.name for a in sweep.recipe.adapters]
    weights = sweep.search.weights
    if weights is None:
        return dict.fromkeys(names)
    if isinstance(weights, list):
        return {n: list(weights) for n in names}
    return {n: weights.get(n) for n in names}


def methods_of(sweep: Sweep) -> list[str]:
    return list(sweep.search.methods or [sweep.recipe.merge.method])


def suggest(trial: Any, sweep: Sweep) -> Candidate:
    """Ask ``trial`` for one candidate; parameters a method does not take are never asked for it."""
    methods = methods_of(sweep)
    method = trial.suggest_categorical("method", methods) if len(methods) > 1 else methods[0]
    fields = REGISTRY[method].Params.model_fields
    space = None
    if sweep.search.space and "space" in fields:
        choices = list(sweep.search.space)
        space = trial.suggest_categorical("space", choices) if len(choices) > 1 else choices[0]
    params = {name: _suggest(trial, name, domain) for name, domain in sweep.search.params.items() if name in fields}
    recipe_weights = {a.name: a.weight for a in sweep.recipe.adapters}
    weights = {
        name: recipe_weights[name] if domain is None else _suggest(trial, f"weight.{name}", domain)
        for name, domain in weight_domains(sweep).items()
    }
    return Candidate(method, space, params, weights)


def _grid_values(domain: Domain, points: int) -> list[Value]:
    if not _is_range(domain):
        return list(domain) if isinstance(domain, list) else [domain]
    lo, hi = domain  # type: ignore[misc]
    values = [lo + (hi - lo) * i / (points - 1) for i in range(points)]
    if isinstance(lo, int) and isinstance(hi, int):
        return sorted({round(v) for v in values})
    return [round(v, 10) for v in values]


def grid_space(sweep: Sweep) -> dict[str, list[Value]]:
    """Every optuna parameter's grid values (``grid`` sampler)."""
    points = sweep.search.grid_points
    grid: dict[str, list[Value]] = {}
    methods = methods_of(sweep)
    if len(methods) > 1:
        grid["method"] = methods
    if sweep.search.space and len(sweep.search.space) > 1:
        grid["space"] = list(sweep.search.space)
    for name, domain in sweep.search.params.items():
        grid[name] = _grid_values(domain, points)
    for name, domain in weight_domains(sweep).items():
        if domain is not None:
            grid[f"weight.{name}"] = _grid_values(domain, points)
    return {k: v for k, v in grid.items() if len(v) > 1 or k == "method"}


def _portable(value: str, root: Path, out_dir: Path) -> str:
    """A recipe path rewritten relative to ``out_dir`` (hub ids and absolute paths stay as written)."""
    path = Path(value).expanduser()
    if path.is_absolute() or not (root / path).exists():
        return value
    return os.path.relpath((root / path).resolve(), out_dir.resolve())


def candidate_recipe(sweep: Sweep, candidate: Candidate, out_dir: Path | None = None) -> dict[str, Any]:
    """The plain recipe of a candidate (paths as written, or relative to ``out_dir`` when given)."""
    raw = json.loads(json.dumps(sweep.raw_recipe))  # a deep copy of plain YAML values
    merge = {k: v for k, v in raw["merge"].items() if k in ("rank", "modules")}
    if candidate.method == sweep.recipe.merge.method:  # the recipe's own parameters, where not searched
        merge.update({k: v for k, v in raw["merge"].items() if k not in ("method", "rank", "modules")})
    merge = {"method": candidate.method, **merge, **candidate.params}
    if candidate.space is not None:
        merge["space"] = candidate.space
    raw["merge"] = merge
    for adapter in raw["adapters"]:
        adapter["weight"] = candidate.weights[adapter["name"]]
        if out_dir is not None:
            adapter["path"] = _portable(adapter["path"], sweep.root, out_dir)
    if out_dir is not None:
        raw["base_model"] = _portable(raw["base_model"], sweep.root, out_dir)
    return raw


def _file_hash(path: str) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def space_fingerprint(sweep: Sweep) -> dict[str, Any]:
    """What makes two runs one study: the recipe, the search block (less trial counts) and the data's hashes."""
    search = sweep.search.model_dump(mode="json", exclude={"trials", "top_k"})
    data = {name: _file_hash(sweep.data_path(name)) for name in ("validation", "test") if getattr(sweep.search.data, name)}
    return {"recipe": sweep.recipe.resolved(), "search": search, "data_sha256": data}
