"""fit-alpha on a base sharded over GPUs (FSDP2): tokens/s and peak memory next to the no-adapter floor.

    python benchmarks/bench_fit.py fsdp      # every visible GPU (>= 2); writes bench_fit_fsdp.json to $OUT

Each row is one ``torchrun`` launch (one process per GPU) that builds the model directly sharded on
the GPUs: base and factors on the meta device, ``fully_shard`` (soupkit.fit.shard: one unit per
block, embeddings, root), storage for each rank's shards only, random weights (seeded per rank).
No checkpoint file is read. Rows:

- Llama-3-70B shape (hidden 8192, 80 layers, MLP 28672, 64 heads, 8 KV heads, vocab 128256), bf16,
  FSDP, activation checkpointing, 1 x 2048 tokens per GPU: the no-adapter floor (forward+backward
  with the gradient taken w.r.t. the input embeddings, so backward crosses every block as in
  fitting) and soupkit's fit step (two rank-32 adapters on q/k/v/up/down, one concatenated path
  per module, Adam on the replicated logits, their gradient all-reduced);
- Llama-3-8B shape, 2 x 2048 tokens per GPU, no checkpointing: the same two variants under FSDP
  and under DDP (each GPU holds the whole model).

The 70B floor and soupkit run in separate launches (two 70B models do not fit at once).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
RANK, SEQ = 32, 2048
SHAPES = {
    "llama3-70b": {
        "hidden_size": 8192,
        "num_hidden_layers": 80,
        "intermediate_size": 28672,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
    },
    "llama3-8b": {
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
    },
    "tiny": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },  # CPU smoke
}
# (shape, parallelism, sequences of SEQ tokens per GPU, activation checkpointing, variant)
RUNS = [
    ("llama3-70b", "fsdp", 1, True, "floor"),
    ("llama3-70b", "fsdp", 1, True, "soupkit"),
    ("llama3-8b", "fsdp", 2, False, "floor,soupkit"),  # 8B: both variants in one launch (2 x 8 GiB fit at once)
    ("llama3-8b", "ddp", 2, False, "floor,soupkit"),
]
OUT = Path(os.environ.get("OUT", "."))


def llama_config(shape: str):
    from transformers import LlamaConfig

    return LlamaConfig(
        **SHAPES[shape], vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False
    )


def fit_targets(base: nn.Module) -> list:
    from soupkit.fit.model import TargetModule

    names = [n for n, _ in base.named_modules() if n.rsplit(".", 1)[-1] in TARGETS]
    return [TargetModule(n, int(n.split(".")[2]), (0, 1), (RANK, RANK)) for n in names]


def random_fill(model: nn.Module, skip: set[int], seed: int) -> None:
    """Random weights in each rank's shards: norms 1, factors A ~ N(0, 1/d_in), the rest N(0, 0.02^2)."""
    from torch.distributed.tensor import DTensor

    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if id(p) in skip:
                continue
            local = p.to_local() if isinstance(p, DTensor) else p.data
            if p.dim() == 1:
                local.fill_(1.0)
            else:
                std = p.shape[1] ** -0.5 if name.endswith("factors.A") else 0.02
                local.normal_(0.0, std, generator=gen)


def sharded_floor(config, device: torch.device, checkpointing: bool) -> nn.Module:
    """The plain base, sharded as soupkit shards the fit model (blocks, embeddings, root)."""
    from accelerate import init_empty_weights
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    from soupkit.fit.shard import device_mesh, enable_checkpointing, module_buffers, transformer_blocks

    with init_empty_weights(include_buffers=False):
        base = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    base.requires_grad_(False)
    if checkpointing:
        enable_checkpointing(base)
    mesh = device_mesh(device, dist.get_world_size())
    for block in transformer_blocks(base):
        fully_shard(block, mesh=mesh)
    fully_shard(base.get_input_embeddings(), mesh=mesh)
    fully_shard(base, mesh=mesh, reshard_after_forward=False)
    buffers = [(sub, name, buf.clone()) for sub, name, buf in module_buffers(base)]
    base.to_empty(device=device)
    for sub, name, buf in buffers:
        sub._buffers[name] = buf.to(device)
    return base.eval()


