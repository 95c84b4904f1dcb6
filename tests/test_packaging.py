"""Declared dependency floors, the minimum-version constraints and CI's pinned versions agree."""

from __future__ import annotations

import ast
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


# import name -> the distribution that provides it, where the two differ or a declared one brings it
PROVIDED_BY = {"yaml": "pyyaml", "lm_eval": "lm-eval", "pydantic_core": "pydantic", "tokenizers": "transformers"}


def third_party_imports() -> dict[str, set[str]]:
    """Distribution name -> the soupkit/ files that import it (standard library and soupkit left out)."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / "soupkit").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("soupkit", "__future__"):
                    found.setdefault(canonicalize_name(PROVIDED_BY.get(top, top)), set()).add(str(path.relative_to(ROOT)))
    return found


def extras() -> dict[str, list[Requirement]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {name: [Requirement(r) for r in reqs] for name, reqs in project["optional-dependencies"].items()}


def test_every_package_soupkit_imports_is_declared() -> None:
    declared = {canonicalize_name(r.name) for r in dependencies()}
    declared |= {canonicalize_name(r.name) for reqs in extras().values() for r in reqs}
    missing = {name: sorted(files) for name, files in third_party_imports().items() if name not in declared}
    assert not missing, f"imported but declared neither in dependencies nor in an extra: {missing}"


def dependency_table() -> dict[str, str]:
    """docs/architecture.md's Dependencies table: first-column name -> the row's 'needed for' text."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    assert "\n## Dependencies\n" in text, "docs/architecture.md has no Dependencies section"
    section = text.split("\n## Dependencies\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|") for line in section.splitlines() if line.startswith("| `")]
    return {row[1].strip().strip("`"): row[2].strip() for row in rows}


def test_the_architecture_page_lists_exactly_the_declared_dependencies_and_extras() -> None:
    """Every core dependency and every extra has a row saying what needs it, and nothing else does."""
    table = dependency_table()
    core = {canonicalize_name(r.name) for r in dependencies()}
    listed = {canonicalize_name(name) for name in table if not name.startswith("[")}
    assert listed == core, f"table: {sorted(listed)}; pyproject dependencies: {sorted(core)}"
    extra_rows = {name.strip("[]") for name in table if name.startswith("[")}
    assert extra_rows == set(extras()), f"table extras: {sorted(extra_rows)}; pyproject: {sorted(extras())}"


def test_extras_named_in_the_docs_exist() -> None:
    """``pip install ... ".[a,b]"`` or ``soupkit[a]`` in the README and docs names only declared extras."""
    declared = set(extras())
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for group in re.findall(r"(?:soupkit|\.)\[([a-z0-9_,\- ]+)\]", page.read_text()):
            for name in (n.strip() for n in group.split(",")):
                assert name in declared, f"{page.name} names an extra '{name}' that pyproject.toml does not declare"
