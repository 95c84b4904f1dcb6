"""Random Llama-shaped bases and LoRA adapters written straight to disk, for benchmarks.

Nothing is instantiated: each tensor is generated and streamed into safetensors one at a time, so a
7B-shaped base (13.5 GB in bf16) is built with a few hundred MB of RAM. Key names, config.json and
adapter_config.json are what transformers and PEFT write, so both load the files.

    from benchmarks.llama_shapes import ensure_fixture
    base_dir, adapter_dirs = ensure_fixture(Path("/tmp/soupkit-bench"), "llama-1b", n_adapters=2, rank=32)

Functions: ``SHAPES``, ``llama_config(shape)``, ``base_tensor_shapes(shape)``, ``build_base(out, shape)``,
``build_adapter(out, shape, rank, alpha, seed, targets)``, ``ensure_fixture(root, shape, ...)``.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import torch

from soupkit.io.writer import SafetensorsStreamWriter

SHAPES: dict[str, dict[str, int]] = {
    # hidden, layers, intermediate, heads, kv heads, vocab
    "llama-1b": {"hidden": 2048, "layers": 16, "intermediate": 8192, "heads": 32, "kv_heads": 8, "vocab": 32000},
    "llama-7b": {"hidden": 4096, "layers": 32, "intermediate": 11008, "heads": 32, "kv_heads": 32, "vocab": 32000},
    "llama3-8b": {"hidden": 4096, "layers": 32, "intermediate": 14336, "heads": 32, "kv_heads": 8, "vocab": 128256},
    "llama3-8b-4layers": {"hidden": 4096, "layers": 4, "intermediate": 14336, "heads": 32, "kv_heads": 8, "vocab": 128256},
    "llama-tiny": {"hidden": 256, "layers": 4, "intermediate": 512, "heads": 4, "kv_heads": 2, "vocab": 1000},
}
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHARD_BYTES = 2 * 1024**3


def llama_config(shape: str) -> dict:
    """config.json contents for a random Llama of this shape (bf16, untied embeddings)."""
    s = SHAPES[shape]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": s["hidden"],
        "intermediate_size": s["intermediate"],
        "num_hidden_layers": s["layers"],
        "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv_heads"],
        "vocab_size": s["vocab"],
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def module_shapes(shape: str) -> dict[str, tuple[int, int]]:
    """Leaf name -> (out_features, in_features) of each linear module in a layer."""
    s = SHAPES[shape]
    head_dim = s["hidden"] // s["heads"]
    kv = s["kv_heads"] * head_dim
    h, i = s["hidden"], s["intermediate"]
    return {
        "q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
        "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i),
    }  # fmt: skip


def base_tensor_shapes(shape: str) -> dict[str, tuple[int, ...]]:
    """Every tensor of the base model, in the order transformers writes them."""
    s = SHAPES[shape]
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (s["vocab"], s["hidden"])}
    for layer in range(s["layers"]):
        prefix = f"model.layers.{layer}"
        for leaf, dims in module_shapes(shape).items():
            group = "self_attn" if leaf in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            out[f"{prefix}.{group}.{leaf}.weight"] = dims
        out[f"{prefix}.input_layernorm.weight"] = (s["hidden"],)
        out[f"{prefix}.post_attention_layernorm.weight"] = (s["hidden"],)
    out["model.norm.weight"] = (s["hidden"],)
    out["lm_head.weight"] = (s["vocab"], s["hidden"])
    return out


def _random(shape: tuple[int, ...], gen: torch.Generator, std: float) -> torch.Tensor:
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=gen) * std).to(torch.bfloat16)


def write_zero_file(path: Path, specs: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """A safetensors file whose data is one sparse hole: every tensor reads as zeros, no disk used.

    For benchmarks of adapter merges, which read the base's headers only (PEFT loads the zeros)."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, (tag, dims) in specs.items():
        size = 2 * int(torch.tensor(dims).prod())  # BF16
        header[key] = {"dtype": tag, "shape": list(dims), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.truncate(8 + len(raw) + offset)


def build_base(out: Path, shape: str, seed: int = 0, shard_bytes: int = SHARD_BYTES, zeros: bool = False) -> Path:
    """Write a random bf16 base (sharded safetensors + index + config.json) to ``out``.

    ``zeros``: sparse files of zeros instead (seconds, no disk), for runs that never read base values."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = base_tensor_shapes(shape)
    shards: list[dict[str, tuple[int, ...]]] = [{}]
    size = 0
    for key, dims in tensors.items():
        nbytes = 2 * int(torch.tensor(dims).prod())
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = dims
        size += nbytes
    gen = torch.Generator().manual_seed(seed)
    weight_map = {}
    for k, shard in enumerate(shards, start=1):
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        specs = {key: ("BF16", dims) for key, dims in shard.items()}
        if zeros:
            write_zero_file(out / name, specs)
            weight_map.update(dict.fromkeys(shard, name))
            continue
        with SafetensorsStreamWriter(out / name, specs, {"format": "pt"}) as writer:
            for key, dims in shard.items():
                writer.write(key, _random(dims, gen, 0.02))
                weight_map[key] = name
    total = sum(2 * int(torch.tensor(d).prod()) for d in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(llama_config(shape), indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return out


def build_adapter(
    out: Path, shape: str, rank: int = 32, alpha: int = 64, seed: int = 1, targets: list[str] | None = None
) -> Path:
    """Write a random bf16 PEFT LoRA adapter (non-zero A and B) for a base of ``shape``."""
    targets = targets or ALL_LINEAR
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    specs: dict[str, tuple[str, tuple[int, ...]]] = {}
    for key, dims in base_tensor_shapes(shape).items():
        leaf = key.rsplit(".", 2)[-2]
        if leaf in targets and key.startswith("model.layers."):
            path = key.removesuffix(".weight")
            specs[f"base_model.model.{path}.lora_A.weight"] = ("BF16", (rank, dims[1]))
            specs[f"base_model.model.{path}.lora_B.weight"] = ("BF16", (dims[0], rank))
    with SafetensorsStreamWriter(out / "adapter_model.safetensors", dict(sorted(specs.items())), {"format": "pt"}) as w:
        for key, (_, dims) in sorted(specs.items()):
            w.write(key, _random(dims, gen, 1.0 / dims[1] ** 0.5 * (0.1 if "lora_B" in key else 1.0)))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "../base", "r": rank,
        "lora_alpha": alpha, "target_modules": targets, "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "inference_mode": True,
    }  # fmt: skip
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


def ensure_fixture(
    root: Path, shape: str, n_adapters: int = 2, rank: int = 32, targets: list[str] | None = None, zero_base: bool = False
) -> tuple[Path, list[Path]]:
    """Build (once) ``root/shape/base`` (``base-zeros`` with ``zero_base``) and ``root/shape/adapter{i}``."""
    home = root / shape
    base = home / ("base-zeros" if zero_base else "base")
    if not (base / "config.json").is_file():
        shutil.rmtree(base, ignore_errors=True)
        build_base(base.with_name(base.name + ".partial"), shape, zeros=zero_base)
        base.with_name(base.name + ".partial").rename(base)
    adapters = []
    for i in range(n_adapters):
        adapter = home / f"adapter{i}_r{rank}"
        if not (adapter / "adapter_config.json").is_file():
            build_adapter(adapter, shape, rank=rank, seed=100 + i, targets=targets)
        adapters.append(adapter)
    return base, adapters


def remove_fixture(root: Path, shape: str) -> None:
    """Delete a built fixture (7B shapes take 13.5 GB of disk)."""
    shutil.rmtree(root / shape, ignore_errors=True)
