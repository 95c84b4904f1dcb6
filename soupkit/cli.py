"""The ``soupkit`` command line: each command parses, calls one library function, prints."""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import click

from soupkit.errors import Interrupted, SoupkitError, SoupkitWarning
from soupkit.io.output_lock import stop_on_signals
from soupkit.io.progress import line_start


def recipe_stem(recipe: Path) -> str:
    """The recipe's name for default output names ('recipe' for one read from stdin)."""
    from soupkit.recipe.load import reads_stdin

    return "recipe" if reads_stdin(recipe) else recipe.stem


def recipe_file(recipe: Path) -> Path | None:
    """The recipe as a file the outputs must keep apart from (None for stdin)."""
    from soupkit.recipe.load import reads_stdin

    return None if reads_stdin(recipe) else recipe


def print_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, file: object = None, line: str | None = None
) -> None:
    """A SoupkitWarning as one ``warning: ...`` line on stderr; other warnings as Python prints them."""
    if issubclass(category, SoupkitWarning):
        click.echo(f"{line_start()}warning: {message}", err=True, color=True)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def examples(*commands: str) -> str:
    """An epilog of example commands that click prints as written (``\\b``: no re-wrapping mid-word)."""
    return "\b\nExamples:\n" + "\n".join(f"  {c}" for c in commands)


def keep_freed_memory() -> None:
    """Let glibc keep freed large buffers for reuse instead of handing them back to the kernel.

    A dense merge allocates and frees several (d_out, d_in) float32 temporaries per module (64 MB on a
    Llama-1B MLP, 235 MB on Llama-3-8B's). By default glibc maps each one fresh and unmaps it when
    freed, and the kernel zero-fills every 4 KiB page again on first touch: measured on the 2-core
    machine, that was 60% of a TIES module's CPU time (1.44 s -> 0.57 s per 8192 x 2048 module with
    the thresholds below). Process-wide, so only the CLI, which owns its process, sets it; a C
    library without ``mallopt`` (not glibc) is left as it is.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    mallopt(m_mmap_threshold, 1 << 30)  # blocks below 1 GiB come from the heap and are reused
    mallopt(m_trim_threshold, (1 << 31) - 1)  # and the heap keeps up to 2 GiB free at its top


def base_mismatch_option(command: Callable[..., None]) -> Callable[..., None]:
    """Add ``--allow-base-mismatch`` to a command that opens a recipe's inputs (soupkit.io.base_check)."""

    @functools.wraps(command)
    def run(*args: object, allow_base_mismatch: bool, **kwargs: object) -> None:
        from soupkit.io.base_check import allowing_base_mismatch

        with allowing_base_mismatch(allow_base_mismatch):
            command(*args, **kwargs)

    help_text = "Merge adapters whose own base's config differs from the recipe's base (a warning instead of an error)."
    return click.option("--allow-base-mismatch", is_flag=True, help=help_text)(run)


class SoupkitGroup(click.Group):
    """Prints user errors as one line on stderr and exits 2, without a traceback.

    SIGINT, SIGTERM and SIGHUP stop a command cleanly (its temporary output and lock are removed on the
    way out) and exit 130 / 143 / 129 with one line.
    """

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list with each command's whole first sentence, wrapped rather than cut with '...'."""
        rows = []
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(limit=10_000)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> object:
        try:
            with stop_on_signals(), warnings.catch_warnings():
                warnings.simplefilter("always", SoupkitWarning)
                warnings.showwarning = print_warning
                return super().invoke(ctx)
        except SoupkitError as err:
            more = len(getattr(err, "more", []))  # one line, whatever else is wrong: fix this first
            extra = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
            click.echo(f"{line_start()}error: {err.line()}{extra}", err=True, color=True)
            sys.exit(2)
        except Interrupted as stop:
            click.echo(f"{line_start()}soupkit: {stop.line()}", err=True, color=True)
            sys.exit(stop.exit_code)


@click.group(cls=SoupkitGroup)
@click.version_option(package_name="soupkit")
def main() -> None:
    """soupkit: declarative merge recipes for LoRA adapters."""


