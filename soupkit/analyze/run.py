"""``soupkit analyze``: per-module and per-layer interference statistics of a recipe's adapters.

Reads the factors one layer at a time (as the merge does) and, if asked, the base weights the
adapters target (one tensor at a time), and returns a JSON-ready dict:

    {"adapters": [...], "modules": [per-module record], "layers": [per-layer summary], "model": summary}

Each adapter's update is its own delta_i = s_i B_i A_i (recipe weights are NOT applied, except to the
signs counted by ``sign_conflict``, which follows TIES' election on w_i delta_i).
"""

from __future__ import annotations

import math
from itertools import combinations

import torch

from soupkit.analyze.stats import Grams, factor_bases, gram_rank, sign_conflict, subspace_overlaps
from soupkit.execute import Inputs, load_sources, plan_recipe, source_names
from soupkit.io.progress import progress
from soupkit.methods import LoraFactors
from soupkit.plan import ModulePlan
from soupkit.recipe.schema import Recipe

CPU = torch.device("cpu")
PAIR_STATS = ("cosine", "col_overlap", "col_max_cos", "row_overlap", "row_max_cos")


def module_record(
    module: ModulePlan,
    names: tuple[str, ...],
    factors: list[LoraFactors],
    weights: list[float],
    dense_density: float | None,
    dense: bool,
) -> dict:
    """Statistics of one module (see ``soupkit.analyze.stats`` for the formulas)."""
    grams = Grams.of([f.B for f in factors], [f.A for f in factors])
    norms = [math.sqrt(max(grams.inner(i, i), 0.0)) for i in range(len(factors))]
    bases = [factor_bases(grams, i) for i in range(len(factors))]
    pairs = []
    for i, j in combinations(range(len(factors)), 2):
        ip = grams.inner(i, j)
        cosine = ip / (norms[i] * norms[j]) if norms[i] > 0 and norms[j] > 0 else float("nan")
        (col, col_max), (row, row_max) = subspace_overlaps(grams, bases, i, j)
        pairs.append({"pair": [names[i], names[j]], "cosine": cosine, "col_overlap": col, "col_max_cos": col_max,
                      "row_overlap": row, "row_max_cos": row_max})  # fmt: skip
    record = {
        "path": module.path,
        "layer": module.layer,
        "leaf": module.path.rsplit(".", 1)[-1],
        "shape": [module.d_out, module.d_in],
        "adapters": list(names),
        "ranks": [f.rank for f in factors],
        "delta_rank": {n: b.rank for n, b in zip(names, bases, strict=True)},
        "norm": dict(zip(names, norms, strict=True)),
        "pairs": pairs,
        "cat_rank": sum(f.rank for f in factors),  # what `cat` writes: R = sum r_i
        "core_rank": min(gram_rank(grams.G_B), gram_rank(grams.G_A)),  # dimension of the core space
    }
    if dense:
        deltas = [w * (f.B.double() @ f.A.double()) for f, w in zip(factors, weights, strict=True)]
        record["sign_conflict"] = sign_conflict(deltas, dense_density) if len(deltas) > 1 else float("nan")
    return record


def base_norm(inputs: Inputs, module: ModulePlan) -> float | None:
    """||W||_F of the base weight this module updates (read alone, float32 accumulation), or None."""
    key = inputs.base.weight_key(module.path)
    if key is None:
        return None
    return float(torch.linalg.vector_norm(inputs.base.index.get(key), dtype=torch.float32))


def _mean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


def summarise(label: str | int, records: list[dict], names: list[str]) -> dict:
    """Aggregate module records: norms as the Frobenius norm of the concatenated deltas, cosine of the
    concatenated deltas (sum of inner products over the norms), overlaps and conflicts as means."""
    sq = {n: sum(r["norm"][n] ** 2 for r in records if n in r["norm"]) for n in names}
    out: dict = {"layer": label, "modules": len(records), "norm": {n: math.sqrt(v) for n, v in sq.items()}}
    if records and all("base_norm" in r for r in records):
        base = math.sqrt(sum(r["base_norm"] ** 2 for r in records))
        out["relative_norm"] = {n: math.sqrt(sq[n]) / base if base > 0 else float("nan") for n in names}
    pairs = []
    for a, b in combinations(names, 2):
        mine = [p for r in records for p in r["pairs"] if p["pair"] == [a, b]]
        dot = sum(
            p["cosine"] * r["norm"][a] * r["norm"][b]
            for r in records
            for p in r["pairs"]
            if p["pair"] == [a, b] and not math.isnan(p["cosine"])
        )
        denom = math.sqrt(sq[a] * sq[b])
        entry = {"pair": [a, b], "cosine": dot / denom if denom > 0 else float("nan")}
        entry.update({k: _mean([p[k] for p in mine]) for k in PAIR_STATS if k != "cosine"})
        pairs.append(entry)
    out["pairs"] = pairs
    out["cat_rank"] = max((r["cat_rank"] for r in records), default=0)
    out["core_rank"] = max((r["core_rank"] for r in records), default=0)
    if records and "sign_conflict" in records[0]:
        out["sign_conflict"] = _mean([r["sign_conflict"] for r in records])
    return out


def analyze_recipe(recipe: Recipe, dense: bool = False, base_norms: bool = True) -> dict:
    """Statistics of every planned module with at least one adapter, layer by layer (memory: one
    module's factors, plus its dense deltas with ``dense``, plus one base weight with ``base_norms``)."""
    # torch's default threads; its r x r LAPACK calls run on one (ops.svd, ops.eigh: small matrices)
    return _analyze(recipe, dense, base_norms)


def _analyze(recipe: Recipe, dense: bool, base_norms: bool) -> dict:
    plan, inputs = plan_recipe(recipe)
    names = [a.name for a in recipe.adapters]
    density = getattr(recipe.merge.params, "density", None)
    records = []
    for layer in progress(plan.layers, "analyze", "layer"):
        for module in layer.modules:
            if not module.sources:
                continue
            factors = load_sources(inputs, module, CPU)
            weights = [s.weight for s in module.sources]
            record = module_record(module, source_names(recipe, module), factors, weights, density, dense)
            norm = base_norm(inputs, module) if base_norms else None
            if norm is not None:
                record["base_norm"] = norm
                record["relative_norm"] = {n: v / norm if norm > 0 else float("nan") for n, v in record["norm"].items()}
            records.append(record)
        for adapter in inputs.adapters:  # unmap this layer's pages, as the merge does
            adapter.index.close()
        inputs.base.index.close()
    layers: dict = {}
    for r in records:
        layers.setdefault(r["layer"], []).append(r)
    ordered = sorted(layers, key=lambda k: (k is None, k if k is not None else 0))
    return {
        "adapters": names,
        "method": recipe.merge.method,
        "density": density,
        "dense": dense,
        "modules": records,
        "layers": [summarise("other" if k is None else k, layers[k], names) for k in ordered],
        "model": summarise("model", records, names),
    }
