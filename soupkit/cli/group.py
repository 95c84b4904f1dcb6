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
        from soupkit.describe import human_bytes  # only here: a merge that writes does not need describe

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


@main.command(epilog=examples("soupkit verify out/cat"))
@click.argument("out", type=click.Path(path_type=Path))
def verify(out: Path) -> None:
    """Re-hash OUT's inputs and files against its lock file; list what changed (exit 1 if anything did)."""
    from soupkit.verify import describe_report, verify_output

    report = verify_output(out)
    click.echo(describe_report(out, report))
    if not report.ok:
        sys.exit(1)