@main.command(
    epilog=examples(
        "soupkit merge recipes/cat.yaml -o out/cat", "soupkit merge recipes/full_model.yaml -o out/full --shard-size 2GB"
    )
)
@base_mismatch_option
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), help="Output directory (default: ./<recipe name>-merged).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="Where the maths runs.")
@click.option("--dry-run", is_flag=True, help="Plan and validate only; write nothing.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory (atomically, at the end).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--output-type", type=click.Choice(["adapter", "model"]), help="Override the recipe's `output`.")
@click.option("--shard-size", default="5GB", show_default=True, help="Full-model export: data per safetensors shard.")
@click.option("--serving", type=click.Choice(["vllm"]), help="Refuse an adapter output this server cannot load.")
@click.option("--drop-modules-to-save", is_flag=True, help="Leave the inputs' modules_to_save out of an adapter output.")
def merge(
    recipe: Path,
    out: Path | None,
    device: str,
    dry_run: bool,
    overwrite: bool,
    quiet: bool,
    output_type: str | None,
    shard_size: str,
    serving: str | None,
    drop_modules_to_save: bool,
) -> None:
    """Run RECIPE and write one merged PEFT adapter (or full model)."""
    keep_freed_memory()
    from soupkit.describe import human_bytes
    from soupkit.execute import RunOptions
    from soupkit.io.sharded import parse_size
    from soupkit.merge import merge_recipe
    from soupkit.recipe import load_recipe

    loaded = load_recipe(recipe)
    if (change := loaded.generator_change()) is not None:
        click.echo(f"warning: {recipe}: {change}", err=True)
    if output_type:
        loaded = loaded.model_copy(update={"output": output_type})
    given, out = out, out or Path(f"{recipe_stem(recipe)}-merged")
    options = RunOptions(
        device, overwrite, dry_run, not quiet, parse_size(shard_size), serving=serving, drop_modules_to_save=drop_modules_to_save
    )
    # a dry run checks an -o it was given (docs/safety.md), and writes nothing
    report = merge_recipe(loaded, given if dry_run else out, options, recipe_file=recipe_file(recipe))
    plan = report.plan
    if dry_run:
        click.echo(f"dry run: {len(plan.modules)} modules, rank {plan.rank}, would write {human_bytes(plan.bytes_written)}")
        return
    kept = f", energy kept >= {min(report.energy_kept.values()):.4f}" if report.energy_kept else ""
    if report.energy_kept:  # a truncated merge loses part of each update: say so where warnings go, too
        click.echo(
            f"soupkit: energy kept by the rank-{plan.rank} truncation: min {min(report.energy_kept.values()):.4f}", err=True
        )
    click.echo(f"wrote {out} ({plan.method}, {len(plan.modules)} modules, rank {plan.rank}{kept}) in {report.seconds:.1f} s")