def build(shape: str, parallel: str, variant: str, checkpointing: bool, device: torch.device):
    """(model, optimizer or None): the floor base or soupkit's fit model, sharded or whole."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from soupkit.fit.model import CatFitModel
    from soupkit.fit.shard import enable_checkpointing, materialise_sharded, meta_fit_model

    config, rank = llama_config(shape), dist.get_rank()
    with init_empty_weights():
        targets = fit_targets(AutoModelForCausalLM.from_config(config))
    if parallel == "fsdp":
        if variant == "floor":
            model = sharded_floor(config, device, checkpointing)
            random_fill(model, set(), seed=rank)
            return model, None
        model = materialise_sharded(
            meta_fit_model(config, targets, 2, "module", "softmax", torch.bfloat16), device, checkpointing
        )
        random_fill(model, {id(model.logits)}, seed=rank)
        return model, torch.optim.Adam([model.logits], lr=5e-2)
    torch.manual_seed(0)
    with torch.device(device):
        base = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    base.requires_grad_(False)
    if checkpointing:
        enable_checkpointing(base)
    if variant == "floor":
        return base, None
    gen = torch.Generator(device=device).manual_seed(1)
    factors = []
    for t in targets:
        d_out, d_in = base.get_submodule(t.path).weight.shape
        factors.append(
            [
                (
                    torch.randn(RANK, d_in, device=device, generator=gen) / d_in**0.5,
                    0.02 * torch.randn(d_out, RANK, device=device, generator=gen),
                )
                for _ in range(2)
            ]
        )
    model = CatFitModel(base, targets, factors, 2, "module", "softmax").to(device)
    ddp = nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
    )
    return ddp, torch.optim.Adam([model.logits], lr=5e-2)


def step_fn(model: nn.Module, optimizer, variant: str, parallel: str, ids: torch.Tensor):
    """One forward+backward (+ for soupkit the logits' gradient sync and Adam step)."""
    from soupkit.fit.shard import sync_logit_grads

    mask = torch.ones_like(ids)
    if variant == "floor":  # gradient w.r.t. the input embeddings: backward crosses every block
        model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.detach().requires_grad_(True))

        def floor() -> None:
            with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=ids.is_cuda):
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).backward()

        return floor

    def soupkit() -> None:
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=ids.is_cuda):
            loss, count = model(ids, mask, ids)
        (loss / count).backward()
        if parallel == "fsdp":
            sync_logit_grads(model, dist.get_world_size())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return soupkit


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def child(shape: str, parallel: str, batch: int, checkpointing: bool, variants: str) -> None:
    """One launch, one process per GPU: per variant build, warm up, time; rank 0 prints one JSON line each."""
    local = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl", device_id=device)
    else:  # CPU smoke test of this script (tiny shape, gloo)
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    for variant in variants.split(","):
        row = time_variant(shape, parallel, batch, checkpointing, variant, device)
        if dist.get_rank() == 0:
            print("ROW " + json.dumps(row), flush=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    dist.destroy_process_group()


def time_variant(shape: str, parallel: str, batch: int, checkpointing: bool, variant: str, device: torch.device) -> dict:
    start = time.perf_counter()
    model, optimizer = build(shape, parallel, variant, checkpointing, device)
    sync(device)
    build_s = time.perf_counter() - start
    seq = SEQ if device.type == "cuda" else 16
    ids = torch.randint(
        0, 128256, (batch, seq), device=device, generator=torch.Generator(device=device).manual_seed(10 + dist.get_rank())
    )
    step = step_fn(model, optimizer, variant, parallel, ids)
    warmup, steps = (2, 4) if shape == "llama3-70b" else (3, 8)
    for _ in range(warmup):
        step()
    sync(device)
    dist.barrier()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.tensor(
        [torch.cuda.max_memory_allocated() if cuda else 0, torch.cuda.max_memory_reserved() if cuda else 0],
        device=device,
        dtype=torch.float64,
    )
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    world = dist.get_world_size()
    del model, optimizer, step
    return {
        "shape": shape,
        "parallel": parallel,
        "variant": variant,
        "checkpointing": checkpointing,
        "gpus": world,
        "tokens_per_gpu": batch * seq,
        "tokens_per_s": round(world * batch * seq * steps / seconds, 1),
        "peak_allocated_gib": round(float(peak[0]) / 2**30, 2),
        "peak_reserved_gib": round(float(peak[1]) / 2**30, 2),
        "build_s": round(build_s, 1),
        "timed_steps": steps,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
    }


def bench_fsdp() -> None:
    """Launch every row with torchrun on all visible GPUs; print the table; write bench_fit_fsdp.json."""
    gpus = torch.cuda.device_count()
    if gpus < 2:
        raise SystemExit(f"bench_fit.py fsdp needs >= 2 GPUs, found {gpus}")
    only = os.environ.get("BENCH_FSDP_ONLY")  # e.g. "llama3-8b": run those rows only
    rows = []
    for shape, parallel, batch, ckpt, variants in RUNS:
        if only and only not in shape:
            continue
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(gpus),
            "--master_port",
            "29651",
            __file__,
            shape,
            parallel,
            str(batch),
            str(int(ckpt)),
            variants,
        ]
        try:
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=150 if "70b" in shape else 90)
            out, err, code = proc.stdout, proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as exc:
            out, err, code = str(exc.stdout or ""), str(exc.stderr or ""), "timeout"
        for line in out.splitlines():
            if line.startswith("ROW "):
                rows.append(json.loads(line[4:]))
                print(json.dumps(rows[-1]), flush=True)
        if code:
            print(f"{shape} {parallel} {variants}: failed (exit {code})\n{err[-3000:]}", flush=True)
            rows.append({"shape": shape, "parallel": parallel, "variant": variants, "failed": err[-1500:]})
    summary = report(rows)
    (OUT / "bench_fit_fsdp.json").write_text(json.dumps({"rows": rows, "summary": summary}, indent=2))


