"""Adapters that cannot be what the user meant: no LoRA tensor at all, or trained on another base."""

from __future__ import annotations

import json
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


# ---- the adapter's own base against the recipe's base --------------------------------------------


def named_base(d: Path, name: str, **config_changes: object) -> Path:
    """A folder holding only a config.json: the tiny base's, with ``config_changes``."""
    folder = d / name
    folder.mkdir()
    config = json.loads((TINY / "base" / "config.json").read_text())
    config.update(config_changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def naming(d: Path, base_ref: str) -> dict:
    """The tiny recipe whose 'math' adapter (a copy) names ``base_ref`` as its base."""
    math = copy_adapter(d, "math")
    config = json.loads((math / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base_ref
    (math / "adapter_config.json").write_text(json.dumps(config))
    recipe = tiny_recipe("cat")
    recipe["adapters"][0]["path"] = str(math)
    return recipe


@pytest.mark.parametrize(
    "changes,named",
    [
        ({"num_hidden_layers": 32}, "num_hidden_layers 32"),
        ({"vocab_size": 32000}, "vocab_size 32000"),
        ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "model_type 'mistral'"),
    ],
    ids=["layers", "vocabulary", "architecture"],
)
def test_an_adapter_whose_base_config_differs_is_refused_naming_what_differs(tmp_path: Path, changes: dict, named: str) -> None:
    recipe = naming(tmp_path, str(named_base(tmp_path, "other-base", **changes)))
    for command in (["merge", "--quiet", "-o", str(tmp_path / "out")], ["validate"], ["plan"]):
        code, errors, _ = run(tmp_path, recipe, *command)
        assert code == 2 and len(errors) == 1, (command, errors)
        assert "adapter 'math'" in errors[0] and named in errors[0] and "--allow-base-mismatch" in errors[0], errors
    assert not (tmp_path / "out").exists()
    code, errors, _ = run(tmp_path, recipe, "merge", "--quiet", "-o", str(tmp_path / "out"), "--allow-base-mismatch")
    assert code == 0 and (tmp_path / "out" / WEIGHTS).is_file(), errors
    assert any(e.startswith("warning:") and named in e for e in errors), errors


def test_another_name_for_the_same_base_is_a_warning_not_a_refusal(tmp_path: Path) -> None:
    """A renamed repo (same config) or a base whose config is not at hand: merged, with one warning line."""
    for ref in (str(named_base(tmp_path, "Llama-3.1-8B")), "meta-llama/Meta-Llama-3.1-8B-Instruct"):
        out = tmp_path / "out"
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(tmp_path / "math", ignore_errors=True)
        code, errors, _ = run(tmp_path, naming(tmp_path, ref), "merge", "--quiet", "-o", str(out))
        assert code == 0 and (out / WEIGHTS).is_file(), errors
        warnings = [e for e in errors if e.startswith("warning:")]
        assert len(warnings) == 1 and "adapter 'math'" in warnings[0] and ref.rsplit("/", 1)[-1] in warnings[0], errors


def test_adapters_naming_different_bases_of_one_shape_are_each_compared_with_the_recipe_base(tmp_path: Path) -> None:
    """The old guard compared adapters with each other by name and refused; now each is held against the base."""
    recipe = naming(tmp_path, "meta-llama/Llama-3.1-8B")
    code_dir = copy_adapter(tmp_path, "code")
    config = json.loads((code_dir / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "meta-llama/Llama-3.1-8B-Instruct"
    (code_dir / "adapter_config.json").write_text(json.dumps(config))
    recipe["adapters"][1]["path"] = str(code_dir)
    code, errors, _ = run(tmp_path, recipe, "validate")
    assert code == 0 and sum(e.startswith("warning:") for e in errors) == 2, errors


def test_an_adapter_naming_the_recipe_base_gives_no_warning(tmp_path: Path) -> None:
    code, errors, _ = run(tmp_path, tiny_recipe("cat"), "validate")
    assert code == 0 and errors == [], errors


@pytest.mark.parametrize("command", ["merge", "validate", "plan", "analyze", "fit-alpha"])
def test_every_command_that_opens_a_recipe_takes_allow_base_mismatch(command: str) -> None:
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0 and "--allow-base-mismatch" in result.output


def test_a_base_name_too_long_for_a_path_is_only_a_name(tmp_path: Path) -> None:
    code, errors, _ = run(tmp_path, naming(tmp_path, "x" * 5000), "validate")
    assert code == 0 and len(errors) == 1 and errors[0].startswith("warning: adapter 'math'"), errors
