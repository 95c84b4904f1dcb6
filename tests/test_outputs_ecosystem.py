"""Outputs follow the ecosystem: AutoPeftModel loads them from any folder; the card has Hub front matter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from test_hub_verify import SHA, hub_cache  # noqa: F401  (hub_cache is a fixture)

from soupkit.cli import main

from conftest import TINY, tiny_recipe, write_recipe


def merge(tmp_path: Path, recipe: dict, out: str) -> Path:
    result = CliRunner().invoke(
        main, ["merge", str(write_recipe(tmp_path, recipe, f"{out}.yaml")), "-o", str(tmp_path / out), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    return tmp_path / out


def front_matter(card: Path) -> dict:
    text = card.read_text()
    assert text.startswith("---\n"), text[:80]
    return yaml.safe_load(text.split("---\n")[1])


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(4, 36).reshape(2, 16)
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_auto_peft_loads_local_base_from_another_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """base_model_name_or_path is absolute for a local base; the lock keeps the recipe's relative form."""
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    recipe = tiny_recipe("cat", (0.6, 0.4))
    recipe["base_model"] = "../base"  # relative to the recipe file
    (tmp_path / "recipes").mkdir()
    shutil.copytree(TINY / "base", tmp_path / "base")
    out = merge(tmp_path / "recipes", recipe, "merged")

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "base").resolve()) and config["revision"] is None
    assert yaml.safe_load((out / "soupkit.lock.yaml").read_text())["base_model"] == "../../base"

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = AutoPeftModelForCausalLM.from_pretrained(out).eval()
    expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY / "base"), out).eval()
    plain_base = AutoModelForCausalLM.from_pretrained(TINY / "base").eval()
    assert torch.equal(logits(loaded), logits(expected))
    assert not torch.allclose(logits(loaded), logits(plain_base))  # the adapter is active


def test_card_front_matter_local_base(tmp_path: Path) -> None:
    out = merge(tmp_path, tiny_recipe("ties", (1.0, 1.0), density=0.5), "ties")
    meta = front_matter(out / "README.md")
    assert meta["library_name"] == "peft"
    assert {"soupkit", "ties"} <= set(meta["tags"])
    assert "base_model" not in meta  # a local directory is not a hub id
    recipe_block = (out / "README.md").read_text().split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(recipe_block)["merge"]["method"] == "ties"


def test_hub_base_written_as_id_and_commit(tmp_path: Path, hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """A hub base: base_model_name_or_path is the id, revision the resolved commit; AutoPeftModel loads it offline."""
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    recipe = tiny_recipe("cat", (0.6, 0.4))
    recipe["base_model"] = "tiny-org/base@main"
    out = merge(tmp_path, recipe, "hub-out")
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == ("tiny-org/base", SHA["base"])
    assert front_matter(out / "README.md")["base_model"] == "tiny-org/base"
    assert yaml.safe_load((out / "soupkit.lock.yaml").read_text())["base_model"] == f"tiny-org/base@{SHA['base']}"

    monkeypatch.chdir(tmp_path)
    # huggingface_hub read HF_HUB_OFFLINE / HF_HUB_CACHE at import, so the fake cache is named here
    loaded = AutoPeftModelForCausalLM.from_pretrained(out, cache_dir=hub_cache, local_files_only=True).eval()
    expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY / "base"), out).eval()
    assert torch.equal(logits(loaded), logits(expected))


def test_full_model_card_front_matter(tmp_path: Path) -> None:
    recipe = tiny_recipe("cat", (0.6, 0.4))
    recipe["output"] = "model"
    meta = front_matter(merge(tmp_path, recipe, "full") / "README.md")
    assert meta["library_name"] == "transformers" and {"soupkit", "cat"} <= set(meta["tags"])
