"""The ``soupkit`` command line: each command parses, calls one library function, prints.

``group.py`` holds the click group (one-line errors, signals) and the merge-side commands;
``fit.py`` fit-alpha; ``search.py`` eval and sweep. Importing them registers their commands on ``main``.
"""

from soupkit.cli import fit, search  # noqa: F401  (registers fit-alpha, eval and sweep on main)
from soupkit.cli.group import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
