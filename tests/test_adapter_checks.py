"""Adapters that cannot be what the user meant: no LoRA tensor at all, or trained on another base."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from safetensors.torch import save_file

from soupkit.cli import main

from conftest import TINY, tiny_recipe

WEIGHTS = "adapter_model.safetensors"


def copy_adapter(d: Path, name: str) -> Path:
    dest = d / name
    shutil.copytree(TINY / "adapters" / name, dest)
    return dest


def run(d: Path, recipe: dict, *args: str) -> tuple[int, list[str], str]:
    """Exit code, stderr lines and stdout of ``soupkit merge`` (or ``args``) on ``recipe``."""
    path = d / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    command = list(args) or ["merge", "--quiet", "-o", str(d / "out")]
    result = CliRunner().invoke(main, [command[0], str(path), *command[1:]])
    return result.exit_code, result.stderr.strip().splitlines(), result.stdout


def empty_adapter(d: Path) -> Path:
    """A PEFT adapter folder whose safetensors file holds no tensor at all."""
    adapter = copy_adapter(d, "math")
    save_file({}, adapter / WEIGHTS, metadata={"format": "pt"})
    return adapter


@pytest.mark.parametrize("override", [False, True], ids=["plain", "merge_modules"])
def test_an_adapter_without_lora_tensors_is_refused_naming_its_file(tmp_path: Path, override: bool) -> None:
    recipe = tiny_recipe("cat")
    recipe["adapters"][0]["path"] = str(empty_adapter(tmp_path))
    if override:
        recipe["merge"]["modules"] = [{"match": "*.mlp.*", "weights": {"math": 0.8, "code": 0.2}}]
    code, errors, _ = run(tmp_path, recipe)
    assert code == 2, errors
    assert len(errors) == 1 and errors[0].startswith("error: adapter 'math'"), errors
    assert str(tmp_path / "math" / WEIGHTS) in errors[0] and "no LoRA tensor" in errors[0], errors
    assert not (tmp_path / "out").exists()


def test_an_adapter_without_lora_tensors_is_refused_by_validate_too(tmp_path: Path) -> None:
    recipe = tiny_recipe("ties", density=0.5)
    recipe["adapters"][1]["path"] = str(empty_adapter(tmp_path))
    code, errors, _ = run(tmp_path, recipe, "validate")
    assert code == 2 and len(errors) == 1 and "no LoRA tensor" in errors[0], errors


def test_a_lone_adapter_without_lora_tensors_and_an_override_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    recipe = tiny_recipe("cat")
    recipe["adapters"] = [{"name": "math", "path": str(empty_adapter(tmp_path)), "weight": 1.0}]
    recipe["merge"]["modules"] = [{"match": "*.q_proj", "weights": {"math": 0.5}}]
    code, errors, _ = run(tmp_path, recipe)
    assert code == 2 and len(errors) == 1 and "no LoRA tensor" in errors[0], errors
