"""The fast paths of issue 22 against plain references: the randomized re-factorisation of the dense
methods (``ops.best_rank_k``) against the exact best rank-k truncation computed here in float64
(Eckart-Young: the tail of the singular values), the float64 magnitude selection against a sort."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from soupkit.cli.exit import FAST_EXIT_COMMANDS, command_name
from soupkit.methods import REGISTRY, LoraFactors, MergeContext
from soupkit.ops import best_rank_k, elect_sign, keep_where, kth_largest_magnitude, linalg, trim_to_density
from soupkit.ops.magprune import magnitude_order
from soupkit.ops.sparsify import kth_largest_bracketed

from conftest import tiny_recipe

DENSE = {
    "ties": {"density": 0.5},
    "dare_ties": {"density": 0.5},
    "dare_linear": {"density": 0.3},
    "della": {},
    "breadcrumbs": {},
    "magnitude_prune": {"density": 0.2},
}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors run faster on one thread


@pytest.fixture(params=["gram", "householder"])
def basis(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The range finder with each basis: the CPU's Gram route, and the GPU's Householder QR run here on the CPU."""
    if request.param == "householder":
        monkeypatch.setattr(linalg, "orthonormal_columns", lambda Y, rounds=2: linalg.householder_columns(Y))
    return request.param


def low_rank_inputs(shape: tuple[int, int], rank: int, seed: int) -> list[LoraFactors]:
    """Two random adapters (with the spectra of trained LoRAs: a few strong directions)."""
    g = torch.Generator().manual_seed(seed)
    decay = torch.logspace(0, -1.5, rank)
    return [
        LoraFactors(A=torch.randn(rank, shape[1], generator=g), B=torch.randn(shape[0], rank, generator=g) * decay)
        for _ in range(2)
    ]


def exact_residual(delta: torch.Tensor, rank: int) -> float:
    """||delta - best rank-k||_F^2 in float64: the sum of the squared singular values past k."""
    s = torch.linalg.svdvals(delta.double())
    return float(s[rank:].square().sum())


@pytest.mark.parametrize("method", sorted(DENSE))
@pytest.mark.parametrize("shape", [(600, 1100), (1100, 600)])
def test_randomized_truncation_is_within_1e_3_of_the_exact_residual(method: str, shape: tuple[int, int], basis: str) -> None:
    factors = low_rank_inputs(shape, 24, seed=len(method))
    m = REGISTRY[method]
    ctx = MergeContext("model.layers.0.mlp.up_proj", 24, 7, sources=("a", "b"))
    dense = m.dense_merge(factors, [0.7, 0.5], m.Params.model_validate(DENSE[method]), ctx)
    out = m.merge(factors, [0.7, 0.5], m.Params.model_validate(DENSE[method]), ctx)
    optimum = exact_residual(dense, 24)
    error = float(((out.factors.B @ out.factors.A).double() - dense.double()).square().sum())
    total = float(dense.double().square().sum())
    assert min(shape) > 512, "the randomized path runs only above 512"
    assert out.factors.rank <= 24
    assert optimum > 1e-3 * total, "a full-rank remainder: the residual is not trivially zero"
    assert error <= optimum * (1 + 1e-3)
    assert out.energy_kept == pytest.approx(1 - error / total, abs=1e-6)
    assert out.energy_kept <= 1 - optimum / total + 1e-9  # never optimistic


def test_randomized_truncation_is_deterministic_per_seed() -> None:
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(700, 900, generator=g) + torch.randn(700, 5, generator=g) @ torch.randn(5, 900, generator=g)
    first, kept = best_rank_k(delta, 20, seed=11)
    again, kept_again = best_rank_k(delta.clone(), 20, seed=11)
    other, _ = best_rank_k(delta, 20, seed=12)
    assert torch.equal(first.A, again.A) and torch.equal(first.B, again.B) and kept == kept_again
    assert not torch.equal(first.A, other.A)  # the seed reaches the random columns


def test_a_rank_deficient_update_comes_back_exactly(basis: str) -> None:
    """An update inside the start's row space (no trimming) is captured in the first sketch."""
    factors = low_rank_inputs((800, 640), 8, seed=5)
    delta = sum(f.B @ f.A for f in factors)
    start = torch.cat([f.A for f in factors]).T
    out, kept = best_rank_k(delta, 16, start=start, seed=0)
    assert kept == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(out.B @ out.A, delta, atol=1e-4 * float(delta.abs().max()))


