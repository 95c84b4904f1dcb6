"""Where soupkit writes, and how it stops: the one place that enforces the data-safety contract.

Every command that writes goes through here (the full contract is docs/safety.md):

1. :func:`resolve_output` refuses output paths that cannot or must not be written (``..``, the
   current or home folder, ``/proc``, a parent that is a file, a symlink loop, no permission).
2. :func:`check_apart` refuses an output that is, holds or lies inside an input (base model,
   adapters, their hub cache folders, the recipe file, data files), whatever the flags.
3. :func:`check_replaceable` lets ``--overwrite`` replace only what soupkit wrote itself: an empty
   folder, or one whose marker file soupkit wrote (checked by content, not by name).
4. :func:`claim` holds an exclusive ``flock`` on a lock file beside each output for the whole run
   (one writer per output), and turns SIGINT/SIGTERM into :class:`Interrupted`, so the temporary
   output and the lock are removed on the way out.
5. :func:`atomic_dir` / :func:`atomic_file` write into a temporary sibling and publish it with
   one rename at the end; a crash leaves the output absent, as it was, or complete.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from soupkit.errors import SoupkitError
from soupkit.io.output_lock import SIGNALS, OutputLock
from soupkit.io.output_markers import OWNERSHIP, Kind

SYSTEM_FOLDERS = (Path("/proc"), Path("/sys"), Path("/dev"))


@dataclass(frozen=True)
class OutputTarget:
    """One output of a command: the path as given (for messages) and its real path (what is written)."""

    given: Path
    flag: str  # the option that named it, e.g. "-o"
    kind: Kind
    path: Path  # absolute, symlinks resolved

    @property
    def is_dir(self) -> bool:
        return self.kind not in ("fitted-recipe", "eval-results")

    @property
    def where(self) -> str:
        shown = f"{self.flag} {self.given}"
        return shown if str(self.given) == str(self.path) else f"{shown} (= {self.path})"

    def error(self, expected: str, found: str, fix: str) -> SoupkitError:
        return SoupkitError(self.where, expected, found, fix)

    @property
    def example(self) -> str:
        """A fix that names a fresh output of this kind (``-o fitted.yaml`` for fit-alpha's file)."""
        return f"{self.flag} {EXAMPLE_NAMES[self.kind]}"


# a fresh output name to suggest, per kind: fit-alpha's -o is a YAML file, not a folder
EXAMPLE_NAMES = {"merge": "merged", "analysis": "analysis", "fitted-recipe": "fitted.yaml", "fit-report": "fit-report"}


# ---- 1. output paths ----------------------------------------------------------------------------


def resolve_output(given: Path, flag: str, kind: Kind) -> OutputTarget:
    """Resolve ``given`` and refuse a path soupkit must not or cannot write (one-line errors).

    A symlinked output resolves to its target, which is then what is checked and replaced.
    """
    given = Path(given)
    shown = f"{flag} {given}"
    if str(given) in ("", ".", "..", "/") or given.name in ("", ".", ".."):
        raise SoupkitError(shown, "a name for a new output", f"'{given}'", f"name the output, e.g. {flag} {EXAMPLE_NAMES[kind]}")
    absolute = Path(os.getcwd()) / given
    _walk(absolute, shown)
    target = OutputTarget(given, flag, kind, Path(os.path.realpath(absolute)))
    _refuse_special(target)
    _check_writable_parent(target)
    return target


def _walk(absolute: Path, shown: str) -> None:
    """stat every prefix of ``absolute``: a loop, a file used as a folder or a closed folder is an error."""
    prefix = Path(absolute.anchor)
    for part in absolute.parts[1:]:
        parent, prefix = prefix, prefix / part
        try:
            os.stat(prefix)
        except OSError as err:
            if err.errno == errno.ENOENT:
                return
            if err.errno == errno.ELOOP:
                raise SoupkitError(
                    shown, "a path without a symlink loop", f"a loop at {prefix}", "fix or remove that link"
                ) from None
            if err.errno == errno.ENOTDIR:
                raise SoupkitError(shown, f"a folder at {parent}", "a file", "choose an output outside that file") from None
            if err.errno == errno.EACCES:
                raise SoupkitError(shown, f"permission to enter {parent}", "none", "choose a folder you can write") from None
            raise SoupkitError(
                shown, "a usable path", f"{prefix}: {os.strerror(err.errno or 0)}", "choose another path"
            ) from None


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _refuse_special(target: OutputTarget) -> None:
    """The filesystem root, system folders, the current and home folders (or a folder above them)."""
    path, flag = target.path, target.flag
    for system in SYSTEM_FOLDERS:
        if _is_within(path, system):
            raise target.error("a folder on a disk you own", f"a system folder ({system})", f"choose another {flag}")
    cwd, home = Path(os.path.realpath(os.getcwd())), Path(os.path.realpath(Path.home()))
    for folder, name in ((cwd, "current folder"), (home, "home folder")):
        if path == folder or path in folder.parents:
            found = f"the {name}" if path == folder else f"a folder that holds the {name} ({folder})"
            new = "a new output file" if target.kind == "fitted-recipe" else "a new output folder"
            raise target.error(new, found, f"name a new {new.rsplit(' ', 1)[1]}, e.g. {target.example}")


def _check_writable_parent(target: OutputTarget) -> None:
    """The nearest existing folder above the output must be a folder soupkit may write."""
    parent = target.path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise target.error(f"a folder at {parent}", "a file", f"choose another {target.flag}")
    if not os.access(parent, os.W_OK | os.X_OK):
        readonly = bool(os.statvfs(parent).f_flag & os.ST_RDONLY)
        found = "a read-only file system" if readonly else "no permission to write there"
        raise target.error(f"a writable folder at {parent}", found, f"choose another {target.flag}")


# ---- 2. inputs are never written ----------------------------------------------------------------


def input_folders(label: str, path: Path) -> list[tuple[str, Path]]:
    """The folders an input occupies: itself and, for a hub snapshot, its whole cache repo folder (first)."""
    real = Path(os.path.realpath(path))
    folders = [(label, real)]
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith(("models--", "datasets--")):
        folders.insert(0, (f"hub cache folder of the {label}", real.parent.parent))  # with blobs/ and refs/
    return folders


def check_apart(target: OutputTarget, folders: Sequence[tuple[str, Path]], files: Sequence[tuple[str, Path]] = ()) -> None:
    """Refuse an output that is, holds, or lies inside an input folder, or that is or holds an input file.

    Args:
        folders: (label, folder) of every input folder, e.g. ("adapter 'math'", path).
        files: (label, file) of every input file, e.g. ("recipe file", path); symlinks are resolved.
    """
    out = target.path
    fix = f"choose another {target.flag}; soupkit never writes into its inputs"
    for given_label, given in folders:
        for label, folder in input_folders(given_label, given):
            if out == folder:
                raise target.error(
                    "an output apart from the inputs", f"the {label} folder" if label == given_label else f"the {label}", fix
                )
            if folder in out.parents:
                raise target.error("an output apart from the inputs", f"a path inside the {label} ({folder})", fix)
            if out in folder.parents:
                raise target.error("an output apart from the inputs", f"a folder that holds the {label} ({folder})", fix)
    for label, given in files:
        real = Path(os.path.realpath(given))
        if _is_within(real, out):
            found = f"the {label}" if real == out else f"a folder that holds the {label} ({real})"
            raise target.error("an output apart from the inputs", found, fix)


def check_disjoint(targets: Sequence[OutputTarget]) -> None:
    """Two outputs of one command must not be one inside the other."""
    for a in targets:
        for b in targets:
            if a is not b and _is_within(b.path, a.path):
                raise b.error(f"a path outside {a.flag} {a.given}", "a path inside it", f"choose another {b.flag}")


# ---- 3. --overwrite replaces only what soupkit wrote --------------------------------------------


def check_replaceable(target: OutputTarget, overwrite: bool) -> None:
    """An existing output is replaced only with ``overwrite``, and only if soupkit wrote it (or it is an empty folder)."""
    path = target.path
    if not os.path.lexists(path):
        return
    if path.is_dir() != target.is_dir:
        found = "an existing folder" if path.is_dir() else "an existing file"
        raise target.error("a folder" if target.is_dir else "a file", found, f"choose another {target.flag}")
    empty = path.is_dir() and not any(path.iterdir())
    problem = None if empty else OWNERSHIP[target.kind](path)
    if problem:
        raise target.error(
            "a new path, or an output soupkit wrote",
            problem,
            f"choose another {target.flag} (--overwrite replaces only soupkit's own outputs)",
        )
    if not overwrite:
        raise target.error(
            "a path that does not exist yet",
            f"an existing {'folder' if target.is_dir else 'file'}",
            f"pass --overwrite or choose another {target.flag}",
        )


@contextmanager
def claim(targets: Sequence[OutputTarget], overwrite: bool, command: str) -> Iterator[None]:
    """Hold every output for the block: its folder exists, it is locked, leftovers of killed runs are tidied,
    it is (still) replaceable, and SIGINT/SIGTERM stop the run cleanly.

    On any error the folders this created for it are removed again (if still empty).
    """
    with ExitStack() as stack:
        stack.enter_context(SIGNALS.installed_here())
        for target in targets:  # the main output first: a second run is told about the option it can change
            created = _make_parents(target.path.parent)
            stack.callback(_remove_empty, created)
            lock = OutputLock(target.path, target.where, target.flag, command)
            lock.acquire()
            stack.callback(lock.release)
            recover_stale(target.path)
            check_replaceable(target, overwrite)
        yield  # on the way out: locks released, then created folders removed if still empty


def _make_parents(folder: Path) -> list[Path]:
    created = []
    while not folder.exists():
        created.append(folder)
        folder = folder.parent
    for path in reversed(created):
        path.mkdir()
    return created


def _remove_empty(created: list[Path]) -> None:
    for path in created:  # deepest first
        try:
            path.rmdir()
        except OSError:
            return


# ---- 5. atomic publication; leftovers of killed runs --------------------------------------------


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_dir(target: OutputTarget, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder beside the output; publish it as the output only if the block succeeds.

    A previous output (checked replaceable again just before) is moved aside, replaced, then deleted.
    An error or signal leaves the output absent or as it was and removes the temporary folder.
    """
    out = target.path
    tmp = out.parent / f".{out.name}.soupkit-tmp-{os.getpid()}"
    _remove(tmp)
    tmp.mkdir()
    try:
        with _disk_full_is_one_line(target):
            yield tmp
        for f in tmp.rglob("*"):  # make file contents durable before the rename publishes them
            if f.is_file():
                _fsync(f)
        check_replaceable(target, overwrite)
        with SIGNALS.deferred():
            if os.path.lexists(out):
                trash = out.parent / f".{out.name}.soupkit-old-{os.getpid()}"
                os.replace(out, trash)
                try:
                    os.replace(tmp, out)
                except BaseException:
                    os.replace(trash, out)
                    raise
                _remove(trash)
            else:
                os.replace(tmp, out)
            _fsync(out.parent)
    finally:
        _remove(tmp)


@contextmanager
def _disk_full_is_one_line(target: OutputTarget) -> Iterator[None]:
    """A full disk or quota while writing is the user's to fix: say so in one line (other I/O errors raise)."""
    try:
        yield
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        raise target.error(
            "room to write the output", os.strerror(err.errno), f"free space there, or choose another {target.flag}"
        ) from None


def atomic_file(target: OutputTarget, overwrite: bool, text: str) -> None:
    """Write ``text`` to a temporary file beside the output, then rename it over the output."""
    out = target.path
    tmp = out.parent / f".{out.name}.soupkit-tmp-{os.getpid()}"
    try:
        with _disk_full_is_one_line(target), open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        check_replaceable(target, overwrite)
        with SIGNALS.deferred():
            os.replace(tmp, out)
    finally:
        _remove(tmp)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers (a previous call in this process) are stale
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_stale(out: Path) -> None:
    """Tidy what a killed run (a dead PID) left beside ``out``.

    ``.OUT.soupkit-old-PID`` exists only between the two renames that replace an old output, i.e.
    after the new output in ``.OUT.soupkit-tmp-PID`` was complete and synced: that rename is
    finished if ``out`` is missing. Every other temporary file or folder of a dead PID is deleted.
    """
    if not out.parent.is_dir():
        return
    for kind in ("old", "tmp"):
        for stale in out.parent.glob(f".{glob_escape(out.name)}.soupkit-{kind}-*"):
            pid_text = stale.name.rsplit("-", 1)[-1]
            if not pid_text.isdigit() or _pid_alive(int(pid_text)):
                continue
            done = out.parent / f".{out.name}.soupkit-tmp-{pid_text}"
            if kind == "old" and not os.path.lexists(out) and done.is_dir():
                os.replace(done, out)
            _remove(stale)


def glob_escape(name: str) -> str:
    """``name`` with glob metacharacters escaped (an output may be called ``run[1]``)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)
