"""The merge plan: which tensors each layer reads and writes, from headers only (pure, no maths).

``soupkit plan`` prints it; the executor walks it layer by layer.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, replace

from soupkit.errors import AdapterError, RecipeError, UnsupportedAdapterError, did_you_mean
from soupkit.io.adapter import LoraAdapter
from soupkit.io.adapter_config import FLOAT_TAGS
from soupkit.io.base_model import BaseModelInfo, layer_of
from soupkit.io.experts import ParamSlot, checkpoint_pieces, param_structure
from soupkit.methods import MergeMethod, MethodParams, get_method
from soupkit.recipe.schema import Recipe, Weight

BYTES_F32 = 4
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class Source:
    """One adapter's contribution to one module."""

    adapter: int  # index into recipe.adapters
    rank: int
    weight: float
    nbytes: int  # bytes of A and B on disk


@dataclass(frozen=True)
class ModulePlan:
    """One output module: its inputs, shape (A is (rank, d_in), B is (d_out, rank)) and rank."""

    path: str
    kind: str  # "linear" | "embedding" | "param" (a targeted parameter, or one expert of a 3-D one)
    layer: int | None
    d_in: int
    d_out: int
    sources: tuple[Source, ...]
    rank: int  # the method's rank for this module, before zero-padding to Plan.rank
    budget: int | None = None  # the rank the method is asked for: merge.rank, or the min(d_out, d_in) cap; None: its default
    param: ParamSlot | None = None  # kind "param": where its update goes in the adapter and the checkpoint
    dora: bool = False  # a DoRA source: an adapter output keeps the best rank-``rank`` part of the exact merge

    def peak_bytes(self, dense: bool, out_rank: int) -> int:
        """Working memory to merge this module in float32: inputs, output, dense buffers if any."""
        inputs = sum(s.rank for s in self.sources) * (self.d_in + self.d_out) * BYTES_F32
        output = out_rank * (self.d_in + self.d_out) * BYTES_F32
        dense_bytes = (len(self.sources) + 3) * self.d_in * self.d_out * BYTES_F32 if dense else 0
        return 2 * inputs + output + dense_bytes


@dataclass(frozen=True)
class LayerPlan:
    index: int | None  # None: modules outside the layer stack (embeddings, lm_head)
    modules: tuple[ModulePlan, ...]


@dataclass(frozen=True)
class SavedPlan:
    """One tensor of a ``modules_to_save`` module: merged as base + merge_full(saved_i - base)."""

    name: str  # by module path, e.g. ``lm_head.weight``; the adapter key is PREFIX + name
    base_key: str  # the base checkpoint's key of the same tensor (of the input embedding, for a tied head)
    out_key: str  # the full-model export's key: base_key, or the untied head's name
    shape: tuple[int, ...]
    sources: tuple[Source, ...]  # the adapters that save it (rank 0)


@dataclass(frozen=True)
class Plan:
    """Everything the executor needs, computed before any tensor is read."""

    method: str
    layers: tuple[LayerPlan, ...]
    rank: int  # uniform output rank (modules are zero-padded to it)
    target_modules: tuple[str, ...]  # leaf names for adapter_config.json
    fan_in_fan_out: bool
    bytes_read: int
    bytes_written: int
    peak_bytes: int
    target_parameters: tuple[str, ...] = ()  # adapter_config.json's target_parameters (union of the inputs')
    saved: tuple[SavedPlan, ...] = ()  # modules_to_save tensors, in the base's order
    modules_to_save: tuple[str, ...] = ()  # adapter_config.json's modules_to_save (union of the inputs' entries)
    biased: tuple[str, ...] = ()  # lora_bias: module paths where some input has a lora_B.bias

    @property
    def modules(self) -> list[ModulePlan]:
        return [m for layer in self.layers for m in layer.modules]


