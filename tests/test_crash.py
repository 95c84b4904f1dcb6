"""SIGKILL a running `soupkit merge` at chosen points: OUT is never half-written, and the rerun gives the same bytes.

A child process runs the real CLI with a few functions wrapped so that it announces each point it
reaches (writer opened, N tensors written, lock about to be written, each os.replace before and
after) and stops at the one named by SOUPKIT_CRASH_AT. The parent kills it there with SIGKILL.
The children run concurrently (their start-up, importing torch, dominates), then each is checked.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from soupkit.cli import main
from soupkit.io.output_guard import recover_stale

from conftest import tiny_recipe, write_recipe

CHILD = r"""
import os, sys, time
import soupkit.io.writer as writer
import soupkit.recipe.lock as lock

STOP = os.environ["SOUPKIT_CRASH_AT"]
counts = {"tensor": 0, "replace": 0}

def point(name):
    print(name, flush=True)
    if name == STOP:
        print("STOPPED", flush=True)
        time.sleep(300)

init, write, write_lock, replace = writer.SafetensorsStreamWriter.__init__, writer.SafetensorsStreamWriter.write, lock.write_lock, os.replace

def wrapped_init(self, *args, **kwargs):
    init(self, *args, **kwargs)
    self._fh.flush()
    point("writer-open")

def wrapped_write(self, key, tensor):
    write(self, key, tensor)
    self._fh.flush()
    counts["tensor"] += 1
    point(f"tensor-{counts['tensor']}")

def wrapped_lock(*args, **kwargs):
    point("lock")
    return write_lock(*args, **kwargs)

def wrapped_replace(src, dst):
    counts["replace"] += 1
    point(f"replace-{counts['replace']}")
    replace(src, dst)
    point(f"replaced-{counts['replace']}")

writer.SafetensorsStreamWriter.__init__ = wrapped_init
writer.SafetensorsStreamWriter.write = wrapped_write
lock.write_lock = wrapped_lock
os.replace = wrapped_replace
from soupkit.cli import main
main(sys.argv[1:])
"""

# kill point -> (OUT existed before the run, what OUT must hold right after the kill)
SCENARIOS: dict[str, tuple[bool, str]] = {
    "tensor-10": (False, "absent"),
    "lock": (False, "absent"),
    "replace-1": (False, "absent"),  # everything written and synced, not yet published
    "replaced-1": (False, "new"),  # published, the process dies before returning
    "tensor-3": (True, "old"),  # overwrite: the previous output stays intact until the end
    "replace-2": (True, "absent"),  # overwrite: old moved aside, new not yet renamed in
    "replaced-2": (True, "new"),  # overwrite: new published, old not yet deleted
}


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(f.relative_to(directory)): f.read_bytes() for f in sorted(directory.rglob("*")) if f.is_file()}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".soupkit-" in p.name)


def cli_merge(recipe: Path, out: Path, overwrite: bool = False) -> None:
    args = ["merge", str(recipe), "-o", str(out), "--quiet"] + (["--overwrite"] if overwrite else [])
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def killed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Reference outputs, then one killed child per scenario (run concurrently)."""
    root = tmp_path_factory.mktemp("crash")
    (root / "ref").mkdir()
    new_recipe = write_recipe(root, tiny_recipe("linear", (0.7, 0.3)), "new.yaml")
    old_recipe = write_recipe(root, tiny_recipe("cat", (1.0, 1.0)), "old.yaml")
    cli_merge(new_recipe, root / "ref" / "out")
    cli_merge(old_recipe, root / "ref" / "old")
    new, old = snapshot(root / "ref" / "out"), snapshot(root / "ref" / "old")
    children = {}
    for name, (existed, _) in SCENARIOS.items():
        parent = root / name
        parent.mkdir()
        if existed:
            shutil.copytree(root / "ref" / "old", parent / "out")
        args = [sys.executable, "-c", CHILD, "merge", str(new_recipe), "-o", str(parent / "out"), "--quiet"]
        args += ["--overwrite"] if existed else []
        env = {**os.environ, "SOUPKIT_CRASH_AT": name}
        children[name] = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    reached = {}
    for name, child in children.items():
        lines = []
        for line in child.stdout:  # type: ignore[union-attr]
            lines.append(line.strip())
            if line.strip() == "STOPPED":
                break
        os.kill(child.pid, signal.SIGKILL)
        child.wait()  # reap it, so that its PID is dead (not a zombie) when the rerun looks
        reached[name] = lines
    return {"root": root, "recipe": new_recipe, "new": new, "old": old, "reached": reached}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_sigkill_leaves_no_half_output_and_rerun_is_identical(killed: dict, name: str) -> None:
    existed, expected = SCENARIOS[name]
    parent = killed["root"] / name
    out = parent / "out"
    assert killed["reached"][name][-1:] == ["STOPPED"], killed["reached"][name]  # killed exactly at the point
    state = (
        "absent"
        if not out.exists()
        else "new"
        if snapshot(out) == killed["new"]
        else "old"
        if snapshot(out) == killed["old"]
        else "corrupt"
    )
    assert state == expected
    if name != "replaced-1":  # (after a fresh output is published nothing is left beside it)
        assert leftovers(parent), "the kill should have left its temporary directory"
    if name == "replace-2":
        recover_stale(out)  # the new output was complete: recovery finishes the interrupted rename
        assert snapshot(out) == killed["new"]
    cli_merge(killed["recipe"], out, overwrite=True)
    assert snapshot(out) == killed["new"]
    assert leftovers(parent) == []


def test_recovery_leaves_live_runs_alone(tmp_path: Path) -> None:
    """A temporary directory of a live process (another merge still running) is not touched; a dead one's is removed."""
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        for pid in (live.pid, dead.pid):
            (tmp_path / f".out.soupkit-tmp-{pid}").mkdir()
            (tmp_path / f".out.soupkit-tmp-{pid}" / "adapter_model.safetensors").write_bytes(b"partial")
        recover_stale(tmp_path / "out")
        assert leftovers(tmp_path) == [f".out.soupkit-tmp-{live.pid}"]
        assert not (tmp_path / "out").exists()
    finally:
        live.kill()
        live.wait()
