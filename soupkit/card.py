"""The model card (README.md) written beside every output."""

from __future__ import annotations

import yaml

from soupkit.methods import get_method


def model_card(resolved: dict, rank: int, target_modules: list[str], kind: str) -> str:
    """A README.md that says what was merged, how, and how to load it; the recipe is embedded."""
    method = get_method(resolved["merge"]["method"])
    names = ", ".join(a["name"] for a in resolved["adapters"])
    recipe = yaml.safe_dump(resolved, sort_keys=False).rstrip()
    load = (
        "from peft import PeftModel\nmodel = PeftModel.from_pretrained(base_model, PATH)"
        if kind == "adapter"
        else "from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained(PATH)"
    )
    return f"""---
library_name: {"peft" if kind == "adapter" else "transformers"}
tags: [soupkit, lora, merge, {method.name}]
---
# Merged {kind}: {names}

Made by [soupkit](https://pypi.org/project/soupkit/) with method `{method.name}` ({method.paper}).

- formula: {method.summary}
- rank: {rank} (lora_alpha = r, so the PEFT scale is 1); target modules: {", ".join(target_modules)}

## Load

```python
{load}
```

## Recipe

```yaml
{recipe}
```

`soupkit.lock.yaml` beside this file holds input hashes and versions.
"""
