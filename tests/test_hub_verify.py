"""Hub references from a local fake cache (HF_HUB_OFFLINE=1: no network), pinned commits, and `soupkit verify`."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from soupkit.cli import main
from soupkit.io import resolve

from conftest import TINY, tiny_recipe, write_recipe

SHA = {name: hashlib.sha1(name.encode()).hexdigest() for name in ("base", "math-v1", "math-v2", "code")}


def add_snapshot(cache: Path, repo: str, commit: str, source: Path, refs: tuple[str, ...] = ()) -> Path:
    """Lay ``source``'s files out as the hub cache does: blobs/<sha256>, snapshots/<commit>/name -> blob, refs/<ref>."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (root / "blobs").mkdir(exist_ok=True)
    for f in sorted(source.iterdir()):
        blob = root / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    for ref in refs:
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture()
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake cache: tiny-org/base (main), tiny-org/math (v1 = examples' math, main = code's tensors), tiny-org/code (main)."""
    cache = tmp_path / "hub"
    add_snapshot(cache, "tiny-org/base", SHA["base"], TINY / "base", refs=("main",))
    add_snapshot(cache, "tiny-org/math", SHA["math-v1"], TINY / "adapters" / "math", refs=("v1",))
    add_snapshot(cache, "tiny-org/math", SHA["math-v2"], TINY / "adapters" / "code", refs=("main",))
    add_snapshot(cache, "tiny-org/code", SHA["code"], TINY / "adapters" / "code", refs=("main",))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def test_hub_references_merge_pin_and_rerun(tmp_path: Path, hub_cache: Path) -> None:
    """org/name, org/name@branch and org/name@commit resolve from the cache; the lock pins commits; the lock reruns."""
    local = write_recipe(tmp_path, tiny_recipe("cat", (0.6, 0.4)), "local.yaml")
    hub = tiny_recipe("cat", (0.6, 0.4))
    hub["base_model"] = "tiny-org/base"
    hub["adapters"][0]["path"] = "tiny-org/math@v1"
    hub["adapters"][1]["path"] = f"tiny-org/code@{SHA['code']}"
    hub_path = write_recipe(tmp_path, hub, "hub.yaml")

    assert invoke("merge", str(local), "-o", str(tmp_path / "local"), "--quiet")[0] == 0
    assert invoke("merge", str(hub_path), "-o", str(tmp_path / "hub-out"), "--quiet")[0] == 0
    out = tmp_path / "hub-out"
    weights = (out / "adapter_model.safetensors").read_bytes()
    assert weights == (tmp_path / "local" / "adapter_model.safetensors").read_bytes()
    lock = yaml.safe_load((out / "soupkit.lock.yaml").read_text())
    assert lock["base_model"] == f"tiny-org/base@{SHA['base']}"
    assert [a["path"] for a in lock["adapters"]] == [f"tiny-org/math@{SHA['math-v1']}", f"tiny-org/code@{SHA['code']}"]
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-org/base"

    code, text = invoke("verify", str(out))
    assert code == 0 and "ok" in text, text
    # the lock is a recipe: rerunning it offline resolves the pinned commits, not refs/main
    (hub_cache / "models--tiny-org--math" / "refs" / "v1").write_text(SHA["math-v2"])
    assert invoke("merge", str(out / "soupkit.lock.yaml"), "-o", str(tmp_path / "rerun"), "--quiet")[0] == 0
    assert (tmp_path / "rerun" / "adapter_model.safetensors").read_bytes() == weights


def test_hub_branch_moves_changes_inputs(tmp_path: Path, hub_cache: Path) -> None:
    """`org/name` follows refs/main; a moved ref is a different input, recorded with its own commit."""
    recipe = tiny_recipe("cat")
    recipe["adapters"][0]["path"] = "tiny-org/math"  # main -> the code adapter's files
    code, text = invoke("merge", str(write_recipe(tmp_path, recipe)), "-o", str(tmp_path / "out"), "--quiet")
    assert code == 0, text
    lock = yaml.safe_load((tmp_path / "out" / "soupkit.lock.yaml").read_text())
    assert lock["adapters"][0]["path"] == f"tiny-org/math@{SHA['math-v2']}"
    assert lock["soupkit_lock"]["inputs"]["math"] == lock["soupkit_lock"]["inputs"]["code"]


def test_hub_requests_only_needed_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What soupkit asks huggingface_hub for: configs and safetensors (tokenizer only for export), offline honoured."""
    import huggingface_hub

    calls: list[dict] = []

    def fake_snapshot_download(repo_id: str, **kwargs: object) -> str:
        calls.append({"repo_id": repo_id, **kwargs})
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
    resolve.resolve_reference("org/adapter@abc", tmp_path, "adapters.0.path")
    resolve.resolve_reference("org/base", tmp_path, "base_model")
    resolve.resolve_reference("org/base", tmp_path, "base_model", "base+tokenizer")
    adapter, base, export = calls
    assert adapter["revision"] == "abc" and adapter["local_files_only"] is True and adapter["cache_dir"] == str(tmp_path / "c")
    assert adapter["allow_patterns"] == ["adapter_config.json", "adapter_model.safetensors"]
    assert base["revision"] is None and "tokenizer.json" not in base["allow_patterns"]
    assert "tokenizer.json" in export["allow_patterns"] and "model-*-of-*.safetensors" in export["allow_patterns"]
    for call in calls:  # never pickles or code
        assert not any(p.endswith((".bin", ".py", ".pt", ".pth", ".pkl")) or p == "*" for p in call["allow_patterns"])


