"""Sharded safetensors output, planned up front, plus raw byte ranges of input tensors.

A full-model export knows every output tensor's dtype and shape from the base's headers before it
reads any data, so shards are laid out by a byte budget first and named
``model-0000k-of-0000N.safetensors`` directly (no rename at the end, unlike writers that discover
the total as they go). Each shard is a :class:`SafetensorsStreamWriter`: header first, then tensors
appended in order, so memory holds one block of one tensor at a time.

Untouched tensors are copied as raw byte ranges (``os.sendfile``, or bounded reads), never
decoded: the output bytes are the input bytes, with no dtype round trip.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from soupkit.errors import SoupkitError
from soupkit.io.tensor_index import DTYPES
from soupkit.io.writer import SafetensorsStreamWriter, TensorSpec

COPY_CHUNK = 16 * 1024 * 1024  # bytes per read/write when sendfile is not available
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
DEFAULT_SHARD_BYTES = 5 * 10**9  # the Hugging Face Hub's usual shard size


def parse_size(text: str | int, where: str = "--shard-size") -> int:
    """``"5GB"`` -> 5_000_000_000; ``"512MiB"``, ``"200KB"`` and plain byte counts also work."""
    if isinstance(text, int):
        value, unit = float(text), ""
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
        if not match or match.group(2).upper() not in SIZE_UNITS:
            raise SoupkitError(where, "a size such as 5GB, 500MB or 2GiB", repr(text), "write a number and a unit")
        value, unit = float(match.group(1)), match.group(2).upper()
    size = int(value * SIZE_UNITS[unit])
    if size <= 0:
        raise SoupkitError(where, "a positive size", repr(text), "use e.g. 5GB")
    return size


def spec_nbytes(spec: TensorSpec) -> int:
    """Bytes of one tensor from its (dtype tag, shape)."""
    tag, shape = spec
    n = DTYPES[tag][1]
    for d in shape:
        n *= d
    return n


def plan_shards(
    specs: dict[str, TensorSpec], max_shard_bytes: int, stem: str = "model"
) -> list[tuple[str, dict[str, TensorSpec]]]:
    """Split ordered ``specs`` into consecutive shards of at most ``max_shard_bytes`` of data.

    A tensor larger than the budget gets a shard of its own (as transformers does). One shard is
    named ``{stem}.safetensors``; several are ``{stem}-0000k-of-0000N.safetensors``.
    """
    groups: list[dict[str, TensorSpec]] = [{}]
    size = 0
    for key, spec in specs.items():
        nbytes = spec_nbytes(spec)
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append({})
            size = 0
        groups[-1][key] = spec
        size += nbytes
    if len(groups) == 1:
        return [(f"{stem}.safetensors", groups[0])]
    n = len(groups)
    return [(f"{stem}-{k:05d}-of-{n:05d}.safetensors", group) for k, group in enumerate(groups, start=1)]


@dataclass(frozen=True)
class ByteRange:
    """Where one tensor's data lies in a safetensors file: absolute byte offset and length."""

    file: Path
    offset: int
    nbytes: int


def tensor_ranges(files: Iterable[Path]) -> dict[str, ByteRange]:
    """key -> ByteRange for every tensor in ``files`` (reads headers only)."""
    out = {}
    for path in files:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for key, entry in header.items():
            if key != "__metadata__":
                start, end = entry["data_offsets"]
                out[key] = ByteRange(path, 8 + n + start, end - start)
    return out


