"""Human-readable summaries printed by ``soupkit plan``, ``methods`` and ``inspect``."""

from __future__ import annotations

import types
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Union, get_args, get_origin

from pydantic import BaseModel

from soupkit.io.adapter import LoraAdapter
from soupkit.io.adapter_config import VLLM_MODULES_TO_SAVE
from soupkit.io.base_model import layer_of
from soupkit.methods import REGISTRY
from soupkit.ops import frobenius_norm
from soupkit.plan import Plan
from soupkit.recipe.schema import AdapterSpec, MergeSpec, ModuleOverride, Recipe


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def format_table(rows: Sequence[Sequence[object]], indent: str = "", right: Sequence[int] = ()) -> list[str]:
    """Rows as lines with aligned columns (two spaces apart); columns in ``right`` are right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells if i < len(row)) for i in range(max(map(len, cells), default=0))]
    lines = []
    for row in cells:
        padded = [c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(row)]
        lines.append((indent + "  ".join(padded)).rstrip())
    return lines


def type_name(annotation: object) -> str:
    """A parameter's type as a user writes it: ``full|core`` for a Literal, ``float | None`` for a union."""
    if get_origin(annotation) is Literal:
        return "|".join(str(v) for v in get_args(annotation))
    if get_origin(annotation) in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in get_args(annotation))
    return "None" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def param_lines(params: type[BaseModel]) -> list[str]:
    """One line per parameter: name, type (choices for a Literal), default, description."""
    lines = []
    for field, info in params.model_fields.items():
        name = info.alias or field  # e.g. ``lambda``, a Python keyword, is the alias of ``lambda_``
        default = "required" if info.is_required() else f"default {info.get_default(call_default_factory=True)!r}"
        kind = type_name(info.annotation)
        lines.append(f"{name} ({kind}, {default}): {info.description or ''}".rstrip(": "))
    return lines


def describe_methods(verbose: bool = True) -> str:
    """Every registered method: name, space, formula, parameters, paper."""
    if not verbose:  # one aligned row per method
        return "\n".join(format_table([(name, f"[{m.space}]", m.summary) for name, m in sorted(REGISTRY.items())]))
    blocks = []
    for name, method in sorted(REGISTRY.items()):
        lines = [f"{name}  [{method.space}]  {method.summary}", f"    paper: {method.paper}"]
        lines.append(f"    modules_to_save and lora_bias tensors: {method.full_tensor_rule}")
        lines += [f"    {line}" for line in param_lines(method.Params)] or ["    (no parameters beyond weights and rank)"]
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


def recipe_field_rows() -> list[tuple[str, str]]:
    """(field path, description) for every recipe field, from the schema's Field descriptions."""
    rows = []
    for prefix, model in (
        ("", Recipe),
        ("adapters[].", AdapterSpec),
        ("merge.", MergeSpec),
        ("merge.modules[].", ModuleOverride),
    ):
        for name, info in model.model_fields.items():
            default = "" if info.is_required() else f" Default: {info.get_default(call_default_factory=True)!r}."
            rows.append((prefix + name, f"{info.description or ''}{default}"))
    rows.append(("merge.<param>", "The chosen method's own parameters: see `soupkit methods`."))
    return rows


