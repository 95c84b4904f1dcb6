"""The data-safety contract (docs/safety.md), case by case.

Every refused case asserts: exit code 2, exactly one line on stderr and no traceback, the expected
words in it, and that nothing under the test's folder changed: every file's bytes (inputs, recipe,
an existing OUT) and the set of paths (no OUT, lock or temporary folder created). The inputs are
copies of examples/tiny, so that a failure here can never damage the shipped example.

Then real processes: two merges into one OUT started together (one wins, the other names its pid),
SIGTERM / SIGINT mid-export (exit 143 / 130, nothing left behind), and write failures injected at
every point of a full-model export (the process exits within seconds instead of hanging).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from soupkit.cli import main
from soupkit.errors import SoupkitError

from conftest import TINY


def tree_state(root: Path) -> dict[str, str]:
    """Every path under ``root``: a file's sha256, a link's target, 'dir' for folders."""
    state = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            state[rel] = "-> " + os.readlink(path)
        elif path.is_dir():
            state[rel] = "dir"
        else:
            state[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


class World:
    """A private copy of the tiny example: base, adapters, a recipe beside them, data for fit-alpha."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.inputs = root / "inputs"
        shutil.copytree(TINY / "base", self.inputs / "base")
        for name in ("math", "code"):
            shutil.copytree(TINY / "adapters" / name, self.inputs / "adapters" / name)
        self.recipes = root / "recipes"
        self.recipes.mkdir()
        self.recipe = self.write_recipe("recipe.yaml")
        self.model_recipe = self.write_recipe("model.yaml", output="model")
        self.data = root / "data.jsonl"
        self.data.write_text('{"text": "abc"}\n' * 4)
        self.work = root / "work"  # the current folder of every case
        self.work.mkdir()
        self.home = root / "home"  # HOME of every case (never the real one)
        (self.home / "projects").mkdir(parents=True)

    def write_recipe(self, name: str, **extra: object) -> Path:
        recipe = {
            "base_model": "../inputs/base",
            "adapters": [{"name": n, "path": f"../inputs/adapters/{n}", "weight": 1.0} for n in ("math", "code")],
            "merge": {"method": "cat"},
            "dtype": "float32",
            **extra,
        }
        path = self.recipes / name
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        return path

    def merge(self, out: str | Path, *flags: str, recipe: Path | None = None) -> list[str]:
        return ["merge", str(recipe or self.recipe), "-o", str(out), "--quiet", *flags]

    def fit(self, *flags: str) -> list[str]:
        return ["fit-alpha", str(self.recipe), "--data", str(self.data), *flags]

    def analyze(self, out: str | Path, *flags: str) -> list[str]:
        return ["analyze", str(self.recipe), "-o", str(out), "--no-base", *flags]

    def soupkit_output(self, name: str) -> Path:
        """A real merge output, made with the CLI (exit 0)."""
        out = self.root / name
        result = CliRunner().invoke(main, self.merge(out))
        assert result.exit_code == 0, result.output
        return out


def folder_with(files: dict[str, str]) -> Callable[[World], Path]:
    def make(w: World) -> Path:
        folder = w.root / "mine"
        folder.mkdir()
        for name, text in files.items():
            (folder / name).write_text(text)
        return folder

    return make


def lock_text(w: World) -> str:
    return (w.soupkit_output("real") / "soupkit.lock.yaml").read_text()


def symlink_loop(w: World) -> Path:
    (w.root / "loop").symlink_to(w.root / "loop")
    return w.root / "loop" / "out"


def symlink_to(target: Callable[[World], Path]) -> Callable[[World], Path]:
    def make(w: World) -> Path:
        (w.root / "link").symlink_to(target(w))
        return w.root / "link"

    return make


def output_with_user_file(w: World) -> Path:
    out = w.soupkit_output("out")
    (out / "keep.txt").write_text("mine")
    return out


def user_file(w: World, name: str = "notes.txt") -> Path:
    (w.root / name).write_text("my notes\n")
    return w.root / name


