"""``--search lorahub``: LoraHub's gradient-free weight search (Huang et al. 2023, arXiv 2307.13269).

As in LoraHub: one weight per adapter, start at 0, bounds [-1.5, 1.5], objective = per-token loss on
a handful of examples + 0.05 * mean |w|, a budget of 40 loss evaluations, forward passes only.
Unlike LoraHub, the candidate adapters are combined by CAT (sum_i w_i B_i A_i, exact, any ranks)
rather than by averaging A and B separately (which adds cross terms B_j A_i and needs equal ranks),
so the result is a recipe ``soupkit merge`` folds exactly. The optimizer is a small CMA-ES below
(LoraHub calls nevergrad's NGOpt, which picks a CMA-ES variant for such problems).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from soupkit.fit.data import Example

BOUND = 1.5
SIGMA0 = 0.5  # a third of the half-range: the first generation spreads over most of the box


def cma_es(
    f: Callable[[np.ndarray], float], x0: np.ndarray, sigma: float, lower: float, upper: float, budget: int, seed: int
) -> tuple[np.ndarray, float, list[float]]:
    """Minimise ``f`` over the box [lower, upper]^n with at most ``budget`` calls.

    (mu/mu_w, lambda)-CMA-ES with rank-one and rank-mu covariance updates and cumulative step-size
    adaptation (Hansen, "The CMA Evolution Strategy: A Tutorial", 2016, default constants).
    Candidates outside the box are clipped before evaluation and the update uses the clipped
    points (repair). Returns the best point, its value, and every value in evaluation order.
    """
    rng = np.random.default_rng(seed)
    n = len(x0)
    lam = 4 + int(3 * math.log(n))
    mu = lam // 2
    w = math.log(mu + 0.5) - np.log(np.arange(1, mu + 1))
    w /= w.sum()
    mueff = 1.0 / float((w**2).sum())
    cc, cs = (4 + mueff / n) / (n + 4 + 2 * mueff / n), (mueff + 2) / (n + mueff + 5)
    c1 = 2 / ((n + 1.3) ** 2 + mueff)
    cmu = min(1 - c1, 2 * (mueff - 2 + 1 / mueff) / ((n + 2) ** 2 + mueff))
    damps = 1 + 2 * max(0.0, math.sqrt((mueff - 1) / (n + 1)) - 1) + cs
    chi_n = math.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n * n))
    mean, C = np.clip(np.asarray(x0, float), lower, upper), np.eye(n)
    ps, pc = np.zeros(n), np.zeros(n)
    best_x, best_f, history, gen = mean.copy(), math.inf, [], 0
    while len(history) < budget:
        evals, vecs = np.linalg.eigh(C)
        D = np.sqrt(np.maximum(evals, 1e-20))
        x = np.clip(mean + sigma * (rng.standard_normal((lam, n)) * D) @ vecs.T, lower, upper)
        x = x[: budget - len(history)]
        fx = np.array([f(xi) for xi in x])
        history += fx.tolist()
        if fx.min() < best_f:
            best_f, best_x = float(fx.min()), x[int(fx.argmin())].copy()
        if len(x) < lam:
            break  # budget ran out mid-generation: no update from a partial population
        gen += 1
        y = (x[np.argsort(fx)[:mu]] - mean) / sigma  # selected steps, (mu, n)
        y_w = w @ y
        mean = mean + sigma * y_w
        inv_sqrt = vecs @ np.diag(1 / D) @ vecs.T
        ps = (1 - cs) * ps + math.sqrt(cs * (2 - cs) * mueff) * inv_sqrt @ y_w
        hsig = np.linalg.norm(ps) / math.sqrt(1 - (1 - cs) ** (2 * gen)) / chi_n < 1.4 + 2 / (n + 1)
        pc = (1 - cc) * pc + hsig * math.sqrt(cc * (2 - cc) * mueff) * y_w
        rank_mu = (y.T * w) @ y
        C = (1 - c1 - cmu) * C + c1 * (np.outer(pc, pc) + (1 - hsig) * cc * (2 - cc) * C) + cmu * rank_mu
        sigma *= math.exp((cs / damps) * (np.linalg.norm(ps) / chi_n - 1))
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
