"""A lazy index over safetensors files: shapes and dtypes from headers, tensors read on demand."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from soupkit.errors import SoupkitError

# safetensors dtype tag -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
TAG_OF_DTYPE = {dt: tag for tag, (dt, _) in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, from the file header alone."""

    file: Path
    dtype: str  # safetensors tag, e.g. "BF16"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype][1] if self.dtype in DTYPES else 1
        for d in self.shape:
            n *= d
        return n


def _valid_entry(entry: object) -> bool:
    """One header entry as safetensors writes it: dtype tag, shape of ints, two ordered offsets."""
    if not isinstance(entry, dict):
        return False
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    return (
        isinstance(entry.get("dtype"), str)
        and isinstance(shape, list)
        and all(isinstance(d, int) and d >= 0 for d in shape)
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    )


def read_header(path: Path) -> dict:
    """Parse a safetensors header (8-byte little-endian length + JSON); user error if malformed."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise SoupkitError(str(path), "a safetensors file", f"{size} bytes", "re-download or re-save the file")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES:  # random or foreign bytes: their first 8 give an absurd header length
            raise SoupkitError(
                str(path),
                f"a safetensors file (an 8-byte header length of at most {MAX_HEADER_BYTES // 2**20} MB, then JSON)",
                f"other bytes (a header length of {n:,} bytes)",
                "re-download it, or point at the right file",
            )
        if 8 + n > size:
            raise SoupkitError(str(path), "a complete safetensors header", "a truncated file", "re-download or re-save it")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise SoupkitError(str(path), "a JSON safetensors header", "unreadable bytes", "re-save the file") from None
    if not isinstance(header, dict) or not all(_valid_entry(v) for k, v in header.items() if k != "__metadata__"):
        raise SoupkitError(
            str(path), "a safetensors header (dtype, shape, data_offsets per tensor)", "malformed entries", "re-save the file"
        )
    data_bytes = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + data_bytes > size:
        raise SoupkitError(str(path), f"{8 + n + data_bytes} bytes", f"{size} (truncated)", "re-download the file")
    return header


class TensorIndex:
    """key -> TensorInfo over one or more safetensors files; ``get`` reads one tensor lazily.

    Only headers are read at construction. File handles are opened on first use and kept.
    """

    def __init__(self, files: list[Path]) -> None:
        self.files = list(files)
        self.infos: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        for path in self.files:
            header = read_header(path)
            self.metadata.update(header.pop("__metadata__", None) or {})
            for key, entry in header.items():
                self.infos[key] = TensorInfo(path, entry["dtype"], tuple(entry["shape"]))
        self._handles: dict[Path, object] = {}

    @classmethod
    def from_dir(cls, directory: Path, stem: str) -> TensorIndex | None:
        """Index ``{stem}.safetensors`` or the shards named by ``{stem}.safetensors.index.json``."""
        single = directory / f"{stem}.safetensors"
        if single.is_file():
            return cls([single])
        index_file = directory / f"{stem}.safetensors.index.json"
        if index_file.is_file():
            try:
                weight_map = json.loads(index_file.read_text())["weight_map"]
                names = sorted(set(weight_map.values()))
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
                raise SoupkitError(
                    str(index_file), "a JSON object with a weight_map", "something else", "re-download or re-save it"
                ) from None
            missing = [n for n in names if not (directory / n).is_file()]
            if missing:
                raise SoupkitError(str(index_file), f"shard {missing[0]} beside it", "no such file", "download every shard")
            return cls([directory / name for name in names])
        return None

    def __contains__(self, key: str) -> bool:
        return key in self.infos

    def keys(self) -> list[str]:
        return list(self.infos)

    def _handle(self, key: str) -> object:
        info = self.infos[key]
        handle = self._handles.get(info.file)
        if handle is None:
            handle = safe_open(str(info.file), framework="pt", device="cpu")
            self._handles[info.file] = handle
        return handle

    def get(self, key: str) -> torch.Tensor:
        """Read one tensor (on CPU, in its stored dtype)."""
        return self._handle(key).get_tensor(key)  # type: ignore[attr-defined]

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Read rows ``start:stop`` of one tensor (dim 0) from disk (CPU, stored dtype).

        Through a handle of its own, dropped on return: the file's mapped pages are released at
        once, so reading a model shard by shard keeps host memory near one tensor's rows (a kept
        handle would leave every page read so far resident).
        """
        handle = safe_open(str(self.infos[key].file), framework="pt", device="cpu")
        return handle.get_slice(key)[start:stop]  # type: ignore[attr-defined]

    def close(self) -> None:
        self._handles.clear()
