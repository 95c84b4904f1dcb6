"""``--search lorahub``: LoraHub's gradient-free weight search (Huang et al. 2023, arXiv 2307.13269).

As in LoraHub: one weight per adapter, start at 0, bounds [-1.5, 1.5], objective = per-token loss on
a handful of examples + 0.05 * mean |w|, a budget of 40 loss evaluations, forward passes only.
Unlike LoraHub, the candidate adapters are combined by CAT (sum_i w_i B_i A_i, exact, any ranks)
rather than by averaging A and B separately (which adds cross terms B_j A_i and needs equal ranks),
so the result is a recipe ``soupkit merge`` folds exactly. The optimizer is the ``cmaes`` library's CMA-ES
(LoraHub calls nevergrad's NGOpt, which picks a CMA-ES variant for such problems).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from soupkit.errors import SoupkitError
from soupkit.fit.data import Example

BOUND = 1.5
SIGMA0 = 0.5  # a third of the half-range: the first generation spreads over most of the box


def cma_es(
    f: Callable[[np.ndarray], float], x0: np.ndarray, sigma: float, lower: float, upper: float, budget: int, seed: int
) -> tuple[np.ndarray, float, list[float]]:
    """Minimise ``f`` over the box [lower, upper]^n with exactly ``budget`` calls, by CMA-ES.

    The optimizer is the ``cmaes`` library's ``CMA`` (Hansen's CMA-ES with box constraints; the one
    optuna's CMA-ES sampler runs), started at ``x0`` with step ``sigma``. Every process of a
    data-parallel fit proposes the same points (same seed), as its collective loss evaluations need.
    Returns the best point, its value, and every value in evaluation order.
    """
    try:
        from cmaes import CMA
    except ImportError:
        raise SoupkitError("--search lorahub", "cmaes installed", "it is not", 'pip install "soupkit[search]"') from None
    mean = np.clip(np.asarray(x0, float), lower, upper)
    optimizer = CMA(mean=mean, sigma=sigma, bounds=np.array([[lower, upper]] * len(mean)), seed=seed)
    best_x, best_f, history = mean.copy(), float("inf"), []
    while len(history) < budget:
        told = []
        for _ in range(min(optimizer.population_size, budget - len(history))):
            x = optimizer.ask()
            value = float(f(x))
            history.append(value)
            told.append((x, value))
            if value < best_f:
                best_x, best_f = x.copy(), value
        if len(told) < optimizer.population_size:
            break  # budget ran out mid-generation: no update from a partial population
        optimizer.tell(told)
    return best_x, best_f, history


def lorahub_search(
    accelerator: Any, model: Any, examples: list[Example], pad_id: int, budget: int, l1: float, batch_size: int, seed: int
) -> tuple[torch.Tensor, list[dict[str, float]]]:
    """Search one weight per adapter; return it (n,) and the objective per evaluation (for the curve)."""
    from soupkit.fit.train import with_weights

    core = accelerator.unwrap_model(model)
    n_modules = len(core.targets)

    def objective(w: np.ndarray) -> float:
        fixed = torch.tensor(w, dtype=torch.float32).expand(n_modules, -1).clone()
        return with_weights(accelerator, model, fixed, examples, batch_size, pad_id) + l1 * float(np.abs(w).mean())

    best, _, history = cma_es(objective, np.zeros(core.n_adapters), SIGMA0, -BOUND, BOUND, budget, seed)
    curve = [{"step": i + 1, "train_loss": v} for i, v in enumerate(history)]
    return torch.tensor(best, dtype=torch.float32), curve
