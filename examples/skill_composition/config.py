"""Every knob of the experiment in one place: the full GPU run and the CPU smoke run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace


@dataclass(frozen=True)
class Config:
    # base model (character-level Llama) and its pretraining on the generic corpus
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
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
    lora_steps: int = 500
    lora_batch: int = 32
    lora_lr: float = 5e-4
    # data
    train_per_skill: int = 4000
    calib_fraction: float = 0.05
    eval_math: int = 200
    eval_code: int = 200
    eval_composite: int = 300
    # merging and fitting
    density: float = 0.75  # TIES/DARE density, the value LoRA Soups' baselines used
    fit_lr: float = 5e-2
    fit_epochs: int = 1
    lorahub_budget: int = 40  # loss evaluations, LoraHub's default
    seeds: tuple[int, ...] = (0, 1, 2)
    gen_batch: int = 300
    max_new: tuple[int, int, int] = (80, 110, 110)  # generated characters for math, code, composite
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


FULL = Config()

# Small enough that data -> base -> LoRAs -> every merge -> scoring runs on 2 CPU cores in ~2 minutes.
SMOKE = replace(
    FULL,
    hidden=32,
    intermediate=64,
    layers=2,
    heads=2,
    seq_len=128,
    corpus_docs=300,
    pretrain_steps=8,
    pretrain_batch=8,
    lora_steps=4,
    lora_batch=4,
    train_per_skill=100,
    calib_fraction=0.05,
    eval_math=2,
    eval_code=2,
    eval_composite=2,
    seeds=(0,),
    gen_batch=8,
    max_new=(6, 6, 6),
    lorahub_budget=3,
)
