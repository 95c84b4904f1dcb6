"""One writer per output, and clean stops: the lock file beside an output, and SIGINT/SIGTERM/SIGHUP handling.

Used by :mod:`soupkit.io.output_guard` (the data-safety contract; docs/safety.md).
"""

from __future__ import annotations

import fcntl
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from soupkit.errors import Interrupted, SoupkitError


def lock_path(out: Path) -> Path:
    """The lock file beside the output (not inside it: the output is replaced as a whole)."""
    return out.parent / f".{out.name}.soupkit-lock"


class OutputLock:
    """An exclusive ``flock`` on the lock file beside an output, held until :meth:`release`.

    The kernel drops a ``flock`` when its process dies, so a lock file left by a killed run is
    simply taken over. The file holds the holder's pid and command, for the message others get.

    Args:
        out: the output's real path.
        where: how messages name the output (e.g. ``-o merged``); ``flag`` is the option to change.
        command: what the holder is doing, for others' messages (e.g. ``soupkit merge``).
    """

    def __init__(self, out: Path, where: str, flag: str, command: str) -> None:
        self.path, self.where, self.flag, self.command = lock_path(out), where, flag, command
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock now, or raise a one-line SoupkitError naming the process that holds it."""
        for _ in range(100):
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise SoupkitError(
                    self.where,
                    "no other soupkit run writing there",
                    f"{holder} writing it (lock {self.path})",
                    f"wait for it to finish, or choose another {self.flag}",
                ) from None
            if _same_file(fd, self.path):  # else its holder removed it between our open and flock: retry
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()} {self.command}\n".encode())
                self._fd = fd
                return
            os.close(fd)
        raise RuntimeError(f"could not take the lock {self.path}")

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise SoupkitError(
                self.where,
                f"a lock file {self.path} soupkit can create",
                os.strerror(err.errno or 0),
                f"remove it, or choose another {self.flag}",
            ) from None

    def release(self) -> None:
        """Remove the lock file while still holding it (the next run creates a fresh one), then unlock."""
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _read_holder(fd: int) -> str:
    """'pid 1234 (soupkit merge)' from the lock file (retried briefly: the holder writes it just after locking)."""
    for _ in range(50):
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
        if text:
            pid, _, command = text.partition(" ")
            return f"pid {pid} ({command})" if command else f"pid {pid}"
        threading.Event().wait(0.01)
    return "another soupkit process"


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # each stops a run cleanly


class _Signals:
    """SIGINT/SIGTERM/SIGHUP raise :class:`Interrupted` in the main thread, except while an output is being published.

    SIGHUP comes when the terminal closes or an ssh session drops. Raising (instead of dying, the default) runs every ``finally`` on the way out: the
    temporary output is removed and the lock released. A second signal during that cleanup is
    ignored so that the cleanup itself is not cut short.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.publishing = 0
        self.installed = 0
        self.previous: dict[int, object] = {}

    def handler(self, signum: int, frame: object) -> None:
        if self.received is not None:
            return
        self.received = signum
        if not self.publishing:
            raise Interrupted(signum)

    @contextmanager
    def installed_here(self) -> Iterator[None]:
        """Install the handlers for the block (main thread only; nested blocks share them)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        if not self.installed:
            self.received = None
            # a signal the process was started ignoring stays ignored: `nohup soupkit merge ...` survives a hang-up
            self.previous = {s: signal.signal(s, self.handler) for s in STOP_SIGNALS if signal.getsignal(s) != signal.SIG_IGN}
        self.installed += 1
        try:
            yield
        finally:
            self.installed -= 1
            if not self.installed:
                for s, previous in self.previous.items():
                    signal.signal(s, previous)  # type: ignore[arg-type]

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Publish without interruption; a signal received meanwhile is raised right after."""
        self.publishing += 1
        try:
            yield
        finally:
            self.publishing -= 1
        if not self.publishing and self.received is not None and self.installed:
            raise Interrupted(self.received, published=True)


SIGNALS = _Signals()
stop_on_signals = SIGNALS.installed_here
