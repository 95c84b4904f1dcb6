"""Factor-space methods: KnOTS against a plain dense SVD of [delta_1, ..., delta_n], LoRA-LEGO on units
whose clustering is known by construction, and both against CAT / linear in their degenerate cases."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from soupkit.execute import RunOptions
from soupkit.merge import merge_recipe
from soupkit.methods import REGISTRY, LoraFactors, MergeContext
from soupkit.recipe import Recipe

from conftest import TINY, reference_deltas, tiny_recipe, weighted_sum

QUIET = RunOptions(progress=False)


def run(tmp_path: Path, recipe: dict, name: str = "out") -> dict[str, torch.Tensor]:
    out = tmp_path / name
    merge_recipe(Recipe.from_dict(recipe, tmp_path), out, QUIET)
    return reference_deltas(out)


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / max(float(want.norm()), 1e-12))


def inputs() -> tuple[dict, dict]:
    return reference_deltas(TINY / "adapters" / "math"), reference_deltas(TINY / "adapters" / "code")


# --- KnOTS ---------------------------------------------------------------------------------


def test_knots_without_trimming_equals_linear(tmp_path: Path) -> None:
    weights = [0.6, -0.9]
    got = run(tmp_path, tiny_recipe("knots", tuple(weights), merge_type="linear", density=1.0))
    want = weighted_sum(list(inputs()), weights)
    for path in want:
        assert rel(got[path], want[path]) < 1e-5, path


def plain_knots_ties(deltas: list[torch.Tensor], weights: list[float], density: float, lam: float, k_of=None) -> torch.Tensor:
    """KnOTS as its code does it: dense SVD of the horizontally stacked deltas, TIES on Z_i = S V_i^T."""
    d_in = deltas[0].shape[1]
    U, S, Vh = torch.linalg.svd(torch.cat(deltas, dim=1), full_matrices=False)
    keep = S > 1e-8 * S[0]
    U, S, Vh = U[:, keep], S[keep], Vh[keep]
    Z = [S[:, None] * Vh[:, i * d_in : (i + 1) * d_in] for i in range(len(deltas))]
    trimmed = []
    for i, (z, w) in enumerate(zip(Z, weights)):
        k = int(density * z.numel()) if k_of is None else k_of(i, z)
        mask = torch.zeros(z.numel(), dtype=torch.bool)
        mask[z.abs().flatten().topk(k).indices] = True
        trimmed.append(w * z * mask.view(z.shape))
    elected = torch.sign(sum(trimmed))
    elected[elected == 0] = 1
    agree = [torch.sign(t) == elected for t in trimmed]
    merged = sum(t * a for t, a in zip(trimmed, agree)) / sum(a.double() for a in agree).clamp(min=1)
    return lam * U @ merged


def test_knots_ties_equals_plain_dense_knots(tmp_path: Path) -> None:
    weights, density, lam = [1.0, 0.7], 0.4, 0.5
    got = run(tmp_path, tiny_recipe("knots", tuple(weights), density=density, **{"lambda": lam}))
    math, code = inputs()
    for path, m in math.items():
        deltas, ws = ([m, code[path]], weights) if path in code else ([m], weights[:1])
        want = plain_knots_ties(deltas, ws, density, lam)
        assert rel(got[path], want) < 1e-5, path


def test_knots_global_scope_equals_plain(tmp_path: Path) -> None:
    """One magnitude threshold per adapter over the Z_i of every module (the published setting)."""
    density = 0.3
    got = run(tmp_path, tiny_recipe("knots", (1.0, 1.0), density=density, scope="global"))
    math, code = inputs()
    names = ("math", "code")
    coords: dict[str, list[torch.Tensor]] = {"math": [], "code": []}
    for path, m in math.items():
        deltas = [m, code[path]] if path in code else [m]
        U, S, Vh = torch.linalg.svd(torch.cat(deltas, dim=1), full_matrices=False)
        keep = S > 1e-8 * S[0]
        for i, _ in enumerate(deltas):
            coords[names[i]].append((S[keep, None] * Vh[keep][:, i * m.shape[1] : (i + 1) * m.shape[1]]).abs().flatten())
    threshold = {}
    for name, parts in coords.items():
        everything = torch.cat(parts)
        threshold[name] = everything.topk(int(density * everything.numel())).values[-1]
    for path, m in math.items():
        deltas = [m, code[path]] if path in code else [m]
        kept = lambda i, z: int((z.abs() >= threshold[names[i]]).sum())  # noqa: E731
        want = plain_knots_ties(deltas, [1.0] * len(deltas), density, 1.0, k_of=kept)
        assert rel(got[path], want) < 1e-4, path


# --- LoRA-LEGO -----------------------------------------------------------------------------


def test_lego_with_k_sum_of_ranks_equals_cat(tmp_path: Path) -> None:
    weights = [0.8, -0.5]
    want = weighted_sum(list(inputs()), weights)
    for reweight in (False, True):  # with one unit per cluster both reweightings are identities
        recipe = tiny_recipe("lego", tuple(weights), rank=12, parameter_reweighting=reweight, output_reweighting=reweight)
        got = run(tmp_path, recipe, f"out-{reweight}")
        for path in want:
            assert rel(got[path], want[path]) < 1e-5, path


def unit(i: int, n: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(i), n).double()


def lego(factors: list[LoraFactors], weights: list[float], k: int, **params) -> torch.Tensor:
    method = REGISTRY["lego"]
    ctx = MergeContext("model.layers.0.self_attn.q_proj", k, 0, sources=tuple(f"a{i}" for i in range(len(factors))))
    f = method.merge(factors, weights, method.Params.model_validate(params), ctx).factors
    return (f.B @ f.A).double()


def test_lego_never_averages_a_unit_with_its_own_negation_or_rescaling() -> None:
    """Adapter 2 holds adapter 1's first unit negated and re-gauged ((-2 b, -a/2): same b a^T)."""
    b1, b2, a1, a2 = unit(0, 6), unit(1, 6), unit(0, 5), unit(1, 5)
    first = LoraFactors(A=torch.stack([a1, a2]).float(), B=torch.stack([b1, b2], dim=1).float())
    second = LoraFactors(A=(-a1 / 2)[None].float(), B=(-2 * b1)[:, None].float())
    no_reweight = lego([first, second], [1.0, 1.0], 2, parameter_reweighting=False, output_reweighting=False)
    assert rel(no_reweight, torch.outer(b1, a1) + torch.outer(b2, a2)) < 1e-6  # cluster {u1, u1'} -> u1
    full = lego([first, second], [1.0, 1.0], 2)
    target = 2 * torch.outer(b1, a1) + torch.outer(b2, a2)  # the weighted sum the output is rescaled to
    assert float(full.norm()) == pytest.approx(float(target.norm()), rel=1e-6)
    assert rel(full / full.norm(), no_reweight / no_reweight.norm()) < 1e-6


