"""Base model, pretraining, LoRA training and greedy-decoding evaluation (character-level Llama).

Token ids come from the same character tokenizer that is saved with the base model
(``soupkit.testing.char_tokenizer``), so ``soupkit fit-alpha`` sees exactly the ids used here.
"""

from __future__ import annotations

import copy
import math
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch

from soupkit.testing import char_tokenizer, tiny_llama_config

from examples.skill_composition.config import Config
from examples.skill_composition.data import Example

PAD, EOS = 0, 2


class CharCodec:
    """Characters <-> ids with the saved tokenizer's vocabulary (one id per character)."""

    def __init__(self) -> None:
        self.tokenizer = char_tokenizer()
        vocab = self.tokenizer.get_vocab()
        self.ids = {tok: i for tok, i in vocab.items() if len(tok) == 1}

    def encode(self, text: str) -> list[int]:
        return [self.ids[c] for c in text]

    pad_id = PAD

    def encode_pair(self, prompt: str, completion: str) -> tuple[list[int], list[int]]:
        return self.encode(prompt), self.encode(completion) + [EOS]

    def calib_record(self, prompt: str, completion: str) -> dict:
        return {"prompt": prompt, "completion": completion + "</s>"}

    def generate(self, model, prompts: list[str], max_new: int, batch_size: int) -> list[str]:
        """``soupkit eval``'s greedy batched generation; it stops at the tokenizer's ``</s>``."""
        from soupkit.eval import generate

        return generate(model, self.tokenizer, prompts, max_new, (), batch_size)


class ChatCodec:
    """A chat model's tokenizer: prompts go through its chat template; replies end at <|im_end|>
    (the model may also start a new turn with <|im_start|>: generation stops there too)."""

    STOPS = ("<|im_end|>", "<|im_start|>")

    def __init__(self, base_dir: Path) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(base_dir)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.stop_ids = [self.tokenizer.convert_tokens_to_ids(t) for t in self.STOPS]

    def prompt_ids(self, prompt: str) -> list[int]:
        return list(
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )

    def encode_pair(self, prompt: str, completion: str) -> tuple[list[int], list[int]]:
        chat = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        full = list(self.tokenizer.apply_chat_template(chat, tokenize=True, return_dict=False))
        head = self.prompt_ids(prompt)
        assert full[: len(head)] == head, "chat template: the prompt is not a prefix of the chat"
        return head, full[len(head) :]

    def calib_record(self, prompt: str, completion: str) -> dict:
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]}

    def cut(self, text: str) -> str:
        for stop in self.STOPS:
            text = text.split(stop)[0]
        return text

    def render(self, prompt: str) -> str:
        """The prompt as the chat template writes it, ready for the reply (what ``soupkit eval`` feeds)."""
        chat = [{"role": "user", "content": prompt}]
        return self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)

    def generate(self, model, prompts: list[str], max_new: int, batch_size: int) -> list[str]:
        """``soupkit eval``'s greedy batched generation (left padding, stops at the end-of-turn tokens and
        at <|im_start|>), so the experiment scores what ``soupkit eval`` and ``soupkit sweep`` score."""
        from soupkit.eval import generate

        return generate(model, self.tokenizer, [self.render(p) for p in prompts], max_new, self.STOPS[1:], batch_size)


def device_of() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_deterministic(cfg: Config) -> None:
    """As repeatable as torch allows: deterministic kernels (warn where none exists), a fixed cuBLAS
    workspace (must be set before CUDA starts), no cuDNN autotuning; attention is eager (``load_base``)."""
    if not cfg.deterministic:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


def new_base(cfg: Config):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(cfg.base_seed)
    config = tiny_llama_config(
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=max(512, cfg.seq_len),
    )
    return AutoModelForCausalLM.from_config(config)


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to 10%."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_loop(model, params, batch_fn: Callable[[int], tuple], steps: int, lr: float, log: Callable[[str], None]) -> list[float]:
    """AdamW with warm-up + cosine; ``batch_fn(step) -> (input_ids, labels)`` on the model's device."""
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    losses, t0 = [], time.time()
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, max(1, steps // 20))
        ids, labels = batch_fn(step)
        with autocast(device):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()) if step % 10 == 0 or step == steps - 1 else losses[-1])
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            log(f"  step {step + 1}/{steps} loss {losses[-1]:.3f} ({time.time() - t0:.0f} s)")
    model.eval()
    return losses


