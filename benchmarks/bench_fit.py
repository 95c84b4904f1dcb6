"""fit-alpha on GPUs: the fitting step's speed and memory, and data-parallel equivalence.

    python benchmarks/bench_fit.py step   # one GPU: Llama-7B-shaped random bf16 model, 2 x rank-32 adapters
    python benchmarks/bench_fit.py dp     # >= 2 GPUs: accelerate launch, 1 vs 2 processes, same global batch
    python benchmarks/bench_fit.py fsdp   # >= 2 GPUs: sharded Llama-3-70B/8B shapes vs the floor, FSDP vs DDP (bench_fit_fsdp.py)
    python benchmarks/bench_fit.py fsdp-check  # >= 2 GPUs: FSDP2 config vs 1 process; bf16 drift vs repeat and seed spread
    python benchmarks/bench_fit.py host-memory  # CPU: peak host RSS per process, sharded vs whole-model loading
    python benchmarks/bench_fit.py bf16-determinism  # one GPU: run-to-run spread of the bf16 logits gradient per attention backend

``step`` times forward+backward (+ the Adam step on the logits) on batch 8 x 512 tokens for three
models built in the same process, on the same base weights: the no-adapter floor (gradient taken
w.r.t. the input embeddings, so backward runs through every layer as in fitting), soupkit's
``CatFitModel`` (one concatenated path per module), and one path per adapter written plainly as
the LoRA Soups code does (``y += softmax(w)_i * s_i * B_i(A_i x)``). It prints one table and
writes bench_fit_step.json (to $OUT if set).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]  # LoRA Soups' targets
RANK, SCALE, BATCH, SEQ = 32, 2.0, 8, 512
OUT = Path(os.environ.get("OUT", "."))


def llama7b() -> nn.Module:
    """A Llama-7B-shaped causal LM (32 layers, 4096 hidden, 11008 MLP, 32k vocab), random bf16, on the GPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.requires_grad_(False)
    return model.eval()


