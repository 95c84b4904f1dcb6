"""MoE adapters with PEFT ``target_parameters`` (fused experts, routers), saved by PEFT 0.21 itself.

Tiny random Mixtral and Qwen3-MoE bases (transformers 5 saves their experts per expert; the model
fuses them on load). References: PEFT's forward with both adapters active (each layer's scaling
times its weight), PEFT's ``merge_and_unload``, and a plain float64 TIES per expert over PEFT's
own ``get_delta_weight``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from soupkit.errors import SoupkitError
from soupkit.execute import RunOptions
from soupkit.io.experts import expert_transposed
from soupkit.merge import merge_recipe
from soupkit.recipe import Recipe
from soupkit.testing import make_base

QUIET = RunOptions(progress=False)
WEIGHTS = {"a": 0.7, "b": 0.4}


def mixtral_config(**overrides: object):
    from transformers import MixtralConfig

    kwargs = dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
    kwargs |= dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
    return MixtralConfig(**(kwargs | dict(tie_word_embeddings=False) | overrides))


def qwen3_moe_config():
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, moe_intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=64, tie_word_embeddings=False, mlp_only_layers=[],
    )  # fmt: skip


def gpt_oss_config():
    """gpt-oss stores its experts fused and transposed ((E, in, out), ``is_transposed``) in the checkpoint itself."""
    from transformers import GptOssConfig

    return GptOssConfig(
        vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        tie_word_embeddings=False, layer_types=["full_attention", "full_attention"],
    )  # fmt: skip


def save_lora(base: Path, out: Path, seed: int, **config: object) -> Path:
    """A PEFT adapter on ``base`` with random non-zero A and B (seeded), saved by PEFT."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(init_lora_weights=False, **config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3 / param.shape[-1] ** 0.5)
    model.save_pretrained(out)
    return out


EXPERTS_AND_ROUTER = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"]
CASES = {
    "mixtral_all_linear": (
        mixtral_config,
        dict(r=2, lora_alpha=4, target_modules="all-linear"),
        dict(r=3, lora_alpha=3, target_modules="all-linear", use_rslora=True),
    ),
    "qwen3_moe_experts": (  # PEFT's reference needs one target_parameters set for both (soupkit takes the union)
        qwen3_moe_config,
        dict(r=2, lora_alpha=8, target_modules=["q_proj"], target_parameters=EXPERTS_AND_ROUTER),
        dict(r=4, lora_alpha=4, target_modules=["v_proj"], target_parameters=EXPERTS_AND_ROUTER),
    ),
    "gpt_oss_transposed_experts": (
        gpt_oss_config,
        dict(r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=EXPERTS_AND_ROUTER[:2]),
        dict(r=3, lora_alpha=6, target_modules=["o_proj"], target_parameters=EXPERTS_AND_ROUTER[:2]),
    ),
}


@pytest.fixture(scope="module")
def moe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, Path]]]:
    """case -> (base, {"a": adapter, "b": adapter})."""
    root = tmp_path_factory.mktemp("moe")
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, (config, a, b) in CASES.items():
            base = make_base(root / name / "base", config=config())
            out[name] = (base, {"a": save_lora(base, root / name / "a", 1, **a), "b": save_lora(base, root / name / "b", 2, **b)})
    return out


def load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


