"""DELLA's MagPrune on the CPU block path (``ops.magprune``): against a plain float64 reference of the
rank-based keep probabilities, and bit for bit against the whole-matrix torch expression it replaced."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from soupkit.ops import della_drop, della_keep_probability, magprune
from soupkit.rng import counter_uniform, stream_key


def awkward_delta(rows: int = 150, n: int = 300) -> torch.Tensor:
    """Random float32 rows with the cases a rank must get right: ties, zeros of both signs, a constant row."""
    g = torch.Generator().manual_seed(22)
    x = torch.randn(rows, n, generator=g)
    x[0, :50] = 0.0  # ties at zero: ranked by position
    x[1, 10:40] = -2.0
    x[1, 40:60] = 2.0  # equal magnitudes, both signs
    x[2] = -0.0
    x[3] = 0.5
    x[:, ::7] = 0.25  # a tie in every row
    return x


@pytest.fixture(params=[(1, 1 << 17), (2, 1 << 10), (2, 300 * 7)], ids=["1 thread", "2 threads small blocks", "2 threads"])
def blocks(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Threads and block size of the CPU path (the result must not depend on either)."""
    threads, elements = request.param
    monkeypatch.setattr(magprune, "BLOCK_ELEMENTS", elements)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    yield
    torch.set_num_threads(before)


def reference_keep(x: torch.Tensor, density: float, epsilon: float) -> list[list[float]]:
    """Per row, rank 0 = smallest |x| (ties by position); p = (density - eps) + 2 eps rank / (n - 1) in [0, 1]."""
    out = []
    for row in x.double().tolist():
        n = len(row)
        order = sorted(range(n), key=lambda i: (abs(row[i]), i))
        p = [0.0] * n
        for rank, i in enumerate(order):
            p[i] = min(max((density - epsilon) + 2 * epsilon * rank / max(n - 1, 1), 0.0), 1.0)
        out.append(p)
    return out


@pytest.mark.parametrize("density,epsilon", [(0.5, 0.1), (0.1, 0.1), (0.9, 0.05)])
def test_della_drop_follows_the_float64_rank_probabilities(blocks: None, density: float, epsilon: float) -> None:
    """Kept where u < p (the float64 p of the entry's rank in its row), divided by that p; +0.0 elsewhere."""
    x = awkward_delta()
    u = counter_uniform(x.shape, stream_key(0, "m", "della", "a"), "cpu")
    got = della_drop(x, density, epsilon, u)
    p64 = reference_keep(x, density, epsilon)
    keep = della_keep_probability(x, density, epsilon)
    for i, (row, urow, prow) in enumerate(zip(x.double().tolist(), u.double().tolist(), p64)):
        assert keep[i].double().tolist() == pytest.approx(prow, rel=1e-6, abs=1e-7)
        for j, (value, draw, p) in enumerate(zip(row, urow, prow)):
            if draw < p:
                assert float(got[i, j]) == pytest.approx(value / p, rel=1e-6, abs=0.0), (i, j)
            else:
                assert got[i, j].view(torch.int32) == 0, (i, j)  # +0.0, never -0.0


@pytest.mark.parametrize("density,epsilon", [(0.5, 0.1), (0.1, 0.1), (1.0, 0.0)])
def test_cpu_blocks_give_the_bits_of_the_whole_matrix_expression(blocks: None, density: float, epsilon: float) -> None:
    """The blocked sort and scatter give exactly the bits of the rule as one torch expression (rank by a
    stable argsort of |x|, p from the rank, torch.where drop): the maths did not change."""
    x = awkward_delta(97, 301)
    n = x.shape[1]
    rank = x.abs().argsort(dim=-1, stable=True).argsort(dim=-1)
    rn = rank.float() / torch.full((), n - 1, dtype=torch.float32)
    p = ((density - epsilon) + 2 * epsilon * rn).clamp(0.0, 1.0)
    u = counter_uniform(x.shape, stream_key(3, "m", "della", "b"), "cpu")
    want = torch.where(u < p, x / p.clamp_min(1e-12), torch.zeros_like(x))
    assert torch.equal(della_keep_probability(x, density, epsilon).view(torch.int32), p.view(torch.int32))
    assert torch.equal(della_drop(x, density, epsilon, u).view(torch.int32), want.view(torch.int32))


def test_other_dtypes_and_shapes_take_the_torch_path() -> None:
    """float64 and non-contiguous inputs: the same rule through torch's argsort."""
    x = awkward_delta(20, 30)
    u = counter_uniform(x.shape, stream_key(1, "m", "della", "c"), "cpu")
    blocked = della_drop(x, 0.5, 0.1, u)
    assert torch.allclose(della_drop(x.double(), 0.5, 0.1, u.double()), blocked.double(), rtol=1e-6, atol=0)
    xt = x.T.contiguous().T  # the same values, column-major
    assert torch.equal(della_drop(xt, 0.5, 0.1, u), blocked)
