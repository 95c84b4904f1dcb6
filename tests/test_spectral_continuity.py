"""Continuity where the published spectral rules are ill-defined: identical adapters, adapters 1e-6 apart,
orthogonal adapters. ``tsv`` and ``iso_c`` against plain float64 references written here from
docs/methods.md (Merge space, tsv, iso_c) with the rank-revealing tolerance; ``knots`` and the core-space
rules against the closed forms these inputs have (identical adapters at weights w_1, w_2: TIES-style means
give (w_1 + w_2) / 2 * delta; orthogonal adapters: the weighted sum)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from soupkit.execute import RunOptions
from soupkit.merge import merge_recipe
from soupkit.methods import REGISTRY, LoraFactors, MergeContext
from soupkit.recipe import Recipe

from conftest import TINY, reference_deltas, tiny_recipe

D_OUT, D_IN, RANK = 40, 28, 4
RTOL = 1e-4  # docs/methods.md: singular values below 1e-4 of the largest are dropped (spectra and polar factors)
APART = 1e-6  # relative distance between "nearly identical" inputs
MOVED = 1e-4  # the most their outputs may differ, relative


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors run faster on one thread


# --- plain float64 references (docs/methods.md, tsv and iso_c) ----------------------------


def kept_svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD keeping the singular values above RTOL of the largest."""
    U, S, Vh = torch.linalg.svd(x, full_matrices=False)
    k = int((S > RTOL * S[0]).sum()) if float(S[0]) > 0 else 0
    return U[:, :k], S[:k], Vh[:k]


def plain_polar(x: torch.Tensor) -> torch.Tensor:
    """Rank-revealing polar factor: P_k Q_k^T over the singular values above RTOL of the largest."""
    P, _, Qh = kept_svd(x)
    return P @ Qh


def plain_tsv(deltas: list[torch.Tensor], lam: float = 1.0) -> torch.Tensor:
    cap = min(deltas[0].shape) // len(deltas)
    parts = [kept_svd(d) for d in deltas]
    U = torch.cat([u[:, :cap] for u, _, _ in parts], dim=1)
    S = torch.cat([s[:cap] for _, s, _ in parts])
    V = torch.cat([vh[:cap] for _, _, vh in parts], dim=0).T
    return lam * plain_polar(U) @ torch.diag(S) @ plain_polar(V).T


def plain_iso(total: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    U, S, Vh = kept_svd(total)
    return lam * S.mean() * U @ Vh


def plain_core_tsv(Bs: list[torch.Tensor], As: list[torch.Tensor]) -> torch.Tensor:
    """TSV on the core matrices M_i = U_ref^T B_i A_i V_ref^T (B_i carry w_i), mapped back."""
    U = torch.linalg.svd(torch.cat(Bs, dim=1), full_matrices=False).U
    V = torch.linalg.svd(torch.cat(As, dim=0), full_matrices=False).Vh
    return U @ plain_tsv([U.T @ B @ A @ V.T for B, A in zip(Bs, As)]) @ V


def dense(f: LoraFactors) -> torch.Tensor:
    return f.B.double() @ f.A.double()


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / max(float(want.norm()), 1e-300))


# --- inputs -------------------------------------------------------------------------------


def adapter(seed: int) -> LoraFactors:
    g = torch.Generator().manual_seed(seed)
    return LoraFactors(A=torch.randn(RANK, D_IN, generator=g), B=0.2 * torch.randn(D_OUT, RANK, generator=g))


def jittered(f: LoraFactors, seed: int) -> LoraFactors:
    """Every entry of A and B moved by a relative APART (same rank)."""
    g = torch.Generator().manual_seed(seed)
    return LoraFactors(
        A=f.A * (1 + APART * torch.randn(f.A.shape, generator=g)), B=f.B * (1 + APART * torch.randn(f.B.shape, generator=g))
    )


