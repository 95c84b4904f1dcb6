"""The README's set-up and Quick start commands run as written, in a fresh copy of the repository.

``pip install`` steps are skipped (this environment has them installed) and so is the test command
itself (it is what is running); every other command runs through bash, in order, and must exit 0.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

SKIPPED = ("pip install", "python -m pytest")


def code_block(markdown: str, heading: str) -> list[str]:
    """Command lines of the first ```bash block under ``## heading`` (comments and blank lines dropped)."""
    section = markdown.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL)
    assert block, f"README: no bash block under '## {heading}'"
    lines = [re.sub(r"\s+#\s.*$", "", line).strip() for line in block.group(1).splitlines()]
    return [line for line in lines if line]


def runnable(line: str) -> list[str]:
    return [part.strip() for part in line.split("&&") if not part.strip().startswith(SKIPPED)]


def test_setup_is_two_commands_and_tests_are_one() -> None:
    setup = code_block((ROOT / "README.md").read_text(), "Set-up")
    assert len(setup) == 2 and setup[1] == 'pip install -e ".[dev]" && python -m pytest -q', setup


def test_readme_setup_and_quick_start_run_as_written(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    commands = [c for line in code_block(readme, "Set-up") + code_block(readme, "Quick start") for c in runnable(line)]
    assert len(commands) >= 8, commands
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "recipes", repo / "recipes")
    shutil.copytree(ROOT / "examples" / "tiny", repo / "examples" / "tiny")
    bin_dir = Path(sys.executable).parent
    assert (bin_dir / "soupkit").exists(), f"no soupkit console script beside {sys.executable}: pip install -e ."
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    for command in commands:
        done = subprocess.run(
            ["bash", "-c", command], check=False, cwd=repo, env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, f"README command failed: {command}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    assert (repo / "out" / "cat-fitted" / "adapter_model.safetensors").is_file()
