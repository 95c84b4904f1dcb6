"""``soupkit fit-alpha`` end to end: load, fit (gradient or lorahub), write the fitted recipe and report.

The fitted recipe is the input recipe with one ``merge.modules`` override per adapted module
(exact module path as ``match``, the learned weights as plain numbers), appended last so they win;
``soupkit merge`` consumes it unchanged and writes the merged adapter.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from soupkit.errors import SoupkitError
from soupkit.fit.checks import check_finite_options, check_micro_batch_fits, micro_batch_without_repeats, warn_once
from soupkit.fit.data import check_record_shapes, load_examples, read_records, same_source, split_heldout
from soupkit.fit.model import CatFitModel, build_fit_model
from soupkit.fit.report import weights_by_module, write_report
from soupkit.fit.train import FitOptions, FitState, make_accelerator, train, with_autocast, with_weights
from soupkit.io.output_guard import (
    OutputTarget,
    atomic_dir,
    atomic_file,
    check_apart,
    check_disjoint,
    check_replaceable,
    claim,
    resolve_output,
)
from soupkit.io.output_markers import FITTED_HEADER
from soupkit.io.progress import on_terminal
from soupkit.io.resolve import TOKENIZER_VOCAB_FILES, has_tokenizer, resolve_reference
from soupkit.recipe import Recipe, load_recipe
from soupkit.recipe.load import reads_stdin


@dataclass(frozen=True)
class FitOutcome:
    """What the CLI prints: where files went and the held-out losses."""

    fitted_recipe: Path
    report_dir: Path
    heldout: dict[str, float]
    steps: int
    tokens_per_s: float
    main_process: bool
    chosen: str = "fitted"  # whose weights the fitted recipe holds (see keep_the_better)


def default_paths(recipe_path: Path, out: Path | None, report_dir: Path | None) -> tuple[Path, Path]:
    out = out or Path(f"{'recipe' if reads_stdin(recipe_path) else recipe_path.stem}-fitted.yaml")
    return out, report_dir or out.parent / f"{out.stem}-report"


def run_fit_alpha(
    recipe_path: Path,
    data: str,
    eval_data: str | None,
    out: Path | None,
    report_dir: Path | None,
    options: FitOptions,
    overwrite: bool = False,
) -> FitOutcome:
    """Fit the CAT weights of ``recipe_path`` on ``data`` and write the fitted recipe and report.

    Every user error is raised before any file is written.
    """
    check_finite_options(options)
    recipe = load_recipe(recipe_path)
    out, report_dir = default_paths(recipe_path, out, report_dir)
    targets = fit_output_targets(recipe_path, recipe, [data, eval_data], out, report_dir, overwrite)
    if options.search == "lorahub" and options.init == "recipe":
        raise SoupkitError(
            "--init", "uniform with --search lorahub (LoraHub starts every weight at 0)", "recipe", "drop --init recipe"
        )
    if recipe.merge.method != "cat":
        raise SoupkitError(
            "merge.method", "cat (fit-alpha learns CAT's weights)", repr(recipe.merge.method), "set merge.method: cat"
        )
    # Data first: a typo in --data fails before transformers is even imported, and bad records before the
    # base model loads (the tokenizer loads in seconds; a 70B base in minutes).
    train_records = read_records(data, "--data")
    check_record_shapes(train_records, "--data")
    eval_records = read_records(eval_data, "--eval-data") if eval_data else None
    if eval_data and same_source(data, eval_data):
        warn_once(
            f"--eval-data is --data ({data[:80]}): the held-out loss then scores the training examples, so early "
            "stopping and the choice of weights cannot see overfitting; pass other examples, or omit --eval-data"
        )
    if eval_records is not None:
        check_record_shapes(eval_records, "--eval-data")
    tokenizer, pad_id = load_tokenizer(recipe)
    train_set = load_examples(data, tokenizer, options.seq_len, "--data", train_records)
    if eval_data:
        eval_set = load_examples(eval_data, tokenizer, options.seq_len, "--eval-data", eval_records)
    else:
        train_set, eval_set = split_heldout(train_set, options.heldout_fraction, options.seed)
    accelerator = make_accelerator(options)
    options = resolve_sharding(options, accelerator)
    options = micro_batch_without_repeats(options, len(train_set), accelerator.num_processes)
    check_fit_memory(recipe, options, train_set, accelerator)
    with (
        claim(targets, overwrite, "soupkit fit-alpha") if accelerator.is_main_process else nullcontext()
    ):  # one writer per output
        model, recipe_weights = load_fit_model(recipe, options, accelerator)
        state = fit(accelerator, model, recipe_weights, train_set, eval_set, pad_id, options)
        return write_fitted(recipe_path, recipe, state, model, targets, options, overwrite, accelerator)


def fit_output_targets(
    recipe_path: Path, recipe: Recipe, data: list[str | None], out: Path, report_dir: Path, overwrite: bool
) -> list[OutputTarget]:
    """Check both outputs before any work: writable, apart from every input, replaceable (docs/safety.md)."""
    targets = [resolve_output(out, "-o", "fitted-recipe"), resolve_output(report_dir, "--report-dir", "fit-report")]
    check_disjoint(targets)
    folders = [("base model", resolve_reference(recipe.base_model, recipe.root, "base_model", "base+tokenizer"))]
    folders += [
        (f"adapter '{a.name}'", resolve_reference(a.path, recipe.root, f"adapters[{i}].path"))
        for i, a in enumerate(recipe.adapters)
    ]
    files = [] if reads_stdin(recipe_path) else [("recipe file", recipe_path)]
    files += [("data file", Path(d)) for d in data if d and Path(d).expanduser().exists()]
    for target in targets:
        check_apart(target, folders, files)
        check_replaceable(target, overwrite)
    return targets


def write_fitted(
    recipe_path: Path,
    recipe: Recipe,
    state: FitState,
    model: CatFitModel,
    targets: list[OutputTarget],
    options: FitOptions,
    overwrite: bool,
    accelerator: Any,
) -> FitOutcome:
    """(Main process) publish the report folder and the fitted recipe, each atomically."""
    out = targets[0].path
    names = [a.name for a in recipe.adapters]
    weights = weights_by_module(state.weights, model.targets, names)
    fitted = fitted_recipe_data(recipe_path, recipe, weights, out)
    Recipe.from_dict(fitted, out.parent)  # what we write must load as a recipe
    if accelerator.is_main_process:
        source = "stdin" if reads_stdin(recipe_path) else recipe_path.name
        header = f"{FITTED_HEADER} from {source} ({options.search}); see {targets[1].given}"
        with atomic_dir(targets[1], overwrite) as tmp:
            write_report(tmp, build_report(state, options, weights, names), state.weights, model.targets, names)
        atomic_file(targets[0], overwrite, f"{header}\n" + yaml.safe_dump(fitted, sort_keys=False))
    accelerator.wait_for_everyone()
    speed = state.tokens / state.seconds if state.seconds else 0.0
    main = accelerator.is_main_process
    return FitOutcome(targets[0].given, targets[1].given, state.heldout, state.steps, speed, main, state.chosen)


def resolve_sharding(options: FitOptions, accelerator: Any) -> FitOptions:
    """``--shard``/``--checkpointing``, also switched on by an accelerate FSDP config (examples/fsdp/)."""
    from accelerate.utils import DistributedType

    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    fsdp_config = accelerator.distributed_type == DistributedType.FSDP
    if fsdp_config and getattr(plugin, "fsdp_version", 2) != 2:
        raise SoupkitError(
            "accelerate config",
            "fsdp_version: 2 (fit-alpha shards with FSDP2)",
            f"fsdp_version: {plugin.fsdp_version}",
            "set fsdp_version: 2",
        )
    checkpointing = options.checkpointing or bool(fsdp_config and getattr(plugin, "activation_checkpointing", False))
    shard = options.shard or fsdp_config
    if shard and not torch.distributed.is_initialized():
        raise SoupkitError(
            "--shard",
            "a run started by a launcher (accelerate launch, torchrun)",
            "a plain single process",
            "run: accelerate launch --config_file examples/fsdp/accelerate_fsdp2.yaml -m soupkit fit-alpha ..., or drop --shard",
        )
    return replace(options, shard=shard, checkpointing=checkpointing)


def load_fit_model(recipe: Recipe, options: FitOptions, accelerator: Any) -> tuple[CatFitModel, torch.Tensor]:
    """The fit model: sharded over the processes (each reads its rows only), or whole on each process."""
    from soupkit.fit.shard import build_sharded_fit_model, enable_checkpointing

    dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32
    device = accelerator.device
    if not on_terminal():  # transformers' "Loading weights" bar would fill a redirected stderr
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    if options.shard:
        return build_sharded_fit_model(recipe, options.granularity, options.constraint, device, dtype, options.checkpointing)
    model, recipe_weights = build_fit_model(recipe, options.granularity, options.constraint, device, dtype)
    if options.checkpointing:
        enable_checkpointing(model.base)
    return model, recipe_weights


def check_fit_memory(recipe: Recipe, options: FitOptions, train_set: list, accelerator: Any) -> None:
    """Refuse a micro-batch that cannot fit on the device, from the base's headers (``checks`` module)."""
    from soupkit.execute import available_memory
    from soupkit.io.base_model import BaseModelInfo

    base = BaseModelInfo(resolve_reference(recipe.base_model, recipe.root, "base_model", "base+tokenizer"))
    dtype_bytes = 2 if accelerator.mixed_precision == "bf16" else 4
    free = available_memory("cuda" if accelerator.device.type == "cuda" else "cpu")
    check_micro_batch_fits(options, base, train_set, dtype_bytes, free, accelerator.num_processes if options.shard else 1)


