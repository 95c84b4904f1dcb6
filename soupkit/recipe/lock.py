"""The lock file written beside every output: the resolved recipe, input hashes, versions.

It holds no timestamps or absolute paths, so the same recipe on the same machine gives the same
bytes. ``soupkit merge OUT/soupkit.lock.yaml`` reruns the merge (the lock is a valid recipe).
"""

from __future__ import annotations

import hashlib
import platform
import struct
from pathlib import Path

import yaml

import soupkit

LOCK_NAME = "soupkit.lock.yaml"
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
    """Versions of what produced the output."""
    import safetensors
    import torch

    return {
        "soupkit": str(soupkit.__version__),
        "torch": str(torch.__version__),
        "safetensors": str(safetensors.__version__),
        "python": platform.python_version(),
    }


def file_hashes(files: list[Path], root: Path, header_only: bool = False) -> dict[str, str]:
    """{file name relative to ``root``: hash}. ``header_only`` hashes safetensors headers only."""
    out = {}
    for f in files:
        header = header_only and f.suffix == ".safetensors"
        out[str(f.relative_to(root))] = ("header-sha256:" + sha256_header(f)) if header else ("sha256:" + sha256_file(f))
    return out


def write_lock(path: Path, resolved: dict, inputs: dict, report: dict, outputs: dict | None = None) -> None:
    """Write the lock: ``resolved`` recipe fields first (so the file is itself a recipe).

    ``outputs`` maps each other file of the output directory to its sha256 (``soupkit verify``).
    """
    meta = {"inputs": inputs, "outputs": outputs or {}, "versions": versions(), "report": report}
    text = yaml.safe_dump(resolved, sort_keys=False) + yaml.safe_dump({"soupkit_lock": meta}, sort_keys=False)
    path.write_text("# Written by soupkit: the resolved recipe, input hashes and versions.\n" + text)