def report(rows: list[dict]) -> dict:
    ok = {(r["shape"], r["parallel"], r["variant"]): r for r in rows if "failed" not in r}
    print(f"\n{'shape':11s} {'parallel':8s} {'variant':8s} {'ckpt':>4s} {'tok/GPU':>7s} {'tokens/s':>9s} {'peak GiB/GPU':>12s}")
    for r in ok.values():
        print(
            f"{r['shape']:11s} {r['parallel']:8s} {r['variant']:8s} {str(r['checkpointing'])[0]:>4s} {r['tokens_per_gpu']:7d} "
            f"{r['tokens_per_s']:9.0f} {r['peak_allocated_gib']:12.1f}"
        )
    summary = {}
    for shape, parallel in {(s, p) for s, p, _ in ok}:
        floor, cat = ok.get((shape, parallel, "floor")), ok.get((shape, parallel, "soupkit"))
        if floor and cat:
            ratio = cat["tokens_per_s"] / floor["tokens_per_s"]
            summary[f"{shape}/{parallel}"] = {
                "speed_vs_floor": round(ratio, 3),
                "memory_vs_floor": round(cat["peak_allocated_gib"] / floor["peak_allocated_gib"], 3),
            }
            print(f"{shape} {parallel}: soupkit {ratio:.2f}x the floor's tokens/s (target >= 0.85)")
    if ok:
        print(f"device: {next(iter(ok.values()))['gpus']} x {next(iter(ok.values()))['device']}")
    return summary