def read_range(fd: int, offset: int, nbytes: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Read ``nbytes`` at ``offset`` of an open file into ``out`` (uint8, CPU) or a new tensor.

    Plain reads, not mmap: the pages read belong to the page cache, not to this process's RSS.
    """
    buf = torch.empty(nbytes, dtype=torch.uint8) if out is None else out[:nbytes]
    view = memoryview(buf.numpy())
    done = 0
    while done < nbytes:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise OSError(f"unexpected end of file at byte {offset + done}")
        done += got
    return buf


class _ShardWriter(SafetensorsStreamWriter):
    """A SafetensorsStreamWriter that also takes a tensor's bytes in parts, or straight from a file.

    It appends to the parent's file handle in the parent's declared order and length; these two
    paths exist so that a big tensor never has to be held whole in memory.
    """

    def _begin(self, key: str) -> int:
        expected = self._order[self._next]
        if key != expected:
            raise RuntimeError(f"writer expected tensor {expected!r} next, got {key!r}")
        return spec_nbytes(self.specs[key])

    def write_parts(self, key: str, parts: Iterable[torch.Tensor]) -> None:
        """Append tensor ``key`` as consecutive parts (row blocks, already in the declared dtype)."""
        nbytes, done = self._begin(key), 0
        tag = self.specs[key][0]
        for part in parts:
            if part.dtype != DTYPES[tag][0]:
                raise RuntimeError(f"part of {key!r} has dtype {part.dtype}, declared {tag}")
            data = part.detach().cpu().contiguous().view(torch.uint8).reshape(-1)
            self._fh.write(memoryview(data.numpy()))
            done += data.numel()
        if done != nbytes:
            raise RuntimeError(f"tensor {key!r}: wrote {done} bytes, declared {nbytes}")
        self._next += 1

    def copy_range(self, key: str, source: ByteRange) -> None:
        """Append tensor ``key`` as the raw bytes of ``source`` (must be exactly the declared size)."""
        if self._begin(key) != source.nbytes:
            raise RuntimeError(f"tensor {key!r}: source has {source.nbytes} bytes, declared {self._begin(key)}")
        self._fh.flush()  # sendfile writes at the OS file position, after what Python buffered
        with open(source.file, "rb") as src:
            done = 0
            try:
                while done < source.nbytes:
                    sent = os.sendfile(self._fh.fileno(), src.fileno(), source.offset + done, source.nbytes - done)
                    if sent == 0:
                        raise OSError("sendfile made no progress")
                    done += sent
            except OSError:
                if done:  # partial progress, then failure: nothing sane to resume from
                    raise
                self._copy_by_reads(src.fileno(), source)
        self._next += 1

    def _copy_by_reads(self, fd: int, source: ByteRange) -> None:
        for start in range(0, source.nbytes, COPY_CHUNK):
            length = min(COPY_CHUNK, source.nbytes - start)
            self._fh.write(memoryview(read_range(fd, source.offset + start, length).numpy()))


class ShardedWriter:
    """Write ordered tensors into planned shards, then ``{stem}.safetensors.index.json``.

    Use as a context manager. Tensors must arrive in the order of ``specs``; each shard file is
    opened when its first tensor arrives and closed (checked complete) when the next one opens.

    Args:
        directory: output directory (exists).
        specs: ordered key -> (dtype tag, shape) of every output tensor.
        max_shard_bytes: data bytes per shard.
        metadata: each shard header's ``__metadata__`` (``{"format": "pt"}`` for transformers).
    """

    def __init__(
        self, directory: Path, specs: dict[str, TensorSpec], max_shard_bytes: int, metadata: dict[str, str], stem: str = "model"
    ) -> None:
        self.directory, self.stem, self.metadata = directory, stem, metadata
        self.shards = plan_shards(specs, max_shard_bytes, stem)
        self.shard_of = {key: i for i, (_, group) in enumerate(self.shards) for key in group}
        self.total_bytes = sum(spec_nbytes(s) for s in specs.values())
        self._current: tuple[int, _ShardWriter] | None = None

    def _writer_for(self, key: str) -> _ShardWriter:
        index = self.shard_of[key]
        if self._current is not None and self._current[0] == index:
            return self._current[1]
        if self._current is not None:
            self._current[1].close()
        name, group = self.shards[index]
        writer = _ShardWriter(self.directory / name, group, self.metadata)
        self._current = (index, writer)
        return writer

    def write_parts(self, key: str, parts: Iterable[torch.Tensor]) -> None:
        """Append tensor ``key`` from consecutive parts in its declared dtype."""
        self._writer_for(key).write_parts(key, parts)

    def copy_range(self, key: str, source: ByteRange) -> None:
        """Append tensor ``key`` as raw bytes copied from an input file."""
        self._writer_for(key).copy_range(key, source)

    def close(self) -> None:
        """Close the last shard; write the index when there are several shards."""
        if self._current is not None:
            self._current[1].close()
            self._current = None
        written = {p.name for p in self.directory.glob(f"{self.stem}*.safetensors")}
        missing = [name for name, _ in self.shards if name not in written]
        if missing:
            raise RuntimeError(f"shards never written: {missing}")
        if len(self.shards) > 1:
            weight_map = {key: name for name, group in self.shards for key in sorted(group)}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.directory / f"{self.stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.close()
        elif self._current is not None:
            self._current[1].__exit__(exc_type)
