"""The MoE baseline of the skill-composition experiment: a per-layer router over frozen LoRAs.

References are written plainly here: dense float64 deltas (s * B @ A read from the saved files) added to
the base weights, and the routed sum computed by hand for one module."""

from __future__ import annotations

import json

import pytest
import torch

from soupkit.testing import tiny_llama_config

from examples.skill_composition.moe import LayerRouter, RoutedLoRALinear, routed_model, train_router


def _base():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_llama_config()).eval()


def _lora(base, path, seed, targets=("q_proj", "v_proj", "down_proj")):
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    spec = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False)
    get_peft_model(copy.deepcopy(base), spec).save_pretrained(path)
    return path


def _dense_deltas(path):
    """module path -> float64 (alpha / r) * B @ A, straight from the saved safetensors."""
    from safetensors.torch import load_file

    config = json.loads((path / "adapter_config.json").read_text())
    tensors = load_file(str(path / "adapter_model.safetensors"))
    out = {}
    for key, a in tensors.items():
        if key.endswith("lora_A.weight"):
            b = tensors[key.replace("lora_A", "lora_B")]
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            out[name] = config["lora_alpha"] / config["r"] * (b.double() @ a.double())
    return out


def _logits_with_deltas(base, deltas_and_weights, ids):
    import copy

    model = copy.deepcopy(base).double()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for deltas, weight in deltas_and_weights:
            for name, delta in deltas.items():
                params[f"{name}.weight"] += weight * delta
        return model(input_ids=ids).logits


@pytest.mark.parametrize("bias", [(0.0, 0.0), (1.5, -0.5)])
def test_input_independent_router_is_cat_with_softmax_weights(tmp_path, bias):
    """W = 0: every token gets softmax(b), so the routed model is base + g0 dW0 + g1 dW1 (dense reference)."""
    base = _base()
    a, b = _lora(base, tmp_path / "a", 1), _lora(base, tmp_path / "b", 2)
    model, routers = routed_model(base, [a, b])
    for router in routers:
        router.bias.data = torch.tensor(bias)
    ids = torch.randint(4, 60, (3, 17))
    with torch.no_grad():
        got = model(input_ids=ids).logits.double()
    g = torch.softmax(torch.tensor(bias, dtype=torch.float64), 0)
    want = _logits_with_deltas(base, [(_dense_deltas(a), g[0].item()), (_dense_deltas(b), g[1].item())], ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    base_logits = _logits_with_deltas(base, [], ids)
    assert (want - base_logits).abs().max() > 1e-3  # the adapters do change the output


def test_routed_module_mixes_per_token(tmp_path):
    """One module with a token-dependent gate equals the sum written out in float64."""
    torch.manual_seed(3)
    linear = torch.nn.Linear(6, 5, bias=False)
    factors = [(torch.randn(2, 6), torch.randn(5, 2), 2.0), (torch.randn(3, 6), torch.randn(5, 3), 0.5)]
    router = LayerRouter(hidden=6, n=2)
    router.weight.data = torch.randn(2, 6) * 6
    router.bias.data = torch.tensor([0.3, -0.2])
    module = RoutedLoRALinear(linear, factors, router)
    h, x = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    router.route(h)
    got = module(x).double()
    hd = h.double() / (h.double().pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
    gates = torch.softmax(router.bias.double() + hd @ router.weight.double().t() / 6, -1)
    assert (gates[..., 0].max() - gates[..., 0].min()) > 0.1  # the gate does vary over tokens
    want = x.double() @ linear.weight.double().t()
    for i, (fa, fb, s) in enumerate(factors):
        want = want + gates[..., i : i + 1] * s * (x.double() @ fa.double().t() @ fb.double().t())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_training_moves_only_the_routers(tmp_path):
    """The routers learn (loss falls, gates leave 0.5); the base and both LoRAs stay exactly as they were."""
    from types import SimpleNamespace

    from examples.skill_composition.data import Example
    from examples.skill_composition.model import CharCodec

    base = _base()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    a, b = _lora(base, tmp_path / "a", 1), _lora(base, tmp_path / "b", 2)
    files = {p: p.read_bytes() for p in (a / "adapter_model.safetensors", b / "adapter_model.safetensors")}
    examples = [Example(prompt=f"q{i}:", completion="abcabc", answer=0, task="code") for i in range(8)]
    cfg = SimpleNamespace(fit_batch=4, fit_steps=30, fit_lr=0.1)
    model, info = train_router(base, [a, b], examples, cfg, CharCodec(), seed=0, log=lambda _: None)
    assert info["final_loss"] < info["first_loss"]
    assert info["router_parameters"] == 2 * (2 * 64 + 2)
    assert info["gates"]["a"]["n"] == 2
    assert abs(info["gates"]["a"]["mean"] - 0.5) > 0.01
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    assert all(p.read_bytes() == data for p, data in files.items())
    lora_a = model.model.layers[0].self_attn.q_proj.a[0]
    assert not lora_a.requires_grad


def test_router_refuses_adapters_it_cannot_read_plainly(tmp_path):
    base = _base()
    a = _lora(base, tmp_path / "a", 1)
    b = _lora(base, tmp_path / "b", 2, targets=("q_proj",))
    with pytest.raises(ValueError, match="same targets"):
        routed_model(base, [a, b])
    config = json.loads((a / "adapter_config.json").read_text())
    config["rank_pattern"] = {"q_proj": 2}
    (a / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="plain LoRAs"):
        routed_model(base, [a, b])
