"""Which rows a run does: the committed two-LoRA table (``core``) and the open questions of issues 23 and 19.

Stages (``--stages``; a row that belongs to several stages runs once, shared by name):
- ``core``: the committed 90 rows (``merges.rows``).
- ``pool``: math, code and six distractor LoRAs (8); each LoRA's own accuracy; over the pool, per regime
  of ``cfg.pool_regimes``: fit-alpha softmax and free, ``--search lorahub``, a ``soupkit sweep`` over
  the CAT weights, the fresh-LoRA control; CAT with uniform 1/8 weights; the best fixed two-LoRA rows.
- ``granularity``: fit-alpha on math + code with one weight per adapter, per layer and per module,
  softmax and free, in each of ``cfg.pool_regimes``.
- ``calib``: fit-alpha softmax and the fresh-LoRA control at each fraction of ``cfg.calib_fractions`` of
  the skill data, with k = 0 and k = 16 target examples.
- ``search``: a ``soupkit sweep`` over every registered method (both spaces) and the two weights,
  chosen on the validation composite prompts; beside it data-mix and the CAT grid sweep.
"""

from __future__ import annotations

import math

from examples.skill_composition.config import Config
from examples.skill_composition.merges import REGIMES, Row, rows

STAGES = ("core", "pool", "granularity", "calib", "search")
NEW_STAGES = STAGES[1:]
SKILLS = ("math", "code")
FIXED_TWO = ("cat 0.5/0.5", "tsv 0.5/0.5")  # the committed table's best fixed row (tsv) and plain CAT


def size_regime(fraction: float, k: int) -> str:
    return f"{100 * fraction:g}% skill data" + (f" + k={k} target" if k else "")


def all_regimes(cfg: Config) -> dict[str, tuple[float, int]]:
    """Every calibration regime a row may use -> (fraction of each skill's training data, k target examples)."""
    out = {name: (cfg.calib_fraction if paper else 0.0, k) for name, (paper, k) in REGIMES.items()}
    for fraction in cfg.calib_fractions:
        for k in cfg.calib_size_k:
            out.setdefault(size_regime(fraction, k), (fraction, k))
    return out


def calib_steps(cfg: Config, n_examples: int) -> int:
    """Optimizer steps of a fit or control: ``cfg.fit_steps``, or one pass over a larger calibration set."""
    return max(cfg.fit_steps, math.ceil(n_examples / cfg.fit_batch))


def fresh_control(regime: str, priority: int = 0) -> Row:
    """The fresh LoRA trained on the regime's calibration data (with the seed's other LoRAs)."""
    return Row(f"control: fresh LoRA [{regime}]", "adapter", (f"fresh_{slug_of(regime)}",), regime=regime, priority=priority)


def slug_of(name: str) -> str:
    from examples.skill_composition.merges import slug

    return slug(name)


def fit_row(name: str, sources: tuple[str, ...], regime: str, priority: int, **fit) -> Row:
    n = len(sources)
    return Row(name, "fit", sources, (1 / n,) * n, fit=fit, regime=regime, priority=priority)


def pool_rows(cfg: Config) -> list[Row]:
    pool = (*SKILLS, *cfg.distractors)
    n = len(pool)
    out = [Row(f"{d} LoRA", "adapter", (d,)) for d in cfg.distractors]
    out.append(Row(f"pool: cat uniform 1/{n}", "merge", pool, (1 / n,) * n, "cat", priority=1))
    out += [Row(name, "merge", SKILLS, (0.5, 0.5), name.split()[0], priority=1) for name in FIXED_TWO]
    for regime in cfg.pool_regimes:
        out += [
            fit_row(f"pool: cat fit softmax [{regime}]", pool, regime, 1, constraint="softmax"),
            fit_row(f"pool: cat fit free [{regime}]", pool, regime, 1, constraint="free"),
            fit_row(f"pool: lorahub [{regime}]", pool, regime, 3, search="lorahub"),
            Row(
                f"pool: soupkit sweep, cat weights, TPE [{regime}]",
                "search",
                pool,
                (1 / n,) * n,
                fit={"methods": ["cat"], "weights": list(cfg.pool_search_weights)},
                regime=regime,
                priority=4,  # the longest rows: taken once every other row is taken
            ),
            fresh_control(regime, 1),
            # the same fits over math + code alone, for comparison (shared with the granularity stage)
            fit_row(f"cat fit softmax [{regime}]", SKILLS, regime, 1, constraint="softmax"),
            fit_row(f"cat fit free [{regime}]", SKILLS, regime, 1, constraint="free"),
        ]
    return out


def granularity_rows(cfg: Config) -> list[Row]:
    out = []
    for regime in cfg.pool_regimes:
        for constraint in ("softmax", "free"):
            for gran in cfg.granularities:
                label = f"cat fit {constraint}" + ("" if gran == "module" else f", per {gran}")
                out.append(fit_row(f"{label} [{regime}]", SKILLS, regime, 2, constraint=constraint, granularity=gran))
    return out


def calib_rows(cfg: Config) -> list[Row]:
    out = []
    for k in cfg.calib_size_k:
        for fraction in cfg.calib_fractions:
            regime = size_regime(fraction, k)
            out += [fit_row(f"cat fit softmax [{regime}]", SKILLS, regime, 3, constraint="softmax"), fresh_control(regime, 3)]
    return out


def search_rows(cfg: Config) -> list[Row]:
    from soupkit.methods import REGISTRY

    methods = sorted(REGISTRY)
    spaces = ["full", "core"] if any("space" in REGISTRY[m].Params.model_fields for m in methods) else ["full"]
    n_val = cfg.val_composite
    return [
        Row(
            f"soupkit sweep: every method, TPE (chosen with {n_val} target examples)",
            "search",
            SKILLS,
            (0.5, 0.5),
            "cat",
            fit={"methods": methods, "space": spaces, "weights": list(cfg.search_weights)},
            regime="validation",
            priority=-1,  # long: started first, so that it ends in time
        ),
        Row(f"cat sweep (chosen with {n_val} target examples)", "sweep", SKILLS, priority=1),
        Row("data-mix LoRA", "adapter", ("mix",), priority=0),
        *[Row(name, "merge", SKILLS, (0.5, 0.5), name.split()[0], priority=1) for name in FIXED_TWO],
    ]


def select_rows(cfg: Config, stages: tuple[str, ...]) -> list[Row]:
    """The rows of ``stages``, each once (first occurrence), in table order."""
    out = [Row("base", "base"), Row("math LoRA", "adapter", ("math",)), Row("code LoRA", "adapter", ("code",))]
    makers = {"core": rows, "pool": pool_rows, "granularity": granularity_rows, "calib": calib_rows, "search": search_rows}
    for stage in STAGES:
        if stage in stages:
            out += makers[stage](cfg)
    seen, unique = set(), []
    for row in out:
        if row.name not in seen:
            seen.add(row.name)
            unique.append(row)
    return unique


def needed_adapters(cfg: Config, stages: tuple[str, ...]) -> list[str]:
    """The trained LoRAs the selected rows read (skills first, then controls), in training order."""
    names = ["math", "code"]
    if "core" in stages or "search" in stages:
        names.append("mix")
    if "pool" in stages:
        names += list(cfg.distractors)
    names += sorted({r.sources[0] for r in select_rows(cfg, stages) if r.kind == "adapter" and r.sources[0].startswith("fresh_")})
    return names
