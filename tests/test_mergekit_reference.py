"""The dense methods against mergekit's own merge functions (an outside implementation), on dense deltas.

mergekit (a test-only dependency, installed by .ci/run with ``pip install --no-deps mergekit==0.1.5``)
merges full models: ``base + merge(theta_i - base)``. With a zero base its inputs are the deltas
themselves. Both TIES scales are checked: soupkit's ``normalize: weights`` is mergekit's
``normalize: true`` with ``weight: w_i``; ``normalize: count`` is mergekit's ``normalize: true`` on the
pre-weighted deltas ``w_i delta_i`` with ``weight: 1`` (the divisor is then the count). Random masks
are fixed: mergekit's ``torch.bernoulli`` call returns soupkit's documented draws (``u < p``), and
mergekit's L1 rescale is off (``rescale: false``), so the paper's ``1/p`` is applied here by hand.
Where mergekit's defaults differ from the papers, docs/methods.md says how (mergekit's column).
In CI (``CI`` or ``SOUPKIT_REQUIRE_MERGEKIT`` set) a missing mergekit fails these tests; elsewhere they skip.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

from soupkit.methods import REGISTRY, LoraFactors, MergeContext, seeds
from soupkit.ops import della_keep_probability

REQUIRED = any(os.environ.get(v, "").lower() not in ("", "0", "false") for v in ("CI", "SOUPKIT_REQUIRE_MERGEKIT"))
try:
    from mergekit.merge_methods import merge_tensors
    from mergekit.merge_methods.generalized_task_arithmetic import ConsensusMethod, GeneralizedTaskArithmeticMerge
    from mergekit.sparsify import SparsificationMethod, della_magprune
except ImportError as err:  # pragma: no cover - the environment decides
    if REQUIRED:
        raise ImportError(f"mergekit must be importable in CI (pip install --no-deps mergekit==0.1.5): {err}") from err
    pytest.skip(f"mergekit is not installed (pip install --no-deps mergekit==0.1.5): {err}", allow_module_level=True)

D_OUT, D_IN = 24, 20
WEIGHTS = [0.6, 0.4, 1.3]
MODULE = "model.layers.0.mlp.up_proj"
SOURCES = ("math", "code", "chat")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors run faster on one thread


def random_factors(seed: int, rank: int) -> LoraFactors:
    g = torch.Generator().manual_seed(seed)
    return LoraFactors(A=torch.randn(rank, D_IN, generator=g), B=0.3 * torch.randn(D_OUT, rank, generator=g))


INPUTS = [random_factors(1, 3), random_factors(2, 5), random_factors(3, 4)]
# The dense deltas exactly as soupkit forms them (float32 B @ A), in float64 for mergekit.
DELTAS = [(f.B @ f.A).double() for f in INPUTS]


def soupkit_merge(name: str, n: int, seed: int = 0, **params) -> torch.Tensor:
    method = REGISTRY[name]
    ctx = MergeContext(MODULE, 64, seed, sources=SOURCES[:n])  # rank 64 >= min(d_out, d_in): no truncation
    f = method.merge(INPUTS[:n], WEIGHTS[:n], method.Params.model_validate(params), ctx).factors
    return f.B.double() @ f.A.double()


def gta(consensus: str | None, sparsification: str | None) -> GeneralizedTaskArithmeticMerge:
    """mergekit's generalized task arithmetic (its ties / dare_* / della / breadcrumbs) with explicit parts."""
    return GeneralizedTaskArithmeticMerge(
        consensus_method=ConsensusMethod(consensus) if consensus else None,
        sparsification_method=SparsificationMethod(sparsification) if sparsification else None,
        default_normalize=False,
        default_rescale=False,
        method_name="reference",
        method_pretty_name=None,
        method_reference_url=None,
    )