# name -> (build the command line in a fresh World, words the one error line must contain)
CASES: dict[str, tuple[Callable[[World], list[str]], str]] = {
    # 1. inputs are never written, whatever the flags
    "base_as_out_overwrite": (lambda w: w.merge(w.inputs / "base", "--overwrite"), "found the base model folder"),
    "base_as_out_output_model": (
        lambda w: w.merge(w.inputs / "base", "--overwrite", recipe=w.model_recipe),
        "found the base model folder",
    ),
    "adapter_as_out": (lambda w: w.merge(w.inputs / "adapters" / "math", "--overwrite"), "found the adapter 'math' folder"),
    "inside_adapter": (lambda w: w.merge(w.inputs / "adapters" / "code" / "merged"), "a path inside the adapter 'code'"),
    "holds_inputs": (lambda w: w.merge(w.inputs, "--overwrite"), "a folder that holds the base model"),
    "recipe_folder": (lambda w: w.merge(w.recipes, "--overwrite"), "a folder that holds the recipe file"),
    "recipe_file_as_out": (lambda w: w.merge(w.recipe, "--overwrite"), "found the recipe file"),
    "symlink_to_base": (
        lambda w: w.merge(symlink_to(lambda w: w.inputs / "base")(w), "--overwrite"),
        "found the base model folder",
    ),
    "lock_recipe_into_its_output": (
        lambda w: w.merge(w.soupkit_output("prev"), "--overwrite", recipe=w.root / "prev" / "soupkit.lock.yaml"),
        "a folder that holds the recipe file",
    ),
    "dry_run_into_base": (lambda w: w.merge(w.inputs / "base", "--dry-run"), "found the base model folder"),
    # folders soupkit must never replace
    "cwd": (lambda w: w.merge(w.work, "--overwrite"), "found the current folder"),
    "dot": (lambda w: w.merge(".", "--overwrite"), "a name for a new output, found '.'"),
    "dotdot": (lambda w: w.merge("..", "--overwrite"), "a name for a new output, found '..'"),
    "above_cwd": (lambda w: w.merge(w.root, "--overwrite"), "a folder that holds the current folder"),
    "home": (lambda w: w.merge(w.home, "--overwrite"), "found the home folder"),
    "filesystem_root": (lambda w: w.merge("/"), "a name for a new output, found '/'"),
    # 2. --overwrite replaces only what soupkit wrote
    "unrelated_folder": (
        lambda w: w.merge(folder_with({"notes.txt": "mine"})(w), "--overwrite"),
        "a folder soupkit did not write",
    ),
    "soupkit_output_plus_user_file": (
        lambda w: w.merge(output_with_user_file(w), "--overwrite"),
        "files soupkit did not write (keep.txt)",
    ),
    "fake_lock_name_only": (
        lambda w: w.merge(folder_with({"soupkit.lock.yaml": "hello: 1\n"})(w), "--overwrite"),
        "no soupkit.lock.yaml written by soupkit",
    ),
    "lock_header_but_not_soupkits": (
        lambda w: w.merge(
            folder_with({"soupkit.lock.yaml": lock_text(w).split("\n")[0] + "\nbase_model: x\n"})(w), "--overwrite"
        ),
        "whose soupkit.lock.yaml soupkit did not write",
    ),
    "out_is_user_file": (lambda w: w.merge(user_file(w), "--overwrite"), "found an existing file"),
    "symlinked_out_to_user_folder": (
        lambda w: w.merge(symlink_to(folder_with({"a.txt": "mine"}))(w), "--overwrite"),
        "a folder soupkit did not write",
    ),
    "soupkit_output_without_overwrite": (lambda w: w.merge(w.soupkit_output("out")), "pass --overwrite"),
    # 6. bad output paths
    "parent_is_file": (lambda w: w.merge(user_file(w) / "out"), "a folder at"),
    "proc": (lambda w: w.merge("/proc/soupkit-out"), "a system folder (/proc)"),
    "sys": (lambda w: w.merge("/sys/soupkit-out", "--overwrite"), "a system folder (/sys)"),
    "dev": (lambda w: w.merge("/dev/soupkit-out"), "a system folder (/dev)"),
    "symlink_loop": (lambda w: w.merge(symlink_loop(w)), "a path without a symlink loop"),
    # fit-alpha's fitted recipe and report folder
    "fit_out_is_recipe": (lambda w: w.fit("-o", str(w.recipe), "--overwrite"), "found the recipe file"),
    "fit_out_is_data": (lambda w: w.fit("-o", str(w.data), "--overwrite"), "found the data file"),
    "fit_out_inside_base": (lambda w: w.fit("-o", str(w.inputs / "base" / "fitted.yaml")), "a path inside the base model"),
    "fit_report_is_adapter": (
        lambda w: w.fit("-o", str(w.root / "f.yaml"), "--report-dir", str(w.inputs / "adapters" / "math"), "--overwrite"),
        "found the adapter 'math' folder",
    ),
    "fit_report_holds_recipe": (
        lambda w: w.fit("-o", str(w.root / "f.yaml"), "--report-dir", str(w.recipes), "--overwrite"),
        "holds the recipe file",
    ),
    "fit_out_user_yaml": (
        lambda w: w.fit("-o", str(user_file(w, "mine.yaml")), "--overwrite"),
        "a file soupkit fit-alpha did not write",
    ),
    "fit_report_user_folder": (
        lambda w: w.fit(
            "-o", str(w.root / "f.yaml"), "--report-dir", str(folder_with({"fit_report.json": "{}"})(w)), "--overwrite"
        ),
        "a folder soupkit did not write",
    ),
    "fit_outputs_overlap": (
        lambda w: w.fit("-o", str(w.root / "r" / "f.yaml"), "--report-dir", str(w.root / "r")),
        "a path inside it",
    ),
    "fit_out_dotdot": (lambda w: w.fit("-o", ".."), "a name for a new output, found '..'"),
    "fit_out_dotdot_suggests_a_file": (lambda w: w.fit("-o", ".."), "name the output, e.g. -o fitted.yaml"),
    "fit_out_home": (lambda w: w.fit("-o", str(w.home)), "found the home folder; name a new file, e.g. -o fitted.yaml"),
    # soupkit analyze's output folder
    "analyze_into_adapter": (
        lambda w: w.analyze(w.inputs / "adapters" / "math", "--overwrite"),
        "found the adapter 'math' folder",
    ),
    "analyze_over_merge_output": (
        lambda w: w.analyze(w.soupkit_output("out"), "--overwrite"),
        "no analysis.json written by soupkit analyze",
    ),
    "analyze_into_proc": (lambda w: w.analyze("/proc/analysis"), "a system folder (/proc)"),
}


