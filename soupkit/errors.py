"""User-facing errors.

Every error a user can cause is a :class:`SoupkitError`. The CLI prints it as ONE line
(``where: expected ..., found ...; fix``) and exits with code 2, without a traceback.
Anything else that escapes is an internal bug and is allowed to raise normally.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SoupkitError(Exception):
    """A problem with the user's input: recipe, files, adapters or options.

    Args:
        where: the recipe field, file or tensor key at fault (e.g. ``merge.density``).
        expected: what soupkit needed there.
        found: what it found instead.
        fix: one short instruction that resolves it.
    """

    def __init__(self, where: str, expected: str, found: str, fix: str = "") -> None:
        self.where, self.expected, self.found, self.fix = where, expected, found, fix
        super().__init__(self.line())

    def line(self) -> str:
        """The one-line message: ``where: expected X, found Y; fix``.

        Each part is cut to ``PART_LIMIT`` characters and kept on one line: a value from the user (a
        10 MB string, a path with newlines) never floods the terminal. Call sites echo values shorter still.
        """
        where, expected, found, fix = (one_line(x) for x in (self.where, self.expected, self.found, self.fix))
        text = f"{where}: expected {expected}, found {found}"
        return f"{text}; {fix}" if fix else text


PART_LIMIT = 240


def one_line(text: str, limit: int = PART_LIMIT) -> str:
    """``text`` with line breaks escaped, cut to ``limit`` characters."""
    text = str(text).replace("\r", "\\r").replace("\n", "\\n")
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


class RecipeError(SoupkitError):
    """The recipe file is malformed or names something that does not exist."""


class AdapterError(SoupkitError):
    """An adapter is unreadable, inconsistent with the others, or with the base model."""


class UnsupportedAdapterError(AdapterError):
    """An adapter uses a feature soupkit refuses rather than merge wrongly (DoRA, lora_bias, ...)."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class Interrupted(BaseException):
    """SIGINT, SIGTERM or SIGHUP arrived: raised in the main thread so every cleanup runs (see io.output_lock).

    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` swallows it.

    Args:
        signum: the signal received.
        published: the output had already been published when it arrived.
    """

    def __init__(self, signum: int, published: bool = False) -> None:
        import signal

        self.signum, self.published = signum, published
        super().__init__(signal.Signals(signum).name)

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process a signal stopped (130, 143, 129)."""
        return 128 + self.signum

    def line(self) -> str:
        name = str(self)
        if self.published:
            return f"stopped by {name} after the output was complete; it is in place"
        return f"stopped by {name}; the unfinished output and its lock were removed, existing files are as they were"


class SoupkitWarning(UserWarning):
    """Doubtful but usable input: the CLI prints it as one ``warning: ...`` line on stderr and goes on."""


def warn_user(message: str) -> None:
    """Tell the user about doubtful input (the CLI prints one line; a library caller gets a SoupkitWarning)."""
    import warnings

    warnings.warn(one_line(message, 2 * PART_LIMIT), SoupkitWarning, stacklevel=2)