def load_tokenizer(recipe: Recipe) -> tuple[Any, int]:
    """The base model's tokenizer and a pad id (pad, else eos, else 0: padding carries no loss anyway)."""
    from transformers import AutoTokenizer

    base = resolve_reference(recipe.base_model, recipe.root, "base_model", "base+tokenizer")  # hub: tokenizer files too
    if not has_tokenizer(base):
        raise SoupkitError(
            "base_model",
            f"tokenizer files ({', '.join(TOKENIZER_VOCAB_FILES[:2])}, ...) in {base}",
            "none",
            "copy the base model's tokenizer files into that folder",
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(base)
    except (OSError, ValueError, TypeError, KeyError) as err:  # transformers' ways of saying "cannot build it"
        raise SoupkitError(
            "base_model",
            f"a tokenizer transformers can load from {base}",
            f"{type(err).__name__}: {err}"[:200],
            "fix or re-download its tokenizer files",
        ) from None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return tokenizer, int(pad or 0)


def uniform_logits(model: CatFitModel) -> torch.Tensor:
    """Equal logits: softmax gives 1/(adapters present) per module; free gives 1/n everywhere."""
    value = 0.0 if model.constraint == "softmax" else 1.0 / model.n_adapters
    return torch.full_like(model.logits, value)


def fit(
    accelerator: Any,
    model: CatFitModel,
    recipe_weights: torch.Tensor,
    train_set: list,
    eval_set: list,
    pad_id: int,
    options: FitOptions,
) -> FitState:
    """Reference losses, then the search; returns the fitted weights (M, n) and everything measured."""
    from soupkit.fit.lorahub import lorahub_search

    with torch.no_grad():
        model.logits.copy_(uniform_logits(model))
        uniform = model.weights().detach().clone()
        model.logits.copy_(
            model.logits_for(recipe_weights.to(model.logits.device)) if options.init == "recipe" else uniform_logits(model)
        )
    optimizer = torch.optim.Adam([model.logits], lr=options.lr)  # the logits alone: replicated, never sharded
    if options.shard:  # already sharded by shard.py; accelerate's own FSDP wrapping would shard the logits too
        prepared = with_autocast(model, accelerator)
    else:
        prepared, optimizer = accelerator.prepare(model, optimizer)
    heldout = {
        "uniform": with_weights(accelerator, prepared, uniform, eval_set, options.batch_size, pad_id),
        "recipe": with_weights(accelerator, prepared, recipe_weights, eval_set, options.batch_size, pad_id),
    }
    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if options.search == "lorahub":
        handful = [train_set[i] for i in torch.randperm(len(train_set), generator=torch.Generator().manual_seed(options.seed))]
        best, curve = lorahub_search(
            accelerator,
            prepared,
            handful[: options.lorahub_examples],
            pad_id,
            options.budget,
            options.l1,
            options.batch_size,
            options.seed,
        )
        fixed = best.to(model.logits.device).expand(len(model.targets), -1).clone()
        state = FitState(weights=fixed, heldout={}, curve=curve, steps=len(curve), num_processes=accelerator.num_processes)
        state.heldout["fitted"] = with_weights(accelerator, prepared, fixed, eval_set, options.batch_size, pad_id)
        state.weights = (fixed * model.mask).float().cpu()
    else:
        state = train(accelerator, prepared, optimizer, train_set, eval_set, pad_id, options)
        state.weights = model.weights().detach().float().cpu()
        heldout["init"] = state.curve[0]["eval_loss"]  # the held-out loss at the starting logits
    state.heldout = {**heldout, **state.heldout}
    # the weights a fit must beat: the recipe's, and gradient's uniform start (LoraHub's one weight per adapter
    # starts at 0, no adapter at all; a per-module uniform start is not one of its answers)
    starts = {"recipe": recipe_weights} if options.search == "lorahub" else {"recipe": recipe_weights, "uniform": uniform}
    keep_the_better(state, starts, model.mask)
    state.device = torch.cuda.get_device_name() if accelerator.device.type == "cuda" else "cpu"
    state.peak_memory_bytes = torch.cuda.max_memory_allocated() if accelerator.device.type == "cuda" else None
    state.extra = {
        "train_examples": len(train_set),
        "heldout_examples": len(eval_set),
        "peak_host_rss_bytes": peak_host_rss(accelerator),
    }
    return state


def keep_the_better(state: FitState, starts: dict[str, torch.Tensor], mask: torch.Tensor) -> None:
    """Write the recipe's (or uniform) weights instead of the fitted ones when those are no better held out.

    A fit on little data can end worse than where it started; the user is told, and the report says
    which weights were written (``chosen_weights``). On a tie the recipe's own weights win.
    """
    fitted = state.heldout["fitted"]
    best = min(starts, key=lambda name: state.heldout[name])  # dict order: recipe before uniform on a tie
    if fitted < state.heldout[best]:
        return
    state.weights = (starts[best].to(mask.device) * mask).float().cpu()
    state.chosen = best
    warn_once(
        f"the fitted weights are no better on held-out data than the {best} weights ({fitted:.4f} against "
        f"{state.heldout[best]:.4f} loss per token); the fitted recipe keeps the {best} weights (more data, "
        "--eval-data or another --lr may help)"
    )


def peak_host_rss(accelerator: Any) -> int:
    """The largest peak resident host memory of any process so far (bytes; loading included)."""
    import resource

    mine = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024], device=accelerator.device)  # Linux: KiB
    return int(accelerator.gather(mine).max())