def run_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, build: Callable[[World], list[str]]) -> tuple[str, dict, dict]:
    world = World(tmp_path)
    monkeypatch.chdir(world.work)
    monkeypatch.setenv("HOME", str(world.home))
    args = build(world)
    before = tree_state(tmp_path)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    return result.stderr, before, tree_state(tmp_path)


@pytest.mark.parametrize("name", list(CASES))
def test_refused_in_one_line_and_nothing_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    build, expected = CASES[name]
    stderr, before, after = run_refused(tmp_path, monkeypatch, build)
    lines = stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert expected in lines[0], lines[0]
    assert after == before  # inputs' bytes, OUT as it was, and no new path (lock, temporary folder, OUT)


def test_unwritable_folder_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder nobody may write into (immutable: refused even for root, which these tests run as)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True, check=False).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        stderr, before, after = run_refused(tmp_path, monkeypatch, lambda w: w.merge(locked / "out"))
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)
    assert len(stderr.splitlines()) == 1 and f"a writable folder at {locked}, found no permission to write there" in stderr
    assert after == before


def test_symlinked_out_is_resolved_and_replaced_cleanly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--overwrite through a symlink replaces the folder it points to; the link stays, nothing is left beside."""
    world = World(tmp_path)
    monkeypatch.chdir(world.work)
    real = world.soupkit_output("real")
    (tmp_path / "link").symlink_to(real)
    result = CliRunner().invoke(
        main, world.merge(tmp_path / "link", "--overwrite", recipe=world.write_recipe("linear.yaml", merge={"method": "linear"}))
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "link").is_symlink() and "method: linear" in (real / "soupkit.lock.yaml").read_text()
    assert [p.name for p in tmp_path.iterdir() if ".soupkit-" in p.name] == []


def test_output_beside_the_recipe_is_the_normal_case(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`-o out` next to recipe.yaml (run from the recipe's folder) writes out/ and touches nothing else."""
    world = World(tmp_path)
    monkeypatch.chdir(world.recipes)
    before = tree_state(world.inputs)
    result = CliRunner().invoke(main, ["merge", "recipe.yaml", "-o", "out", "--quiet"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in world.recipes.iterdir()) == ["model.yaml", "out", "recipe.yaml"]
    assert tree_state(world.inputs) == before


def test_analyze_replaces_its_own_output_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    world = World(tmp_path)
    monkeypatch.chdir(world.work)
    out = tmp_path / "analysis"
    for flags in ((), ("--overwrite",)):
        result = CliRunner().invoke(main, world.analyze(out, *flags))
        assert result.exit_code == 0, result.output
    (out / "notes.txt").write_text("mine")
    result = CliRunner().invoke(main, world.analyze(out, "--overwrite"))
    assert result.exit_code == 2 and "files soupkit did not write (notes.txt)" in result.stderr
    assert (out / "notes.txt").read_text() == "mine" and (out / "analysis.json").is_file()


def test_empty_folder_is_replaced_and_created_parents_are_removed_on_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = World(tmp_path)
    monkeypatch.chdir(world.work)
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(main, world.merge(tmp_path / "empty", "--overwrite"))
    assert result.exit_code == 0 and (tmp_path / "empty" / "adapter_model.safetensors").is_file()

    def fail(*_: object) -> None:
        raise SoupkitError("adapter 'math'", "readable tensors", "an injected failure mid-run")

    monkeypatch.setattr("soupkit.merge.write_sidecars", fail)
    before = tree_state(tmp_path)
    result = CliRunner().invoke(main, world.merge(tmp_path / "new" / "deep" / "out"))
    assert result.exit_code == 2 and "injected failure" in result.stderr
    assert tree_state(tmp_path) == before  # no new/deep/, no lock, no temporary folder


def test_second_fit_run_is_told_about_the_option_it_can_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second fit-alpha into the same -o is refused naming -o (not the report folder, derived from -o)."""
    from soupkit.io.output_lock import OutputLock

    world = World(tmp_path)
    monkeypatch.chdir(world.work)
    out = tmp_path / "f.yaml"
    held = [OutputLock(p, str(p), "-o", "soupkit fit-alpha") for p in (out, tmp_path / "f-report")]  # the first run
    for lock in held:
        lock.acquire()
    try:
        before = tree_state(tmp_path)
        result = CliRunner().invoke(main, world.fit("-o", str(out)))
        after = tree_state(tmp_path)
    finally:
        for lock in held:
            lock.release()
    lines = result.stderr.splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.output
    assert lines[0].startswith(f"error: -o {out}: expected no other soupkit run writing there"), lines[0]
    assert "or choose another -o" in lines[0] and "--report-dir" not in lines[0]
    assert after == before


# ---- real processes -----------------------------------------------------------------------------

CHILD = r"""
import os, sys, time
import soupkit.io.writer as writer
import soupkit.io.sharded as sharded

mode = os.environ["SAFETY_MODE"]
count = [0]

def slow_write(self, key, tensor):
    count[0] += 1
    print(f"tensor-{count[0]}", flush=True)
    time.sleep(0.3 if mode == "slow" or count[0] <= 3 else 0)  # slow-start: only the first three
    return write(self, key, tensor)

def slow_parts(self, key, parts):
    count[0] += 1
    print(f"tensor-{count[0]}", flush=True)
    time.sleep(0.3 if mode == "slow" or count[0] <= 3 else 0)
    return parts_write(self, key, parts)

write, parts_write = writer.SafetensorsStreamWriter.write, sharded.ShardedWriter.write_parts
if mode in ("slow", "slow-start"):
    writer.SafetensorsStreamWriter.write = slow_write
    sharded.ShardedWriter.write_parts = slow_parts
from soupkit.cli import main
main(sys.argv[1:])
"""


def spawn(world: World, args: list[str], mode: str, ignore: tuple[int, ...] = ()) -> subprocess.Popen:
    """A CLI child process; ``ignore``: signals it starts with ignored (as under nohup), the others at their default
    (whatever this test process inherited: CI may itself run under nohup)."""
    env = {**os.environ, "SAFETY_MODE": mode, "PYTHONPATH": os.pathsep.join(sys.path)}

    def ignore_signals() -> None:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN if sig in ignore else signal.SIG_DFL)

    return subprocess.Popen(
        [sys.executable, "-c", CHILD, *args],
        cwd=world.work,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=ignore_signals,
    )


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".soupkit-" in p.name)


RACE_CHILD = r"""
import json, os, sys, time
import soupkit.io.writer as writer
from soupkit.cli import main

init = writer.SafetensorsStreamWriter.__init__
go = [""]

def hold(self, *a, **k):
    # the winner waits here, holding the output's lock, until the file go[0] exists
    while not os.path.exists(go[0]):
        time.sleep(0.02)
    return init(self, *a, **k)

writer.SafetensorsStreamWriter.__init__ = hold

def start(args, err_path):
    pid = os.fork()  # each run is its own process; forking skips a second import of torch
    if pid == 0:
        fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 2)
        try:
            main(args)
            code = 0
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 1
        sys.stderr.flush()
        os._exit(code)
    return pid

