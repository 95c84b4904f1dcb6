"""Shared fixtures: the shipped tiny example, recipe writing, and plain dense references."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny"


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread for a test of tiny tensors: on a busy 2-core machine a small float64 product or
    LAPACK call takes milliseconds with two OpenMP threads and microseconds with one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny() -> Path:
    """examples/tiny: base (2-layer Llama, float32), adapters math (r4) and code (r8, 4 targets)."""
    return TINY


def write_recipe(directory: Path, recipe: dict, name: str = "recipe.yaml") -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def tiny_recipe(method: str = "cat", weights: tuple[float, float] = (1.0, 1.0), **merge: object) -> dict:
    """A recipe dict over examples/tiny with absolute paths (so it can live in any tmp dir)."""
    return {
        "base_model": str(TINY / "base"),
        "adapters": [
            {"name": "math", "path": str(TINY / "adapters" / "math"), "weight": weights[0]},
            {"name": "code", "path": str(TINY / "adapters" / "code"), "weight": weights[1]},
        ],
        "merge": {"method": method, **merge},
        "dtype": "float32",
    }


def reference_deltas(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Dense s * B @ A per module path, computed plainly from the files (the independent reference)."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    out = {}
    for key, A in tensors.items():
        if key.endswith("lora_A.weight"):
            path = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            B = tensors[key.replace("lora_A", "lora_B")]
            r = A.shape[0]
            scale = config["lora_alpha"] / (r**0.5 if config.get("use_rslora") else r)
            out[path] = scale * B.double() @ A.double()
    return out


def weighted_sum(deltas: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """sum_i w_i * delta_i per module; a module an adapter lacks contributes nothing."""
    out: dict[str, torch.Tensor] = {}
    for delta, w in zip(deltas, weights):
        for path, d in delta.items():
            out[path] = out.get(path, torch.zeros_like(d)) + w * d
    return out


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``-m gpu`` on a machine without CUDA skips the GPU tests (with the reason) instead of failing them."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