def write_fit_workspace(work: Path, seq: int | None) -> None:
    """The fit benchmarks' inputs in ``work``: an 8-layer Llama (hidden 1024) base, two rank-32 LoRAs
    ``a`` and ``b`` on TARGETS, the CAT recipe ``r.yaml``, and with ``seq`` set, ``train.jsonl`` (640)
    and ``eval.jsonl`` (64) of random printable text, ``seq`` characters each (seeded)."""
    from soupkit.testing import make_base, make_lora, tiny_llama_config

    work.mkdir(parents=True, exist_ok=True)
    config = tiny_llama_config(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=8,
        max_position_embeddings=1024,
    )
    base = make_base(work / "base", seed=0, config=config)
    for i, name in enumerate(["a", "b"]):
        make_lora(base, work / name, seed=i + 1, r=32, lora_alpha=64, target_modules=TARGETS, b_scale=2.0)
    (work / "r.yaml").write_text(
        "base_model: base\nadapters:\n  - {name: a, path: a}\n  - {name: b, path: b}\nmerge: {method: cat}\n"
    )
    if seq is None:
        return
    gen = torch.Generator().manual_seed(0)
    chars = [chr(c) for c in range(32, 127)]
    for split, n in (("train", 640), ("eval", 64)):
        lines = ["".join(chars[i] for i in torch.randint(0, len(chars), (seq,), generator=gen).tolist()) for _ in range(n)]
        (work / f"{split}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))


def fit_runs(work: Path, seq: int) -> dict[str, list[str]]:
    """fit-alpha command lines: (name -> argv); 1-process runs use accumulation 2 for the same global batch."""
    common = [
        "-m",
        "soupkit",
        "fit-alpha",
        "r.yaml",
        "--data",
        "train.jsonl",
        "--eval-data",
        "eval.jsonl",
        "--steps",
        "20",
        "--batch-size",
        "8",
        "--seq-len",
        str(seq),
        "--eval-every",
        "20",
        "--patience",
        "10",
        "--overwrite",
    ]
    one = [sys.executable, *common, "--grad-accum", "2"]
    fsdp = ["accelerate", "launch", "--config_file", str(ROOT / "examples/fsdp/accelerate_fsdp2.yaml"), *common]
    ddp = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", *common]
    return {
        "1gpu-fp32": [*one, "--precision", "fp32"],
        "1gpu-bf16": [*one, "--precision", "bf16"],
        "1gpu-bf16-repeat": [*one, "--precision", "bf16"],
        "1gpu-bf16-seed1": [*one, "--precision", "bf16", "--seed", "1"],
        "fsdp2-fp32": [*fsdp, "--precision", "fp32"],
        "fsdp2-bf16": [*fsdp, "--precision", "bf16"],
        "ddp2-bf16": [*ddp, "--precision", "bf16"],
    }


def max_weight_diff(a: dict, b: dict) -> float:
    return max(abs(a["weights"][p][k] - b["weights"][p][k]) for p in a["weights"] for k in a["weights"][p])


def max_curve_diff(a: dict, b: dict) -> float:
    """Largest |train loss difference| over the steps both ran."""
    la = {c["step"]: c["train_loss"] for c in a["loss_curve"] if "train_loss" in c}
    lb = {c["step"]: c["train_loss"] for c in b["loss_curve"] if "train_loss" in c}
    return max(abs(la[k] - lb[k]) for k in la.keys() & lb.keys())


def bench_fsdp_check(work: Path = Path("/tmp/fitfsdp"), seq: int = 512) -> None:
    """fit-alpha through the committed accelerate FSDP2 config (2 processes) against 1 process, same
    global batch; bf16: 1-process repeat (run-to-run), another seed (seed spread), DDP (last turn's path)."""
    write_fit_workspace(work, seq)
    runs = fit_runs(work, seq)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    # 1-process runs two at a time, one per GPU; then the 2-process runs
    for group in (
        ("1gpu-fp32", "1gpu-bf16"),
        ("1gpu-bf16-repeat", "1gpu-bf16-seed1"),
        ("fsdp2-fp32",),
        ("fsdp2-bf16",),
        ("ddp2-bf16",),
    ):
        procs = []
        for gpu, name in enumerate(group):
            run_env = {**env, "CUDA_VISIBLE_DEVICES": str(gpu)} if len(group) > 1 else env
            log = open(work / f"{name}.log", "w")  # noqa: SIM115 - closed below
            procs.append(
                (
                    name,
                    log,
                    subprocess.Popen(
                        [*runs[name], "-o", f"{name}.yaml"], cwd=work, env=run_env, stdout=log, stderr=subprocess.STDOUT
                    ),
                )
            )
        for name, log, proc in procs:
            if proc.wait():
                print(f"{name} failed:\n" + (work / f"{name}.log").read_text()[-3000:], flush=True)
            log.close()
    reports = {
        n: json.loads((work / f"{n}-report" / "fit_report.json").read_text())
        for n in runs
        if (work / f"{n}-report" / "fit_report.json").exists()
    }
    pairs = [
        ("1gpu-fp32", "fsdp2-fp32", "fp32: 1 GPU vs FSDP2 2 GPUs"),
        ("1gpu-bf16", "fsdp2-bf16", "bf16: 1 GPU vs FSDP2 2 GPUs"),
        ("1gpu-bf16", "ddp2-bf16", "bf16: 1 GPU vs DDP 2 GPUs"),
        ("1gpu-bf16", "1gpu-bf16-repeat", "bf16: 1 GPU vs the same run repeated"),
        ("1gpu-bf16", "1gpu-bf16-seed1", "bf16: seed 0 vs seed 1 (data order), 1 GPU"),
    ]
    summary = {
        "device": f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}",
        "pairs": {},
        "runs": {
            n: {
                **{k: r[k] for k in ("best_step", "steps", "tokens_per_s", "num_processes", "heldout_loss", "peak_memory_bytes")},
                "shard": r["options"]["shard"],
                "checkpointing": r["options"]["checkpointing"],
            }
            for n, r in reports.items()
        },
    }
    for a, b, label in pairs:
        if a in reports and b in reports:
            row = {
                "max_abs_weight_diff": max_weight_diff(reports[a], reports[b]),
                "max_abs_train_loss_diff": max_curve_diff(reports[a], reports[b]),
                "best_steps": [reports[a]["best_step"], reports[b]["best_step"]],
            }
            summary["pairs"][label] = row
            print(
                f"{label}: max |w diff| {row['max_abs_weight_diff']:.2e}, max |train loss diff| {row['max_abs_train_loss_diff']:.2e}, best steps {row['best_steps']}"
            )
    for n, r in summary["runs"].items():
        print(
            f"{n}: {r['num_processes']} proc, shard {r['shard']}, ckpt {r['checkpointing']}, {r['tokens_per_s']} tokens/s, best step {r['best_step']}, held-out {r['heldout_loss']}"
        )
    (OUT / "bench_fit_fsdp_check.json").write_text(json.dumps(summary, indent=2))


