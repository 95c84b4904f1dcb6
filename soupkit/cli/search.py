"""``soupkit eval`` and ``soupkit sweep``: score one candidate, search many."""

from __future__ import annotations

from pathlib import Path

import click

from soupkit.cli.group import examples, main


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
