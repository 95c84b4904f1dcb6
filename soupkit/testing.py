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


def tiny_vlm_config(kind: str) -> Any:
    """A tiny vision-language config over the tiny Llama / Qwen2 text model: ``llava``, ``llava_next`` or ``qwen2_vl``.

    transformers 5 saves llava-style models under ``language_model.model.layers.N...`` and qwen2_vl under
    ``model.layers.N...``, while the modules live at ``model.language_model.layers.N...``.
    """
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaNextConfig, Qwen2VLConfig

    text = tiny_llama_config().to_dict()
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8
    ).to_dict()
    image_token = len(SPECIAL) + len(CHARS) - 1  # "\n": never in the tests' text
    if kind == "llava":
        return LlavaConfig(text_config=text, vision_config=vision, image_token_index=image_token)
    if kind == "llava_next":
        return LlavaNextConfig(
            text_config=text, vision_config=vision, image_token_index=image_token, image_grid_pinpoints=[[16, 16]]
        )
    if kind == "qwen2_vl":
        text = dict(text, model_type="qwen2_vl_text", rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]})
        vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=4, spatial_merge_size=2)
        ids = dict(image_token_id=image_token, video_token_id=image_token - 1, vision_start_token_id=image_token - 2)
        return Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    raise ValueError(f"unknown tiny VLM {kind!r}")


def model_class(directory: Path) -> Any:
    """The transformers class a saved model's config.json names (``architectures[0]``)."""
    import json

    import transformers

    return getattr(transformers, json.loads((directory / "config.json").read_text())["architectures"][0])


def make_base(out: Path, seed: int = 0, dtype: torch.dtype = torch.float32, config: Any = None, **save_kwargs: Any) -> Path:
    """Write a random-init model (default: tiny Llama; a VLM config builds its conditional-generation model)
    and a char tokenizer to ``out``."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    torch.manual_seed(seed)
    config = config or tiny_llama_config()
    vlm = getattr(config, "vision_config", None) is not None
    model = (AutoModelForImageTextToText if vlm else AutoModelForCausalLM).from_config(config)
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
    """Write a PEFT LoRA adapter for ``base`` with random non-zero A and B (seeded).

    Copies of ``modules_to_save`` get seeded noise too, so each adapter saves a trained module.
    """
    from peft import LoraConfig, get_peft_model

    model = model_class(base).from_pretrained(base, dtype=torch.float32)
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
            elif "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)
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
