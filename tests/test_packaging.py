"""Declared dependency floors, the minimum-version constraints and CI's pinned versions agree."""

from __future__ import annotations

import re
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
