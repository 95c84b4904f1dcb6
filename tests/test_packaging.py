"""Declared dependency floors, the minimum-version constraints and CI's pinned versions agree."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from conftest import ROOT

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11


def pins(path: Path) -> dict[str, Version]:
    """name -> version of every ``name==version`` line (comments ignored)."""
    out = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s#;]+)", line.strip())
        if match:
            out[canonicalize_name(match.group(1))] = Version(match.group(2))
    return out


def dependencies() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"]]


def floor(req: Requirement) -> Version:
    floors = [Version(s.version) for s in req.specifier if s.operator == ">="]
    assert len(floors) == 1, f"pyproject.toml: {req} should declare one floor (>=)"
    return floors[0]


def test_min_constraints_pin_every_declared_floor() -> None:
    minimum = pins(ROOT / "constraints" / "min.txt")
    for req in dependencies():
        name = canonicalize_name(req.name)
        if name == "torch":  # .ci/run-min installs torch itself, from PyTorch's CPU index
            continue
        assert minimum.get(name) == floor(req), f"constraints/min.txt: expected {name}=={floor(req)}, found {minimum.get(name)}"


def test_ci_constraints_pin_every_dependency_within_its_range() -> None:
    ci = pins(ROOT / "constraints" / "ci.txt")
    for req in dependencies():
        name = canonicalize_name(req.name)
        assert name in ci, f"constraints/ci.txt does not pin {name}"
        assert req.specifier.contains(ci[name], prereleases=True), f"constraints/ci.txt: {name}=={ci[name]} is outside {req}"


def test_ci_script_uses_the_constraints_and_runs_ruff_and_the_docs_build() -> None:
    script = (ROOT / ".ci" / "run").read_text()
    assert "-c constraints/ci.txt" in script and "ruff check" in script and "mkdocs build --strict" in script
    docs_line = next(line for line in script.splitlines() if "mkdocs build" in line)
    assert "--quiet" not in docs_line and " -q" not in docs_line  # mkdocs' --quiet hides the warnings --strict counts


def test_the_package_needs_no_python_newer_than_the_declared_floor() -> None:
    """vermin reads every module of soupkit/ and names any feature newer than ``requires-python``."""
    pytest.importorskip("vermin")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floor_version = re.fullmatch(r">=(\d+\.\d+)", project["requires-python"]).group(1)
    found = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from vermin.main import main; sys.exit(main())",
            "-q",
            "--no-tips",
            "--violations",
            "--exclude",
            "file",
            f"-t={floor_version}-",
            "soupkit",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert found.returncode == 0, f"soupkit/ needs a newer Python than {floor_version}:\n{found.stdout}{found.stderr}"


def test_ci_merges_and_tests_under_the_declared_python_floor() -> None:
    script = (ROOT / ".ci" / "run").read_text()
    assert "vermin" in script and ".ci/find-python 3.10" in script and "-c constraints/py310.txt" in script
    assert "soupkit merge recipes/cat.yaml" in script and ".venv-ci310/bin/python -m pytest" in script
