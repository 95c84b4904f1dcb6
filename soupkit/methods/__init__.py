"""Merge methods: one file per method, listed once in ``registry.METHODS``.

A method sees one module's factors and weights and returns merged factors; it knows no files
and no recipe (see ``base.py`` for the contract).
"""

from __future__ import annotations

from soupkit.methods.base import LoraFactors, MergeContext, MergeMethod, MergeResult, MethodParams
from soupkit.methods.registry import METHODS, REGISTRY, get_method

__all__ = [
    "METHODS",
    "REGISTRY",
    "LoraFactors",
    "MergeContext",
    "MergeMethod",
    "MergeResult",
    "MethodParams",
    "get_method",
]