def pretrain(cfg: Config, corpus: str, out: Path, log: Callable[[str], None]) -> dict:
    """Pretrain the base from scratch on the generic corpus; save it (fp16) with its tokenizer."""
    device = device_of()
    codec = CharCodec()
    stream = torch.tensor(codec.encode(corpus), dtype=torch.long)
    model = new_base(cfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"base: {n_params / 1e6:.1f}M parameters, corpus {len(stream) / 1e6:.1f}M chars, {cfg.pretrain_steps} steps")
    gen = torch.Generator().manual_seed(cfg.base_seed)

    def batch(_: int) -> tuple:
        starts = torch.randint(0, len(stream) - cfg.seq_len - 1, (cfg.pretrain_batch,), generator=gen)
        ids = torch.stack([stream[s : s + cfg.seq_len] for s in starts]).to(device)
        return ids, ids

    t0 = time.time()
    losses = train_loop(model, list(model.parameters()), batch, cfg.pretrain_steps, cfg.pretrain_lr, log)
    model.to(torch.float16).save_pretrained(out, safe_serialization=True)
    codec.tokenizer.save_pretrained(out)
    return {"params": n_params, "seconds": time.time() - t0, "final_loss": losses[-1], "steps": cfg.pretrain_steps}


def load_base(path: Path, device: torch.device, dtype: torch.dtype = torch.float32, eager: bool = False):
    """The base in ``dtype`` on ``device``; ``eager``: the plain attention kernels (repeatable), not SDPA's choice."""
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": "eager"} if eager else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).to(device).eval()


def sft_batches(examples: list[Example], codec, batch_size: int, seed: int, device: torch.device):
    """A ``batch_fn`` of random prompt+completion batches; loss only on the completion (and its end token)."""
    rng = random.Random(seed)
    encoded = [codec.encode_pair(e.prompt, e.completion) for e in examples]

    def batch(_: int) -> tuple:
        picks = [encoded[rng.randrange(len(encoded))] for _ in range(batch_size)]
        width = max(len(p) + len(c) for p, c in picks)
        ids = torch.full((batch_size, width), codec.pad_id, dtype=torch.long)
        labels = torch.full((batch_size, width), -100, dtype=torch.long)
        for row, (p, c) in enumerate(picks):
            ids[row, : len(p) + len(c)] = torch.tensor(p + c)
            labels[row, len(p) : len(p) + len(c)] = torch.tensor(c)
        return ids.to(device), labels.to(device)

    return batch


def lora_config(cfg: Config, init: bool = True):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.lora_alpha,
        target_modules=list(cfg.targets),
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
        init_lora_weights=init,
    )


def train_lora(
    base,
    cfg: Config,
    examples: list[Example],
    steps: int,
    seed: int,
    out: Path,
    log,
    codec=None,
    start_from: Path | None = None,
    batch_size: int | None = None,
) -> dict:
    """Train one LoRA (PEFT) on ``examples``; A's init comes from ``seed`` (the same for every skill).
    ``start_from``: continue training that saved LoRA instead of a fresh one."""
    from peft import PeftModel, get_peft_model

    torch.manual_seed(seed)
    if start_from is not None:
        model = PeftModel.from_pretrained(copy.deepcopy(base), str(start_from), is_trainable=True)
    else:
        model = get_peft_model(copy.deepcopy(base), lora_config(cfg))
    params = [p for p in model.parameters() if p.requires_grad]
    batch = sft_batches(examples, codec or CharCodec(), batch_size or cfg.lora_batch, seed + 7, next(base.parameters()).device)
    t0 = time.time()
    losses = train_loop(model, params, batch, steps, cfg.lora_lr, log)
    model.save_pretrained(out)
    return {"steps": steps, "seconds": time.time() - t0, "final_loss": losses[-1], "examples": len(examples)}


def random_lora(base, cfg: Config, seed: int, like: Path, out: Path) -> None:
    """A LoRA with random A (PEFT's init) and random B whose norm matches ``like``'s B per module."""
    from peft import get_peft_model
    from safetensors.torch import load_file

    reference = load_file(str(like / "adapter_model.safetensors"))
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), lora_config(cfg))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                key = name.replace(".default", "")
                target = reference[key].float().norm()
                noise = torch.randn(param.shape, generator=gen)
                param.copy_((noise * target / noise.norm()).to(param.device))
    model.save_pretrained(out)
