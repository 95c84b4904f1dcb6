"""The optuna study behind a sweep: storage, sampler, and the fingerprint that keeps one study one search."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from soupkit.errors import SoupkitError
from soupkit.sweep.space import grid_space
from soupkit.sweep.spec import Sweep

STUDY_NAME = "soupkit-sweep"
FINGERPRINT_KEY = "soupkit_fingerprint"


def optuna_module() -> Any:
    try:
        import optuna
    except ImportError:
        raise SoupkitError("soupkit sweep", "optuna installed", "it is not", 'pip install "soupkit[search]"') from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # soupkit prints its own one-line progress
    return optuna


def storage_url(out: Path, storage: str | None) -> str:
    """``--storage`` as given, else an SQLite file in the sweep folder."""
    return storage or f"sqlite:///{out / 'study.db'}"


def make_sampler(sweep: Sweep, stream: int = 0) -> Any:
    """The sampler, seeded from search.seed and ``stream``: each worker, and each resumed run, draws anew.

    Samplers restart their generator from the seed: two workers, or a rerun, seeded alike would
    propose the very same first points again.
    """
    optuna = optuna_module()
    seed, name = (sweep.search.seed * 1_000_003 + stream) % 2**32, sweep.search.sampler
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.GridSampler(grid_space(sweep), seed=seed)


def grid_size(sweep: Sweep) -> int:
    size = 1
    for values in grid_space(sweep).values():
        size *= len(values)
    return size


def open_study(sweep: Sweep, url: str, direction: str, fingerprint: dict, worker: int = 0) -> Any:
    """Create or load the study; refuse one whose search space differs from this sweep file's."""
    optuna = optuna_module()
    storage = url
    if url.startswith("sqlite:"):  # several local workers share the file: wait for its lock instead of failing
        storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 120}})
    try:
        study = optuna.create_study(study_name=STUDY_NAME, storage=storage, direction=direction, load_if_exists=True)
        study.sampler = make_sampler(sweep, 7919 * worker + len(study.get_trials(deepcopy=False)))
    except (ValueError, ImportError, RuntimeError) as err:
        raise SoupkitError("--storage", "a reachable optuna storage URL", f"{url} ({err})"[:200], "check the URL") from None
    stored = study.user_attrs.get(FINGERPRINT_KEY)
    if stored is None:
        study.set_user_attr(FINGERPRINT_KEY, fingerprint)
    elif json.dumps(stored, sort_keys=True) != json.dumps(fingerprint, sort_keys=True):
        changed = sorted(
            k for k in fingerprint if json.dumps(stored.get(k), sort_keys=True) != json.dumps(fingerprint[k], sort_keys=True)
        )
        raise SoupkitError(
            "soupkit sweep",
            "the same recipe, search block and data as the study being resumed",
            f"a changed {', '.join(changed) or 'search space'}",
            "use a new -o folder for a new search (only search.trials and top_k may change)",
        )
    return study


def fail_stale_trials(study: Any) -> int:
    """Trials left running by a killed run of this folder are failed (only for the folder's own storage)."""
    optuna = optuna_module()
    stale = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for trial in stale:
        study._storage.set_trial_user_attr(trial._trial_id, "error", "interrupted: the run stopped during this trial")
        study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
    return len(stale)