def bench_host_memory(work: Path = Path("/tmp/fitrss")) -> None:
    """Peak host RSS per process while fitting (CPU, gloo): 2 sharded processes (each reads its rows of
    a 1.0 GB float32 checkpoint in 200 MB files) vs 2 data-parallel processes and 1 process (each
    loads the whole base with from_pretrained). 2 short steps: loading dominates the peak."""
    from soupkit.testing import make_base, make_lora, tiny_llama_config

    work.mkdir(parents=True, exist_ok=True)
    config = tiny_llama_config(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=8
    )
    if not (work / "base" / "model.safetensors.index.json").exists():
        base = make_base(work / "base", seed=0, config=config, max_shard_size="200MB")
        for i, name in enumerate(["a", "b"]):
            make_lora(base, work / name, seed=i + 1, r=32, lora_alpha=64, target_modules=TARGETS, b_scale=2.0)
    (work / "r.yaml").write_text(
        "base_model: base\nadapters:\n  - {name: a, path: a}\n  - {name: b, path: b}\nmerge: {method: cat}\n"
    )
    (work / "d.jsonl").write_text("".join(json.dumps({"text": f"sample text number {i} " * 3}) + "\n" for i in range(8)))
    checkpoint = sum(f.stat().st_size for f in (work / "base").glob("*.safetensors"))
    fit = [
        "-m",
        "soupkit",
        "fit-alpha",
        "r.yaml",
        "--data",
        "d.jsonl",
        "--eval-data",
        "d.jsonl",
        "--steps",
        "2",
        "--batch-size",
        "1",
        "--seq-len",
        "32",
        "--eval-every",
        "2",
        "--device",
        "cpu",
        "--overwrite",
    ]
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29655"]
    runs = {
        "2 processes, --shard": [*two, *fit, "--shard"],
        "2 processes, data parallel": [*two, *fit],
        "1 process": [sys.executable, *fit],
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    result = {"checkpoint_bytes": checkpoint, "files": len(list((work / "base").glob("*.safetensors")))}
    for i, (label, cmd) in enumerate(runs.items()):
        subprocess.run([*cmd, "-o", f"run{i}.yaml"], cwd=work, env=env, check=True, capture_output=True)
        report = json.loads((work / f"run{i}-report" / "fit_report.json").read_text())
        result[label] = report["peak_host_rss_bytes"]
        print(
            f"{label}: peak host RSS per process {report['peak_host_rss_bytes'] / 2**30:.2f} GiB (checkpoint {checkpoint / 2**30:.2f} GiB)",
            flush=True,
        )
    (OUT / "bench_fit_host_memory.json").write_text(json.dumps(result, indent=2))


def bench_bf16_determinism(work: Path = Path("/tmp/fitdet"), seq: int = 512) -> None:
    """Is one GPU's bf16 gradient of the logits reproducible? Same weights, same batch, 4 repeats per
    attention backend; the spread is compared with the gradient itself (Adam's step is ~lr * sign(g)
    wherever |g| is below that spread, so those components take random lr-sized steps)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from soupkit.fit.model import build_fit_model
    from soupkit.recipe import load_recipe

    write_fit_workspace(work, None)
    cuda = torch.cuda.is_available()
    device, dtype = (torch.device("cuda"), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
    model, _ = build_fit_model(load_recipe(work / "r.yaml"), "module", "softmax", device, dtype)
    ids = torch.randint(0, 100, (8, seq), device=device, generator=torch.Generator(device=device).manual_seed(0))
    result = {}
    backends = {
        "default": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH],
        "flash": [SDPBackend.FLASH_ATTENTION],
        "efficient": [SDPBackend.EFFICIENT_ATTENTION],
        "math": [SDPBackend.MATH],
    }
    for label, backend in backends.items():
        grads = []
        try:
            for _ in range(4):
                model.logits.grad = None
                with sdpa_kernel(backend), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                    loss, count = model(ids, torch.ones_like(ids), ids)
                (loss / count).backward()
                grads.append(model.logits.grad.detach().clone())
        except RuntimeError as err:  # backend not available here (e.g. flash on CPU)
            print(f"{label}: unavailable ({str(err).splitlines()[0][:100]})")
            continue
        g = grads[0]
        spread = max(float((x - g).abs().max()) for x in grads[1:])
        result[label] = {
            "max_abs_grad": float(g.abs().max()),
            "median_abs_grad": float(g[g != 0].abs().median()),
            "max_run_to_run_diff": spread,
            "fraction_below_spread": float(((g.abs() < spread) & (g != 0)).float().sum() / (g != 0).sum()),
        }
        print(
            f"{label}: max |g| {result[label]['max_abs_grad']:.3e}, median |g| {result[label]['median_abs_grad']:.3e}, "
            f"run-to-run max |dg| {spread:.3e}, share of |g| below it {result[label]['fraction_below_spread']:.2f}",
            flush=True,
        )
    result["device"] = torch.cuda.get_device_name() if cuda else "cpu"
    (OUT / "bench_fit_bf16_determinism.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    child(sys.argv[1], sys.argv[2], int(sys.argv[3]), bool(int(sys.argv[4])), sys.argv[5])
