"""Progress bars on a terminal only: redirected to a file or a pipe, stderr gets no bar frames.

The commands' own last line (``wrote OUT (...) in 3.2 s``) is then the plain summary.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

# a terminal's "start of line, erase line": an error after a bar starts on a clean line
CLEAR_LINE = "\r\x1b[K"


def on_terminal() -> bool:
    """Whether stderr is a terminal (where a bar redraws in place)."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def progress(items: Iterable[T], desc: str, unit: str, total: int | None = None, enabled: bool = True) -> Iterator[T]:
    """``items``, with a tqdm bar on stderr when ``enabled`` and stderr is a terminal; the bar is erased at the end."""
    if not (enabled and on_terminal()):
        yield from items
        return
    from tqdm import tqdm

    bar = tqdm(items, desc=desc, unit=unit, total=total, leave=False, file=sys.stderr)
    try:
        yield from bar
    finally:
        bar.close()


def line_start() -> str:
    """What to print before a message so that it starts on its own line after a bar (nothing off a terminal).

    Printed with ``click.echo(color=True)``: click strips escape codes from what it thinks is no terminal."""
    return CLEAR_LINE if on_terminal() else ""
