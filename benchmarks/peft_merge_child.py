"""PEFT's whole path, for comparison: load base + adapters, add_weighted_adapter, save the result.

    python benchmarks/peft_merge_child.py BASE OUT COMBINATION ADAPTER [ADAPTER ...]
"""

from __future__ import annotations

import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


def main(base: str, out: str, combination: str, adapters: list[str]) -> None:
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    names = [f"a{i}" for i in range(len(adapters))]
    model = PeftModel.from_pretrained(model, adapters[0], adapter_name=names[0])
    for name, path in zip(names[1:], adapters[1:]):
        model.load_adapter(path, adapter_name=name)
    extra = {"density": 0.2} if "ties" in combination or "dare" in combination else {}
    model.add_weighted_adapter(names, [1.0] * len(names), "merged", combination_type=combination, **extra)
    model.save_pretrained(out, selected_adapters=["merged"])


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