def fitted_recipe_data(recipe_path: Path, recipe: Recipe, weights: dict[str, dict[str, float]], out: Path) -> dict:
    """The input recipe's YAML with local paths re-based to ``out``'s folder and per-module overrides appended."""
    data = recipe.source_data()  # as parsed (YAML 1.2 numbers; a recipe read from stdin is not re-read)
    target = out.resolve().parent
    data["base_model"] = _rebase(recipe.base_model, recipe.root, target)
    for spec in data["adapters"]:
        spec["path"] = _rebase(spec["path"], recipe.root, target)
    merge = data["merge"]
    merge["modules"] = list(merge.get("modules") or []) + [{"match": path, "weights": w} for path, w in weights.items()]
    return data


def _rebase(ref: str, root: Path, target: Path) -> str:
    """A local path relative to the fitted recipe's folder; a hub id unchanged."""
    local = Path(ref).expanduser()
    local = local if local.is_absolute() else root / local
    return os.path.relpath(local.resolve(), target) if local.is_dir() else ref


def build_report(state: FitState, options: FitOptions, weights: dict[str, dict[str, float]], names: list[str]) -> dict[str, Any]:
    """The fit_report.json content."""
    return {
        "written_by": "soupkit fit-alpha",  # first key: the marker --overwrite checks (io.output_markers.REPORT_MARKER)
        "adapters": names,
        "search": options.search,
        "granularity": "adapter" if options.search == "lorahub" else options.granularity,
        "constraint": "free" if options.search == "lorahub" else options.constraint,
        "heldout_loss": state.heldout,
        "chosen_weights": state.chosen,  # fitted, or recipe/uniform when the fit was no better held out
        "steps": state.steps,
        "best_step": state.best_step,
        "stopped_early": state.stopped_early,
        "tokens_per_s": round(state.tokens / state.seconds, 1) if state.seconds else None,
        "train_seconds": round(state.seconds, 3),
        "peak_memory_bytes": state.peak_memory_bytes,
        "num_processes": state.num_processes,
        "device": state.device,
        "options": asdict(options),
        **state.extra,
        "loss_curve": state.curve,
        "weights": weights,
    }
