"""Negative log-likelihood of each example's scored tokens, the ``loss`` metric's raw material."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from soupkit.fit.data import IGNORE, Example, collate


@torch.no_grad()
def example_nll(
    model: Any, examples: list[Example], pad_id: int, batch_size: int = 8, on_batch: Callable[[int], None] | None = None
) -> list[tuple[float, int]]:
    """Per example: (summed NLL in nats over its label tokens, how many label tokens), float32 or wider maths."""
    device = next(model.parameters()).device
    out: list[tuple[float, int]] = []
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad_id)
        ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        targets = labels[:, 1:]
        nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")  # (batch, length-1)
        sums, counts = nll.double().sum(dim=1), (targets != IGNORE).sum(dim=1)
        out += [(float(s), int(c)) for s, c in zip(sums.tolist(), counts.tolist())]
        if on_batch is not None:
            on_batch(len(ids))
    return out