def describe_plan(recipe: Recipe, plan: Plan) -> str:
    """What will be read per layer, output rank per module, bytes, estimated peak memory."""
    names = [a.name for a in recipe.adapters]
    lines = [
        (
            f"method {plan.method}; output {recipe.output}, rank {plan.rank}, dtype {recipe.dtype}; "
            f"targets {', '.join(plan.target_modules)}"
        ),
    ]
    if plan.target_parameters:
        lines[0] += f"; target_parameters {', '.join(plan.target_parameters)}"
    rows: list[Sequence[object]] = [("module", "shape", "merged rank", "written r", "sources (rank, weight)")]
    for layer in plan.layers:
        rows.append((f"layer {layer.index}:" if layer.index is not None else "outside layers:",))
        experts: dict[tuple, list[int]] = {}  # the experts of a parameter alike in all but their index share a row
        for m in layer.modules:
            srcs = ", ".join(f"{names[s.adapter]}(r={s.rank}, w={s.weight:g})" for s in m.sources) or "none (zeros)"
            row = (f"  {m.path}", f"{m.d_out}x{m.d_in}", m.rank, plan.rank, srcs)
            if m.param is None or m.param.expert is None:
                rows.append(row)
                continue
            key = (f"  {m.param.param.path}", *row[1:])
            if key not in experts:
                experts[key] = []
                rows.append(key)
            experts[key].append(m.param.expert)
        for key, found in experts.items():
            ids = sorted(found)  # plan order is by path text: 0, 1, 10, 11, ..., 2
            span = f"{ids[0]}..{ids[-1]}" if ids == list(range(ids[0], ids[-1] + 1)) else ",".join(map(str, ids))
            rows[rows.index(key)] = (f"{key[0]}.{{{span}}}" if len(ids) > 1 else f"{key[0]}.{ids[0]}", *key[1:])
    lines += format_table(rows, right=(2, 3))
    for saved in plan.saved:
        srcs = ", ".join(f"{names[s.adapter]}(w={s.weight:g})" for s in saved.sources)
        lines.append(f"modules_to_save {saved.name} {'x'.join(map(str, saved.shape))}: base + merged (saved - base) of {srcs}")
    if plan.biased:
        lines.append(f"lora_bias: {len(plan.biased)} modules merge a bias update with the same weights")
    lines.append(
        "merged rank: the rank of the module's merged update (merge.rank, else the method's default, at most "
        "min(d_out, d_in)); written r: the output's one rank, to which smaller modules are zero-padded"
    )
    lines.append(
        f"read {human_bytes(plan.bytes_read)}, write {human_bytes(plan.bytes_written)}, "
        f"estimated peak working memory {human_bytes(plan.peak_bytes)} (one module at a time)"
    )
    return "\n".join(lines)


def describe_adapter(directory: Path) -> str:
    """Rank, alpha, scale, targets, layers, dtype and the norm of each module's update."""
    adapter = LoraAdapter(directory.name, directory)
    cfg = adapter.config
    specs = list(adapter.modules.values())
    dtypes = Counter(adapter.index.infos[s.a_key].dtype for s in specs)
    layers = sorted({layer_of(s.path) for s in specs} - {None})  # type: ignore[type-var]
    lines = [
        f"adapter {directory}",
        (
            f"  r {cfg.get('r')}, lora_alpha {cfg.get('lora_alpha')}, use_rslora {bool(cfg.get('use_rslora'))}, "
            f"rank_pattern {cfg.get('rank_pattern') or {}}, alpha_pattern {cfg.get('alpha_pattern') or {}}"
        ),
        f"  base {cfg.get('base_model_name_or_path')}, task {cfg.get('task_type')}, fan_in_fan_out {adapter.fan_in_fan_out}",
        f"  targets {', '.join(sorted({s.path.rsplit('.', 1)[-1] for s in specs}))}; "
        f"layers {layers[0]}..{layers[-1]} ({len(layers)})"
        if layers
        else "  no layered modules",
        f"  dtype {', '.join(f'{k} x{v}' for k, v in dtypes.items())}; {len(specs)} modules",
    ]
    if adapter.biases:
        lines.append(f"  lora_bias: {len(adapter.biases)} modules add a bias update")
    if adapter.saved:
        lines.append(f"  modules_to_save: {', '.join(adapter.saved)} (full trained copies); {VLLM_MODULES_TO_SAVE}")
    if adapter.param_wrappers:
        lines.append(
            f"  target_parameters {', '.join(cfg.get('target_parameters') or [])}: {len(adapter.param_wrappers)} wrapped "
            "parameter tensors (MoE experts, routers), placed against the base at merge time; not listed below"
        )
    if adapter.magnitudes:
        lines.append("  use_dora: each module's update is its task vector W' - W (the norms below are of s B A only)")
    rows: list[Sequence[object]] = [("module", "rank", "scale", "||s B A||_F")]
    rows += [(spec.path, spec.rank, f"{spec.scale:g}", f"{frobenius_norm(adapter.load(spec.path)):.4g}") for spec in specs]
    return "\n".join(lines + format_table(rows, indent="  ", right=(1, 2, 3)))