def random_adapters(base: nn.Module) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Two rank-32 adapters per target module: (A (r, d_in), s * B (d_out, r)), bf16 on the GPU."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    out = {}
    for name, module in base.named_modules():
        if name.rsplit(".", 1)[-1] in TARGETS:
            d_out, d_in = module.weight.shape
            out[name] = [
                (
                    torch.randn(RANK, d_in, device="cuda", generator=gen, dtype=torch.bfloat16) / d_in**0.5,
                    SCALE * torch.randn(d_out, RANK, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.01,
                )
                for _ in range(2)
            ]
    return out


def token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, float32 (the same for every variant)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


class PerAdapterPaths:
    """One path per adapter, as LoRA Soups' layer.py does: y += softmax(w)_i * s_i * B_i(A_i(dropout_i(x))).

    ``dropout`` 0.05 is the skill adapters' lora_dropout, active while LoRA Soups fits (train mode);
    0 gives the same paths without it.
    """

    def __init__(self, base: nn.Module, factors: dict, dropout: float = 0.0) -> None:
        self.dropout = dropout
        self.logits = torch.zeros(len(factors), 2, device="cuda", requires_grad=True)
        self.handles = []
        for m, (name, pairs) in enumerate(factors.items()):
            self.handles.append(base.get_submodule(name).register_forward_hook(self._hook(m, pairs)))

    def _hook(self, m: int, pairs: list):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            w = self.logits[m].softmax(-1)
            for i, (A, B) in enumerate(pairs):
                x = F.dropout(args[0], self.dropout) if self.dropout else args[0]
                output = output + w[i] * F.linear(F.linear(x, A), B)  # s_i is folded into B
            return output

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def timed(step, steps: int = 10, warmup: int = 3) -> tuple[float, int]:
    """tokens/s and peak bytes of ``step()`` (one forward+backward on BATCH x SEQ tokens)."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return BATCH * SEQ * steps / (time.perf_counter() - start), torch.cuda.max_memory_allocated()


class FitSetup:
    """The Llama-7B-shaped base, two rank-32 adapters, one batch, and the CAT model (its paths detached)."""

    def __init__(self) -> None:
        from soupkit.fit.model import CatFitModel, TargetModule

        self.base = llama7b()
        self.factors = random_adapters(self.base)
        gen = torch.Generator(device="cuda").manual_seed(2)
        self.ids = torch.randint(0, 32000, (BATCH, SEQ), device="cuda", generator=gen)
        self.mask = torch.ones_like(self.ids)
        self.weights_bytes = torch.cuda.memory_allocated()  # model + adapters, before the CAT model's copies
        targets = [TargetModule(name, int(name.split(".")[2]), (0, 1), (RANK, RANK)) for name in self.factors]
        self.cat = CatFitModel(self.base, targets, list(self.factors.values()), 2, "module", "softmax").cuda()
        self.cat.detach_paths()  # attached only while its own variant runs

    def floor(self, attention_mask: torch.Tensor | None = None) -> None:
        """One forward+backward of the base alone (gradients reach the input embeddings)."""
        embeds = self.base.get_input_embeddings()(self.ids).detach().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = self.base(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).logits
            token_loss(logits, self.ids).backward()


def bench_step() -> None:
    setup = FitSetup()
    base, factors, ids, mask, cat = setup.base, setup.factors, setup.ids, setup.mask, setup.cat
    floor = setup.floor
    cat_opt = torch.optim.Adam([cat.logits], lr=5e-2)

    def soupkit_step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, count = cat(ids, mask, ids)
        (loss / count).backward()
        cat_opt.step()
        cat_opt.zero_grad(set_to_none=True)

    rows = {}
    for _round in range(2):  # two rounds, interleaved: the second is reported (clocks and allocator settled)
        rows["floor (no adapters)"] = timed(floor)
        cat.attach_paths()
        rows["soupkit: one concatenated path"] = timed(soupkit_step)
        cat.detach_paths()
        for label, dropout in (("one path per adapter", 0.0), ("one path per adapter, dropout 0.05", 0.05)):
            plain = PerAdapterPaths(base, factors, dropout)
            plain_opt = torch.optim.Adam([plain.logits], lr=5e-2)

            def per_adapter_step(opt: torch.optim.Optimizer = plain_opt) -> None:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    token_loss(base(input_ids=ids, attention_mask=mask, use_cache=False).logits, ids).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            rows[label] = timed(per_adapter_step)
            plain.remove()
    report(rows, setup.weights_bytes)


def bench_profile() -> None:
    """Where fit-alpha's step loses to the floor (issue 22): tokens/s of variants that each add one part
    of the soupkit step to the floor, then torch.profiler's top CUDA kernels of the floor and the step."""
    from torch.profiler import ProfilerActivity, profile

    setup = FitSetup()
    ids, mask, cat, floor = setup.ids, setup.mask, setup.cat, setup.floor
    opt = torch.optim.Adam([cat.logits], lr=5e-2)

    def step(optimizer: bool = True, attention_mask: torch.Tensor | None = mask) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, count = cat(ids, attention_mask, ids)
        (loss / count).backward()
        if optimizer:
            opt.step()
        opt.zero_grad(set_to_none=True)

    variants = {
        "floor": floor,
        "floor + attention mask": lambda: floor(mask),
        "soupkit step": step,
        "soupkit step, no optimizer": lambda: step(False),
        "soupkit step, no attention mask": lambda: step(True, None),
    }
    for _round in range(2):  # the second round is printed
        rows = {}
        for name, fn in variants.items():
            if name.startswith("soupkit"):
                cat.attach_paths()
            rows[name] = timed(fn)[0]
            cat.detach_paths()
    for name, tps in rows.items():
        print(f"{name:40s} {tps:10.0f} tokens/s  {tps / rows['floor']:.3f}x floor")
    for name in ("floor", "soupkit step"):
        if name.startswith("soupkit"):
            cat.attach_paths()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                variants[name]()
            torch.cuda.synchronize()
        cat.detach_paths()
        print(f"--- {name}: top CUDA kernels over 3 steps")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))


