"""One row of the table: build its model (adapter, soupkit merge, fit-alpha, CAT sweep, control LoRA) and score it."""

from __future__ import annotations

import shutil
from pathlib import Path

from examples.skill_composition.merges import NotAvailable, Row, fitted_weight_stats, run_row, slug
from examples.skill_composition.model import train_lora
from examples.skill_composition.safe_eval import program_shape, score_math, score_program
from examples.skill_composition.scoring import exact

TASKS = ("math", "code", "composite")


def tasks(cfg) -> tuple[str, ...]:
    """The test sets every row is scored on: the two skills, the composite, and the distractor skills."""
    return (*TASKS, *cfg.distractors)


def generate(ctx, prompts: list[str], model=None) -> list[str]:
    model = ctx.eval_model().model if model is None else model
    return ctx.codec.generate(model, prompts, ctx.cfg.max_new, ctx.cfg.gen_batch)


def score(examples: list, outputs: list[str], task: str) -> dict:
    """Accuracy and format rate; for the composite also partial credit (operators / numbers right)."""
    if task in ("math", "code", "composite"):
        scorer = score_math if task == "math" else score_program
        scored = [scorer(o, e.answer) for o, e in zip(outputs, examples)]
    else:  # a distractor skill: the reply must equal the reference
        scored = [exact(o, e.completion) for o, e in zip(outputs, examples)]
    n = len(scored)
    metrics = {f"{task}_acc": sum(ok for _, ok in scored) / n, f"{task}_valid": sum(v for v, _ in scored) / n}
    if task == "composite":
        shapes = [(program_shape(o), program_shape(e.completion)) for o, e in zip(outputs, examples)]
        metrics["composite_ops"] = sum(p is not None and p[0] == g[0] for p, g in shapes) / n
        metrics["composite_numbers"] = sum(p is not None and p[1] == g[1] for p, g in shapes) / n
    return metrics


def evaluate_current(ctx, seed: int, model=None) -> tuple[dict, dict]:
    """Score the working model (or ``model``) on the three test sets, generated together in one batched pass."""
    sets, names = ctx.sets(seed), tasks(ctx.cfg)
    examples = {t: sets[f"eval_{t}"] for t in names}
    outputs = generate(ctx, [e.prompt for t in names for e in examples[t]], model)
    metrics, samples, at = {}, {}, 0
    for task in names:
        outs = outputs[at : at + len(examples[task])]
        at += len(outs)
        metrics.update(score(examples[task], outs, task))
        samples[task] = [
            {"prompt": e.prompt[-100:], "output": o[:200], "answer": e.answer} for e, o in zip(examples[task][:3], outs)
        ]
    return metrics, samples


def sweep(ctx, seed: int, row: Row) -> dict:
    """CAT at every (w_math, w_code) of the grid, scored on the validation composite prompts only.

    CAT of two LoRAs is exactly base + w_math dW_math + w_code dW_code (tests/test_real_model.py checks
    soupkit's cat against PEFT), so the grid is evaluated by adding the deltas in memory; the chosen pair
    is then merged by ``soupkit merge`` and reported on the test prompts."""
    from examples.skill_composition.weights import adapter_deltas

    adapters = ctx.run_dir / f"seed{seed}" / "adapters"
    dm, dc = (adapter_deltas(adapters / s, ctx.device) for s in row.sources)
    val = ctx.sets(seed)["val_composite"]
    grid = []
    for wc in ctx.cfg.sweep_code:
        for wm in ctx.cfg.sweep_math:
            ctx.eval_model().set_deltas({p: wm * dm.get(p, 0) + wc * dc.get(p, 0) for p in sorted(set(dm) | set(dc))})
            acc = score(val, generate(ctx, [e.prompt for e in val]), "composite")["composite_acc"]
            grid.append({"w_math": wm, "w_code": wc, "val_composite_acc": acc})
    ctx.eval_model().reset()
    best = max(grid, key=lambda g: g["val_composite_acc"])  # first of equals, in grid order
    return {"grid": grid, "chosen": best}


def train_control(ctx, seed: int, row: Row) -> Path:
    """A LoRA trained on the regime's calibration data for the fit's optimizer steps (fresh, or the code LoRA further)."""
    cfg, sdir = ctx.cfg, ctx.run_dir / f"seed{seed}"
    out = sdir / "adapters" / f"control_{slug(row.name)}"
    shutil.rmtree(out, ignore_errors=True)  # ours: a half-written control from an interrupted run
    start = sdir / "adapters" / row.sources[0] if row.sources else None
    examples = ctx.sets(seed)[f"calib:{row.regime}"]
    train_lora(ctx.train_base(), cfg, examples, cfg.fit_steps, 3000 + seed, out, lambda _: None, ctx.codec, start, cfg.fit_batch)
    return out


def evaluate_router(ctx, seed: int, row: Row, entry: dict) -> None:
    """The MoE baseline: routers trained on the regime's calibration data, then the routed model scored."""
    import torch

    from examples.skill_composition.moe import train_router

    adapters = [ctx.run_dir / f"seed{seed}" / "adapters" / s for s in row.sources]
    examples = ctx.sets(seed)[f"calib:{row.regime}"]
    model, entry["router"] = train_router(ctx.train_base(), adapters, examples, ctx.cfg, ctx.codec, 4000 + seed, lambda _: None)
    entry["fitted_weights"] = entry["router"]["gates"]  # mean gate per adapter, over layers (calibration tokens)
    if ctx.device.type == "cuda":
        model.to(torch.bfloat16)  # generate in bf16 like every other row
    entry["metrics"], entry["samples"] = evaluate_current(ctx, seed, model)


def evaluate_row(ctx, seed: int, row: Row) -> dict:
    sdir = ctx.run_dir / f"seed{seed}"
    entry: dict = {
        "name": row.name,
        "kind": row.kind,
        "method": row.method if row.kind in ("merge", "fit") else None,
        "regime": row.regime,
        "commands": [],
    }
    try:
        adapter = None
        if row.kind == "moe":
            evaluate_router(ctx, seed, row, entry)
            entry["status"] = "ok"
            return entry
        if row.kind == "adapter":
            adapter = sdir / "adapters" / row.sources[0]
        elif row.kind == "train":
            adapter = train_control(ctx, seed, row)
        elif row.kind == "search":
            from examples.skill_composition.sweeps import run_sweep

            adapter = run_sweep(ctx, seed, row, entry)
        elif row.kind == "sweep":
            entry["sweep"] = chosen = sweep(ctx, seed, row)
            pair = (chosen["chosen"]["w_math"], chosen["chosen"]["w_code"])
            row = Row(row.name, "merge", row.sources, pair, "cat")
        if row.kind in ("merge", "fit"):
            adapter, entry["commands"], recipe = run_row(row, sdir, ctx.base_dir, ctx.cfg, seed, ctx.device.type)
            if row.kind == "fit":
                entry["fitted_weights"] = fitted_weight_stats(recipe)
                entry["fit_report"] = str(recipe.with_name(recipe.stem + "-report").relative_to(ctx.run_dir))
        ctx.eval_model().set_adapter(adapter)
        entry["metrics"], entry["samples"] = evaluate_current(ctx, seed)
        entry["status"] = "ok"
    except NotAvailable as err:
        entry.update(status="not available", reason=str(err))
    finally:
        ctx.eval_model().reset()
    return entry