def test_lego_parameter_reweighting_restores_the_mean_norm() -> None:
    """Two orthogonal unit-norm units in one cluster: the centroid (norm 1) is scaled to sqrt(2)."""
    b1, b2, a1, a2 = unit(0, 4), unit(1, 4), unit(0, 3), unit(1, 3)
    f = LoraFactors(A=torch.stack([a1, a2]).float(), B=torch.stack([b1, b2], dim=1).float())
    plain = lego([f], [1.0], 1, parameter_reweighting=False, output_reweighting=False)
    assert rel(plain, torch.outer(b1 + b2, a1 + a2) / 4) < 1e-6
    reweighted = lego([f], [1.0], 1, parameter_reweighting=True, output_reweighting=False)
    assert rel(reweighted, torch.outer(b1 + b2, a1 + a2) / 2) < 1e-6


def test_lego_clusters_are_seeded() -> None:
    g = torch.Generator().manual_seed(0)
    fs = [LoraFactors(A=torch.randn(6, 10, generator=g), B=torch.randn(12, 6, generator=g)) for _ in range(2)]
    first = lego(fs, [1.0, 1.0], 4)
    assert torch.equal(first, lego(fs, [1.0, 1.0], 4))
    assert torch.linalg.matrix_rank(first, rtol=1e-5) <= 4
