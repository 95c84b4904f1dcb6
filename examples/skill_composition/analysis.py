"""How big each adapter is relative to the model, and how much two adapters overlap.

ratio(module) = ||s B A||_F / ||W||_F (W the base weight of that module);
cosine(module) = <dW_math, dW_code>_F / (||dW_math|| ||dW_code||).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from soupkit.io.adapter import LoraAdapter


def _deltas(adapter_dir: Path) -> dict[str, torch.Tensor]:
    adapter = LoraAdapter(adapter_dir.name, adapter_dir)
    out = {}
    for path in adapter.modules:
        f = adapter.load(path)
        out[path] = (f.B @ f.A).double()
    return out


def _base_norms(base_dir: Path, paths: list[str]) -> dict[str, float]:
    files = sorted(base_dir.glob("*.safetensors"))
    norms: dict[str, float] = {}
    for file in files:
        with safe_open(str(file), "pt") as handle:
            for path in paths:
                key = f"{path}.weight"
                if key in handle.keys():  # noqa: SIM118 - safe_open is not a dict
                    norms[path] = float(handle.get_tensor(key).double().norm())
    return norms


def _summary(values: list[float]) -> dict:
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}


def adapter_stats(base_dir: Path, adapters: dict[str, Path], pair: tuple[str, str] = ("math", "code")) -> dict:
    """Delta/weight norm ratio per adapter (mean, min, max over modules, and per module kind) and
    the per-module cosine between the two skill adapters' deltas."""
    deltas = {name: _deltas(path) for name, path in adapters.items()}
    paths = sorted(next(iter(deltas.values())))
    base = _base_norms(base_dir, paths)
    stats: dict = {"ratio": {}, "cosine": {}}
    for name, d in deltas.items():
        ratios = {p: float(d[p].norm()) / base[p] for p in d}
        by_kind: dict[str, list[float]] = {}
        for p, v in ratios.items():
            by_kind.setdefault(p.rsplit(".", 1)[-1], []).append(v)
        stats["ratio"][name] = {**_summary(list(ratios.values())), "by_kind": {k: _summary(v) for k, v in by_kind.items()}}
    a, b = (deltas[n] for n in pair)
    cos = {p: float((a[p] * b[p]).sum() / (a[p].norm() * b[p].norm() + 1e-30)) for p in paths if p in b}
    by_kind = {}
    for p, v in cos.items():
        by_kind.setdefault(p.rsplit(".", 1)[-1], []).append(v)
    by_kind_summary = {k: _summary(v) for k, v in by_kind.items()}
    stats["cosine"] = {"pair": list(pair), **_summary(list(cos.values())), "by_kind": by_kind_summary}
    return stats