def report(rows: dict[str, tuple[float, int]], weights_bytes: int) -> None:
    gib = 2**30
    floor_tps = rows["floor (no adapters)"][0]
    cat_tps, cat_mem = rows["soupkit: one concatenated path"]
    print(
        f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; batch {BATCH} x {SEQ} tokens; model + adapters {weights_bytes / gib:.1f} GiB"
    )
    print(f"{'variant':38s} {'tokens/s':>10s} {'peak GiB':>9s}")
    for name, (tps, mem) in rows.items():
        print(f"{name:38s} {tps:10.0f} {mem / gib:9.1f}")
    ratios = {"speed_vs_floor": cat_tps / floor_tps}
    for label in ("one path per adapter", "one path per adapter, dropout 0.05"):
        tps, mem = rows[label]
        ratios[f"speed_vs[{label}]"], ratios[f"memory_vs[{label}]"] = cat_tps / tps, cat_mem / mem
        print(
            f"soupkit vs {label}: tokens/s {cat_tps / tps:.2f}x (target >= 1.3), peak memory {cat_mem / mem:.2f}x (target <= 0.65)"
        )
    print(f"soupkit tokens/s vs the floor: {cat_tps / floor_tps:.2f}x (target >= 0.9)")
    result = {
        "device": torch.cuda.get_device_name(),
        "batch": BATCH,
        "seq": SEQ,
        "rank": RANK,
        "targets": TARGETS,
        "rows": {k: {"tokens_per_s": round(v[0], 1), "peak_bytes": v[1]} for k, v in rows.items()},
        **ratios,
    }
    (OUT / "bench_fit_step.json").write_text(json.dumps(result, indent=2))


def bench_dp(work: Path = Path("/tmp/fitdp")) -> None:
    """Same global batch (16) on 1 process (8 x accum 2) and 2 processes (8 each): compare weights, speed."""
    from benchmarks.bench_fit_fsdp import write_fit_workspace

    write_fit_workspace(work, SEQ)
    common = [
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
        str(SEQ),
        "--eval-every",
        "10",
        "--patience",
        "10",
        "--overwrite",
    ]
    results = {}
    for precision in ("fp32", "bf16"):
        runs = {
            f"1gpu-{precision}": [sys.executable, "-m", "soupkit", *common, "--grad-accum", "2"],
            f"2gpu-{precision}": [
                "accelerate",
                "launch",
                "--num_processes",
                "2",
                "--multi_gpu",
                "-m",
                "soupkit",
                *common,
                "--grad-accum",
                "1",
            ],
        }
        for name, cmd in runs.items():
            subprocess.run([*cmd, "--precision", precision, "-o", f"{name}.yaml"], cwd=work, check=True)
            results[name] = json.loads((work / f"{name}-report" / "fit_report.json").read_text())
    summary = {}
    for precision in ("fp32", "bf16"):
        one, two = results[f"1gpu-{precision}"], results[f"2gpu-{precision}"]
        diff = max(abs(one["weights"][p][a] - two["weights"][p][a]) for p in one["weights"] for a in one["weights"][p])
        moved = max(abs(w - 0.5) for p in one["weights"].values() for w in p.values())
        summary[precision] = {
            "max_abs_weight_diff": diff,
            "max_weight_move_from_init": moved,
            "tokens_per_s_1gpu": one["tokens_per_s"],
            "tokens_per_s_2gpu": two["tokens_per_s"],
            "scaling": two["tokens_per_s"] / one["tokens_per_s"],
            "heldout_fitted_1gpu": one["heldout_loss"]["fitted"],
            "heldout_fitted_2gpu": two["heldout_loss"]["fitted"],
        }
        print(
            f"{precision}: max |w_1gpu - w_2gpu| = {diff:.2e} (weights moved up to {moved:.3f} from 0.5); tokens/s 1 GPU "
            f"{one['tokens_per_s']:.0f}, 2 GPUs {two['tokens_per_s']:.0f} ({summary[precision]['scaling']:.2f}x); held-out "
            f"{one['heldout_loss']['fitted']:.5f} vs {two['heldout_loss']['fitted']:.5f}"
        )
    summary["device"] = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}"
    (OUT / "bench_fit_dp.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    from benchmarks.bench_fit_fsdp import bench_bf16_determinism, bench_fsdp, bench_fsdp_check, bench_host_memory

    modes = {
        "step": bench_step,
        "profile": bench_profile,
        "dp": bench_dp,
        "fsdp": bench_fsdp,
        "fsdp-check": bench_fsdp_check,
        "bf16-determinism": bench_bf16_determinism,
        "host-memory": bench_host_memory,
    }
    modes[sys.argv[1] if len(sys.argv) > 1 else "step"]()
