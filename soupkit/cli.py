"""The ``soupkit`` command line: each command parses, calls one library function, prints."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from soupkit.errors import SoupkitError



class SoupkitGroup(click.Group):
    """Prints user errors as one line on stderr and exits 2, without a traceback."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except SoupkitError as err:
            for e in [err, *getattr(err, "more", [])]:
                click.echo(f"error: {e.line()}", err=True)
            sys.exit(2)


@click.group(cls=SoupkitGroup)
@click.version_option(package_name="soupkit")
def main() -> None:
    """soupkit: declarative merge recipes for LoRA adapters."""


@main.command(epilog="Example: soupkit merge recipes/cat.yaml -o merged/")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), help="Output directory (default: ./<recipe name>-merged).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="Where the maths runs.")
@click.option("--dry-run", is_flag=True, help="Plan and validate only; write nothing.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory (atomically, at the end).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--output-type", type=click.Choice(["adapter", "model"]), help="Override the recipe's `output`.")
@click.option("--shard-size", default="5GB", show_default=True, help="Full-model export: data per safetensors shard.")
def merge(
    recipe: Path, out: Path | None, device: str, dry_run: bool, overwrite: bool, quiet: bool, output_type: str | None, shard_size: str
) -> None:
    """Run RECIPE and write one merged PEFT adapter (or full model)."""
    from soupkit.describe import human_bytes
    from soupkit.execute import RunOptions, merge_recipe
    from soupkit.io.sharded import parse_size
    from soupkit.recipe import load_recipe

    loaded = load_recipe(recipe)
    if output_type:
        loaded = loaded.model_copy(update={"output": output_type})
    out = out or Path(f"{recipe.stem}-merged")
    options = RunOptions(device, overwrite, dry_run, not quiet, shard_bytes=parse_size(shard_size))
    report = merge_recipe(loaded, None if dry_run else out, options)
    plan = report.plan
    if dry_run:
        click.echo(f"dry run: {len(plan.modules)} modules, rank {plan.rank}, would write {human_bytes(plan.bytes_written)}")
        return
    kept = f", energy kept >= {min(report.energy_kept.values()):.4f}" if report.energy_kept else ""
    click.echo(f"wrote {out} ({plan.method}, {len(plan.modules)} modules, rank {plan.rank}{kept}) in {report.seconds:.1f} s")


class RecipeFieldsCommand(click.Command):
    """A command whose help ends with every recipe field, generated from the schema's descriptions."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from soupkit.describe import recipe_field_rows

        super().format_epilog(ctx, formatter)
        with formatter.section("Recipe fields"):
            formatter.write_dl(recipe_field_rows())


@main.command(cls=RecipeFieldsCommand, epilog="Example: soupkit validate recipes/cat.yaml")
@click.argument("recipe", type=click.Path(path_type=Path))
def validate(recipe: Path) -> None:
    """Check RECIPE: schema, method parameters, and that its inputs exist and fit together."""
    from soupkit.execute import plan_recipe
    from soupkit.recipe import load_recipe

    plan, _ = plan_recipe(load_recipe(recipe))
    click.echo(f"{recipe}: ok ({plan.method}, {len(plan.modules)} modules, output rank {plan.rank})")


@main.command(epilog="Example: soupkit plan recipes/ties.yaml")
@click.argument("recipe", type=click.Path(path_type=Path))
def plan(recipe: Path) -> None:
    """Show what RECIPE will read per layer, output ranks, bytes and peak memory (headers only)."""
    from soupkit.describe import describe_plan
    from soupkit.execute import plan_recipe
    from soupkit.recipe import load_recipe

    loaded = load_recipe(recipe)
    built, _ = plan_recipe(loaded)
    click.echo(describe_plan(loaded, built))


@main.command(epilog="Example: soupkit methods --brief")
@click.option("--brief", is_flag=True, help="One line per method.")
def methods(brief: bool) -> None:
    """List every merge method: its space (factors or dense delta), formula, parameters and paper."""
    from soupkit.describe import describe_methods

    click.echo(describe_methods(verbose=not brief))


@main.command(epilog="Example: soupkit inspect examples/tiny/adapters/math")
@click.argument("adapter", type=click.Path(path_type=Path))
def inspect(adapter: Path) -> None:
    """Show an adapter's rank, alpha, scale, targets, layers, dtype and per-module norms."""
    from soupkit.describe import describe_adapter

    if not adapter.is_dir():
        raise SoupkitError(str(adapter), "an adapter directory", "no such directory", "check the path")
    click.echo(describe_adapter(adapter))


@main.command(epilog="Example: soupkit verify merged/")
@click.argument("out", type=click.Path(path_type=Path))
def verify(out: Path) -> None:
    """Re-hash OUT's inputs and files against its lock file; list what changed (exit 1 if anything did)."""
    from soupkit.verify import describe_report, verify_output

    report = verify_output(out)
    click.echo(describe_report(out, report))
    if not report.ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