def weight_at(weight: Weight, layer: int | None, num_layers: int) -> float:
    """A scalar weight, or a gradient list interpolated linearly over depth (mergekit's rule)."""
    if not isinstance(weight, list):
        return float(weight)
    if len(weight) == 1 or layer is None or num_layers <= 1:
        return float(weight[0])
    pos = layer / (num_layers - 1) * (len(weight) - 1)
    lo = min(math.floor(pos), len(weight) - 2)
    frac = pos - lo
    return float(weight[lo] * (1 - frac) + weight[lo + 1] * frac)


def module_weight(recipe: Recipe, adapter: int, path: str, num_layers: int) -> float:
    """Weight of adapter ``adapter`` at module ``path``: its own weight, then overrides (last wins)."""
    spec = recipe.adapters[adapter]
    weight: Weight = spec.weight
    for override in recipe.merge.modules:
        if spec.name in override.weights and fnmatch.fnmatchcase(path, override.match):
            weight = override.weights[spec.name]
    return weight_at(weight, layer_of(path), num_layers)


def _output_modules(adapters: list[LoraAdapter], base: BaseModelInfo) -> dict[str, str]:
    """Module path -> kind for every base module whose leaf name some adapter targets.

    Modules an adapter lacks are still written (as zeros) so that the output's
    ``target_modules`` leaf names describe exactly the tensors in the file, as PEFT and vLLM expect.
    """
    kind_of_leaf: dict[str, str] = {}
    for adapter in adapters:
        for spec in adapter.modules.values():
            if spec.kind != "param":
                kind_of_leaf[spec.path.rsplit(".", 1)[-1]] = spec.kind
    out = {}
    for name, key in base.key_of.items():
        if name.endswith(".weight") and len(base.index.infos[key].shape) == 2:
            path = name[: -len(".weight")]
            leaf = path.rsplit(".", 1)[-1]
            if leaf in kind_of_leaf:
                out[path] = kind_of_leaf[leaf]
    return out


def _param_slots(adapters: list[LoraAdapter], base: BaseModelInfo) -> tuple[tuple[str, ...], dict[str, ParamSlot]]:
    """The output's target_parameters (the union of the inputs') and a slot per parameter (or expert) they match.

    Every matched parameter of the base is written, zeros where no input has it: PEFT wraps all of them.
    """
    names = tuple(sorted({t for a in adapters if a.param_wrappers for t in a.config.get("target_parameters") or []}))
    if not names:
        return (), {}
    structure = param_structure(base)
    slots = {}
    for params in structure.targeted(list(names)).values():
        for depth, param in enumerate(reversed(params)):  # the module's first parameter is the innermost wrapper
            experts = [None] if len(param.shape) == 2 else list(range(param.shape[0]))
            for e in experts:
                path = param.path if e is None else f"{param.path}.{e}"
                pieces = checkpoint_pieces(base.index, structure.model_type, param, e)
                slots[path] = ParamSlot(param, e, depth, pieces)
    return names, slots


DORA_METHODS = ("cat", "linear", "svd")  # factor-space methods whose result depends on the products B_i A_i only