rounds = json.loads(sys.argv[1])
for r in rounds:
    go[0] = r["go"]
    pids = [start(r["args"], f"{r['err']}.{i}") for i in range(2)]
    first, status = os.waitpid(-1, 0)  # the loser: it must fail at once while the winner waits
    open(r["go"], "w").close()
    other = pids[1] if first == pids[0] else pids[0]
    _, other_status = os.waitpid(other, 0)
    print(json.dumps({"loser": first, "loser_code": os.waitstatus_to_exitcode(status), "loser_err": f"{r['err']}.{pids.index(first)}",
                      "winner": other, "winner_code": os.waitstatus_to_exitcode(other_status)}), flush=True)
"""


def test_two_runs_into_one_out_one_wins_the_other_names_it(tmp_path: Path) -> None:
    """Two real processes started together, three times over: the loser fails at once, naming the winner's pid."""
    world = World(tmp_path)
    rounds = []
    for i in range(3):
        (tmp_path / f"round{i}").mkdir()
        out = tmp_path / f"round{i}" / "out"
        rounds.append({"args": world.merge(out), "go": str(tmp_path / f"go{i}"), "err": str(tmp_path / f"err{i}")})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", RACE_CHILD, json.dumps(rounds)],
        cwd=world.work,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]  # (the winners print "wrote ...")
    assert done.returncode == 0 and len(results) == 3, done.stderr
    for i, result in enumerate(results):
        stderr = Path(result["loser_err"]).read_text()
        assert result["winner_code"] == 0 and result["loser_code"] == 2, (result, stderr)
        assert len(stderr.splitlines()) == 1 and "Traceback" not in stderr, stderr
        assert f"pid {result['winner']} (soupkit merge) writing it" in stderr, stderr
        out = tmp_path / f"round{i}" / "out"
        assert (out / "adapter_model.safetensors").is_file() and leftovers(out.parent) == []


