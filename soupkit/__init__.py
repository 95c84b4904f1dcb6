"""soupkit: declarative merge recipes for LoRA adapters."""

from __future__ import annotations

__version__ = "0.1.0"

from soupkit.errors import SoupkitError  # noqa: E402

__all__ = ["SoupkitError", "__version__"]
