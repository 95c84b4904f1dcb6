"""``soupkit verify OUT``: re-hash an output's inputs and files against its lock file.

The lock (``OUT/soupkit.lock.yaml``) records, per input (base model and each adapter), the hash of
every file the merge read, and the sha256 of every other file in OUT. Verification recomputes
each hash the same way (a ``header-sha256:`` entry hashes a safetensors header only) and lists
what changed, what is missing, and which files were added to OUT.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from soupkit.errors import SoupkitError
from soupkit.io.resolve import resolve_reference
from soupkit.recipe.lock import LOCK_NAME, sha256_file, sha256_header


@dataclass(frozen=True)
class Finding:
    """One file that does not match the lock: ``status`` is changed, missing or added."""

    group: str  # "output", "base_model" or an adapter name
    file: str
    status: str
    detail: str = ""


@dataclass
class VerifyReport:
    """Everything checked, and every mismatch found."""

    checked: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings


def hash_like(path: Path, recorded: str) -> str:
    """Hash ``path`` the way ``recorded`` was made (whole file, or safetensors header only)."""
    if recorded.startswith("header-sha256:"):
        return "header-sha256:" + sha256_header(path)
    return "sha256:" + sha256_file(path)


def read_lock(out: Path) -> dict:
    """The lock file of ``out`` as a dict; a missing or unreadable lock is a user error."""
    path = out / LOCK_NAME
    if not path.is_file():
        raise SoupkitError(
            str(out), f"an output directory with {LOCK_NAME}", "no lock file", "point at a directory written by `soupkit merge`"
        )
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        raise SoupkitError(str(path), "a YAML lock file", "unreadable content", "re-run the merge to rewrite it") from None
    if not isinstance(data, dict) or not isinstance(data.get("soupkit_lock"), dict):
        raise SoupkitError(
            str(path), "a soupkit lock file (with a soupkit_lock section)", "another YAML file", "re-run the merge"
        )
    return data


def _check_files(report: VerifyReport, group: str, directory: Path, recorded: dict[str, str]) -> None:
    for name, want in sorted(recorded.items()):
        report.checked += 1
        path = directory / name
        if not path.is_file():
            report.findings.append(Finding(group, name, "missing", f"expected at {path}"))
            continue
        try:
            got = hash_like(path, want)
        except Exception as err:  # a truncated or unreadable file is a finding, not a crash
            got = f"unreadable ({type(err).__name__})"
        if got != want:
            report.findings.append(Finding(group, name, "changed", f"{want[:23]}... -> {got[:23]}..."))


def input_directories(lock: dict, out: Path) -> dict[str, str | Path]:
    """Group name -> local directory of each input named in the lock (or the reason it is unavailable)."""
    refs = {"base_model": lock.get("base_model", "")}
    refs.update({a.get("name", f"#{i}"): a.get("path", "") for i, a in enumerate(lock.get("adapters") or [])})
    dirs: dict[str, str | Path] = {}
    for group, ref in refs.items():
        where = "base_model" if group == "base_model" else f"adapter '{group}'"
        try:
            dirs[group] = resolve_reference(str(ref), out.resolve(), where)
        except SoupkitError as err:
            dirs[group] = err.line()
    return dirs


def verify_output(out: Path) -> VerifyReport:
    """Re-hash the inputs and outputs recorded in ``out``'s lock file.

    Raises:
        SoupkitError: ``out`` has no readable lock file.
    """
    lock = read_lock(out)
    meta = lock["soupkit_lock"]
    report = VerifyReport()
    directories = input_directories(lock, out)
    for group, recorded in (meta.get("inputs") or {}).items():
        directory = directories.get(group)
        if not isinstance(directory, Path):
            report.checked += len(recorded)
            report.findings.append(Finding(group, "(directory)", "missing", str(directory or "not named in the lock")))
            continue
        _check_files(report, group, directory, recorded)
    outputs: dict[str, str] = meta.get("outputs") or {}
    if not outputs:
        report.findings.append(
            Finding("output", "(all)", "missing", "the lock records no output hashes (written by an older soupkit)")
        )
    _check_files(report, "output", out, outputs)
    present = {str(f.relative_to(out)) for f in out.rglob("*") if f.is_file() and f.name != LOCK_NAME}
    for name in sorted(present - set(outputs)):
        report.findings.append(Finding("output", name, "added", "not in the lock"))
    return report


def describe_report(out: Path, report: VerifyReport) -> str:
    """Human-readable lines: one per finding, then a summary line."""
    lines = [f"{f.status:8s} {f.group}: {f.file}" + (f"  ({f.detail})" if f.detail else "") for f in report.findings]
    verdict = "ok" if report.ok else f"{len(report.findings)} difference(s)"
    lines.append(f"{out}: {verdict} ({report.checked} recorded files checked)")
    return "\n".join(lines)