@pytest.mark.parametrize(
    "sig, overwrite, recipe_name",
    [(signal.SIGTERM, False, "model_recipe"), (signal.SIGINT, True, "recipe"), (signal.SIGHUP, False, "recipe")],
    ids=["sigterm-full-model", "sigint-overwrite-adapter", "sighup-adapter"],
)
def test_signal_mid_export_removes_temporary_output_and_lock(tmp_path: Path, sig: int, overwrite: bool, recipe_name: str) -> None:
    world = World(tmp_path)
    out = tmp_path / "out"
    if overwrite:
        world.soupkit_output("out")
    before = tree_state(tmp_path)
    child = spawn(world, world.merge(out, *(["--overwrite"] if overwrite else []), recipe=getattr(world, recipe_name)), "slow")
    for line in child.stdout:  # type: ignore[union-attr]
        if line.strip() == "tensor-3":
            assert leftovers(tmp_path), "the run should be writing its temporary output now"
            child.send_signal(sig)
            break
    assert child.wait(timeout=60) == 128 + sig
    stderr = child.stderr.read()  # type: ignore[union-attr]
    assert len(stderr.splitlines()) == 1 and f"stopped by {signal.Signals(sig).name}" in stderr, stderr
    assert leftovers(tmp_path) == []
    assert tree_state(tmp_path) == before  # OUT absent, or the previous output byte for byte


def test_sighup_under_nohup_is_still_ignored(tmp_path: Path) -> None:
    """A run started with SIGHUP ignored (`nohup soupkit merge ...`) survives the hang-up and completes."""
    world = World(tmp_path)
    child = spawn(world, world.merge(tmp_path / "out"), "slow-start", ignore=(signal.SIGHUP,))
    for line in child.stdout:  # type: ignore[union-attr]
        if line.strip() == "tensor-2":
            child.send_signal(signal.SIGHUP)
            break
    child.stdout.read()  # type: ignore[union-attr]
    assert child.wait(timeout=60) == 0, child.stderr.read()  # type: ignore[union-attr]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file() and leftovers(tmp_path) == []