def _module_plan(
    recipe: Recipe,
    method: MergeMethod,
    adapters: list[LoraAdapter],
    base: BaseModelInfo,
    path: str,
    kind: str,
    slot: ParamSlot | None,
) -> ModulePlan:
    """One output module: its sources, shape, the rank asked of the method (budget) and the rank written.

    A DoRA source is its full task vector (rank min(d_out, d_in)). With a DoRA source, an adapter
    output asks the method for the exact merged update and keeps its best rank-k approximation,
    k = merge.rank, or the method's default rank for the inputs' LoRA ranks.
    """
    shape = slot.param.shape[-2:] if slot else base.index.infos[base.key_of[f"{path}.weight"]].shape
    transposed = kind == "embedding" or (adapters[0].fan_in_fan_out and not slot)
    d_out, d_in = (shape[1], shape[0]) if transposed else (shape[0], shape[1])
    sources, lora_ranks = [], []
    for i, adapter in enumerate(adapters):
        spec = adapter.modules.get(path)
        if spec is not None:
            keys = (spec.a_key, spec.b_key) + ((spec.magnitude_key,) if spec.magnitude_key else ())
            nbytes = sum(adapter.index.infos[k].nbytes for k in keys)
            rank = min(d_in, d_out) if spec.magnitude_key else spec.rank
            sources.append(Source(i, rank, module_weight(recipe, i, path, base.num_layers), nbytes))
            lora_ranks.append(spec.rank)
    dora = any(adapters[s.adapter].modules[path].magnitude_key for s in sources)
    params = recipe.merge.params
    rank = method.output_rank([s.rank for s in sources], params, recipe.merge.rank) if sources else 0
    budget = recipe.merge.rank
    if budget is None and method.uses_rank and rank > min(d_in, d_out):  # capped like an explicit rank: no zero rows
        rank = budget = min(d_in, d_out)
    if dora and recipe.output == "adapter":
        budget = min(d_in, d_out) if method.uses_rank else None
        rank = min(recipe.merge.rank or method.output_rank(lora_ranks, params, None), min(d_in, d_out))
    return ModulePlan(path, kind, layer_of(path), d_in, d_out, tuple(sources), rank, budget, slot, dora)


def check_dora_method(method: MergeMethod, adapters: list[LoraAdapter]) -> None:
    """Refuse DoRA inputs with a method that works on the LoRA factors themselves: a DoRA update is not B @ A."""
    dora = [a.name for a in adapters if a.config.get("use_dora")]
    if dora and method.space != "delta" and method.name not in DORA_METHODS:
        raise RecipeError(
            "merge.method",
            f"a method that merges task vectors with DoRA adapters ({', '.join(DORA_METHODS)} or a delta-space method)",
            f"'{method.name}', which works on the LoRA factors, with DoRA adapter(s) {', '.join(dora)}",
            "choose cat, linear, svd, ties, dare_ties, della or another method listed as space delta by `soupkit methods`",
        )


def build_plan(recipe: Recipe, adapters: list[LoraAdapter], base: BaseModelInfo, out_dtype: str) -> Plan:
    """Plan the merge from headers: validate shapes, resolve weights and ranks, order by layer."""
    method = get_method(recipe.merge.method)
    lora_paths = [spec.path for adapter in adapters for spec in adapter.modules.values() if spec.kind != "param"]
    base.adopt_module_paths(lora_paths + saved_modules(adapters))
    for adapter in adapters:
        for spec in adapter.modules.values():
            if spec.kind != "param":  # targeted parameters were checked against the base when attached
                base.check_module(adapter, spec)
    flags = {a.fan_in_fan_out for a in adapters}
    if len(flags) > 1:
        raise AdapterError(
            "adapters", "the same fan_in_fan_out in every adapter", "a mix of true and false", "use adapters of one base"
        )
    reason = method.check_inputs([[s.rank for s in a.modules.values()] for a in adapters], recipe.merge.params)
    if reason:
        raise RecipeError("merge.method", f"inputs that '{method.name}' can merge", reason, "choose another method")

    modules: list[ModulePlan] = []
    target_parameters, slots = _param_slots(adapters, base)
    outputs = {**_output_modules(adapters, base), **dict.fromkeys(slots, "param")}
    for path, kind in sorted(outputs.items()):
        modules.append(_module_plan(recipe, method, adapters, base, path, kind, slots.get(path)))
    check_dora_method(method, adapters)

    check_rank_budget(recipe, method, modules)
    check_module_globs(recipe, [m.path for m in modules] + saved_modules(adapters))  # overrides weight saved modules too
    rank = max((m.rank for m in modules), default=0)
    if rank == 0:
        raise AdapterError("adapters", "at least one adapted module", "no LoRA tensors", "check the adapter directories")
    layer_ids = sorted({m.layer for m in modules if m.layer is not None})
    layers = [LayerPlan(i, tuple(m for m in modules if m.layer == i)) for i in layer_ids]
    rest = tuple(m for m in modules if m.layer is None)
    if rest:
        layers.append(LayerPlan(None, rest))
    dense = method.forms_dense(recipe.merge.params)
    full = recipe.output == "model"  # a full model reads and writes every base tensor
    base_bytes = sum(info.nbytes for info in base.index.infos.values())
    plan = Plan(
        method=method.name,
        layers=tuple(layers),
        rank=rank,
        target_modules=tuple(sorted({m.path.rsplit(".", 1)[-1] for m in modules if m.kind != "param"})),
        fan_in_fan_out=adapters[0].fan_in_fan_out,
        bytes_read=sum(s.nbytes for m in modules for s in m.sources) + (base_bytes if full else 0),
        bytes_written=base_bytes if full else sum(rank * (m.d_in + m.d_out) for m in modules) * DTYPE_BYTES[out_dtype],
        peak_bytes=max(m.peak_bytes(dense, rank) for m in modules),
        target_parameters=target_parameters,
    )
    return with_saved_and_biases(recipe, adapters, base, plan, out_dtype)


