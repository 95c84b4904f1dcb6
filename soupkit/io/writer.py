"""Streaming safetensors output and atomic output directories.

Every output tensor's key, dtype and shape are known from the plan before any maths runs, so
the header is written first and tensors are appended as they are produced: memory holds one
tensor at a time, never the whole output.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterator
from contextlib import contextmanager
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
        self._fh = open(path, "wb")
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
        self._fh.write(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
        self._next += 1

    def close(self) -> None:
        """Finish the file; every declared tensor must have been written."""
        self._fh.close()
        if self._next != len(self._order):
            raise RuntimeError(f"{self.path}: wrote {self._next} of {len(self._order)} tensors")

    def __enter__(self) -> SafetensorsStreamWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._fh.close()


def check_finite_cast(cast: torch.Tensor, source: torch.Tensor, where: str, fix: str = "use dtype: bfloat16 (or float32), or smaller weights") -> None:
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


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers (a previous call in this process) are stale
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_stale(out: Path) -> None:
    """Tidy what a killed run (a dead PID) left beside ``out``.

    ``.OUT.soupkit-old-PID`` exists only between the two renames that replace an old output, i.e.
    after the new output in ``.OUT.soupkit-tmp-PID`` was complete and synced: that rename is
    finished if ``out`` is missing. Every other temporary directory of a dead PID is deleted.
    """
    if not out.parent.is_dir():
        return
    for kind in ("old", "tmp"):
        for stale in out.parent.glob(f".{out.name}.soupkit-{kind}-*"):
            pid_text = stale.name.rsplit("-", 1)[-1]
            if not pid_text.isdigit() or _pid_alive(int(pid_text)):
                continue
            done = out.parent / f".{out.name}.soupkit-tmp-{pid_text}"
            if kind == "old" and not out.exists() and done.is_dir():
                os.replace(done, out)
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


def check_output_free(out: Path, overwrite: bool) -> None:
    """Refuse to touch an existing output unless ``overwrite`` (checked before any work).

    Leftovers of killed runs are tidied first (see :func:`recover_stale`).
    """
    recover_stale(out)
    if out.exists() and not overwrite:
        raise SoupkitError(str(out), "a path that does not exist yet", "an existing path", "pass --overwrite or choose another -o")


@contextmanager
def atomic_output_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory beside ``out``; rename it to ``out`` only if the block succeeds.

    A crash or error leaves ``out`` untouched (absent, or the previous output) and removes the
    temporary directory. With ``overwrite``, an existing ``out`` is replaced only at the end.
    """
    check_output_free(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.soupkit-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.rglob("*"):  # make file contents durable before the rename publishes them
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if out.exists():
            trash = out.parent / f".{out.name}.soupkit-old-{os.getpid()}"
            os.replace(out, trash)
            os.replace(tmp, out)
            shutil.rmtree(trash) if trash.is_dir() else trash.unlink()
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
