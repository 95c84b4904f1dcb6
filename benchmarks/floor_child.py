"""The floor: a Python process that imports torch, reads the adapters and writes as many bytes.

python benchmarks/floor_child.py OUT_FILE NBYTES ADAPTER [ADAPTER ...]
"""

from __future__ import annotations

import sys

import torch  # noqa: F401  (the import is part of the floor: every candidate pays it)
from safetensors.torch import load_file, save_file


def main(out: str, nbytes: int, adapters: list[str]) -> None:
    total = 0
    for path in adapters:
        tensors = load_file(f"{path}/adapter_model.safetensors")
        total += sum(t.numel() for t in tensors.values())
    save_file({"payload": torch.zeros(nbytes // 2, dtype=torch.bfloat16)}, out)
    assert total > 0


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
