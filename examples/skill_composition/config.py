"""Every knob of the experiment in one place: SmolLM2 (the real run), the toy char model, and CPU smoke sizes.

A stage's cache folder is named by a hash of the settings that produce it (``Config.key``), so a run
with other settings never reuses another run's base, adapters or rows.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace

BASE_FIELDS = (
    "base",
    "hidden",
    "intermediate",
    "layers",
    "heads",
    "seq_len",
    "corpus_docs",
    "pretrain_steps",
    "pretrain_batch",
    "pretrain_lr",
    "base_seed",
)


@dataclass(frozen=True)
class Config:
    base: str = "smollm2"  # smollm2 (pretrained, chat) | toy (character-level Llama pretrained here)
    # toy base only: size and pretraining on the generic corpus
    hidden: int = 512
    intermediate: int = 1024
    layers: int = 8
    heads: int = 8
    seq_len: int = 320
    corpus_docs: int = 60_000
    pretrain_steps: int = 3000
    pretrain_batch: int = 64
    pretrain_lr: float = 1e-3
    base_seed: int = 0
    # skill LoRAs (PEFT); the data-mix LoRA gets the steps of both skill LoRAs on the union
    rank: int = 8
    lora_alpha: int = 16
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    lora_steps: int = 150
    lora_batch: int = 32
    lora_lr: float = 1e-3
    # data
    train_per_skill: int = 2000
    calib_fraction: float = 0.05  # regime (a): the paper's 5% of each skill's training data
    calib_k: tuple[int, ...] = (4, 16, 64)  # regime (b): k examples of the target task; (c) = (a) + k=16
    regimes: tuple[str, ...] | None = None  # calibration regimes run (None: every one whose k is in calib_k)
    eval_math: int = 64
    eval_code: int = 64
    eval_composite: int = 128
    val_composite: int = 50  # the CAT sweep's pair is chosen on these, reported on eval_composite
    # merging and fitting
    fit_steps: int = 40  # fit-alpha optimizer steps; the control LoRAs get the same number of steps
    fit_batch: int = 8
    fit_lr: float = 0.1
    lorahub_budget: int = 40  # loss evaluations, LoraHub's default
    sweep_math: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))
    sweep_code: tuple[float, ...] = (0.5, 1.0)
    fixed_weights: tuple[tuple[float, float], ...] = ((1.0, 1.0), (0.5, 0.5))  # every registered method at each
    # issue 23: the pool (math, code and these distractor skills), weight granularity, calibration size
    distractors: tuple[str, ...] = ("upper", "sort", "count", "units", "weekday", "reverse")
    eval_distractor: int = 32  # test prompts per distractor skill
    pool_regimes: tuple[str, ...] = ("5% skill data", "k=16 target")  # pool and granularity rows
    granularities: tuple[str, ...] = ("adapter", "layer", "module")
    calib_fractions: tuple[float, ...] = (0.01, 0.025, 0.05, 0.10, 0.20)
    calib_size_k: tuple[int, ...] = (0, 16)
    # issue 19: `soupkit sweep` rows (TPE); weights searched per adapter in these ranges
    search_trials: int = 40
    search_chunk: int = 10  # trials per `soupkit sweep` call (it resumes), so a deadline stops between chunks
    search_workers: int = 2  # `soupkit sweep --workers`: processes of one sweep sharing the GPU
    search_weights: tuple[float, float] = (0.0, 1.5)  # two-LoRA sweep over every method
    pool_search_weights: tuple[float, float] = (0.0, 1.0)  # pool sweep over CAT weights (8 adapters)
    deterministic: bool = True  # deterministic torch algorithms, fixed cuBLAS workspace, eager attention
    seeds: tuple[int, ...] = (0, 1, 2)
    gen_batch: int = 512
    max_new: int = 80  # generated tokens (toy: characters), every task
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def key(self, fields: tuple[str, ...] | None = None) -> str:
        """Short hash of the settings (all, or ``fields``): names the cache folders."""
        values = self.to_dict() if fields is None else {f: getattr(self, f) for f in fields}
        return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:10]


SMOLLM2 = Config()

# The earlier attempt: a 21M character-level Llama pretrained here (see docs/experiment.md).
TOY = replace(
    SMOLLM2,
    base="toy",
    targets=("q_proj", "k_proj", "v_proj", "up_proj", "down_proj"),
    lora_steps=500,
    lora_lr=5e-4,
    train_per_skill=4000,
    eval_math=200,
    eval_code=200,
    eval_composite=300,
    max_new=110,
    gen_batch=300,
)

# Small enough that the whole pipeline runs on 2 CPU cores in a few minutes (CI and dry runs).
_TINY = {
    "lora_steps": 3,
    "lora_batch": 4,
    "train_per_skill": 100,
    "eval_math": 2,
    "eval_code": 2,
    "eval_composite": 2,
    "val_composite": 2,
    "seeds": (0,),
    "gen_batch": 8,
    "max_new": 6,
    "lorahub_budget": 3,
    "fit_steps": 2,
    "fit_batch": 2,
    "calib_k": (4, 16),
    "sweep_math": (0.0, 1.0),
    "sweep_code": (1.0,),
    "eval_distractor": 2,
    "search_trials": 2,
    "search_chunk": 2,
    "search_workers": 1,
}
SMOKE = replace(
    TOY,
    hidden=32,
    intermediate=64,
    layers=2,
    heads=2,
    seq_len=128,
    corpus_docs=300,
    pretrain_steps=8,
    pretrain_batch=8,
    **{**_TINY, "calib_k": (16,), "regimes": ("k=16 target",), "fixed_weights": ((1.0, 1.0),)},
    distractors=("upper",),
    pool_regimes=("k=16 target",),
    granularities=("adapter", "module"),
    calib_fractions=(0.01,),
    calib_size_k=(16,),
)
SMOLLM2_TINY = replace(SMOLLM2, targets=("q_proj", "v_proj"), **{**_TINY, "max_new": 8, "calib_fractions": (0.01, 0.05)})
