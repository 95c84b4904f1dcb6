"""Tiny, deterministic models and adapters for tests, examples and benchmarks (no downloads).

Everything is built from configs with random initialisation under a fixed seed, then saved with
transformers / PEFT themselves, so the files are exactly what real tools write.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = list(string.printable[:95]) + ["\n"]  # printable ASCII and newline: 96 characters
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def char_tokenizer() -> Any:
    """A character-level fast tokenizer (100 tokens) that transformers can save and reload."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + CHARS)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: one token per char
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tiny_llama_config(**overrides: Any) -> Any:
    """A 2-layer Llama with GQA (k/v narrower than q), ~90k parameters."""
    from transformers import LlamaConfig

    kwargs: dict[str, Any] = dict(
        vocab_size=len(SPECIAL) + len(CHARS),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def make_base(out: Path, seed: int = 0, dtype: torch.dtype = torch.float32, config: Any = None, **save_kwargs: Any) -> Path:
    """Write a random-init causal LM (default: tiny Llama) and a char tokenizer to ``out``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config or tiny_llama_config())
    model = model.to(dtype)
    model.save_pretrained(out, safe_serialization=True, **save_kwargs)
    char_tokenizer().save_pretrained(out)
    # transformers 5 names its class "TokenizersBackend", which 4.x cannot load; both load this name
    config_path = out / "tokenizer_config.json"
    config_path.write_text(config_path.read_text().replace('"TokenizersBackend"', '"PreTrainedTokenizerFast"'))
    return out


def make_lora(
    base: Path,
    out: Path,
    seed: int,
    r: int = 4,
    lora_alpha: float = 8,
    target_modules: list[str] | None = None,
    b_scale: float = 0.5,
    **lora_kwargs: Any,
) -> Path:
    """Write a PEFT LoRA adapter for ``base`` with random non-zero A and B (seeded)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=target_modules or ALL_LINEAR,
        task_type="CAUSAL_LM",
        init_lora_weights=False,
        **lora_kwargs,
    )
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                scale = b_scale if ("lora_B" in name or "embedding_B" in name) else 1.0
                param.copy_(torch.randn(param.shape, generator=gen) * scale / param.shape[-1] ** 0.5)
    peft_model.save_pretrained(out)
    _relative_base_reference(out, base)
    return out


def _relative_base_reference(adapter: Path, base: Path) -> None:
    """Store base_model_name_or_path relative to the adapter, so fixtures hold no machine paths."""
    import json
    import os

    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = os.path.relpath(base, adapter)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