HANG_CHILD = r"""
import errno, shutil, sys
import soupkit.io.sharded as sharded
from soupkit.cli import main

calls = {"n": 0, "fail_at": 0}
copy, parts = sharded.ShardedWriter.copy_range, sharded.ShardedWriter.write_parts

def failing(original):
    def method(self, *args):
        calls["n"] += 1
        if calls["n"] == calls["fail_at"]:
            raise OSError(globals().get("errno_code", errno.EIO), "injected write failure")
        return original(self, *args)
    return method

sharded.ShardedWriter.copy_range, sharded.ShardedWriter.write_parts = failing(copy), failing(parts)
args = sys.argv[1:]
total = None
for k in range(1, 100):
    calls.update(n=0, fail_at=k)
    try:
        main(args, standalone_mode=False)
    except OSError:
        print(f"failed-at {k}", flush=True)
        continue
    total = calls["n"]
    break
print(f"tensors {total}", flush=True)
shutil.rmtree(args[args.index("-o") + 1])
errno_code = errno.ENOSPC  # last: the real CLI, disk full two writes before the end (worker done, queue full)
calls.update(n=0, fail_at=total - 2)
main(args)
"""


@pytest.mark.timeout(120)
def test_write_failure_at_any_point_of_export_exits_instead_of_hanging(tmp_path: Path) -> None:
    """An I/O error at each tensor write in turn: every run stops; the last one exits non-zero as a process."""
    world = World(tmp_path)
    out = tmp_path / "out"
    args = [sys.executable, "-c", HANG_CHILD, *world.merge(out, recipe=world.model_recipe)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    start = time.time()
    done = subprocess.run(args, cwd=world.work, env=env, capture_output=True, text=True, timeout=60, check=False)
    failed = [line for line in done.stdout.splitlines() if line.startswith("failed-at")]
    total = int(done.stdout.split("tensors ")[1].split()[0])
    assert len(failed) == total >= 10, done.stdout  # every write position was tried, each stopped the run
    assert done.returncode == 2 and done.stderr.splitlines() == [
        f"error: -o {out}: expected room to write the output, found No space left on device; free space there, or choose another -o"
    ]
    assert time.time() - start < 60
    assert not out.exists() and leftovers(tmp_path) == []


def test_signal_during_publish_lets_the_renames_finish(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM between the two renames of a replacement: both finish, then the run stops, saying the output is complete."""
    from soupkit.errors import Interrupted
    from soupkit.io import output_guard

    out = tmp_path / "out"
    out.mkdir()
    target = output_guard.resolve_output(out, "-o", "merge")
    replace = os.replace

    def replace_then_signal(src: object, dst: object) -> None:
        replace(src, dst)
        if str(dst).endswith(".soupkit-old-" + str(os.getpid())):
            os.kill(os.getpid(), signal.SIGTERM)  # arrives before the new output is renamed in

    monkeypatch.setattr(output_guard.os, "replace", replace_then_signal)
    with (
        pytest.raises(Interrupted) as stopped,
        output_guard.claim([target], True, "test"),
        output_guard.atomic_dir(target, True) as tmp,
    ):
        (tmp / "adapter_model.safetensors").write_bytes(b"new")
    assert stopped.value.published and stopped.value.exit_code == 143
    assert (out / "adapter_model.safetensors").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no old, tmp or lock left beside it


HUB_CASES = {
    "hub_repo_folder": (lambda cache: cache / "models--tiny-org--base", "found the hub cache folder of the base model"),
    "hub_blobs": (
        lambda cache: cache / "models--tiny-org--math" / "blobs" / "merged",
        "a path inside the hub cache folder of the adapter 'math'",
    ),
    "hub_cache_root": (lambda cache: cache, "a folder that holds the hub cache folder of the base model"),
}


@pytest.mark.parametrize("name", list(HUB_CASES))
def test_hub_inputs_count_as_their_cache_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Hub inputs (a fake offline cache): their whole cache repo folder is an input, whatever the flags."""
    from test_hub_verify import add_snapshot

    cache = tmp_path / "hub"
    add_snapshot(cache, "tiny-org/base", "1" * 40, TINY / "base", refs=("main",))
    add_snapshot(cache, "tiny-org/math", "2" * 40, TINY / "adapters" / "math", refs=("main",))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = tmp_path / "hub.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {"base_model": "tiny-org/base", "adapters": [{"name": "math", "path": "tiny-org/math"}], "merge": {"method": "cat"}}
        )
    )
    out, expected = HUB_CASES[name]
    before = tree_state(tmp_path)
    result = CliRunner().invoke(main, ["merge", str(recipe), "-o", str(out(cache)), "--overwrite", "--quiet"])
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1 and expected in result.stderr, result.output
    assert tree_state(tmp_path) == before
