"""adapter_config.json as PEFT reads it: which modules it targets, per-module rank and alpha, and the
features soupkit refuses (with the reason and what to do)."""

from __future__ import annotations

import re

from soupkit.errors import AdapterError, UnsupportedAdapterError


def pattern_value(patterns: dict[str, int], path: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern rule: first key matching ``(.*\\.)?(KEY)$`` wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _layer_index(path: str, layers_pattern: object) -> int | None:
    """The layer index PEFT reads from a module path for ``layers_to_transform`` (its first numbered segment)."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)  # type: ignore[call-overload]
        match = next((m for p in patterns if (m := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", path))), None)
    return int(match.group("idx")) if match else None


def peft_targets(config: dict, path: str) -> bool:
    """Whether PEFT (0.21, ``check_target_module_exists``) puts a LoRA on module ``path`` when it loads this config.

    PEFT loads tensors only into the modules it wraps; tensors of any other module are dropped without a
    word. A config without ``target_modules`` (PEFT then uses per-architecture defaults) is not checked.
    """
    excluded = config.get("exclude_modules")
    if isinstance(excluded, str) and re.fullmatch(excluded, path):
        return False
    if isinstance(excluded, list) and (path in excluded or any(path.endswith(f".{e}") for e in excluded)):
        return False
    targets = config.get("target_modules")
    if targets is None:
        return True
    if isinstance(targets, str):
        if targets == "all-linear":  # PEFT expands it to every Linear but the output layer
            return not path.endswith("lm_head")
        return re.fullmatch(targets, path) is not None
    if path in targets:
        return True
    if not any(path.endswith(f".{t}") for t in targets):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    index = _layer_index(path, config.get("layers_pattern"))
    return index is not None and (index == layers if isinstance(layers, int) else index in layers)


def shown_targets(config: dict) -> str:
    text = repr(config.get("target_modules"))
    return text if len(text) <= 80 else text[:77] + "..."


# adapter_config.json fields whose adapters are not a plain low-rank update W + s*B@A (or that change the
# base), with the reason shown to the user. Values that are falsy (None, False, {}, []) are fine.
REFUSED_FIELDS: dict[str, str] = {
    "trainable_token_indices": "trainable_token_indices holds extra token embeddings",
    "layer_replication": "layer_replication changes the model's layer stack",
    "kasa_config": "KaSA adds a singular-value modulation",
    "velora_config": "VeLoRA changes the forward pass",
    "monteclora_config": "MonteCLoRA samples its update",
    "use_bdlora": "BD-LoRA uses block-diagonal factors",
    "arrow_config": "Arrow routes between several LoRAs",
    "alora_invocation_tokens": "aLoRA applies only after invocation tokens",
    "use_qalora": "QA-LoRA pools the input groups",
}
# what soupkit says wherever an adapter keeps modules_to_save (card, inspect, stderr)
VLLM_MODULES_TO_SAVE = (
    "vLLM refuses adapters with modules_to_save ('vLLM only supports modules_to_save being None'): "
    "serve the full model (output: model), or merge with --serving vllm --drop-modules-to-save"
)
# init schemes that rewrite the base weights, so the adapter's delta is relative to a different base
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "mica")
FLOAT_TAGS = {"F16", "BF16", "F32", "F64"}


def check_config_types(where: str, config: object) -> None:
    """The fields soupkit computes with must have the types PEFT writes (a bad file is a user error, not a crash)."""
    if not isinstance(config, dict):
        raise AdapterError(where, "a JSON object", type(config).__name__, "re-save the adapter with PEFT")
    number = (int, float)
    if "r" in config and (not isinstance(config["r"], int) or isinstance(config["r"], bool) or config["r"] < 1):
        raise AdapterError(f"{where}: r", "an integer >= 1", repr(config["r"]), "fix r")
    if "lora_alpha" in config and (not isinstance(config["lora_alpha"], number) or isinstance(config["lora_alpha"], bool)):
        raise AdapterError(f"{where}: lora_alpha", "a number", repr(config["lora_alpha"]), "fix lora_alpha")
    for field in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(field) or {}
        if not isinstance(patterns, dict) or not all(
            isinstance(v, number) and not isinstance(v, bool) for v in patterns.values()
        ):
            raise AdapterError(f"{where}: {field}", "a mapping of module pattern -> number", repr(patterns)[:80], f"fix {field}")
        for key in patterns:
            try:
                re.compile(key)
            except re.error as err:
                raise AdapterError(f"{where}: {field}", "regular-expression keys", f"{key!r} ({err})", f"fix {field}") from None


def refuse_features(name: str, config: dict) -> None:
    """Refuse, with the reason, every config feature that a plain low-rank merge would get wrong."""
    where = f"adapter '{name}' adapter_config.json"
    if config.get("peft_type", "LORA") != "LORA":
        raise UnsupportedAdapterError(where, "peft_type LORA", repr(config.get("peft_type")), "soupkit merges LoRA adapters only")
    for field, reason in REFUSED_FIELDS.items():
        value = config.get(field)
        if value:
            shown = repr(value) if len(repr(value)) < 60 else repr(value)[:57] + "..."
            raise UnsupportedAdapterError(
                where,
                "a plain LoRA adapter",
                f"{field}: {shown} ({reason})",
                "soupkit refuses it rather than write a wrong adapter; merge it into the model with PEFT's merge_and_unload",
            )
    if config.get("bias", "none") != "none":
        raise UnsupportedAdapterError(
            where,
            "bias: none",
            f"bias: {config['bias']!r} (the adapter also trains base biases)",
            "retrain with bias='none' or merge it with PEFT",
        )
    init = str(config.get("init_lora_weights", True)).lower()
    if init.startswith(BASE_CHANGING_INITS):
        raise UnsupportedAdapterError(
            where,
            "an adapter relative to the original base",
            f"init_lora_weights: {init!r} (this init rewrites the base weights)",
            "convert it with PEFT's save_pretrained(path_initial_model_for_weight_conversion=...) first",
        )
