"""The model card (README.md) written beside every output."""

from __future__ import annotations

import yaml

from soupkit.methods import get_method


def front_matter(method: str, kind: str, hub_base: str | None) -> str:
    """The YAML block the Hugging Face Hub reads: base model (hub bases only), library, tags."""
    meta: dict = {}
    if hub_base:  # a local directory is no hub id: the Hub would flag it, so it is left out
        meta["base_model"] = hub_base
    meta["library_name"] = "peft" if kind == "adapter" else "transformers"
    meta["tags"] = ["soupkit", "lora", "merge", method]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def base_section(hub_base: str | None, local_base: str) -> str:
    """How to load the adapter on a base that is not where adapter_config.json says (moved, or a local copy)."""
    named = f"the hub model `{hub_base}`" if hub_base else f"the folder `{local_base}`"
    return f"""
## Base model

`adapter_config.json` names the base as {named} (merged against `{local_base}`). If the base is elsewhere
(moved, copied, or offline), load it yourself and point PEFT at it:

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM
base = AutoModelForCausalLM.from_pretrained("/path/to/base")
model = PeftModel.from_pretrained(base, PATH)
```

or set `base_model_name_or_path` in `adapter_config.json` to the base's new path or hub id.
"""


def energy_line(energy_kept: dict[str, float] | None) -> str:
    if not energy_kept:
        return ""
    worst = min(energy_kept, key=energy_kept.__getitem__)
    mean = sum(energy_kept.values()) / len(energy_kept)
    return (
        f"\n- energy kept by the truncation to rank r: min {energy_kept[worst]:.4f} ({worst}), "
        f"mean {mean:.4f} over {len(energy_kept)} truncated modules"
    )


def model_card(
    resolved: dict,
    rank: int,
    target_modules: list[str],
    kind: str,
    hub_base: str | None = None,
    energy_kept: dict[str, float] | None = None,
    local_base: str = "",
) -> str:
    """A README.md that says what was merged, how, and how to load it; the recipe is embedded.

    ``hub_base`` is the base model's hub id (``org/name``), or None for a local base. ``energy_kept``:
    the fraction of Frobenius energy each truncated module kept. ``local_base``: the folder the merge read the
    base from (the card says how to point PEFT at it once moved).
    """
    method = get_method(resolved["merge"]["method"])
    names = ", ".join(a["name"] for a in resolved["adapters"])
    recipe = yaml.safe_dump(resolved, sort_keys=False).rstrip()
    load = (
        "from peft import AutoPeftModelForCausalLM\nmodel = AutoPeftModelForCausalLM.from_pretrained(PATH)"
        if kind == "adapter"
        else "from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained(PATH)"
    )
    moved = base_section(hub_base, local_base) if kind == "adapter" else ""
    return f"""{front_matter(method.name, kind, hub_base)}# Merged {kind}: {names}

Made by [soupkit](https://pypi.org/project/soupkit/) with method `{method.name}` ({method.paper}).

- formula: {method.summary}
- rank: {rank} (lora_alpha = r, so the PEFT scale is 1); target modules: {", ".join(target_modules)}{energy_line(energy_kept)}

## Load

```python
{load}
```
{moved}
## Recipe

```yaml
{recipe}
```

`soupkit.lock.yaml` beside this file holds input hashes and versions.
"""