class RecipeFieldsCommand(click.Command):
    """A command whose help ends with every recipe field, generated from the schema's descriptions."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from soupkit.describe import recipe_field_rows

        super().format_epilog(ctx, formatter)
        with formatter.section("Recipe fields"):
            formatter.write_dl(recipe_field_rows())


@main.command(cls=RecipeFieldsCommand, epilog=examples("soupkit validate recipes/cat.yaml"))
@base_mismatch_option
@click.argument("recipe", type=click.Path(path_type=Path))
def validate(recipe: Path) -> None:
    """Check RECIPE: schema, method parameters, and that its inputs exist and fit together."""
    from soupkit.execute import memory_problem, plan_recipe
    from soupkit.recipe import load_recipe

    plan, _ = plan_recipe(load_recipe(recipe))
    problem = memory_problem(plan)
    if problem is not None:
        raise problem
    label = recipe if recipe_file(recipe) else "<stdin>"
    click.echo(f"{label}: ok ({plan.method}, {len(plan.modules)} modules, output rank {plan.rank})")


@main.command(epilog=examples("soupkit plan recipes/ties.yaml"))
@base_mismatch_option
@click.argument("recipe", type=click.Path(path_type=Path))
def plan(recipe: Path) -> None:
    """Show what RECIPE will read per layer, output ranks, bytes and peak memory (headers only)."""
    from soupkit.describe import describe_plan
    from soupkit.execute import memory_problem, plan_recipe
    from soupkit.recipe import load_recipe

    loaded = load_recipe(recipe)
    built, _ = plan_recipe(loaded)
    click.echo(describe_plan(loaded, built))
    problem = memory_problem(built)
    if problem is not None:
        click.echo(f"warning: {problem.line()}", err=True)


@main.command(epilog=examples("soupkit analyze recipes/ties.yaml -o out/ties-analysis"))
@base_mismatch_option
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), help="Output directory (default: ./<recipe name>-analysis).")
@click.option("--dense", is_flag=True, help="Also form the dense deltas for TIES' sign-conflict fraction (slower).")
@click.option("--no-base", is_flag=True, help="Skip ||delta||/||W|| (reads the targeted base weights, one at a time).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory (atomically, at the end).")
def analyze(recipe: Path, out: Path | None, dense: bool, no_base: bool, overwrite: bool) -> None:
    """Before merging: norms, pairwise cosines, subspace overlaps and ranks of RECIPE's adapters, per
    module and per layer, from the factors. Prints a table; writes analysis.json and PNG heatmaps."""
    from soupkit.analyze import analyze_to, format_table
    from soupkit.recipe import load_recipe

    keep_freed_memory()
    loaded = load_recipe(recipe)
    out = out or Path(f"{recipe_stem(recipe)}-analysis")
    result = analyze_to(loaded, out, dense=dense, base_norms=not no_base, overwrite=overwrite, recipe_file=recipe_file(recipe))
    click.echo(format_table(result))
    click.echo(f"wrote {out}/analysis.json, table.md and one heatmap per statistic")


@main.command(epilog=examples("soupkit methods --brief", "soupkit methods"))
@click.option("--brief", is_flag=True, help="One line per method.")
def methods(brief: bool) -> None:
    """List every merge method: its space (factors or dense delta), formula, parameters and paper."""
    from soupkit.describe import describe_methods

    click.echo(describe_methods(verbose=not brief))


@main.command(epilog=examples("soupkit inspect examples/tiny/adapters/math"))
@click.argument("adapter", type=click.Path(path_type=Path))
def inspect(adapter: Path) -> None:
    """Show an adapter's rank, alpha, scale, targets, layers, dtype and per-module norms."""
    from soupkit.describe import describe_adapter

    if not adapter.is_dir():
        found = f"a file ({adapter.name})" if adapter.exists() else "no such directory"
        fix = "point at the folder that holds it" if adapter.exists() else "check the path"
        raise SoupkitError(str(adapter), "an adapter directory", found, fix)
    click.echo(describe_adapter(adapter))


