"""fit-alpha's checks before it allocates: finite options, a micro-batch of real examples that fits in memory.

Memory of one training micro-batch (forward + backward), estimated from the base's config.json:
- the base weights in the compute dtype (the safetensors bytes, rescaled from their dtype);
- activations kept for backward: per layer about 34 * b * s * h values of 2 bytes (Korthikanti et al.
  2022, "Reducing Activation Recomputation", without the attention-score term that SDPA does not store);
  with --checkpointing only each layer's input (2 * b * s * h bytes) plus one layer's full set;
- the logits in float32 with their log-softmax and gradient: 3 * b * s * vocab * 4 bytes.
b = micro-batch, s = the longest example's tokens (at most --seq-len), h = hidden size.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from typing import Any

from soupkit.errors import SoupkitError, warn_user
from soupkit.fit.data import Example
from soupkit.fit.train import FitOptions

ACTIVATION_VALUES_PER_TOKEN_PER_HIDDEN = 34  # Korthikanti et al. 2022, eq. 1 without the 5as/h attention term
LOGIT_COPIES = 3  # logits (float32), log-softmax, gradient


def warn_once(message: str) -> None:
    """A warning from the first process only: under a launcher every process runs the same checks."""
    if os.environ.get("RANK", "0") == "0":  # torchrun / accelerate set RANK; a plain run has none
        warn_user(message)


def size(n: int) -> str:
    """Bytes as GiB, or MiB below one GiB."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_finite_options(options: FitOptions) -> None:
    """--lr and --epochs must be finite (click's FloatRange lets nan and inf through)."""
    for flag, value, example in (("--lr", options.lr, "5e-2"), ("--epochs", options.epochs, "1")):
        if not math.isfinite(value):
            raise SoupkitError(flag, "a finite number > 0", f"{value}", f"e.g. {flag} {example}")


def micro_batch_without_repeats(options: FitOptions, n_train: int, num_processes: int) -> FitOptions:
    """The options with --batch-size lowered so that one step's global batch holds each example at most once.

    A micro-batch larger than the data was filled by repeating the same lines (and 100000 of them
    exhausted the host's memory); a repeated line adds no information, only memory.
    """
    per_micro = max(1, n_train // (options.grad_accum * num_processes))
    if options.batch_size <= per_micro:
        return options
    if options.batch_size != FitOptions.batch_size:  # a size the user chose (the default is lowered silently)
        warn_once(
            f"--batch-size {options.batch_size}: only {n_train} training examples, so each micro-batch takes "
            f"{per_micro} (no example is repeated to fill one)"
        )
    return replace(options, batch_size=per_micro)


def micro_batch_bytes(config: dict, base_bytes: int, tokens: int, batch: int, checkpointing: bool, dtype_bytes: int) -> int:
    """Estimated peak bytes of one training micro-batch of ``batch`` examples of ``tokens`` tokens (module docstring)."""
    text = config.get("text_config", config)
    hidden = int(text.get("hidden_size") or text.get("n_embd") or 0)
    layers = int(text.get("num_hidden_layers") or text.get("n_layer") or 0)
    vocab = int(text.get("vocab_size") or 0)
    per_layer = ACTIVATION_VALUES_PER_TOKEN_PER_HIDDEN * batch * tokens * hidden * dtype_bytes // 2
    kept = (2 * batch * tokens * hidden * dtype_bytes * layers + per_layer) if checkpointing else per_layer * layers
    logits = LOGIT_COPIES * batch * tokens * vocab * 4
    return base_bytes + kept + logits


def check_micro_batch_fits(
    options: FitOptions, base: Any, train_set: list[Example], dtype_bytes: int, available: int | None, shards: int = 1
) -> None:
    """Refuse a micro-batch whose estimated memory exceeds what the device has free (before the base loads).

    ``base`` is a ``BaseModelInfo`` (config and headers); ``shards``: processes the base is sharded over.
    """
    if available is None or not train_set:
        return
    tokens = min(options.seq_len, max(len(e.input_ids) for e in train_set))
    base_bytes = sum(math.prod(info.shape) for info in base.index.infos.values()) * dtype_bytes // shards
    need = micro_batch_bytes(base.config, base_bytes, tokens, options.batch_size, options.checkpointing, dtype_bytes)
    if need > available:
        raise SoupkitError(
            f"--batch-size {options.batch_size}",
            f"a micro-batch within the {size(available)} available",
            f"an estimated {size(need)} (base weights, activations of {options.batch_size} x {tokens} tokens, logits)",
            "lower --batch-size (raise --grad-accum to keep the step size) or --seq-len, or add --checkpointing",
        )
