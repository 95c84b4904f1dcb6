"""The paper's MoE baseline: both frozen LoRAs active at once, mixed per token by a learned router per layer.

Each decoder layer ``l`` gets a gate on its input hidden states ``h`` (batch, seq, hidden):

    g_l(h) = softmax(b_l + W_l rms(h) / hidden)        # (batch, seq, n_adapters)

and every targeted linear module of that layer computes ``base(x) + sum_i g_l,i * s_i * B_i A_i x``, with
``s_i = alpha_i / r_i`` and the LoRAs' A, B frozen. Only ``W_l`` and ``b_l`` train. Both start at zero, so
the router starts at 0.5/0.5, like ``fit-alpha --init uniform``; with ``W = 0`` it is exactly CAT with a
softmax over the adapters per layer, so the input-dependent part is what the router adds. ``rms(h)`` is
``h`` divided by its root mean square (no learned scale), and ``/ hidden`` keeps a step of ``W_l`` under
Adam about the size of a step of ``b_l``, so one learning rate (fit-alpha's) serves both.

The routed model runs only at inference time: its mixing weights depend on the token, so it cannot be
written as one adapter. The table labels it so.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from examples.skill_composition.model import sft_batches, train_loop
from examples.skill_composition.weights import PLAIN_KEYS


class LayerRouter(nn.Module):
    """Per-token softmax weights over ``n`` adapters from one decoder layer's input."""

    def __init__(self, hidden: int, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n, hidden))
        self.bias = nn.Parameter(torch.zeros(n))
        self.gates: torch.Tensor | None = None  # (batch, seq, n), set by the layer's pre-hook

    def route(self, hidden_states: torch.Tensor) -> None:
        h = hidden_states.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        logits = self.bias + h @ self.weight.float().t() / h.shape[-1]
        self.gates = torch.softmax(logits, dim=-1)


class RoutedLoRALinear(nn.Module):
    """``base(x) + sum_i gate_i * s_i * B_i A_i x`` with frozen A_i (r_i, in), B_i (out, r_i)."""

    def __init__(self, base: nn.Linear, factors: list[tuple[torch.Tensor, torch.Tensor, float]], router: LayerRouter):
        super().__init__()
        self.base, self.router = base, [router]  # a list: the router is owned by the layer, not this module
        self.a = nn.ParameterList([nn.Parameter(a, requires_grad=False) for a, _, _ in factors])
        self.b = nn.ParameterList([nn.Parameter(b, requires_grad=False) for _, b, _ in factors])
        self.scales = [s for _, _, s in factors]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        gates = self.router[0].gates.to(out.dtype)
        for i, (a, b, s) in enumerate(zip(self.a, self.b, self.scales)):
            out = out + gates[..., i : i + 1] * (s * ((x @ a.to(x.dtype).t()) @ b.to(x.dtype).t()))
        return out


def lora_factors(adapter_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """module path -> (A, B, alpha / r) of a plain PEFT LoRA (the experiment's own adapters)."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    odd = {k: config.get(k) for k in (*PLAIN_KEYS, "rank_pattern", "alpha_pattern") if config.get(k)}
    if odd:
        raise ValueError(f"{adapter_dir}: the router takes plain LoRAs (one r and alpha), found {odd}")
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    out = {}
    for key, a in tensors.items():
        if key.endswith("lora_A.weight"):
            path = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = tensors[key.replace("lora_A", "lora_B")]
            out[path] = (a.float(), b.float(), config["lora_alpha"] / config["r"])
    return out


def routed_model(base, adapter_dirs: list[Path]) -> tuple[nn.Module, list[LayerRouter]]:
    """A copy of ``base`` with every module the adapters target routed; one router per decoder layer."""
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(False)
    factors = [lora_factors(d) for d in adapter_dirs]
    device = next(model.parameters()).device
    layers = model.model.layers
    routers = [LayerRouter(model.config.hidden_size, len(adapter_dirs)).to(device) for _ in layers]
    for index, (layer, router) in enumerate(zip(layers, routers)):
        layer.register_forward_pre_hook(lambda _mod, args, r=router: r.route(args[0]))
        prefix = f"model.layers.{index}."
        for name, module in list(layer.named_modules()):
            path = prefix + name
            if not isinstance(module, nn.Linear) or not any(path in f for f in factors):
                continue
            missing = [str(d) for d, f in zip(adapter_dirs, factors) if path not in f]
            if missing:
                raise ValueError(f"{path}: not targeted by {missing}; this router mixes adapters with the same targets")
            parts = [(f[path][0].to(device), f[path][1].to(device), f[path][2]) for f in factors]
            parent = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
            setattr(parent, name.rsplit(".", 1)[-1], RoutedLoRALinear(module, parts, router))
    return model, routers


def gate_stats(routers: list[LayerRouter], names: list[str]) -> dict:
    """Mean gate per adapter per layer (over the tokens of the last forward): mean / min / max over layers."""
    per_layer = [r.gates.float().reshape(-1, len(names)).mean(0).tolist() for r in routers if r.gates is not None]
    return {
        name: {
            "mean": sum(g[i] for g in per_layer) / len(per_layer),
            "min": min(g[i] for g in per_layer),
            "max": max(g[i] for g in per_layer),
            "n": len(per_layer),
        }
        for i, name in enumerate(names)
    }


def train_router(base, adapter_dirs: list[Path], examples: list, cfg, codec, seed: int, log) -> tuple[nn.Module, dict]:
    """Fit the routers on ``examples`` with fit-alpha's optimizer budget (steps, batch, learning rate)."""
    torch.manual_seed(seed)
    model, routers = routed_model(base, adapter_dirs)
    params = [p for r in routers for p in r.parameters()]
    device = next(model.parameters()).device
    batch = sft_batches(examples, codec, cfg.fit_batch, seed + 11, device)
    t0 = time.time()
    losses = train_loop(model, params, batch, cfg.fit_steps, cfg.fit_lr, log)
    info = {
        "steps": cfg.fit_steps,
        "seconds": time.time() - t0,
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "router_parameters": sum(p.numel() for p in params),
        "gates": gate_stats(routers, [d.name for d in adapter_dirs]),
    }
    return model, info