@pytest.mark.parametrize("shape", [(1024, 1024), (512, 1792)])
def test_bracketed_kth_largest_is_exact_or_declines(shape: tuple[int, int]) -> None:
    """The GPU's sampled bracket (run here on the CPU) against a sort: exact whenever it answers; it
    answers on a low-rank delta with column structure, and declines (None) when the sample is fooled."""
    factors = low_rank_inputs(shape, 16, seed=shape[1])
    factors[0].A[:, ::2] *= 5  # every other column larger: a power-of-two stride would see one kind only
    flat = (factors[0].B @ factors[0].A).abs().flatten()
    flat[::3] = 0.0  # a third exact zeros, as a TIES merge leaves
    ordered = flat.sort(descending=True).values
    for fraction in (0.2, 0.5, 0.01, 0.6):
        k = int(fraction * flat.numel())
        assert kth_largest_bracketed(flat, k) == float(ordered[k - 1]), fraction
    fooled = torch.zeros_like(flat)
    fooled[1:] = torch.linspace(1.0, 2.0, flat.numel() - 1)
    fooled[:: kth_stride(flat.numel())] = 10.0  # every sampled entry is the largest value
    assert kth_largest_bracketed(fooled, flat.numel() // 2) is None  # kth_largest_magnitude then uses radix
    assert kth_largest_magnitude(fooled, flat.numel() // 2) == float(fooled.sort(descending=True).values[flat.numel() // 2 - 1])


def kth_stride(n: int) -> int:
    from soupkit.ops.sparsify import prime_at_least

    return prime_at_least(max(2, n // (1 << 16)))


def test_float64_kth_largest_matches_a_sort() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(200_000, generator=g, dtype=torch.float64).abs()
    x[:300] = 0.25  # exact ties
    x[300:310] = 0.25 + 1e-12  # distinct in float64, the same float32
    x[310:400] = 0.0
    ordered = x.sort(descending=True).values
    for k in (1, 5, 100, 300, 100_000, 199_999, 200_000):
        assert kth_largest_magnitude(x, k) == float(ordered[k - 1])
    near = int((x > 0.25).sum())  # the ranks around the entries that round alike in float32
    for k in range(near - 2, near + 320, 7):
        assert kth_largest_magnitude(x, k) == float(ordered[k - 1])


@pytest.mark.parametrize("method", ["cat", "ties"])
def test_a_plain_adapter_merge_imports_no_transformers(tmp_path: Path, method: str) -> None:
    """Start-up: an adapter merge needs torch and safetensors, not transformers, PEFT or matplotlib
    (about a second of imports; docs/benchmarks.md), nor full-model export or ``describe`` (imported
    only where used), and builds the parameter validator of its own method only (``defer_build``).
    A fresh interpreter, as a user's run."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(method, **({"density": 0.5} if method == "ties" else {}))))
    lazy = ("transformers", "peft", "matplotlib", "soupkit.export", "soupkit.describe")
    code = (
        "import sys\n"
        "from soupkit.cli import main\n"
        "from soupkit.methods import REGISTRY\n"
        f"main(['merge', {str(recipe)!r}, '-o', {str(tmp_path / 'out')!r}, '--quiet'], standalone_mode=False)\n"
        f"print('imported:', *[m for m in {lazy!r} if m in sys.modules])\n"
        "print('built:', *sorted({m.Params.__name__ for m in REGISTRY.values() if m.Params.__pydantic_complete__}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert done.stdout.splitlines()[-2] == "imported:"  # none of them
    assert done.stdout.splitlines()[-1] == f"built: {REGISTRY[method].Params.__name__}"


def test_della_magnitude_order_is_the_stable_argsort() -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(64, 300, generator=g)
    x[0, :50] = 0.0  # ties: ranked by position
    x[1, 10:40] = -2.0
    x[1, 40:60] = 2.0  # equal magnitudes, both signs
    x[2] = -0.0
    assert torch.equal(magnitude_order(x), x.abs().argsort(dim=-1, stable=True))
    assert torch.equal(magnitude_order(x.double()), x.double().abs().argsort(dim=-1, stable=True))


def test_masked_products_give_the_bits_of_where() -> None:
    """keep_where and elect_sign replace torch.where for speed: the same bits, +0.0 included."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 200, 300, generator=g)
    x[:, :20] = 0.0
    x[1, 20:40] = -0.0
    x[2, 40:60] = -x[0, 40:60]  # votes that cancel: a tie elects +1
    for d in x:
        mask = d.abs() >= 0.7
        same = torch.where(mask, d, torch.zeros_like(d))
        assert torch.equal(keep_where(mask, d).view(torch.int32), same.view(torch.int32))
        t = kth_largest_magnitude(d.abs(), d.numel() // 4)
        trimmed = torch.where(d.abs() >= t, d, torch.zeros_like(d))
        assert torch.equal(trim_to_density(d, 0.25).view(torch.int32), trimmed.view(torch.int32))
    for rule in ("total", "frequency"):
        votes = x.sum(0) if rule == "total" else x.sign().sum(0)
        assert torch.equal(elect_sign(x, rule).view(torch.int32), torch.where(votes >= 0, 1.0, -1.0).view(torch.int32))


@pytest.mark.parametrize("exists", [True, False])
def test_the_console_entry_exits_fast_keeping_output_and_exit_code(tmp_path: Path, exists: bool) -> None:
    """``soupkit.cli.exit.run`` skips the interpreter's teardown after a merge (issue 22): the exit code, what
    was printed to a block-buffered pipe and the atexit handlers must all survive it."""
    recipe = tmp_path / "r.yaml"
    if exists:
        recipe.write_text(yaml.safe_dump(tiny_recipe("cat")))
    code = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('atexit ran'))\n"
        f"sys.argv = ['soupkit', 'merge', {str(recipe)!r}, '-o', {str(tmp_path / 'out')!r}, '--quiet']\n"
        "from soupkit.cli.exit import run\n"
        "run()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout to a pipe: block-buffered
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == (0 if exists else 2), done.stderr
    assert done.stdout.splitlines()[-1] == "atexit ran"
    if exists:
        assert done.stdout.startswith("wrote ") and (tmp_path / "out" / "soupkit.lock.yaml").is_file()
    else:
        assert "error:" in done.stderr


def test_fast_exit_only_for_listed_commands() -> None:
    assert command_name(["--quiet", "merge", "r.yaml"]) == "merge"
    assert command_name(["--help"]) is None
    assert command_name(["fit-alpha", "r.yaml"]) not in FAST_EXIT_COMMANDS
