"""Is each adapter trained on the recipe's base? Its named base's config against the base's own.

Tensor shapes are checked against the base elsewhere (``BaseModelInfo.check_module``): they catch a
wrong size, not a wrong model of the same sizes. Here each adapter's ``base_model_name_or_path`` is
read: when that base's config.json is at hand (a local folder, or the hub cache; never the network),
its architecture, hidden sizes, vocabulary and layer count must equal the recipe base's, else the
adapter is refused naming what differs (``--allow-base-mismatch`` turns that into a warning). A base
named differently but alike in all of these, or whose config is not at hand, is a warning: a renamed
repo (``Meta-Llama-3.1-8B`` and ``Llama-3.1-8B``) is the same model, an Instruct base may not be.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from soupkit.errors import AdapterError, warn_user
from soupkit.io.adapter import LoraAdapter
from soupkit.io.base_model import BaseModelInfo
from soupkit.io.resolve import hub_cache_dir, hub_pin, parse_hub_id

# config.json fields that make two bases different models to a LoRA (text_config's for a VLM)
COMPARED_FIELDS = (
    "model_type",
    "architectures",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
)
_ALLOWED: ContextVar[bool] = ContextVar("soupkit_allow_base_mismatch", default=False)


@contextmanager
def allowing_base_mismatch(allowed: bool = True) -> Iterator[None]:
    """Within this block a base config that differs from an adapter's is a warning, not a refusal
    (the CLI's ``--allow-base-mismatch``)."""
    token = _ALLOWED.set(allowed)
    try:
        yield
    finally:
        _ALLOWED.reset(token)


def architecture(config: dict) -> dict[str, object]:
    """The compared fields present in ``config`` (a VLM's text_config holds the language model's)."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    found = {field: text.get(field, config.get(field)) for field in COMPARED_FIELDS}
    return {field: value for field, value in found.items() if value is not None}


def named_base(adapter: LoraAdapter) -> tuple[str, Path | None, dict | None] | None:
    """(name, local folder or None, config.json or None) of the base ``adapter`` names; None if it names none.

    A local folder is looked for beside the adapter (as soupkit's fixtures write it) and from the current
    folder (as PEFT reads it); a hub id in the hub cache only, at the adapter's ``revision``.
    """
    ref = adapter.config.get("base_model_name_or_path")
    if not ref or not isinstance(ref, str):
        return None
    for candidate in (adapter.directory / ref, Path(ref)):
        if _is_dir(candidate):
            folder = candidate.resolve()
            pin = hub_pin(folder)
            return (pin.split("@")[0] if pin else folder.name), folder, _read_config(folder / "config.json")
    hub = parse_hub_id(ref)
    if hub is None:
        return ref.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1], None, None
    repo, revision = hub
    return repo, None, _cached_config(repo, revision or adapter.config.get("revision"))


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a name too long for the file system is no folder
        return False


def _read_config(path: Path) -> dict | None:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # not at hand or not readable: the shapes are all there is to check
    return config if isinstance(config, dict) else None


def _cached_config(repo: str, revision: object) -> dict | None:
    """config.json of ``repo`` if the hub cache holds it (no network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(
            repo, "config.json", revision=str(revision) if revision else None, cache_dir=hub_cache_dir()
        )
    except ValueError:  # a repo id huggingface_hub refuses
        return None
    return _read_config(Path(found)) if isinstance(found, str) else None


def base_name(base: BaseModelInfo, reference: str) -> str:
    """The recipe base's name: its hub repo, else its folder's name."""
    pin = hub_pin(base.directory.resolve())
    hub = parse_hub_id(reference)
    return pin.split("@")[0] if pin else hub[0] if hub else base.directory.resolve().name


def _short(name: str) -> str:
    return name.rsplit("/", 1)[-1].lower()


def check_adapters_base(adapters: list[LoraAdapter], base: BaseModelInfo, reference: str) -> None:
    """Refuse an adapter whose named base's config differs from ``base``'s; warn when only the name differs.

    ``reference`` is the recipe's ``base_model`` as written. Warnings are :class:`SoupkitWarning` (the CLI
    prints each as one line; see ``errors.warn_user``).
    """
    expected = architecture(base.config)
    recipe_name = base_name(base, reference)
    for adapter in adapters:
        named = named_base(adapter)
        if named is None:
            continue
        name, folder, config = named
        if folder is not None and folder == base.directory.resolve():
            continue
        differs = [
            f"{field} {value!r} (base {expected[field]!r})"
            for field, value in architecture(config or {}).items()
            if field in expected and value != expected[field]
        ]
        where = f"adapter '{adapter.name}'"
        if differs:
            found = f"one trained on '{name}', whose config differs: {', '.join(differs)}"
            if not _ALLOWED.get():
                raise AdapterError(
                    where,
                    f"an adapter trained on the recipe's base '{recipe_name}'",
                    found,
                    "use the adapter's own base, or pass --allow-base-mismatch if you know they are compatible",
                )
            warn_user(f"{where}: {found}; merging anyway (--allow-base-mismatch)")
        elif _short(name) != _short(recipe_name):
            seen = "the same architecture and sizes" if config else "its config is not at hand, so only shapes were checked"
            warn_user(
                f"{where} was trained on '{name}', the recipe's base is '{recipe_name}' ({seen}); merging anyway: "
                "check that they are the same model"
            )
