"""Shared tensor maths against plain dense computations."""

from __future__ import annotations

import pytest
import torch

from soupkit.methods import LoraFactors
from soupkit.ops import concat_factors, factor_svd, frobenius_norm, pad_rank, truncate_dense, truncate_factors


def random_factors(d_out: int, d_in: int, r: int, seed: int) -> LoraFactors:
    gen = torch.Generator().manual_seed(seed)
    return LoraFactors(A=torch.randn(r, d_in, generator=gen), B=torch.randn(d_out, r, generator=gen))


@pytest.mark.parametrize(("d_out", "d_in", "r"), [(40, 30, 6), (8, 50, 12), (50, 8, 12)])
def test_factor_svd_matches_dense_svd(d_out: int, d_in: int, r: int) -> None:
    f = random_factors(d_out, d_in, r, 0)
    U, S, Vh = factor_svd(f)
    dense = f.B.double() @ f.A.double()
    torch.testing.assert_close(S.double(), torch.linalg.svdvals(dense)[: S.shape[0]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((U * S) @ Vh, dense.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rank", [1, 3, 5])
def test_truncations_reach_the_eckart_young_optimum(rank: int) -> None:
    f = random_factors(30, 20, 6, 1)
    dense = f.B.double() @ f.A.double()
    s = torch.linalg.svdvals(dense)
    optimum = float(s[rank:].square().sum().sqrt())
    energy = float(s[:rank].square().sum() / s.square().sum())
    for approx, kept in (truncate_factors(f, rank), truncate_dense(dense.float(), rank)):
        assert approx.rank == rank
        error = float((approx.B.double() @ approx.A.double() - dense).norm())
        assert error == pytest.approx(optimum, rel=1e-4)
        assert kept == pytest.approx(energy, rel=1e-6)
        # balanced split: B and A carry the same singular values
        torch.testing.assert_close(approx.B.norm(dim=0), approx.A.norm(dim=1), rtol=1e-4, atol=1e-5)


def test_truncate_dense_wide_and_zero() -> None:
    wide = torch.randn(5, 40, generator=torch.Generator().manual_seed(2))
    approx, kept = truncate_dense(wide, 5)
    torch.testing.assert_close(approx.B @ approx.A, wide, rtol=1e-4, atol=1e-4)
    assert kept == pytest.approx(1.0)
    zero, kept = truncate_dense(torch.zeros(6, 4), 2)
    assert float((zero.B @ zero.A).abs().max()) == 0.0 and kept == 1.0


def test_concat_pad_and_norm() -> None:
    f, g = random_factors(10, 7, 2, 3), random_factors(10, 7, 3, 4)
    cat = concat_factors([f, g], [0.5, -2.0])
    torch.testing.assert_close(cat.B @ cat.A, 0.5 * f.B @ f.A - 2.0 * g.B @ g.A)
    padded = pad_rank(cat, 9)
    assert padded.rank == 9 and torch.equal(padded.B @ padded.A, cat.B @ cat.A)
    assert frobenius_norm(cat) == pytest.approx(float((cat.B @ cat.A).norm()), rel=1e-5)