@main.command(
    "fit-alpha",
    epilog=examples(
        "soupkit fit-alpha recipes/cat.yaml --data examples/tiny/calib.jsonl -o out/cat-fitted.yaml",
        "soupkit merge out/cat-fitted.yaml -o out/cat-fitted",
        "# several GPUs (same global batch, same weights):",
        "accelerate launch --num_processes 2 -m soupkit fit-alpha recipes/cat.yaml --data calib.jsonl",
        "# a base larger than one GPU (FSDP2, docs/fit-alpha.md):",
        "accelerate launch --config_file examples/fsdp/accelerate_fsdp2.yaml -m soupkit fit-alpha recipes/cat.yaml --data calib.jsonl",
    ),
)
@base_mismatch_option
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option(
    "--data",
    required=True,
    help="Calibration data: .jsonl with text | prompt+completion | messages, or a HF dataset name[:split].",
)
@click.option("--eval-data", help="Held-out data for early stopping and the report (default: a seeded 10% of --data).")
@click.option("-o", "--out", type=click.Path(path_type=Path), help="Fitted recipe to write (default: ./<recipe>-fitted.yaml).")
@click.option("--report-dir", type=click.Path(path_type=Path), help="fit_report.json and PNGs (default: <out>-report/).")
@click.option("--steps", type=click.IntRange(min=1), help="Optimizer steps (default: --epochs passes over the data).")
@click.option(
    "--epochs",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Passes over --data (when --steps is not given).",
)
@click.option(
    "--lr", type=click.FloatRange(min=0, min_open=True), default=5e-2, show_default=True, help="Adam learning rate of the logits."
)
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Examples per micro-batch per process."
)
@click.option(
    "--seq-len", type=click.IntRange(min=2), default=512, show_default=True, help="Tokens per example (longer ones are cut)."
)
@click.option("--grad-accum", type=click.IntRange(min=1), default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed of the data order, the held-out split and lorahub's search."
)
@click.option(
    "--granularity",
    type=click.Choice(["module", "layer", "adapter"]),
    default="module",
    show_default=True,
    help="One set of weights per module (LoRA Soups), per layer, or per adapter for the whole model.",
)
@click.option(
    "--constraint",
    type=click.Choice(["softmax", "free"]),
    default="softmax",
    show_default=True,
    help="softmax: weights of a module sum to 1 (LoRA Soups); free: any real numbers.",
)
@click.option(
    "--init",
    "init",
    type=click.Choice(["uniform", "recipe"]),
    default="uniform",
    show_default=True,
    help="Start from equal weights, or from the recipe's own weights.",
)
@click.option(
    "--eval-every", type=click.IntRange(min=1), default=20, show_default=True, help="Steps between held-out evaluations."
)
@click.option(
    "--patience",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Evaluations without improvement before stopping.",
)
@click.option(
    "--search",
    type=click.Choice(["gradient", "lorahub"]),
    default="gradient",
    show_default=True,
    help="gradient: Adam on the weights; lorahub: gradient-free CMA-ES, one weight per adapter (LoraHub).",
)
@click.option("--budget", type=click.IntRange(min=1), default=40, show_default=True, help="lorahub: loss evaluations.")
@click.option(
    "--lorahub-examples", type=click.IntRange(min=1), default=5, show_default=True, help="lorahub: calibration examples scored."
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="auto: a GPU if there is one, else the CPU.",
)
@click.option(
    "--precision", type=click.Choice(["auto", "bf16", "fp32"]), default="auto", show_default=True, help="auto: bf16 on GPU."
)
@click.option(
    "--shard",
    is_flag=True,
    help="Shard the base over the processes with FSDP2 (a base larger than one GPU; on by an accelerate FSDP config).",
)
@click.option("--checkpointing", is_flag=True, help="Recompute activations in backward: less memory, about one more forward.")
@click.option("--overwrite", is_flag=True, help="Replace an existing fitted recipe / report directory.")
def fit_alpha(
    recipe: Path, data: str, eval_data: str | None, out: Path | None, report_dir: Path | None, overwrite: bool, **opts: object
) -> None:
    """Learn CAT's per-module adapter weights for RECIPE on calibration data; write a fitted recipe."""
    from soupkit.fit.run import run_fit_alpha
    from soupkit.fit.train import FitOptions

    result = run_fit_alpha(recipe, data, eval_data, out, report_dir, FitOptions(**opts), overwrite)  # type: ignore[arg-type]
    if result.main_process:
        losses = ", ".join(f"{k} {v:.4f}" for k, v in result.heldout.items())
        speed = f", {result.tokens_per_s:.0f} tokens/s" if result.tokens_per_s > 0 else ""  # lorahub trains nothing
        click.echo(f"wrote {result.fitted_recipe} and {result.report_dir}/ ({result.steps} steps{speed})")
        click.echo(f"held-out loss per token: {losses}; weights written: {result.chosen}")


@main.command(epilog=examples("soupkit verify out/cat"))
@click.argument("out", type=click.Path(path_type=Path))
def verify(out: Path) -> None:
    """Re-hash OUT's inputs and files against its lock file; list what changed (exit 1 if anything did)."""
    from soupkit.verify import describe_report, verify_output

    report = verify_output(out)
    click.echo(describe_report(out, report))
    if not report.ok:
        sys.exit(1)