IDS = torch.randint(4, 100, (2, 11), generator=torch.Generator().manual_seed(0))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.double()


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def peft_both_active(base: Path, adapters: dict[str, Path], weights: dict[str, float]):
    """PEFT's forward with both adapters active, each layer's scaling times its weight."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load(base), adapters["a"], adapter_name="a")
    model.load_adapter(adapters["b"], adapter_name="b")
    model.base_model.set_adapter(["a", "b"])
    for module in model.modules():
        scaling = getattr(module, "scaling", None)
        for name, weight in weights.items():
            if isinstance(scaling, dict) and name in scaling:
                scaling[name] *= weight
    return model.eval()


def merge(tmp_path: Path, base: Path, adapters: dict[str, Path], weights: dict[str, float], output: str = "adapter", **m) -> Path:
    spec = {
        "base_model": str(base),
        "adapters": [{"name": n, "path": str(adapters[n]), "weight": w} for n, w in weights.items()],
        "merge": {"method": "cat", **m},
        "dtype": "float32",
        "output": output,
    }
    out = tmp_path / f"out-{output}"
    merge_recipe(Recipe.from_dict(spec, tmp_path), out, QUIET)
    return out


def peft_loaded(base: Path, adapter: Path):
    """PEFT's model of ``adapter``; it must load with no missing or unexpected keys."""
    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(load(base), adapter).eval()
    assert not [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    return model


@pytest.mark.parametrize(("case", "method"), [(case, "cat") for case in CASES] + [("mixtral_all_linear", "linear")])
def test_merge_equals_peft_with_both_adapters_active(tmp_path: Path, moe: dict, case: str, method: str) -> None:
    base, adapters = moe[case]
    want = logits(peft_both_active(base, adapters, WEIGHTS))
    assert relative(logits(load(base)), want) > 1e-2  # the adapters move the logits: the comparison has teeth
    out = merge(tmp_path, base, adapters, WEIGHTS, method=method)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_parameters"] and config["peft_version"]
    assert relative(logits(peft_loaded(base, out)), want) < 1e-5
    if method == "cat":  # the full model: the expert deltas folded into the base's own per-expert tensors
        full = merge(tmp_path, base, adapters, WEIGHTS, output="model")
        assert sorted(load_file(full / "model.safetensors")) == sorted(load_file(base / "model.safetensors"))
        assert relative(logits(load(full)), want) < 1e-5


@pytest.mark.parametrize("case", ["mixtral_all_linear", "qwen3_moe_experts"])
def test_one_adapter_at_weight_one_equals_merge_and_unload(tmp_path: Path, moe: dict, case: str) -> None:
    from peft import PeftModel

    base, adapters = moe[case]
    want = logits(PeftModel.from_pretrained(load(base), adapters["b"]).merge_and_unload().eval())
    full = merge(tmp_path, base, {"b": adapters["b"]}, {"b": 1.0}, output="model")
    assert relative(logits(load(full)), want) < 1e-5


def peft_expert_deltas(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """Parameter path -> PEFT's own get_delta_weight (E, d1, d2) or (d1, d2), float64, for every wrapped parameter."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model = PeftModel.from_pretrained(load(base), adapter)
    out = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and "default" in module.lora_A:
                stem = name.removeprefix("base_model.model.").replace(".base_layer", "")
                key = f"{stem}.{module.parameter_name}" if hasattr(module, "parameter_name") else f"{stem}.weight"
                out[key] = module.get_delta_weight("default").double()
    return out


def plain_ties(deltas: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """TIES on one matrix: trim each weighted delta to its top-density |.|, elect the sign, disjoint mean."""
    trimmed = []
    for delta, w in zip(deltas, weights):
        flat = (w * delta).flatten()
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[flat.abs().topk(int(density * flat.numel())).indices] = True
        trimmed.append((flat * mask).view(delta.shape))
    sign = torch.sign(sum(trimmed))
    sign[sign == 0] = 1
    agree = [torch.sign(t) == sign for t in trimmed]
    return sum(t * a for t, a in zip(trimmed, agree)) / sum(a.double() for a in agree).clamp(min=1)


def test_ties_merges_expert_by_expert(tmp_path: Path, moe: dict) -> None:
    base, adapters = moe["mixtral_all_linear"]
    density = 0.4
    # rank 32 >= every module's smaller side: the dense TIES delta is kept whole
    out = merge(tmp_path, base, adapters, WEIGHTS, output="model", method="ties", density=density, rank=32)
    deltas = {n: peft_expert_deltas(base, adapters[n]) for n in adapters}
    reference = load(base)
    params = dict(reference.named_parameters())
    with torch.no_grad():
        for key in deltas["a"]:
            pair = [deltas["a"][key], deltas["b"][key]]
            if pair[0].dim() == 3:  # each expert is a module of its own: trimmed on its own magnitudes
                delta = torch.stack(
                    [plain_ties([p[e] for p in pair], list(WEIGHTS.values()), density) for e in range(len(pair[0]))]
                )
            else:
                delta = plain_ties(pair, list(WEIGHTS.values()), density)
            params[key].copy_((params[key].double() + delta).float())
    assert relative(logits(load(out)), logits(reference)) < 1e-5


@pytest.fixture(scope="module")
def square(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A Mixtral whose down_proj experts are square (hidden == intermediate), with a PEFT 0.21 adapter on them."""
    root = tmp_path_factory.mktemp("square")
    base = make_base(root / "base", config=mixtral_config(intermediate_size=32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return base, save_lora(base, root / "new", 3, r=2, lora_alpha=4, target_modules=[], target_parameters=["down_proj"])


def rewrite(adapter: Path, out: Path, version: str | None, old_layout: bool) -> Path:
    """A copy of ``adapter`` as an older PEFT would have saved it: delta[e] = (B_e A_e)^T, so A_e -> B_e^T, B_e -> A_e^T."""
    out.mkdir()
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.pop("peft_version")
    if version is not None:
        config["peft_version"] = version
    (out / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(adapter / "adapter_model.safetensors")
    if old_layout:
        for key in [k for k in tensors if k.endswith("experts.lora_A.weight")]:
            b_key = key.replace("lora_A", "lora_B")
            A, B = tensors[key], tensors[b_key]
            E = 4
            r = A.shape[0] // E
            A_e = A.reshape(E, r, -1)  # (E, r, in)
            B_e = B.reshape(B.shape[0], r, E).permute(2, 0, 1)  # (E, out, r)
            new_A = B_e.transpose(1, 2).reshape(E * r, -1)  # expert e: B_e^T in rows e*r:(e+1)*r
            new_B = A_e.transpose(1, 2).permute(1, 2, 0).reshape(A.shape[1], r * E)  # column ri*E + e: A_e^T[:, ri]
            tensors[key], tensors[b_key] = new_A.contiguous(), new_B.contiguous()
    save_file(tensors, out / "adapter_model.safetensors")
    return out


def test_square_experts_follow_the_recorded_peft_version(tmp_path: Path, square: tuple[Path, Path]) -> None:
    """Square experts: shapes cannot tell PEFT's layouts apart, so the adapter's peft_version decides."""
    from peft import PeftModel

    base, new = square
    want = logits(PeftModel.from_pretrained(load(base), new).merge_and_unload().eval())
    for version in (None, "0.18.1", "0.19.0"):  # the (B_e A_e)^T layout of PEFT before 0.19.1 (Mixtral: not is_transposed)
        old = rewrite(new, tmp_path / f"old-{version}", version, old_layout=True)
        got = logits(load(merge(tmp_path / f"m-{version}", base, {"a": old}, {"a": 1.0}, output="model")))
        assert relative(got, want) < 1e-5, version
    wrong = rewrite(new, tmp_path / "unlabelled", "0.18.1", old_layout=False)  # new tensors, old label: read transposed
    got = logits(load(merge(tmp_path / "m-wrong", base, {"a": wrong}, {"a": 1.0}, output="model")))
    assert relative(got, want) > 1e-3
    dev = rewrite(new, tmp_path / "dev", "0.19.1.dev0", old_layout=False)
    with pytest.raises(SoupkitError, match="peft_version '0.19.1.dev0'"):
        merge(tmp_path / "m-dev", base, {"a": dev}, {"a": 1.0})


def test_expert_layout_rule_by_version() -> None:
    assert expert_transposed(None, False) and expert_transposed("0.17.1", True)  # no swap before 0.19
    assert expert_transposed("0.19.0", False) and not expert_transposed("0.19.0", True)  # PR #3083
    assert not expert_transposed("0.19.1", False) and expert_transposed("0.21.2", True)  # PR #3165
    assert expert_transposed("0.20.0.dev0", False) is None and expert_transposed("0.16.0.dev0", False)


def test_adapter_for_another_base_is_refused_in_one_line(tmp_path: Path, moe: dict, square: tuple[Path, Path]) -> None:
    base, _ = square  # intermediate 32: the experts adapter of the 48-wide Mixtral fits neither layout
    _, adapters = moe["mixtral_all_linear"]
    with pytest.raises(SoupkitError, match="fit|shape|config differs") as err:
        merge(tmp_path, base, {"a": adapters["a"]}, {"a": 1.0})
    assert "\n" not in str(err.value)
    from soupkit.io.base_check import allowing_base_mismatch

    with (
        allowing_base_mismatch(True),
        pytest.raises(SoupkitError, match=r"experts.down_proj of shape \(4, 32, 32\)") as err,
    ):  # past the config check
        merge(tmp_path / "allowed", base, {"a": adapters["a"]}, {"a": 1.0})
    assert "\n" not in str(err.value)


def test_serving_vllm_refuses_a_target_parameters_adapter(tmp_path: Path, moe: dict) -> None:
    base, adapters = moe["qwen3_moe_experts"]
    spec = {
        "base_model": str(base),
        "adapters": [{"name": "a", "path": str(adapters["a"]), "weight": 1.0}],
        "merge": {"method": "cat"},
        "dtype": "float32",
    }
    with pytest.raises(SoupkitError, match="--serving vllm.*target_parameters"):
        merge_recipe(Recipe.from_dict(spec, tmp_path), tmp_path / "out", RunOptions(progress=False, serving="vllm"))
    assert not (tmp_path / "out").exists()


def test_eval_of_an_expert_adapter_is_refused_not_dropped(moe: dict) -> None:
    """eval applies Linear/Embedding LoRAs in memory: expert tensors must stop it, not vanish from the model."""
    from soupkit.eval.target import load_target

    base, adapters = moe["qwen3_moe_experts"]
    with pytest.raises(SoupkitError, match="targeted-parameter"):
        load_target(adapters["a"], torch.device("cpu"), base)


def test_plan_lists_target_parameters_and_one_row_per_parameter(moe: dict) -> None:
    from soupkit.describe import describe_plan
    from soupkit.execute import plan_recipe

    base, adapters = moe["mixtral_all_linear"]
    spec = {"base_model": str(base), "adapters": [{"name": "a", "path": str(adapters["a"])}], "merge": {"method": "cat"}}
    recipe = Recipe.from_dict(spec, base.parent)
    text = describe_plan(recipe, plan_recipe(recipe)[0])
    assert "target_parameters down_proj, gate.weight, gate_up_proj" in text.splitlines()[0]
    assert "model.layers.1.mlp.experts.gate_up_proj.{0..3}  96x32" in text and ".gate_up_proj.2 " not in text