def test_local_directory_wins_over_hub_id(tmp_path: Path) -> None:
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert resolve.resolve_reference("org/name", tmp_path, "base_model") == (tmp_path / "org" / "name").resolve()
    assert resolve.parse_hub_id("./org/name") is None
    assert resolve.parse_hub_id("org/name@refs/pr/3") == ("org/name", "refs/pr/3")


def test_verify_reports_changed_missing_added(tmp_path: Path) -> None:
    """verify passes on a fresh output, then names each changed input, missing output and added file."""
    math = tmp_path / "math"
    shutil.copytree(TINY / "adapters" / "math", math)
    recipe = tiny_recipe("cat")
    recipe["adapters"][0]["path"] = str(math)
    out = tmp_path / "out"
    assert invoke("merge", str(write_recipe(tmp_path, recipe)), "-o", str(out), "--quiet")[0] == 0
    code, text = invoke("verify", str(out))
    assert code == 0 and text.strip().endswith("ok (9 recorded files checked)"), text

    config = json.loads((math / "adapter_config.json").read_text())
    config["lora_alpha"] = 16  # a silent upstream change that would alter the merge
    (math / "adapter_config.json").write_text(json.dumps(config))
    (out / "README.md").unlink()
    (out / "notes.txt").write_text("added by hand")
    code, text = invoke("verify", str(out))
    assert code == 1, text
    lines = text.splitlines()
    assert any(line.startswith("changed") and "math: adapter_config.json" in line for line in lines), text
    assert any(line.startswith("missing") and "output: README.md" in line for line in lines), text
    assert any(line.startswith("added") and "output: notes.txt" in line for line in lines), text
    assert "3 difference(s)" in lines[-1]


def test_verify_detects_changed_output_tensor(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert invoke("merge", str(write_recipe(tmp_path, tiny_recipe("cat"))), "-o", str(out), "--quiet")[0] == 0
    data = bytearray((out / "adapter_model.safetensors").read_bytes())
    data[-1] ^= 0x01  # one bit of the last tensor
    (out / "adapter_model.safetensors").write_bytes(bytes(data))
    code, text = invoke("verify", str(out))
    assert code == 1 and "changed  output: adapter_model.safetensors" in text, text
