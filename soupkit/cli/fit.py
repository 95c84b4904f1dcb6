"""``soupkit fit-alpha``: learn CAT's mixing weights (its many options live here)."""

from __future__ import annotations

from pathlib import Path

import click

from soupkit.cli.group import base_mismatch_option, examples, main


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