def extra_rank(f: LoraFactors, seed: int) -> LoraFactors:
    """One more rank unit, of Frobenius norm APART * ||B A||: a new direction, rank r + 1."""
    g = torch.Generator().manual_seed(seed)
    u, v = torch.randn(D_OUT, 1, generator=g), torch.randn(1, D_IN, generator=g)
    c = APART * float(dense(f).norm()) / float((u @ v).norm())
    return LoraFactors(A=torch.cat([f.A, v]), B=torch.cat([f.B, c * u], dim=1))


def orthogonal_pair(seed: int) -> tuple[LoraFactors, LoraFactors]:
    """Two rank-RANK adapters whose column spaces and row spaces are orthogonal."""
    g = torch.Generator().manual_seed(seed)
    Q_out = torch.linalg.qr(torch.randn(D_OUT, 2 * RANK, generator=g, dtype=torch.float64))[0]
    Q_in = torch.linalg.qr(torch.randn(D_IN, 2 * RANK, generator=g, dtype=torch.float64))[0]
    pair = []
    for block in (slice(0, RANK), slice(RANK, 2 * RANK)):
        core = torch.randn(RANK, RANK, generator=g, dtype=torch.float64)
        pair.append(LoraFactors(A=(core @ Q_in[:, block].T).float(), B=Q_out[:, block].float()))
    return pair[0], pair[1]


def merged(name: str, inputs: list[LoraFactors], weights: list[float], rank: int | None = None, **params) -> torch.Tensor:
    method = REGISTRY[name]
    p = method.Params.model_validate(params)
    ctx = MergeContext("model.layers.0.mlp.up_proj", rank, 0, sources=("math", "code")[: len(inputs)])
    return dense(method.merge(inputs, weights, p, ctx).factors)


SPECTRAL = [("tsv", {"space": "full"}), ("tsv", {"space": "core"}), ("iso_c", {"space": "full"}), ("iso_c", {"space": "core"})]
MEANS = [  # rules whose result on identical adapters is the mean of the weighted updates
    ("knots", {}),
    ("knots", {"density": 0.5}),
    ("ties", {"space": "core", "density": 1.0}),
    ("dare_ties", {"space": "core", "density": 1.0}),
    ("della", {"space": "core", "density": 1.0, "epsilon": 0.0}),
]
SUMS = [
    ("knots", {"merge_type": "linear"}),
    ("linear", {"space": "core"}),
    ("breadcrumbs", {"space": "core", "density": 1.0, "gamma": 0.0}),
]
WEIGHTS = [[0.5, 0.5], [0.2, 0.8], [1.0, 1.0]]


def label(case: tuple[str, dict]) -> str:
    return case[0] + "".join(f"-{k}={v}" for k, v in case[1].items())


# --- identical adapters ---------------------------------------------------------------------


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("case", SPECTRAL, ids=label)
def test_identical_adapters_equal_reference(case: tuple[str, dict], weights: list[float]) -> None:
    """Two copies of one adapter: TSV's polar factors are rank-deficient (the published code fills the missing
    directions by rounding); the rank-revealing rule gives the mean of the weighted updates, Iso-C the flattened sum."""
    name, params = case
    a = adapter(1)
    delta = dense(a)
    got = merged(name, [a, a], weights, **params)
    if name == "tsv":
        if params["space"] == "full":
            want = plain_tsv([w * delta for w in weights])
        else:
            want = plain_core_tsv([w * a.B.double() for w in weights], [a.A.double()] * 2)
        assert rel(want, sum(weights) / 2 * delta) < 1e-10  # the reference agrees with the closed form
    else:
        want = plain_iso(sum(weights) * delta)
    assert rel(got, want) < 1e-5
    assert torch.linalg.matrix_rank(got).item() == RANK


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("case", MEANS + SUMS, ids=label)
def test_identical_adapters_knots_and_core(case: tuple[str, dict], weights: list[float]) -> None:
    name, params = case
    a = adapter(1)
    scale = sum(weights) / 2 if case in MEANS else sum(weights)
    want = scale * dense(a)
    if params.get("density") == 0.5:  # KnOTS trims each Z_i to its top half: compare with one adapter trimmed alike
        want = scale * merged(name, [a], [1.0], **params)
    assert rel(merged(name, [a, a], weights, **params), want) < 1e-5


