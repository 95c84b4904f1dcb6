"""Turn a recipe's reference (local path or hub id ``org/name[@revision]``) into a local directory.

Hub references are fetched with ``huggingface_hub.snapshot_download``, restricted to the files a
merge reads (configs and safetensors; never pickles or code). ``HF_HUB_OFFLINE=1`` and
``HF_HUB_CACHE`` are read at call time, so a cached snapshot is used without any network access.
The snapshot directory's name is the resolved commit, which the lock file records.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from soupkit.errors import RecipeError

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(@(?P<rev>[\w./-]+))?$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")
Role = Literal["adapter", "base", "base+tokenizer"]

ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors"]
BASE_FILES = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors"]
TOKENIZER_FILES = [
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
]
# the files transformers builds a tokenizer from (tokenizer_config.json alone only names a class)
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "tiktoken.model")


def has_tokenizer(directory: Path) -> bool:
    """Whether a model folder holds a tokenizer's vocabulary file."""
    return any((directory / name).is_file() for name in TOKENIZER_VOCAB_FILES)


PATTERNS: dict[str, list[str]] = {
    "adapter": ADAPTER_FILES,
    "base": BASE_FILES,
    "base+tokenizer": BASE_FILES + TOKENIZER_FILES,
}
_FETCHED: dict[tuple, Path] = {}  # one fetch per (repo, revision, files, cache, offline) per process


def parse_hub_id(ref: str) -> tuple[str, str | None] | None:
    """``org/name@rev`` -> (``org/name``, ``rev``); ``org/name`` -> (``org/name``, None); else None."""
    if ref.startswith((".", "/", "~")):
        return None
    match = HUB_ID.match(ref)
    return (match.group("repo"), match.group("rev")) if match else None


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def hub_cache_dir() -> str | None:
    """The cache ``huggingface_hub`` would use, read from the environment now (not at its import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def resolve_reference(ref: str, root: Path, where: str, role: Role | None = None) -> Path:
    """Resolve ``ref`` to a local directory.

    Args:
        ref: a local path (absolute, or relative to ``root``) or a hub id ``org/name[@revision]``.
            An existing local directory wins over a hub id of the same spelling.
        root: the directory of the recipe file (or of the lock file).
        where: the recipe field, for messages.
        role: which files to fetch from the hub; default ``base`` for ``where == "base_model"``,
            else ``adapter``. ``base+tokenizer`` adds tokenizer and generation configs (export).
    """
    local = Path(ref).expanduser()
    local = local if local.is_absolute() else root / local
    try:
        if local.is_dir():
            return local.resolve()
    except OSError as err:  # a name too long, a loop of symlinks, no permission: the path is unusable
        raise RecipeError(where, "an existing directory", f"{ref[:80]!r} ({err.strerror})", "fix the path") from None
    hub = parse_hub_id(ref)
    if hub is None:
        shown_local = str(local) if len(str(local)) <= 120 else f"...{str(local)[-117:]}"
        raise RecipeError(
            where,
            "an existing directory",
            f"{ref[:80]!r} (resolved to {shown_local})",
            "fix the path; relative paths start at the recipe file",
        )
    role = role or ("base" if where == "base_model" else "adapter")
    return fetch_from_hub(hub[0], hub[1], role, where, local)


def fetch_from_hub(repo: str, revision: str | None, role: Role, where: str, local: Path | None = None) -> Path:
    """Download (or find in the cache) the files ``role`` needs from hub repo ``repo``; return the snapshot dir."""
    offline = _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")
    cache = hub_cache_dir()
    key = (repo, revision, role, cache, offline)
    if key in _FETCHED and _FETCHED[key].is_dir():
        return _FETCHED[key]
    from huggingface_hub import snapshot_download

    shown = f"hub repo '{repo}'" + (f" at revision '{revision}'" if revision else "")
    not_local = f" (and no local directory {local})" if local is not None else ""
    try:
        folder = snapshot_download(
            repo, revision=revision, cache_dir=cache, local_files_only=offline, allow_patterns=PATTERNS[role]
        )
    except Exception as err:  # noqa: BLE001 -- every hub failure is a user-facing problem: name it in one line
        raise _hub_error(err, where, shown + not_local, offline) from None
    path = Path(folder)
    _FETCHED[key] = path
    return path


def _hub_error(err: Exception, where: str, shown: str, offline: bool) -> RecipeError:
    kind = type(err).__name__
    first_line = (str(err).strip().splitlines() or [kind])[0][:200]
    if kind == "LocalEntryNotFoundError" and offline:
        return RecipeError(
            where,
            f"{shown} in the local hub cache",
            "it is not cached and HF_HUB_OFFLINE is set",
            "download it once with HF_HUB_OFFLINE unset, or give a local path",
        )
    if kind in {"RepositoryNotFoundError", "GatedRepoError"}:
        return RecipeError(
            where,
            f"an accessible {shown}",
            f"{kind} ({first_line})",
            "check the id, or log in with `hf auth login` for private or gated repos",
        )
    if kind == "RevisionNotFoundError":
        return RecipeError(where, f"an existing revision of {shown}", "no such branch, tag or commit", "fix the text after '@'")
    if kind in {"HFValidationError", "ValueError"}:
        return RecipeError(where, "a valid hub id org/name[@revision]", f"{shown}: {first_line}", "fix the id")
    return RecipeError(
        where,
        f"{shown} from the hub or the local cache",
        f"{kind} ({first_line})",
        "check the network, or set HF_HUB_OFFLINE=1 to use the cache only",
    )


def hub_pin(directory: Path) -> str | None:
    """``org/name@commit`` for a hub-cache snapshot directory (``.../models--org--name/snapshots/<sha>``), else None."""
    parts = directory.parts
    if len(parts) < 3 or parts[-2] != "snapshots" or not COMMIT.match(parts[-1]) or not parts[-3].startswith("models--"):
        return None
    repo = parts[-3].removeprefix("models--").replace("--", "/", 1)
    return f"{repo}@{parts[-1]}"


def lock_reference(directory: Path, out: Path) -> str:
    """How a lock file names an input: a hub snapshot pinned to its commit, else a path relative to ``out``."""
    return hub_pin(directory) or os.path.relpath(directory, out.resolve())


def hub_name(ref: str | None) -> str | None:
    """A hub id without its revision (for ``base_model_name_or_path``), or None for a local reference."""
    hub = parse_hub_id(ref) if ref else None
    return hub[0] if hub else None
