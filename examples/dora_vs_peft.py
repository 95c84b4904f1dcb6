"""Two DoRA adapters merged by PEFT's ``add_weighted_adapter`` and by soupkit, against the exact reference.

The reference is ``W + sum_i w_i (W'_i - W)``, with ``W'_i`` from PEFT's own ``merge_and_unload`` of
adapter i alone. Run ``python examples/dora_vs_peft.py`` (a minute on a laptop CPU); it prints the
relative logit error of each merge (docs/export.md quotes the table).
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch

from soupkit.execute import RunOptions
from soupkit.merge import merge_recipe
from soupkit.recipe import Recipe

BASE = Path(__file__).resolve().parent / "tiny" / "base"
WEIGHTS = {"a": 0.7, "b": 0.4}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32).eval()


def save_dora(out: Path, seed: int) -> Path:
    """A DoRA adapter as training leaves one: random A, B and magnitudes within a few % of the row norms."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load(), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False, use_dora=True))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude" in name:
                param.mul_(1 + 0.05 * torch.randn(param.shape, generator=gen))
            elif "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5 / param.shape[-1] ** 0.5)
    model.save_pretrained(out)
    return out


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


def reference(adapters: dict[str, Path]):
    from peft import PeftModel

    base = {k: v.double() for k, v in load().state_dict().items()}
    total = dict(base)
    for name, path in adapters.items():
        merged = PeftModel.from_pretrained(load(), path).merge_and_unload().state_dict()
        total = {k: total[k] + WEIGHTS[name] * (merged[k].double() - base[k]) for k in base}
    model = load()
    model.load_state_dict({k: v.float() for k, v in total.items()})
    return model


def peft_weighted(adapters: dict[str, Path], combination: str):
    from peft import PeftModel

    model = PeftModel.from_pretrained(load(), adapters["a"], adapter_name="a")
    model.load_adapter(adapters["b"], adapter_name="b")
    model.add_weighted_adapter(["a", "b"], list(WEIGHTS.values()), "merged", combination_type=combination)
    model.set_adapter("merged")
    return model.eval()


def soupkit_merge(root: Path, adapters: dict[str, Path], output: str, **merge: object):
    spec = {
        "base_model": str(BASE),
        "adapters": [{"name": n, "path": str(p), "weight": WEIGHTS[n]} for n, p in adapters.items()],
        "merge": {"method": "cat", **merge},
        "dtype": "float32",
        "output": output,
    }
    out = root / f"soupkit-{output}-{merge.get('rank', '')}"
    report = merge_recipe(Recipe.from_dict(spec, root), out, RunOptions(progress=False))
    if output == "model":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval(), None
    from peft import PeftModel

    return PeftModel.from_pretrained(load(), out).eval(), min(report.energy_kept.values())


def main() -> None:
    warnings.simplefilter("ignore")
    ids = torch.randint(4, 100, (4, 32), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        adapters = {"a": save_dora(root / "a", 1), "b": save_dora(root / "b", 2)}
        want = logits(reference(adapters), ids)

        def error(model) -> float:
            return float((logits(model, ids) - want).norm() / want.norm())

        print(f"base model (no merge)                      {error(load()):.2e}")
        for combination in ("linear", "cat"):
            print(f"PEFT add_weighted_adapter {combination:<8}         {error(peft_weighted(adapters, combination)):.2e}")
        model, _ = soupkit_merge(root, adapters, "model")
        print(f"soupkit cat, full model                    {error(model):.2e}")
        for rank in (16, 32, 64):
            model, kept = soupkit_merge(root, adapters, "adapter", rank=rank, min_energy=0.0)
            print(f"soupkit cat, adapter rank {rank:<3} (energy {kept:.3f}) {error(model):.2e}")


if __name__ == "__main__":
    main()
