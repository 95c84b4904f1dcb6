"""The executor: a plain loop over the plan's layers. Read factors, merge, pad, write."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from soupkit.errors import SoupkitError
from soupkit.io.adapter import BASE_LAYER, PREFIX, LoraAdapter
from soupkit.io.base_check import check_adapters_base
from soupkit.io.base_model import BaseModelInfo
from soupkit.io.experts import OUTPUT_PEFT_VERSION, ParamSlot, attach_param_targets, param_structure
from soupkit.io.output_guard import OutputTarget, check_apart
from soupkit.io.progress import progress as progress_bar
from soupkit.io.resolve import hub_name, hub_pin, resolve_reference
from soupkit.io.writer import SafetensorsStreamWriter, check_finite_cast, dtype_tag
from soupkit.methods import LoraFactors, MergeContext, get_method
from soupkit.methods.base import ModuleInputs, RunInputs
from soupkit.ops import dense_delta, pad_rank, truncate_dense
from soupkit.ops.dora import dora_task_vector, exact_factors, rank_for_energy
from soupkit.plan import ModulePlan, Plan, SavedPlan, build_plan
from soupkit.recipe.schema import Recipe

TORCH_DTYPE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}  # recipe `dtype` -> torch


@dataclass(frozen=True)
class RunOptions:
    """Run-time options that do not change the result (beyond float tolerance for ``device``)."""

    device: str = "cpu"
    overwrite: bool = False
    dry_run: bool = False
    progress: bool = True
    shard_bytes: int = 5 * 10**9  # full-model export: data bytes per safetensors shard
    serving: str | None = None  # "vllm": refuse an adapter output that vLLM cannot load
    drop_modules_to_save: bool = False  # leave modules_to_save out of an adapter output (says so on stderr)


@dataclass
class Inputs:
    """The opened inputs of a recipe: adapters (in recipe order) and base-model headers."""

    adapters: list[LoraAdapter]
    base: BaseModelInfo
    # (adapter index, module path) -> factors on the merge device, kept between merges (soupkit sweep's
    # trials re-merge the same inputs); None: read from the files each time (one module in memory)
    factor_cache: dict[tuple[int, str], LoraFactors] | None = None


def open_inputs(recipe: Recipe) -> Inputs:
    """Resolve and open every input (headers only)."""
    base_dir = resolve_reference(
        recipe.base_model, recipe.root, "base_model", "base+tokenizer" if recipe.output == "model" else "base"
    )
    adapters = [
        LoraAdapter(spec.name, resolve_reference(spec.path, recipe.root, f"adapters[{i}].path"))
        for i, spec in enumerate(recipe.adapters)
    ]
    base = BaseModelInfo(base_dir)
    check_adapters_base(adapters, base, recipe.base_model)
    if any(a.param_wrappers for a in adapters):
        structure = param_structure(base)
        for adapter in adapters:
            attach_param_targets(adapter, structure)
    return Inputs(adapters, base)


def plan_recipe(recipe: Recipe) -> tuple[Plan, Inputs]:
    """Open the inputs and build the plan, reading headers only."""
    inputs = open_inputs(recipe)
    return build_plan(recipe, inputs.adapters, inputs.base, recipe.dtype), inputs


def available_memory(device: str = "cpu") -> int | None:
    """Bytes the merge can still allocate: free GPU memory, or the kernel's MemAvailable (None if unknown)."""
    if device == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info()[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the kernel reports kB
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def memory_problem(plan: Plan, device: str = "cpu") -> SoupkitError | None:
    """The error to raise (merge, validate) or print as a warning (plan) if the plan's peak does not fit."""
    free = available_memory(device)
    if free is None or plan.peak_bytes <= free:
        return None
    where = "GPU" if device == "cuda" else "this machine"
    return SoupkitError(
        "plan",
        f"an estimated peak working memory within the {free / 2**30:.1f} GiB available on {where}",
        f"{plan.peak_bytes / 2**30:.1f} GiB (largest module, rank {plan.rank})",
        "lower merge.rank, use a factor-space method (svd, linear, lego), or a machine with more memory",
    )


def check_inputs_apart(target: OutputTarget, inputs: Inputs, recipe_file: Path | None) -> None:
    """The output must not be, hold or lie inside the base, an adapter, or their files; nor hold the recipe."""
    folders = [("base model", inputs.base.directory)] + [(f"adapter '{a.name}'", a.directory) for a in inputs.adapters]
    files = [("base model file", f) for f in inputs.base.files()]
    files += [(f"adapter '{a.name}' file", f) for a in inputs.adapters for f in a.files()]
    files += [("recipe file", recipe_file)] if recipe_file is not None else []
    check_apart(target, folders, files)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SoupkitError("--device", "a visible CUDA GPU", "none", "use --device cpu")
    return torch.device(name)


def load_sources(inputs: Inputs, module: ModulePlan, device: torch.device) -> list[LoraFactors]:
    """Each source's float32 factors on ``device``, scale folded into B and also kept as ``scale``.

    A DoRA source is its exact task vector t = W' - W (ops/dora.py), as factors of rank min(d_out, d_in).
    """
    out = []
    cache = inputs.factor_cache
    for source in module.sources:
        adapter = inputs.adapters[source.adapter]
        key = (source.adapter, module.path)
        factors = cache.get(key) if cache is not None else None
        if factors is None:
            factors = adapter.load(module.path, device)
            if adapter.modules[module.path].magnitude_key is None:
                factors = LoraFactors(A=factors.A, B=factors.B, scale=adapter.modules[module.path].scale)
            else:
                weight = inputs.base.index.get(inputs.base.key_of[f"{module.path}.weight"]).to(device=device, dtype=torch.float32)
                if module.kind == "embedding" or adapter.fan_in_fan_out:  # stored (d_in, d_out)
                    weight = weight.T
                magnitude = adapter.load_magnitude(module.path, device)
                factors = exact_factors(dora_task_vector(weight, factors, magnitude))
            if cache is not None:
                cache[key] = factors
        out.append(factors)
    return out


def source_names(recipe: Recipe, module: ModulePlan) -> tuple[str, ...]:
    return tuple(recipe.adapters[s.adapter].name for s in module.sources)


def run_inputs(recipe: Recipe, plan: Plan, inputs: Inputs, device: torch.device) -> RunInputs:
    """The lazy module stream a method's ``prepare`` pass may read (one module in memory at a time)."""

    def modules() -> Iterator[ModuleInputs]:
        for module in plan.modules:
            if module.sources:
                ctx = MergeContext(module.path, module.budget, recipe.seed, device, None, source_names(recipe, module))
                yield ModuleInputs(ctx, load_sources(inputs, module, device), [s.weight for s in module.sources])

    return RunInputs(len(inputs.adapters), modules)


def iter_merged(
    recipe: Recipe, plan: Plan, inputs: Inputs, device: torch.device, progress: bool = False
) -> Iterator[tuple[ModulePlan, LoraFactors, float | None]]:
    """Yield each planned module's merged factors (float32, padded to ``plan.rank``), layer by layer.

    Memory: one module's inputs and output at a time.
    """
    method = get_method(recipe.merge.method)
    state = method.prepare(recipe.merge.params, run_inputs(recipe, plan, inputs, device))
    short: dict[str, tuple[float, int]] = {}  # DoRA module -> (energy kept, rank reaching merge.min_energy)
    for layer in progress_bar(plan.layers, f"merge ({method.name})", "layer", enabled=progress):
        for module in layer.modules:
            if not module.sources:
                zeros = LoraFactors(A=torch.zeros(plan.rank, module.d_in), B=torch.zeros(module.d_out, plan.rank))
                yield module, zeros, None
                continue
            factors = load_sources(inputs, module, device)
            ctx = MergeContext(module.path, module.budget, recipe.seed, device, state, source_names(recipe, module))
            result = method.merge(factors, [s.weight for s in module.sources], recipe.merge.params, ctx)
            merged, kept = result.factors, result.energy_kept
            if module.dora and recipe.output == "adapter":  # the exact merge of task vectors, cut to rank k
                merged, kept, needed = best_rank(merged, module.rank, recipe.merge.min_energy)
                short[module.path] = (kept, needed) if needed else short.get(module.path)  # type: ignore[assignment]
            for name, factor in (("A", merged.A), ("B", merged.B)):  # float32 overflow of huge weights
                check_finite_cast(factor, factor, f"module {module.path} (merged {name}, float32)")
            yield module, pad_rank(merged, plan.rank), kept
        for adapter in inputs.adapters:  # unmap this layer's pages: RSS stays flat in adapter size
            adapter.index.close()
    short = {path: v for path, v in short.items() if v}
    if short:  # after every module, so that the rank named reaches the target everywhere
        worst = min(short, key=lambda path: short[path][0])
        raise SoupkitError(
            "merge.min_energy",
            f"rank-{plan.rank} DoRA merges keeping >= {recipe.merge.min_energy} of their energy",
            f"{short[worst][0]:.4f} kept in {worst} ({len(short)} module(s) short)",
            f"set merge.rank: {max(n for _, n in short.values())} to reach it, or lower merge.min_energy",
        )


def best_rank(factors: LoraFactors, rank: int, min_energy: float) -> tuple[LoraFactors, float, int | None]:
    """Best rank-``rank`` approximation, the energy it keeps, and the rank keeping ``min_energy`` if it falls short.

    Through the dense (d_out, d_in) update: the exact merge of full-rank task vectors has rank up to
    sum_i min(d_out, d_in) in factors, where the smaller Gram matrix (min(d_out, d_in) squared) is cheaper.
    """
    delta = dense_delta(factors)
    truncated, kept = truncate_dense(delta, rank)
    needed = rank_for_energy(torch.linalg.svdvals(delta.double()), min_energy) if kept < min_energy else None
    return truncated, kept, needed


def full_context(recipe: Recipe, name: str, sources: list[str], device: torch.device) -> MergeContext:
    """The context of a whole-tensor merge: ``name`` (a tensor, not a module) salts its random draws."""
    return MergeContext(name, None, recipe.seed, device, None, tuple(sources))


def merged_bias(recipe: Recipe, plan: Plan, inputs: Inputs, module: ModulePlan, device: torch.device) -> torch.Tensor:
    """lora_bias: the merged bias update of ``module``, (d_out,) float32, by the method's ``merge_full``.

    Inputs: s_i * b_i of each adapter with a lora_B.bias there, with the module's weights (the others take no part).
    """
    method = get_method(recipe.merge.method)
    sources = [s for s in module.sources if module.path in inputs.adapters[s.adapter].biases]
    if not sources:
        return torch.zeros(module.d_out, device=device)
    deltas = [inputs.adapters[s.adapter].load_bias(module.path, device) for s in sources]
    names = [recipe.adapters[s.adapter].name for s in sources]
    ctx = full_context(recipe, f"{module.path}.bias", names, device)
    return method.merge_full(deltas, [s.weight for s in sources], recipe.merge.params, ctx)


def merged_saved(recipe: Recipe, inputs: Inputs, saved: SavedPlan, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """modules_to_save: (base tensor, merged delta) in float32: the merged tensor is base + merge_full(saved_i - base)."""
    method = get_method(recipe.merge.method)
    base = inputs.base.index.get(saved.base_key).to(device=device, dtype=torch.float32)
    deltas = [inputs.adapters[s.adapter].load_saved(saved.name, device).sub_(base) for s in saved.sources]
    names = [recipe.adapters[s.adapter].name for s in saved.sources]
    ctx = full_context(recipe, saved.name, names, device)
    return base, method.merge_full(deltas, [s.weight for s in saved.sources], recipe.merge.params, ctx)


def adapter_keys(module: ModulePlan) -> tuple[str, str]:
    """PEFT's on-disk keys for a module's A and B."""
    if module.kind == "embedding":
        return f"{PREFIX}{module.path}.lora_embedding_A", f"{PREFIX}{module.path}.lora_embedding_B"
    return f"{PREFIX}{module.path}.lora_A.weight", f"{PREFIX}{module.path}.lora_B.weight"


def param_keys(slot: ParamSlot, rank: int) -> dict[str, tuple[int, int]]:
    """PEFT's keys and shapes of a targeted parameter's A and B: (rank * E, in) and (out, rank * E).

    PEFT >= 0.19.1 reads a 3-D parameter (E, d1, d2) as in = d2, out = d1 unless its module is
    ``is_transposed`` (then in = d1, out = d2); a 2-D one as (out, in).
    """
    experts = 1 if slot.expert is None else slot.param.shape[0]
    d1, d2 = slot.param.shape[-2:]
    a_in, b_out = (d1, d2) if slot.expert is not None and slot.param.module_transposed else (d2, d1)
    stem = f"{PREFIX}{slot.param.module}{BASE_LAYER * slot.depth}"
    return {f"{stem}.lora_A.weight": (rank * experts, a_in), f"{stem}.lora_B.weight": (b_out, rank * experts)}


def pack_experts(slot: ParamSlot, experts: list[LoraFactors]) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's A and B of a targeted parameter from its experts' factors (expert order; see ``ExpertSlice``)."""
    if slot.expert is None:
        return experts[0].A, experts[0].B
    pairs = [(f.B.T, f.A.T) if slot.param.module_transposed else (f.A, f.B) for f in experts]  # PEFT adds (B_e A_e)^T
    B = torch.stack([b for _, b in pairs], dim=2)  # (out, r, E): column ri * E + e is expert e's column ri
    return torch.cat([a for a, _ in pairs]), B.reshape(B.shape[0], -1)


def base_reference(recipe: Recipe, inputs: Inputs) -> tuple[str, str | None]:
    """How outputs name the base for loaders: (hub id, commit or None), else (absolute path, None).

    The hub id where it is known: a base in the hub cache (``models--org--name/snapshots/<sha>``, named by
    id or by path) is pinned to its commit; a local copy whose adapters all name one hub id as their base
    gets that id. A bare absolute path breaks once the folder moves (PEFT then asks the hub for it). Else
    an absolute path: PEFT's ``AutoPeftModel*`` resolves a relative one against the current folder, not
    the adapter's (the lock file keeps the portable relative form).
    """
    pin = hub_pin(inputs.base.directory)
    if pin:
        name, commit = pin.rsplit("@", 1)
        return name, commit
    claimed = {a.config.get("base_model_name_or_path") for a in inputs.adapters}
    named = claimed.pop() if len(claimed) == 1 else None
    if isinstance(named, str) and hub_name(named) and not Path(named).expanduser().exists():
        return str(hub_name(named)), None
    return str(inputs.base.directory.resolve()), None


def adapter_config(recipe: Recipe, plan: Plan, inputs: Inputs) -> dict:
    """A portable adapter_config.json: scale 1 (lora_alpha == r), one rank, no patterns."""
    task_types = {a.config.get("task_type") for a in inputs.adapters}
    base, revision = base_reference(recipe, inputs)
    return {
        "peft_type": "LORA",
        "task_type": task_types.pop() if len(task_types) == 1 else None,
        "base_model_name_or_path": base,
        "revision": revision,  # AutoPeftModel loads the base at this commit
        "r": plan.rank,
        "lora_alpha": plan.rank,
        "target_modules": list(plan.target_modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": plan.fan_in_fan_out,
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": bool(plan.biased),
        "modules_to_save": list(plan.modules_to_save) if plan.saved else None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    } | (
        {"target_parameters": list(plan.target_parameters), "peft_version": OUTPUT_PEFT_VERSION} if plan.target_parameters else {}
    )


def write_adapter(recipe: Recipe, plan: Plan, inputs: Inputs, tmp: Path, out: Path, options: RunOptions) -> dict[str, float]:
    """Stream the merged adapter into ``tmp`` (renamed to ``out`` later); return energy kept per truncated module."""
    tag = dtype_tag(TORCH_DTYPE[recipe.dtype])
    specs = {}
    for module in plan.modules:
        if module.param is not None:  # a parameter's experts come one after another: its tensors sit at the first
            specs.update({key: (tag, shape) for key, shape in param_keys(module.param, plan.rank).items()})
            continue
        a_key, b_key = adapter_keys(module)
        specs[a_key] = (tag, (plan.rank, module.d_in))
        specs[b_key] = (tag, (module.d_out, plan.rank))
        if plan.biased:  # lora_bias: PEFT gives every LoRA Linear a bias; zeros where no input has one
            specs[f"{b_key.removesuffix('.weight')}.bias"] = (tag, (module.d_out,))
    for saved in plan.saved:  # PEFT's key of a modules_to_save copy: the module's own name
        specs[f"{PREFIX}{saved.name}"] = (tag, saved.shape)
    energy: dict[str, float] = {}
    device = resolve_device(options.device)
    experts: dict[str, list[LoraFactors]] = {}  # parameter path -> its experts' factors so far
    with SafetensorsStreamWriter(tmp / "adapter_model.safetensors", specs, {"format": "pt"}) as writer:
        for module, factors, kept in iter_merged(recipe, plan, inputs, device, options.progress):
            if kept is not None:
                energy[module.path] = round(kept, 6)
            if module.param is not None:
                slot = module.param
                done = experts.setdefault(slot.param.path, [None] * (1 if slot.expert is None else slot.param.shape[0]))  # type: ignore[list-item]
                done[slot.expert or 0] = factors
                if all(f is not None for f in done):
                    for key, tensor in zip(param_keys(slot, plan.rank), pack_experts(slot, experts.pop(slot.param.path))):
                        writer.write(key, tensor)
                continue
            a_key, b_key = adapter_keys(module)
            writer.write(a_key, factors.A)
            writer.write(b_key, factors.B)
            if plan.biased:
                writer.write(f"{b_key.removesuffix('.weight')}.bias", merged_bias(recipe, plan, inputs, module, device))
        for saved in plan.saved:
            base, delta = merged_saved(recipe, inputs, saved, device)
            writer.write(f"{PREFIX}{saved.name}", base.add_(delta))
    (tmp / "adapter_config.json").write_text(json.dumps(adapter_config(recipe, plan, inputs), indent=2) + "\n")
    return energy
