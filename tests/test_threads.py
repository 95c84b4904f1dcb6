"""Thread counts: torch's default everywhere, one thread only for LAPACK on small (R x R) matrices."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from soupkit import rng
from soupkit.methods._core import small_maths
from soupkit.ops import linalg


@pytest.fixture
def two_threads() -> Iterator[None]:
    """Two intra-op threads (whatever the machine), so that a drop to one is visible."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def threads_during(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """Record torch's thread count inside every call of ``torch.linalg.<name>``."""
    seen: list[int] = []
    real = getattr(torch.linalg, name)

    def recording(*args: object, **kwargs: object) -> object:
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, name, recording)
    return seen


@pytest.mark.parametrize("name,call", [("svd", linalg.svd), ("eigh", linalg.eigh)])
def test_lapack_runs_on_one_thread_only_for_small_matrices(
    two_threads: None, monkeypatch: pytest.MonkeyPatch, name: str, call: object
) -> None:
    seen = threads_during(monkeypatch, name)
    gen = torch.Generator().manual_seed(0)
    for n in (linalg.SMALL_MATRIX, linalg.SMALL_MATRIX + 1):
        M = torch.randn(n, n, generator=gen, dtype=torch.float64)
        call(M @ M.T)  # type: ignore[operator]
    assert seen == [1, 2]
    assert torch.get_num_threads() == 2  # restored after the small call


def test_small_maths_keeps_the_default_threads_for_a_real_module(two_threads: None) -> None:
    with small_maths(torch.empty(16, 4096)):
        assert torch.get_num_threads() == 2
    with small_maths(torch.empty(4, 64)):  # a tiny model: thread start-up would dominate
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_random_draws_leave_the_thread_count_alone(two_threads: None, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    draws = rng.counter_uniform((300, 700), (1, 2), "cpu")  # several chunks
    assert calls == [] and draws.shape == (300, 700)
    assert 0.0 <= float(draws.min()) and float(draws.max()) < 1.0