@main.command(
    "eval",
    epilog=examples(
        "soupkit eval recipes/cat.yaml --data examples/tiny/calib.jsonl",
        "soupkit eval out/cat --data val.jsonl --metric exact --max-new-tokens 32 --json",
        "soupkit eval merged-model/ --data val.jsonl --metric python:myscorers:score --out per-example.jsonl",
    ),
)
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--data", help="JSON lines: text | prompt+completion | messages, optionally with 'reference' (not for lm-eval).")
@click.option(
    "--metric",
    default="loss",
    show_default=True,
    help="loss | exact | contains | regex:PATTERN | python:module:function | lm-eval:TASK[,TASK] (docs/sweep.md).",
)
@click.option(
    "--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True, help="Generation metrics: new tokens."
)
@click.option(
    "--stop", multiple=True, help="Generation metrics: stop at this string (repeatable); end-of-turn tokens always stop."
)
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Examples per forward / generate call."
)
@click.option("--seq-len", type=click.IntRange(min=2), default=2048, show_default=True, help="loss: tokens kept per example.")
@click.option("--device", default="auto", show_default=True, help="auto (a GPU if there is one), cpu, cuda or cuda:N.")
@click.option("--base", type=click.Path(path_type=Path), help="Base model folder of an adapter TARGET (default: its config's).")
@click.option("--json", "as_json", is_flag=True, help='Print one JSON line {"metric", "score", "n", "stderr"}.')
@click.option("--out", type=click.Path(path_type=Path), help="Write per-example results here (JSON lines).")
@click.option("--overwrite", is_flag=True, help="Replace an --out file soupkit eval wrote before.")
def eval_command(
    target: Path,
    data: str,
    metric: str,
    device: str,
    base: Path | None,
    as_json: bool,
    out: Path | None,
    overwrite: bool,
    **opts: object,
) -> None:
    """Score TARGET (a recipe, merged in memory; an adapter folder; or a full model folder) on --data."""
    import json

    from soupkit.eval.command import run_eval
    from soupkit.eval.run import EvalOptions

    options = EvalOptions(**{**opts, "stop": tuple(opts["stop"]), "progress": True})  # type: ignore[arg-type]
    result = run_eval(target, data, metric, options, device, base, out, overwrite)
    if as_json:
        click.echo(json.dumps(result.summary()))
        return
    spread = f" ± {result.stderr:.4f} (standard error)" if result.stderr is not None else ""
    click.echo(f"{result.metric}: {result.score:.4f}{spread} over {result.n} examples")


@main.command(
    epilog=examples(
        "soupkit sweep examples/sweep/tiny_sweep.yaml -o out/sweep",
        "soupkit sweep examples/sweep/tiny_sweep.yaml -o out/sweep --trials 40   # continue to 40 trials",
        "soupkit sweep sweep.yaml -o out/sweep --workers 4 --storage postgresql://host/db",
    )
)
@click.argument("sweep_file", metavar="SWEEP", type=click.Path(path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="The sweep's folder (a rerun continues it).")
@click.option("--trials", type=click.IntRange(min=1), help="Trials in the study in all (default: search.trials).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Processes, over the visible GPUs.")
@click.option("--storage", help="An optuna storage URL shared by several runs (default: DIR/study.db).")
@click.option("--device", default="auto", show_default=True, help="auto (GPUs if any), cpu, cuda or cuda:N.")
def sweep(sweep_file: Path, out: Path, trials: int | None, workers: int, storage: str | None, device: str) -> None:
    """Search methods, parameters and weights of SWEEP (a recipe with a search: block); write DIR/best.yaml."""
    from soupkit.sweep.run import run_sweep

    outcome = run_sweep(sweep_file, out, trials, workers, storage, device)
    click.echo(f"wrote {out}/: {outcome.trials} trials ({outcome.failed} failed), leaderboard.md, best.yaml")
    if outcome.best is not None:
        b = outcome.best
        test = f", test {b['test']:.4f}" if b.get("test") is not None else ""
        click.echo(f"best: trial {b['number']} {b['method']} validation {b['validation']:.4f}{test}")


if __name__ == "__main__":
    main()
