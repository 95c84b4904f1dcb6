"""Run the skill-composition experiment end to end.

    python -m examples.skill_composition.run --out results/skill_composition          # full run, one GPU
    python -m examples.skill_composition.run --out /tmp/skc --smoke                   # CI-sized, CPU

Stages cache their outputs under ``--out`` and are skipped when present, so a run split over
several calls resumes: ``base/`` (pretrained model + pretrain.json), ``seed<N>/rows.json`` (every
row of one seed), then ``results.json``, ``table.md`` and ``chart.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch

from examples.skill_composition import data as D
from examples.skill_composition.analysis import adapter_stats
from examples.skill_composition.config import FULL, SMOKE, Config
from examples.skill_composition.merges import NotAvailable, Row, fitted_weight_stats, rows, run_row
from examples.skill_composition.model import CharCodec, device_of, generate, load_base, pretrain, random_lora, train_lora
from examples.skill_composition.report import write_report
from examples.skill_composition.safe_eval import program_shape, score_math, score_program

EVAL_SEED = 10_000  # evaluation sets are the same for every training seed


T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.0f} s] {msg}", flush=True)


def stage_base(cfg: Config, out: Path) -> dict:
    """Pretrain the base once (seed ``cfg.base_seed``); cached in ``out/base``."""
    base_dir, meta = out / "base", out / "base" / "pretrain.json"
    if meta.is_file():
        return json.loads(meta.read_text())
    shutil.rmtree(base_dir, ignore_errors=True)
    t0 = time.time()
    corpus = D.pretrain_corpus(cfg.corpus_docs, cfg.base_seed)
    info = pretrain(cfg, corpus, base_dir, log)
    info["seconds_total"] = time.time() - t0
    meta.write_text(json.dumps(info, indent=1) + "\n")
    return info


def splits(cfg: Config, seed: int) -> dict[str, list[D.Example]]:
    math, code = D.make_split("math", cfg.train_per_skill, seed), D.make_split("code", cfg.train_per_skill, seed)
    n_cal = max(1, round(cfg.calib_fraction * cfg.train_per_skill))
    return {
        "math": math,
        "code": code,
        "mix": math + code,
        "calib": math[:n_cal] + code[:n_cal],
        "eval_math": D.make_split("math", cfg.eval_math, EVAL_SEED),
        "eval_code": D.make_split("code", cfg.eval_code, EVAL_SEED),
        "eval_composite": D.make_split("composite", cfg.eval_composite, EVAL_SEED),
    }


def train_adapters(cfg: Config, base, seed_dir: Path, sets: dict, seed: int) -> dict:
    """Skill LoRAs, data-mix (the steps of both on the union), calib control, two random LoRAs."""
    adapters, info = seed_dir / "adapters", {}
    steps = {"math": cfg.lora_steps, "code": cfg.lora_steps, "mix": 2 * cfg.lora_steps, "calib": cfg.lora_steps}
    for name, n in steps.items():
        log(f"[seed {seed}] LoRA '{name}': {len(sets[name])} examples, {n} steps")
        # Same init seed for every LoRA of this run (as PEFT users get by default): shared A init.
        info[name] = train_lora(base, cfg, sets[name], n, 1000 + seed, adapters / name, log)
    for k, name in enumerate(["rand_a", "rand_b"]):
        random_lora(base, cfg, 5000 + 10 * seed + k, adapters / ("math", "code")[k], adapters / name)
    return info


def evaluate(model, cfg: Config, sets: dict, codec: CharCodec) -> tuple[dict, dict]:
    """Accuracy and format rates on the three evaluation sets; a few sample generations."""
    metrics, samples = {}, {}
    for task, max_new in zip(("math", "code", "composite"), cfg.max_new):
        examples = sets[f"eval_{task}"]
        outs = generate(model, codec, [e.prompt for e in examples], max_new, cfg.gen_batch)
        scorer = score_math if task == "math" else score_program
        scored = [scorer(o, e.answer) for o, e in zip(outs, examples)]
        metrics[f"{task}_acc"] = sum(ok for _, ok in scored) / len(scored)
        metrics[f"{task}_valid"] = sum(valid for valid, _ in scored) / len(scored)
        if task == "composite":  # partial credit: the story's operators / numbers, in order
            shapes = [(program_shape(o), program_shape(e.completion)) for o, e in zip(outs, examples)]
            metrics["composite_ops"] = sum(p is not None and p[0] == g[0] for p, g in shapes) / len(shapes)
            metrics["composite_numbers"] = sum(p is not None and p[1] == g[1] for p, g in shapes) / len(shapes)
        samples[task] = [{"prompt": e.prompt[-90:], "output": o[:160], "answer": e.answer} for e, o in zip(examples[:3], outs)]
    return metrics, samples


def model_for(row: Row, base, adapter_dir: Path | None):
    """The base with ``adapter_dir`` folded in through PEFT (a copy; the base is untouched)."""
    if adapter_dir is None:
        return base
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir)).merge_and_unload().eval()


def run_one_row(row: Row, ctx: dict) -> dict:
    cfg, seed_dir, seed = ctx["cfg"], ctx["seed_dir"], ctx["seed"]
    t0 = time.time()
    entry: dict = {"name": row.name, "kind": row.kind, "method": row.method if row.kind in ("merge", "fit") else None}
    try:
        adapter_dir, commands = None, []
        if row.kind == "adapter":
            adapter_dir = seed_dir / "adapters" / row.sources[0]
        elif row.kind in ("merge", "fit"):
            adapter_dir, commands, recipe = run_row(row, seed_dir, ctx["base_dir"], ctx["calib"], cfg, seed, ctx["device"])
            if row.kind == "fit":
                entry["fitted_weights"] = fitted_weight_stats(recipe)
        entry["commands"] = commands
        model = model_for(row, ctx["base"], adapter_dir)
        entry["metrics"], entry["samples"] = evaluate(model, cfg, ctx["sets"], ctx["codec"])
        entry["status"] = "ok"
    except NotAvailable as err:
        entry.update(status="not available", reason=str(err))
    entry["seconds"] = time.time() - t0
    shown = entry.get("metrics", {}).get("composite_acc")
    detail = f", composite {shown:.3f}" if shown is not None else f" ({entry.get('reason')})"
    log(f"[seed {seed}] {row.name}: {entry['status']}{detail}")
    return entry


def write_calib(sets: dict, path: Path) -> None:
    lines = [json.dumps({"prompt": e.prompt, "completion": e.completion + "</s>"}) for e in sets["calib"]]
    path.write_text("\n".join(lines) + "\n")


def stage_seed(cfg: Config, out: Path, seed: int) -> dict:
    """Train this seed's adapters, run every row, save ``seed<N>/rows.json`` (cached)."""
    seed_dir, done = out / f"seed{seed}", out / f"seed{seed}" / "rows.json"
    if done.is_file():
        return json.loads(done.read_text())
    t0 = time.time()
    device = device_of()
    base = load_base(out / "base", device)
    sets = splits(cfg, seed)
    seed_dir.mkdir(parents=True, exist_ok=True)
    training = train_adapters(cfg, base, seed_dir, sets, seed)
    calib = seed_dir / "calib.jsonl"
    write_calib(sets, calib)
    names = ("math", "code", "mix", "calib", "rand_a", "rand_b")
    stats = adapter_stats(out / "base", {n: seed_dir / "adapters" / n for n in names})
    ctx = dict(cfg=cfg, seed_dir=seed_dir, seed=seed, base=base, base_dir=out / "base", calib=calib, sets=sets)
    ctx.update(codec=CharCodec(), device=device.type)
    result = {"seed": seed, "training": training, "adapter_stats": stats, "rows": [run_one_row(r, ctx) for r in rows(cfg)]}
    result["seconds"] = time.time() - t0
    done.write_text(json.dumps(result, indent=1) + "\n")
    return result


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/skill_composition"))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: the whole pipeline on CPU in ~2 minutes")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds to run now (default: the config's)")
    parser.add_argument("--no-report", action="store_true", help="stop after the seeds (for runs split over calls)")
    parser.add_argument("--device-label", help="where the cached stages ran, when the report is written elsewhere")
    args = parser.parse_args(argv)
    cfg = SMOKE if args.smoke else FULL
    if args.seeds:
        cfg = replace(cfg, seeds=tuple(args.seeds))
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    base_info = stage_base(cfg, args.out)
    per_seed = {s: stage_seed(cfg, args.out, s) for s in cfg.seeds}
    if args.no_report:
        return None
    every = {int(p.parent.name[4:]): json.loads(p.read_text()) for p in args.out.glob("seed*/rows.json")}
    payload = {
        "command": "python -m examples.skill_composition.run" + (" --smoke" if args.smoke else ""),
        "device": args.device_label or device_name(),
        "config": cfg.to_dict(),
        "base": base_info,
        # Sum of the stages' own times (pretraining + each seed), as if run one after another.
        "stage_minutes_sum": (base_info["seconds_total"] + sum(r["seconds"] for r in every.values())) / 60,
    }
    results = write_report(args.out, payload, every | per_seed)
    log((args.out / "table.md").read_text())
    return results


if __name__ == "__main__":
    main()
