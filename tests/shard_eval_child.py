"""Run by tests/test_fit_shard.py under ``torch.distributed.run``: the held-out loss of a sharded fit model.

argv: RECIPE DATA.jsonl BATCH SIZE [SIZE ...]. For each SIZE, rank 0 prints one JSON line
``{"size": SIZE, "loss": per-token loss}`` of ``evaluate`` over the first SIZE examples, with fixed
per-module weights (``fixed_weights``), so that the test can compare with one unsharded process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def fixed_weights(n_modules: int, n_adapters: int) -> torch.Tensor:
    """Deterministic per-module weights (M, n) in [-0.5, 1.5): the adapters change the loss."""
    return torch.rand(n_modules, n_adapters, generator=torch.Generator().manual_seed(0)) * 2 - 0.5


def main() -> None:
    from accelerate import Accelerator

    from soupkit.fit.data import load_examples
    from soupkit.fit.run import load_tokenizer
    from soupkit.fit.shard import build_sharded_fit_model
    from soupkit.fit.train import evaluate
    from soupkit.recipe import load_recipe

    recipe_path, data, batch, *sizes = sys.argv[1:]
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    recipe = load_recipe(Path(recipe_path))
    tokenizer, pad_id = load_tokenizer(recipe)
    examples = load_examples(data, tokenizer, 64, "--data")
    model, _ = build_sharded_fit_model(recipe, "module", "free", accelerator.device, torch.float32, checkpointing=False)
    model.fixed = fixed_weights(len(model.targets), model.n_adapters)
    for size in map(int, sizes):
        loss = evaluate(accelerator, model, examples[:size], int(batch), pad_id)
        if accelerator.is_main_process:
            print(json.dumps({"size": size, "loss": loss}), flush=True)
    accelerator.end_training()


if __name__ == "__main__":
    main()
