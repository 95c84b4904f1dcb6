"""The lock file written beside every output: the resolved recipe, input hashes, versions.

It holds no timestamps or absolute paths, so the same recipe on the same machine gives the same
bytes. ``soupkit merge OUT/soupkit.lock.yaml`` reruns the merge (the lock is a valid recipe).
"""

from __future__ import annotations

import hashlib
import os
import platform
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

import soupkit
from soupkit.io.output_markers import LOCK_HEADER, LOCK_NAME

__all__ = ["LOCK_NAME", "file_hashes", "write_lock"]

CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """sha256 of a whole file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_header(path: Path) -> str:
    """sha256 of a safetensors file's header (names, dtypes, shapes, offsets), not its data.

    Used for base-model weights that an adapter merge never reads: hashing gigabytes would cost
    more than the merge itself.
    """
    with open(path, "rb") as fh:
        raw = fh.read(8)
        (n,) = struct.unpack("<Q", raw)
        return hashlib.sha256(raw + fh.read(n)).hexdigest()


def versions() -> dict[str, str]:
    """Versions of what produced the output, including the generator of every random draw
    (``rng``: rerunning a lock written under another generator gives other DARE/DELLA masks)."""
    import safetensors
    import torch

    from soupkit.rng import RNG_NAME

    return {
        "soupkit": str(soupkit.__version__),
        "rng": RNG_NAME,
        "torch": str(torch.__version__),
        "safetensors": str(safetensors.__version__),
        "python": platform.python_version(),
    }


def file_hashes(files: list[Path], root: Path, header_only: bool = False) -> dict[str, str]:
    """{file name relative to ``root``: hash}. ``header_only`` hashes safetensors headers only."""

    def one(f: Path) -> str:
        if header_only and f.suffix == ".safetensors":
            return "header-sha256:" + sha256_header(f)
        return "sha256:" + sha256_file(f)

    # hashlib releases the GIL on large buffers, so shards hash in parallel, one per core.
    with ThreadPoolExecutor(max_workers=max(1, min(len(files), os.cpu_count() or 1))) as pool:
        digests = list(pool.map(one, files))
    return {str(f.relative_to(root)): d for f, d in zip(files, digests, strict=True)}


def write_lock(path: Path, resolved: dict, inputs: dict, report: dict, outputs: dict | None = None) -> None:
    """Write the lock: ``resolved`` recipe fields first (so the file is itself a recipe).

    ``outputs`` maps each other file of the output directory to its sha256 (``soupkit verify``).
    """
    meta = {"inputs": inputs, "outputs": outputs or {}, "versions": versions(), "report": report}
    text = yaml.safe_dump(resolved, sort_keys=False) + yaml.safe_dump({"soupkit_lock": meta}, sort_keys=False)
    path.write_text(LOCK_HEADER + "\n" + text)  # the marker --overwrite checks (io.output_guard)