def saved_modules(adapters: list[LoraAdapter]) -> list[str]:
    """The module paths of every modules_to_save tensor of the inputs (``lm_head``)."""
    return sorted({name.rsplit(".", 1)[0] for adapter in adapters for name in adapter.saved})


def with_saved_and_biases(recipe: Recipe, adapters: list[LoraAdapter], base: BaseModelInfo, plan: Plan, out_dtype: str) -> Plan:
    """Add the modules_to_save tensors and the lora_bias modules to ``plan`` (checked against the base)."""
    saved = [_saved_plan(recipe, adapters, base, name) for name in sorted({n for a in adapters for n in a.saved})]
    biased = tuple(m.path for m in plan.modules if any(m.path in adapters[s.adapter].biases for s in m.sources))
    embeddings = [m.path for m in plan.modules if m.kind == "embedding"]
    if biased and embeddings:
        raise UnsupportedAdapterError(
            "adapters",
            "lora_bias adapters without embedding LoRAs in the same merge (PEFT has no lora_bias on embeddings)",
            f"lora_bias on {biased[0]} and an embedding LoRA on {embeddings[0]}",
            "merge the embedding adapter separately",
        )
    entries = tuple(sorted({e for a in adapters if a.saved for e in a.config.get("modules_to_save") or []}))
    full = recipe.output == "model"  # the base's bytes are counted already; saved and bias tensors are folded in
    base_read = 0 if full else sum(base.index.infos[s.base_key].nbytes for s in saved)
    out_elements = sum(math.prod(s.shape) for s in saved) + (sum(m.d_out for m in plan.modules) if biased else 0)
    peak = max([plan.peak_bytes] + [(len(s.sources) + 2) * math.prod(s.shape) * BYTES_F32 for s in saved])
    return replace(
        plan,
        saved=tuple(sorted(saved, key=lambda s: s.name)),
        modules_to_save=entries,
        biased=biased,
        bytes_read=plan.bytes_read + sum(s.nbytes for p in saved for s in p.sources) + base_read,
        bytes_written=plan.bytes_written + (0 if full else out_elements * DTYPE_BYTES[out_dtype]),
        peak_bytes=peak,
    )