@pytest.mark.parametrize("space", ["full", "core"])
def test_identical_adapters_tsv_rank_budget_keeps_the_best_directions(space: str) -> None:
    """With ``merge.rank`` = r, TSV of the same adapter twice is still (w_1 + w_2) / 2 * delta (rank r): the
    rank-deficient whitening is re-factorised into an exact SVD before the budget picks directions."""
    a = adapter(1)
    for rank in (RANK, RANK - 1):
        got = merged("tsv", [a, a], [0.5, 0.8], rank=rank, space=space)
        U, S, Vh = torch.linalg.svd(0.65 * dense(a), full_matrices=False)
        want = U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank]  # Eckart-Young
        assert rel(got, want) < 1e-5, rank


# --- nearly identical adapters: outputs at most MOVED apart -----------------------------------


@pytest.mark.parametrize("move", [jittered, extra_rank], ids=["jittered", "extra_rank"])
@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("case", SPECTRAL + MEANS + SUMS + [("ties", {"space": "core", "density": 0.5})], ids=label)
def test_nearly_identical_adapters_move_the_output_little(case: tuple[str, dict], weights: list[float], move) -> None:
    name, params = case
    a = adapter(1)
    same = merged(name, [a, a], weights, **params)
    for seed in (5, 6):
        b = move(a, seed)
        assert rel(dense(b), dense(a)) < 2 * APART
        got = merged(name, [a, b], weights, **params)
        assert rel(got, same) < MOVED, (seed, rel(got, same))
        if name == "tsv" and params["space"] == "full":
            assert rel(got, plain_tsv([w * dense(f) for f, w in zip((a, b), weights)])) < 1e-5
        if name == "iso_c":
            assert rel(got, plain_iso(sum(w * dense(f) for f, w in zip((a, b), weights)))) < 1e-5


# --- orthogonal adapters ----------------------------------------------------------------------


@pytest.mark.parametrize("case", SPECTRAL + MEANS[:3] + SUMS, ids=label)
def test_orthogonal_adapters(case: tuple[str, dict]) -> None:
    """Column and row spaces orthogonal: nothing to whiten or to elect, so TSV, KnOTS and the core rules give the
    weighted sum; Iso-C flattens the sum's spectrum (its reference)."""
    name, params = case
    one, two = orthogonal_pair(3)
    weights = [0.9, 0.5]
    total = weights[0] * dense(one) + weights[1] * dense(two)
    want = plain_iso(total) if name == "iso_c" else total
    got = merged(name, [one, two], weights, **params)
    assert rel(got, want) < 1e-5
    for seed in (7, 8):  # nearly orthogonal: 1e-6 apart from the pair above
        assert rel(merged(name, [jittered(one, seed), extra_rank(two, seed)], weights, **params), got) < MOVED, seed


# --- a whole run: the same adapter listed twice -------------------------------------------


@pytest.mark.parametrize("method,scale", [("tsv", 0.5), ("knots", 0.5), ("iso_c", None)])
def test_the_same_adapter_twice_in_a_recipe(tmp_path: Path, method: str, scale: float | None) -> None:
    """examples/tiny's math adapter listed twice (weights 0.5 and 0.5): TSV and KnOTS give their mean,
    0.5 * delta, Iso-C the flattened delta, module by module; and as many modules as the adapter has."""
    recipe = tiny_recipe(method, (0.5, 0.5))
    recipe["adapters"][1]["path"] = recipe["adapters"][0]["path"]
    merge_recipe(Recipe.from_dict(recipe, tmp_path), tmp_path / "out", RunOptions(progress=False))
    got, math = reference_deltas(tmp_path / "out"), reference_deltas(TINY / "adapters" / "math")
    assert set(got) == set(math)
    for path, delta in math.items():
        want = scale * delta if scale is not None else plain_iso(delta)
        assert rel(got[path], want) < 1e-5, path
