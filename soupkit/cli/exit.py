"""The console entry point: run the command, then end the process without the interpreter's teardown.

Once a command has returned, a process that imported torch still spends about 0.27 s of a 2.6 s
``soupkit merge`` (issue 22, docs/benchmarks.md; 2-core machine) freeing every module and object
one by one at exit. Nothing of that is the command's work: its outputs are closed and renamed by
then. So the commands below end with ``os._exit`` after the steps of a normal exit that matter:
atexit handlers run and stdout / stderr are flushed. Only commands whose files are all closed by
context managers on return are listed; any other command, or a process where another Python thread
is still alive (a normal exit would wait for it), exits the normal way.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import NoReturn

from soupkit.cli.group import main

# Commands that only read, or write through context managers that close before they return.
FAST_EXIT_COMMANDS = frozenset({"merge", "validate", "plan", "inspect", "verify", "methods"})


def command_name(argv: list[str]) -> str | None:
    """The subcommand on a ``soupkit`` command line (the first word that is not an option), or None."""
    return next((word for word in argv if not word.startswith("-")), None)


def fast_exit(code: int) -> NoReturn:
    """Exit with ``code`` as a normal exit would, less the teardown of modules and objects."""
    atexit._run_exitfuncs()  # e.g. logging's flush; what registered itself expects to run
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()  # a pipe or file is block-buffered: what the command printed must reach it
        except (OSError, ValueError):  # closed or broken, as a normal exit would have found it
            pass
    os._exit(code)


def run() -> None:
    """``soupkit``: click's ``main`` (which always ends by raising SystemExit), then the exit."""
    try:
        main()
    except SystemExit as stop:
        code = stop.code
    else:  # pragma: no cover - click's standalone mode always raises SystemExit
        code = 0
    fast = command_name(sys.argv[1:]) in FAST_EXIT_COMMANDS and threading.active_count() == 1
    if fast and (code is None or isinstance(code, int)):
        fast_exit(code or 0)
    sys.exit(code)