def _saved_plan(recipe: Recipe, adapters: list[LoraAdapter], base: BaseModelInfo, name: str) -> SavedPlan:
    """One modules_to_save tensor: every adapter's copy must match the base tensor's shape and be a float."""
    base_key = out_key = base.key_of.get(name)
    path = name.rsplit(".", 1)[0]
    if base_key is None and (tied := base.tied_source(name)) is not None:  # a saved copy of a tied lm_head
        base_key, out_key = tied, name
    sources = []
    for i, adapter in enumerate(adapters):
        key = adapter.saved.get(name)
        if key is None:
            continue
        info = adapter.index.infos[key]
        where = f"adapter '{adapter.name}' tensor {key}"
        if base_key is None:
            raise AdapterError(
                where, f"a base tensor {name} (modules_to_save)", base.missing_tensor(path), "check the base model"
            )
        base_shape = base.index.infos[base_key].shape
        if tuple(info.shape) != tuple(base_shape) or info.dtype not in FLOAT_TAGS:
            raise UnsupportedAdapterError(
                where,
                f"a float copy of the base's {base_key}, shape {tuple(base_shape)}",
                f"{info.dtype} of shape {tuple(info.shape)} (a resized vocabulary?)",
                "merge it into the model with PEFT",
            )
        sources.append(Source(i, 0, module_weight(recipe, i, path, base.num_layers), info.nbytes))
    assert base_key is not None and out_key is not None  # some adapter saves ``name``
    return SavedPlan(name, base_key, out_key, tuple(base.index.infos[base_key].shape), tuple(sources))


def usable_rank(method: MergeMethod, module: ModulePlan, params: MethodParams) -> int:
    """The largest rank a merged update of ``module`` can have under ``method``.

    Methods that work on the factors (or in the inputs' core space) combine the inputs' ranks: at most
    sum r_i (and the matrix's own size). Methods that sparsify the full d_out x d_in matrices can reach
    min(d_out, d_in).
    """
    full = min(module.d_in, module.d_out)
    return full if method.forms_dense(params) else min(full, sum(s.rank for s in module.sources))


def check_rank_budget(recipe: Recipe, method: MergeMethod, modules: list[ModulePlan]) -> None:
    """Refuse a ``merge.rank`` the method ignores, or one above the largest rank it can produce.

    soupkit refuses rather than clamps: a rank of 10^9 is a typo, and a clamp would write an adapter of
    another rank than the recipe says (the lock file records the recipe as written).
    """
    budget = recipe.merge.rank
    if budget is None:
        return
    where = "merge.rank"
    if not method.uses_rank and not (recipe.output == "adapter" and any(m.dora for m in modules)):
        raise RecipeError(
            where,
            f"no merge.rank with '{method.name}' (its output rank is fixed by the inputs)",
            "a rank budget",
            "remove merge.rank, or use svd, linear or lego",
        )
    params = recipe.merge.params
    limit = max((usable_rank(method, m, params) for m in modules if m.sources), default=0)
    if budget > limit:
        why = "min(d_out, d_in) of the largest module" if method.forms_dense(params) else "the sum of the input ranks"
        raise RecipeError(
            where,
            f"at most {limit} ({why}: the most '{method.name}' can use here)",
            f"{budget}",
            f"set merge.rank <= {limit} or remove it",
        )


def glob_suggestions(paths: list[str]) -> list[str]:
    """Globs a user might have meant: full paths, '*.leaf' and '*.part.*' for each path component."""
    out = set(paths)
    for path in paths:
        parts = path.split(".")
        out.add(f"*.{parts[-1]}")
        out.update(f"*.{p}.*" for p in parts[:-1] if not p.isdigit())
        out.update(f"*.layers.{p}.*" for p in parts if p.isdigit())
    return sorted(out)


def check_module_globs(recipe: Recipe, paths: list[str]) -> None:
    """Refuse a ``merge.modules`` glob that matches no module of the plan (a typo like '*.mpl.*')."""
    for i, override in enumerate(recipe.merge.modules):
        if not any(fnmatch.fnmatchcase(path, override.match) for path in paths):
            found = f"'{override.match[:80]}', which matches none{did_you_mean(override.match, glob_suggestions(paths))}"
            raise RecipeError(
                f"merge.modules[{i}].match",
                "a glob matching at least one merged module",
                found,
                f"module paths look like '{paths[0]}'",
            )
