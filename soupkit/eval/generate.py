"""Greedy generation in batches, left-padded, stopping on end-of-turn tokens and stop strings."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

# End-of-turn tokens of common chat templates: generation stops on whichever the vocabulary has.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "<|eom_id|>", "</s>")


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """eos of the tokenizer and of the generation config, plus every end-of-turn token in the vocabulary."""
    ids: set[int] = set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, config_eos):
        ids |= set(value) if isinstance(value, list | tuple) else ({value} if value is not None else set())
    vocab = tokenizer.get_vocab()
    ids |= {vocab[t] for t in END_OF_TURN if t in vocab}
    return sorted(ids)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest stop string."""
    ends = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return text[: min(ends)] if ends else text


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    stop: Sequence[str] = (),
    batch_size: int = 16,
    on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy continuations of ``prompts`` (text after the prompt, cut before the first stop string).

    Prompts are tokenized as written (a chat prompt already holds its template's special tokens, so
    none are added), left-padded so every row's last prompt token sits at the same position.
    """
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    pad = tokenizer.pad_token
    if pad is None:  # a tokenizer without one (SmolLM2's from its GGUF): any id will do, the mask hides it
        tokenizer.pad_token = tokenizer.eos_token
    device = next(model.parameters()).device
    eos = stop_token_ids(model, tokenizer)
    out: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = list(prompts[start : start + batch_size])
            special = not any(tokenizer.bos_token and p.startswith(tokenizer.bos_token) for p in batch)
            enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=special).to(device)
            extra = {"stop_strings": list(stop), "tokenizer": tokenizer} if stop else {}
            ids = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
                **extra,
            )
            new = ids[:, enc["input_ids"].shape[1] :]
            texts = tokenizer.batch_decode(new, skip_special_tokens=True)
            out += [cut_at_stop(t, stop) for t in texts]
            if on_batch is not None:
                on_batch(len(batch))
    finally:
        tokenizer.padding_side = side
        if pad is None:
            tokenizer.pad_token = None
    return out
