"""PEFT's whole path, for comparison: load base + adapters, add_weighted_adapter, save the result.

    python benchmarks/peft_merge_child.py [--device cuda] BASE OUT COMBINATION ADAPTER [ADAPTER ...]

With ``--device cuda`` the base and adapters are loaded onto the GPU, so add_weighted_adapter runs there.
The merge call alone is timed too and printed to stderr as ``merge-call-s <seconds>``.
"""

from __future__ import annotations

import sys
import time

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


def main(base: str, out: str, combination: str, adapters: list[str], device: str = "cpu") -> None:
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, device_map=device)
    names = [f"a{i}" for i in range(len(adapters))]
    model = PeftModel.from_pretrained(model, adapters[0], adapter_name=names[0])
    for name, path in zip(names[1:], adapters[1:]):
        model.load_adapter(path, adapter_name=name)
    extra = {"density": 0.2} if "ties" in combination or "dare" in combination else {}
    start = time.perf_counter()
    model.add_weighted_adapter(names, [1.0] * len(names), "merged", combination_type=combination, **extra)
    if device != "cpu":
        torch.cuda.synchronize()
    print(f"merge-call-s {time.perf_counter() - start:.2f}", file=sys.stderr)
    model.save_pretrained(out, selected_adapters=["merged"])


if __name__ == "__main__":
    argv = sys.argv[1:]
    device = "cpu"
    if argv[:1] == ["--device"]:
        device, argv = argv[1], argv[2:]
    main(argv[0], argv[1], argv[2], argv[3:], device)
