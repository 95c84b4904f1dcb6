"""``soupkit sweep``: a scored, resumable search over merge recipes, driven by optuna.

Inside the package: ``spec`` (the search: block), ``space`` (a trial's candidate and its recipe),
``study`` (optuna storage, sampler, fingerprint), ``trial`` (a worker's trials), ``report`` (the
folder's files), ``run`` (the whole command).
"""