def mergekit_merge(method, deltas: list[torch.Tensor], weights: list[float], normalize: str, **params) -> torch.Tensor:
    """mergekit on a zero base; ``normalize`` 'weights' or 'count' as in the module docstring."""
    if normalize == "count":
        deltas, weights = [w * d for d, w in zip(deltas, weights)], [1.0] * len(deltas)
    base = torch.zeros_like(deltas[0])
    parameters = {"weight": weights, "normalize": normalize != "none", "rescale": False, **params}
    return merge_tensors([base, *deltas], method, parameters=parameters, base_index=0)


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def draws(n: int, seed: int, salt: str) -> list[torch.Tensor]:
    """soupkit's documented per-adapter U[0,1) draws (counter-based, keyed by seed, module, salt, name)."""
    ctx = MergeContext(MODULE, None, seed, sources=SOURCES[:n])
    return [ctx.uniform((D_OUT, D_IN), torch.device("cpu"), salt, j) for j in range(n)]


@pytest.fixture
def fixed_bernoulli(monkeypatch: pytest.MonkeyPatch):
    """Make mergekit's ``torch.bernoulli(p)`` calls return ``u_j < p`` for soupkit's draws u_j, in call order;
    the probabilities it asked for are recorded."""
    asked: list[torch.Tensor] = []

    def install(uniforms: list[torch.Tensor]) -> list[torch.Tensor]:
        queue: Iterator[torch.Tensor] = iter(uniforms)

        def bernoulli(p: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            asked.append(p.clone())
            return (next(queue) < p).to(p.dtype)

        monkeypatch.setattr(torch, "bernoulli", bernoulli)
        return asked

    return install


# --- TIES ---------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", ["count", "weights"])
@pytest.mark.parametrize("majority_sign,consensus", [("total", "sum"), ("frequency", "count")])
@pytest.mark.parametrize("n", [2, 3])
def test_ties_equals_mergekit(normalize: str, majority_sign: str, consensus: str, n: int) -> None:
    params = {"density": 0.3, "lambda": 1.4}
    want = mergekit_merge(gta(consensus, "magnitude"), DELTAS[:n], WEIGHTS[:n], normalize, **params)
    got = soupkit_merge("ties", n, majority_sign=majority_sign, normalize=normalize, **params)
    assert rel(got, want) < 1e-5


def test_ties_weights_is_mergekits_default_ties() -> None:
    """mergekit's registered ``ties`` (normalize: true by default) is soupkit's ``normalize: weights``."""
    base = torch.zeros_like(DELTAS[0])
    want = merge_tensors([base, *DELTAS], "ties", parameters={"weight": WEIGHTS, "density": 0.3}, base_index=0)
    assert rel(soupkit_merge("ties", 3, density=0.3, normalize="weights"), want) < 1e-5
    assert rel(soupkit_merge("ties", 3, density=0.3), want) > 0.1  # count: another scale


# --- DARE ---------------------------------------------------------------------------------


def test_dare_linear_at_density_one_is_mergekits_task_arithmetic() -> None:
    base = torch.zeros_like(DELTAS[0])
    for name in ("dare_linear", "task_arithmetic"):
        want = merge_tensors([base, *DELTAS], name, parameters={"weight": WEIGHTS, "density": 1.0, "lambda": 0.7}, base_index=0)
        assert rel(soupkit_merge("dare_linear", 3, density=1.0, **{"lambda": 0.7}), want) < 1e-5, name


def test_dare_linear_with_fixed_masks_equals_mergekit(fixed_bernoulli) -> None:
    """Same masks; mergekit without its L1 rescale, the paper's 1/density folded into mergekit's lambda."""
    density, lam, seed = 0.6, 1.2, 4
    fixed_bernoulli(draws(3, seed, seeds.DARE))
    want = mergekit_merge(gta(None, "random"), DELTAS, WEIGHTS, "none", density=density, **{"lambda": lam / density})
    assert rel(soupkit_merge("dare_linear", 3, seed, density=density, **{"lambda": lam}), want) < 1e-5


@pytest.mark.parametrize("normalize", ["count", "weights"])
@pytest.mark.parametrize("density", [1.0, 0.6])
def test_dare_ties_with_fixed_masks_equals_mergekit(fixed_bernoulli, normalize: str, density: float) -> None:
    seed = 5
    fixed_bernoulli(draws(3, seed, seeds.DARE))
    want = mergekit_merge(gta("sum", "random"), DELTAS, WEIGHTS, normalize, density=density, **{"lambda": 1 / density})
    assert rel(soupkit_merge("dare_ties", 3, seed, density=density, normalize=normalize), want) < 1e-5


# --- DELLA --------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", ["count", "weights"])
def test_della_with_fixed_masks_equals_mergekit(fixed_bernoulli, normalize: str) -> None:
    """mergekit's della_magprune draws the mask (keep probabilities ranked per row, as soupkit's); the kept
    entries get the paper's per-entry 1/p here; mergekit's TIES consensus and divisor merge them."""
    density, epsilon, seed = 0.5, 0.2, 6
    asked = fixed_bernoulli(draws(3, seed, seeds.DELLA))
    masked = [della_magprune(d, density, epsilon, rescale_norm=None) for d in DELTAS]
    assert len(asked) == 3
    for p, d in zip(asked, DELTAS):  # the same keep probabilities (float32, as soupkit computes them)
        assert torch.allclose(p, della_keep_probability(d.float(), density, epsilon), atol=1e-6)
    rescaled = [m / p.double() for m, p in zip(masked, asked)]
    want = mergekit_merge(gta("sum", None), rescaled, WEIGHTS, normalize)
    got = soupkit_merge("della", 3, seed, density=density, epsilon=epsilon, normalize=normalize)
    assert rel(got, want) < 1e-5


# --- breadcrumbs and linear -----------------------------------------------------------------


@pytest.mark.parametrize("density,gamma", [(0.5, 0.1), (0.3, 0.05), (0.9, 0.01)])
def test_breadcrumbs_equals_mergekit(density: float, gamma: float) -> None:
    """24 x 20 = 480 entries: here int(gamma n) + int(density n) = int((gamma + density) n), so both keep the
    same entries (the next test shows the one-entry difference docs/methods.md names otherwise)."""
    base = torch.zeros_like(DELTAS[0])
    params = {"weight": WEIGHTS, "density": density, "gamma": gamma, "lambda": 0.9}
    want = merge_tensors([base, *DELTAS], "breadcrumbs", parameters=params, base_index=0)
    assert rel(soupkit_merge("breadcrumbs", 3, density=density, gamma=gamma, **{"lambda": 0.9}), want) < 1e-5


def test_breadcrumbs_count_differs_from_mergekit_where_the_roundings_differ() -> None:
    """docs/methods.md: with n = 15, density 0.5, gamma 0.1 soupkit keeps 8 entries (ranks 2..9 from the top),
    mergekit int(7.5) = 7 (ranks 2..8)."""
    from mergekit.sparsify import magnitude_outliers

    g = torch.Generator().manual_seed(0)
    one = LoraFactors(A=torch.randn(3, 3, generator=g), B=torch.randn(5, 3, generator=g))
    method = REGISTRY["breadcrumbs"]
    params = method.Params.model_validate({"density": 0.5, "gamma": 0.1})
    f = method.merge([one], [1.0], params, MergeContext(MODULE, 64, 0, sources=("math",))).factors
    ours = (f.B @ f.A).double()
    theirs = magnitude_outliers((one.B @ one.A).double(), 0.5, gamma=0.1)
    assert int((ours.abs() > 1e-6).sum()) == 8 and int((theirs != 0).sum()) == 7
    assert int(((ours - theirs).abs() > 1e-5).sum()) == 1  # the same band, one entry longer


def test_linear_equals_mergekits_task_arithmetic_and_linear() -> None:
    """soupkit ``linear`` is task arithmetic (mergekit ``task_arithmetic``, or ``linear`` with normalize: false
    on the deltas); mergekit's default ``linear`` (normalize: true) is soupkit's with weights divided by their sum."""
    base = torch.zeros_like(DELTAS[0])
    got = soupkit_merge("linear", 3)
    assert rel(got, merge_tensors([base, *DELTAS], "task_arithmetic", parameters={"weight": WEIGHTS}, base_index=0)) < 1e-5
    assert rel(got, merge_tensors(DELTAS, "linear", parameters={"weight": WEIGHTS, "normalize": False})) < 1e-5
    models = [base + d for d in DELTAS]  # full models theta_0 + delta_i with theta_0 = 0: a weighted mean
    assert rel(got / sum(WEIGHTS), merge_tensors(models, "linear", parameters={"weight": WEIGHTS})) < 1e-5
