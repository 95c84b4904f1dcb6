"""Streaming safetensors output (the output folder itself is handled by :mod:`soupkit.io.output_guard`).

Every output tensor's key, dtype and shape are known from the plan before any maths runs, so
the header is written first and tensors are appended as they are produced: memory holds one
tensor at a time, never the whole output.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from soupkit.errors import SoupkitError
from soupkit.io.tensor_index import DTYPES, TAG_OF_DTYPE
from soupkit.ops import all_finite

TensorSpec = tuple[str, tuple[int, ...]]  # (safetensors dtype tag, shape)


class SafetensorsStreamWriter:
    """Write one safetensors file whose tensors are declared up front and arrive in order.

    Args:
        path: the file to create.
        specs: ordered mapping key -> (dtype tag, shape); data is laid out in this order.
        metadata: the header's ``__metadata__`` (string values).
    """

    def __init__(self, path: Path, specs: dict[str, TensorSpec], metadata: dict[str, str] | None = None) -> None:
        self.path, self.specs = path, specs
        self._order = list(specs)
        self._next = 0
        header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for key, (tag, shape) in specs.items():
            size = DTYPES[tag][1]
            for d in shape:
                size *= d
            header[key] = {"dtype": tag, "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes with spaces
        self._fh = open(path, "wb")  # noqa: SIM115 (open across write() calls; closed by close())
        self._fh.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` (converted to its declared dtype); keys must come in declared order."""
        expected = self._order[self._next]
        if key != expected:
            raise RuntimeError(f"writer expected tensor {expected!r} next, got {key!r}")
        tag, shape = self.specs[key]
        if tuple(tensor.shape) != tuple(shape):
            raise RuntimeError(f"tensor {key!r} has shape {tuple(tensor.shape)}, planned {shape}")
        data = tensor.detach().to(device="cpu", dtype=DTYPES[tag][0]).contiguous()
        check_finite_cast(data, tensor, f"tensor {key}")  # what is written is what was checked
        # Little-endian raw bytes, as safetensors stores them (viewed as uint8 to support bf16).
        # Written from the tensor's own memory: ``tobytes()`` would copy every byte once more first.
        self._fh.write(data.view(torch.uint8).numpy().data if data.numel() else b"")
        self._next += 1

    def close(self) -> None:
        """Finish the file; every declared tensor must have been written."""
        self._fh.close()
        if self._next != len(self._order):
            raise RuntimeError(f"{self.path}: wrote {self._next} of {len(self._order)} tensors")

    def __enter__(self) -> SafetensorsStreamWriter:  # typing.Self is Python 3.11+
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._fh.close()


def check_finite_cast(
    cast: torch.Tensor, source: torch.Tensor, where: str, fix: str = "use dtype: bfloat16 (or float32), or smaller weights"
) -> None:
    """Refuse ``cast`` (a tensor about to be written) if it holds NaN or Inf; ``source`` is it before the cast.

    A finite float32 value can overflow float16 (max 65504): the check runs on what is written,
    and the message names the largest magnitude before the cast. One aminmax pass when all is well.
    """
    if all_finite(cast):
        return
    magnitudes = source.detach().abs().float()
    finite = magnitudes[torch.isfinite(magnitudes)]
    largest = f"{float(finite.max()):.4g}" if finite.numel() else "none finite"
    if finite.numel() == magnitudes.numel() and cast.dtype != source.dtype:
        limit = torch.finfo(cast.dtype).max
        found = f"values up to {largest} in magnitude, beyond {str(cast.dtype).removeprefix('torch.')}'s maximum {limit:.4g}"
    else:
        found = f"NaN or Inf before the cast (largest finite magnitude {largest}): an overflow"
    raise SoupkitError(where, "finite values to write", found, fix)


def dtype_tag(dtype: torch.dtype) -> str:
    return TAG_OF_DTYPE[dtype]
