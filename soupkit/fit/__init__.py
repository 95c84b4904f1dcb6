"""``soupkit fit-alpha``: learn CAT's per-module adapter weights on calibration data.

Imported only by the ``fit-alpha`` command (and tests/benchmarks): it pulls in transformers and
accelerate, which ``merge``, ``validate`` and ``plan`` never need.
"""
