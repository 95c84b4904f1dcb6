"""The CLI through click's runner: each command, user errors (exit 2, one line, nothing written), reruns."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from soupkit.cli import main
from soupkit.methods import REGISTRY

from conftest import ROOT, TINY, tiny_recipe, write_recipe


def invoke(*args: str) -> object:
    return CliRunner().invoke(main, list(args))


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_merge_shipped_recipe_twice_is_byte_identical(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    for out in (first, second):
        result = invoke("merge", str(ROOT / "recipes" / "cat.yaml"), "-o", str(out), "--quiet")
        assert result.exit_code == 0, result.output
    assert digest(first) == digest(second)
    assert set(digest(first)) == {"adapter_config.json", "adapter_model.safetensors", "soupkit.lock.yaml", "README.md"}


def test_lock_file_reruns_to_the_same_adapter(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert invoke("merge", str(ROOT / "recipes" / "linear.yaml"), "-o", str(out), "--quiet").exit_code == 0
    rerun = tmp_path / "rerun"
    result = invoke("merge", str(out / "soupkit.lock.yaml"), "-o", str(rerun), "--quiet")
    assert result.exit_code == 0, result.output
    assert (rerun / "adapter_model.safetensors").read_bytes() == (out / "adapter_model.safetensors").read_bytes()


def test_existing_output_needs_overwrite_and_only_soupkits_own_is_replaced(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert invoke("merge", str(ROOT / "recipes" / "cat.yaml"), "-o", str(out), "--quiet").exit_code == 0
    result = invoke("merge", str(ROOT / "recipes" / "linear.yaml"), "-o", str(out))
    assert result.exit_code == 2 and "pass --overwrite" in result.output
    result = invoke("merge", str(ROOT / "recipes" / "linear.yaml"), "-o", str(out), "--overwrite", "--quiet")
    assert result.exit_code == 0, result.output
    assert "linear" in (out / "soupkit.lock.yaml").read_text()
    (out / "keep.txt").write_text("mine")  # a file soupkit did not write: the folder is no longer replaceable
    result = invoke("merge", str(ROOT / "recipes" / "cat.yaml"), "-o", str(out), "--overwrite", "--quiet")
    assert result.exit_code == 2 and "files soupkit did not write (keep.txt)" in result.output
    assert (out / "keep.txt").read_text() == "mine"


def test_validate_plan_methods_inspect() -> None:
    result = invoke("validate", str(ROOT / "recipes" / "cat.yaml"))
    assert result.exit_code == 0 and "ok (cat, 14 modules, output rank 12)" in result.output
    result = invoke("plan", str(ROOT / "recipes" / "cat.yaml"))
    assert result.exit_code == 0
    rows = [line for line in result.output.splitlines() if line.startswith("  model.")]
    assert len(rows) == 14
    cells = {re.split(r"\s{2,}", row.strip())[0]: re.split(r"\s{2,}", row.strip()) for row in rows}
    assert cells["model.layers.1.mlp.up_proj"] == [
        "model.layers.1.mlp.up_proj",
        "128x64",
        "12",
        "12",
        "math(r=4, w=0.8), code(r=8, w=0.2)",
    ]
    header = next(line for line in result.output.splitlines() if line.startswith("module "))
    assert {row.index("math(") for row in rows} == {header.index("sources")}  # aligned columns
    assert "estimated peak working memory" in result.output
    result = invoke("methods")
    assert result.exit_code == 0
    for name, method in REGISTRY.items():
        assert f"{name}  [{method.space}]" in result.output
    assert "majority_sign (total|frequency, default 'total')" in result.output and "Literal" not in result.output
    result = invoke("inspect", str(TINY / "adapters" / "code"))
    assert result.exit_code == 0 and "r 8, lora_alpha 16" in result.output
    rows = [line for line in result.output.splitlines() if line.startswith("  model.")]
    assert re.split(r"\s{2,}", rows[5].strip()) == ["model.layers.1.mlp.up_proj", "8", "2", "11.97"]
    assert len({len(row) for row in rows}) == 1  # right-aligned numbers: every row ends in one column


def test_every_option_has_help_and_the_help_is_not_cut() -> None:
    """Walks the click tree: every option of every command says what it does."""
    import click

    def commands(command: click.Command, path: str) -> list[tuple[str, click.Command]]:
        found = [(path, command)]
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                found += commands(sub, f"{path} {name}")
        return found

    missing = [
        f"{path} {param.opts[-1]}"
        for path, command in commands(main, "soupkit")
        for param in command.params
        if isinstance(param, click.Option) and not (param.help or "").strip()
    ]
    assert not missing, f"options without help: {missing}"
    listing = CliRunner().invoke(main, ["--help"], terminal_width=80).output
    commands_section = listing.split("Commands:")[1]
    assert "..." not in commands_section and "fit together." in commands_section
    fit_help = CliRunner().invoke(main, ["fit-alpha", "--help"], terminal_width=80).output
    assert "  soupkit fit-alpha recipes/cat.yaml --data examples/tiny/calib.jsonl -o out/cat-fitted.yaml\n" in fit_help
    assert "[softmax|free]" in fit_help


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = invoke("merge", str(ROOT / "recipes" / "cat.yaml"), "-o", str(out), "--dry-run")
    assert result.exit_code == 0 and "dry run" in result.output and not out.exists()


BAD_RECIPES = [
    ({"merge": {"method": "catt"}}, "merge.method: expected one of", "did you mean 'cat'"),
    ({"merge": {"method": "cat", "rnak": 8}}, "merge.rnak", "did you mean 'rank'"),
    ({"seeed": 1}, "seeed", "did you mean 'seed'"),
    ({"output": "modle"}, "output: expected 'adapter' or 'model'", "'modle'"),
    ({"merge": {"method": "svd", "rank": 0}}, "merge.rank", "expected a number >= 1, found 0"),
    ({"adapters": []}, "adapters", "at least 1"),
    ({"merge": {"method": "cat", "modules": [{"match": "*", "weights": {"maths": 1}}]}}, "maths", "did you mean 'math'"),
    ({"base_model": "./nowhere"}, "base_model: expected an existing directory", "relative paths start at the recipe"),
]


@pytest.mark.parametrize(("change", "fragment", "hint"), BAD_RECIPES)
def test_bad_recipe_is_one_line_exit_2_nothing_written(tmp_path: Path, change: dict, fragment: str, hint: str) -> None:
    recipe = tiny_recipe()
    for key, value in change.items():
        recipe[key] = value
    out = tmp_path / "out"
    result = invoke("merge", str(write_recipe(tmp_path, recipe)), "-o", str(out))
    assert result.exit_code == 2, result.output
    assert fragment in result.output and hint in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def test_duplicate_adapter_names(tmp_path: Path) -> None:
    recipe = tiny_recipe()
    recipe["adapters"][1]["name"] = "math"
    result = invoke("validate", str(write_recipe(tmp_path, recipe)))
    assert result.exit_code == 2 and "duplicate adapter name 'math'" in result.output


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("base_model: x\nadapters: [\n")
    result = invoke("validate", str(path))
    assert result.exit_code == 2 and "bad.yaml:3" in result.output and "valid YAML" in result.output


def test_docs_document_every_recipe_field() -> None:
    from soupkit.describe import recipe_field_rows

    reference = (ROOT / "docs" / "recipe.md").read_text()
    for field, _ in recipe_field_rows():
        assert f"`{field}`" in reference, f"docs/recipe.md lacks {field}"
