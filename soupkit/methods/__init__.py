"""Merge methods: one file per method, each registered by name.

Every module in this package is imported here, so dropping a new file in is enough to
register its method: there is no second list to keep in sync.
"""

from __future__ import annotations

import importlib
import pkgutil

from soupkit.methods.base import LoraFactors, MergeContext, MergeMethod, MergeResult, MethodParams
from soupkit.methods.registry import REGISTRY, get_method, register

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name not in ("base", "registry") and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "REGISTRY",
    "LoraFactors",
    "MergeContext",
    "MergeMethod",
    "MergeResult",
    "MethodParams",
    "get_method",
    "register",
]
