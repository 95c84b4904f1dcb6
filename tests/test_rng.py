"""The counter-based generator (soupkit.rng): bits against plain Python, statistics, order and chunk
independence, the lock record; CPU vs GPU identity under @pytest.mark.gpu."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from soupkit import rng
from soupkit.execute import RunOptions
from soupkit.merge import merge_recipe
from soupkit.methods import MergeContext
from soupkit.ops import della_keep_probability, drop_and_rescale
from soupkit.recipe import Recipe

from conftest import tiny_recipe

M32 = 0xFFFFFFFF


def plain_lowbias32(x: int) -> int:
    """Wellons' lowbias32 in plain Python integers (the published constants)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    x ^= x >> 16
    return x


def plain_uniform(i: int, key: tuple[int, int]) -> float:
    """The documented draw of element i, written plainly: mix(mix(lo ^ k0) ^ k1 ^ hi), top 24 bits."""
    hi, lo = divmod(i, 1 << 32)
    x = plain_lowbias32(plain_lowbias32(lo ^ key[0]) ^ key[1] ^ hi)
    return (x >> 8) / 2**24


def words_as_numbers(words: torch.Tensor) -> list[int]:
    """hash_words' int32 words as the unsigned 32-bit numbers they hold."""
    return (words.long() & M32).tolist()


def test_known_lowbias32_values() -> None:
    """Pins the hash itself: lowbias32(1) and lowbias32(0xdeadbeef) as plain arithmetic gives them."""
    assert plain_lowbias32(0) == 0
    x = torch.tensor([1, 0xDEADBEEF - (1 << 32), -1], dtype=torch.int32)  # 1, 0xDEADBEEF, 0xFFFFFFFF as int32
    rng._mix32(x, torch.empty_like(x))
    assert words_as_numbers(x) == [plain_lowbias32(1), plain_lowbias32(0xDEADBEEF), plain_lowbias32(M32)]


def test_words_and_draws_equal_plain_python_past_2_to_31_and_2_to_32() -> None:
    """The torch hash (the GPU's path, run here on the CPU): int32 words that wrap past 2**31, and the
    high word past 2**32 (a huge embedding's elements)."""
    key = rng.stream_key(7, "model.layers.3.mlp.up_proj", "dare", "math")
    for start, count in [(0, 15), ((1 << 31) - 4, 8), ((1 << 32) - 8, 8), (1 << 32, 8), (3 << 32, 7)]:
        words = rng.hash_words(start, count, key, torch.device("cpu"))
        assert words.dtype == torch.int32
        assert [(w >> 8) / 2**24 for w in words_as_numbers(words)] == [plain_uniform(start + i, key) for i in range(count)]
    drawn = torch.empty(8)
    rng.fill_uniform_torch(drawn[:4], (1 << 32) - 4, key)  # chunks never cross 2**32 (powers of two)
    rng.fill_uniform_torch(drawn[4:], 1 << 32, key)
    assert drawn.tolist() == [plain_uniform((1 << 32) - 4 + i, key) for i in range(8)]


def test_cpu_draws_equal_plain_python() -> None:
    key = rng.stream_key(7, "model.layers.3.mlp.up_proj", "dare", "math")
    u = rng.counter_uniform((3, 5), key, "cpu")
    assert u.dtype == torch.float32
    assert u.flatten().tolist() == [plain_uniform(i, key) for i in range(15)]


def test_numpy_words_equal_the_torch_words() -> None:
    """The CPU's uint32 numpy hash (counter_uniform's CPU path) and the torch one (the GPU's) give the
    same words, past 2**32 too; and the same draws over several chunks."""
    import numpy as np

    key = rng.stream_key(5, "model.layers.1.mlp.down_proj", "della", "code")
    for start, count in [(0, 5000), ((1 << 31) - 100, 300), ((1 << 32) - 8, 8), (1 << 32, 4096), (3 << 32, 7)]:
        words, tmp = np.empty(count, dtype=np.uint32), np.empty(count, dtype=np.uint32)
        rng.hash_words_numpy(start, count, key, words, tmp)
        assert words.astype(np.int64).tolist() == words_as_numbers(rng.hash_words(start, count, key, torch.device("cpu")))
    torch_drawn = torch.empty(70_001)
    rng.fill_uniform_torch(torch_drawn, 0, key)
    assert torch.equal(torch_drawn, rng.counter_uniform((70_001,), key, "cpu"))


def test_chunking_does_not_change_draws(monkeypatch: pytest.MonkeyPatch) -> None:
    key = rng.stream_key(0, "m", "dare", "a")
    whole = rng.counter_uniform((301, 257), key, "cpu")
    monkeypatch.setitem(rng.CHUNK, "cpu", 1000)  # 77 chunks, the last one partial
    assert torch.equal(rng.counter_uniform((301, 257), key, "cpu"), whole)


def test_uniformity_ks_and_grid() -> None:
    """1M draws: on the 2**-24 grid in [0, 1); Kolmogorov-Smirnov distance below the 0.1% critical
    value 1.95/sqrt(n); mean and variance within 5 standard errors of 1/2 and 1/12."""
    n = 1 << 20
    u = rng.counter_uniform((n,), rng.stream_key(1, "layer", "dare", "x"), "cpu").double()
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert torch.equal(u * 2**24, (u * 2**24).round())
    s = u.sort().values
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = max(float((grid - s).max()), float((s - (grid - 1.0 / n)).max()))
    assert ks < 1.95 / math.sqrt(n), ks
    assert abs(float(u.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert abs(float(u.var()) - 1 / 12) < 5 * math.sqrt(1 / 180 / n)  # Var of (u - 1/2)^2 is 1/180


def test_streams_and_neighbours_are_uncorrelated() -> None:
    """Correlation between two adapters' streams, and between neighbouring elements (lag 1 along a row
    and lag d_in down a column), all within 5/sqrt(n) of zero; the keep rates of two masks are
    independent (joint keep rate = product within 5 standard errors)."""
    shape = (1024, 1024)
    n = shape[0] * shape[1]
    a = rng.counter_uniform(shape, rng.stream_key(0, "m", "dare", "math"), "cpu").double()
    b = rng.counter_uniform(shape, rng.stream_key(0, "m", "dare", "code"), "cpu").double()
    pairs = [(a, b), (a[:, 1:], a[:, :-1]), (a[1:], a[:-1])]
    for x, y in pairs:
        corr = float(torch.corrcoef(torch.stack([x.flatten(), y.flatten()]))[0, 1])
        assert abs(corr) < 5 / math.sqrt(x.numel()), corr
    p = 0.3
    joint = float(((a < p) & (b < p)).double().mean())
    assert abs(joint - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / n)


def test_masks_follow_the_adapter_not_its_position() -> None:
    module = "model.layers.0.self_attn.q_proj"
    forward = MergeContext(module, None, 5, sources=("math", "code"))
    backward = MergeContext(module, None, 5, sources=("code", "math"))
    for j, name in enumerate(("math", "code")):
        assert torch.equal(
            forward.uniform((6, 9), torch.device("cpu"), "dare", j), backward.uniform((6, 9), torch.device("cpu"), "dare", 1 - j)
        )
        assert name == backward.source(1 - j)
    assert not torch.equal(
        forward.uniform((6, 9), torch.device("cpu"), "dare", 0), forward.uniform((6, 9), torch.device("cpu"), "dare", 1)
    )
    other_module = MergeContext("model.layers.1.self_attn.q_proj", None, 5, sources=("math", "code"))
    assert not torch.equal(
        forward.uniform((6, 9), torch.device("cpu"), "dare", 0), other_module.uniform((6, 9), torch.device("cpu"), "dare", 0)
    )


def test_lock_records_the_generator(tmp_path: Path) -> None:
    recipe = Recipe.from_dict(tiny_recipe("dare_ties", (0.7, 0.5), density=0.5), tmp_path)
    merge_recipe(recipe, tmp_path / "out", RunOptions(progress=False))
    lock = yaml.safe_load((tmp_path / "out" / "soupkit.lock.yaml").read_text())
    assert lock["soupkit_lock"]["versions"]["rng"] == "counter-hash-v1"


@pytest.mark.parametrize("locked", ["torch-philox-v0", None])
def test_rerunning_a_lock_of_another_generator_warns(tmp_path: Path, locked: str | None) -> None:
    """`soupkit merge LOCK` says when the lock's masks came from another generator (or an unrecorded one)."""
    from click.testing import CliRunner

    from soupkit.cli import main

    recipe = Recipe.from_dict(tiny_recipe("dare_ties", (0.7, 0.5), density=0.5), tmp_path)
    merge_recipe(recipe, tmp_path / "out", RunOptions(progress=False))
    lock_file = tmp_path / "out" / "soupkit.lock.yaml"
    same = CliRunner().invoke(main, ["merge", str(lock_file), "-o", str(tmp_path / "again"), "--quiet"])
    assert same.exit_code == 0 and "warning" not in same.output, same.output
    text = lock_file.read_text()
    edited = text.replace("rng: counter-hash-v1", f"rng: {locked}" if locked else "")
    assert edited != text
    old = tmp_path / "old" / "soupkit.lock.yaml"  # beside out/: the lock's relative input paths still resolve
    old.parent.mkdir()
    old.write_text(edited)
    rerun = CliRunner().invoke(main, ["merge", str(old), "-o", str(tmp_path / "rerun"), "--quiet"])
    assert rerun.exit_code == 0, rerun.output
    warning = [line for line in rerun.output.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "counter-hash-v1" in warning[0] and "bit for bit" in warning[0]
    assert (locked or "no generator recorded") in warning[0]


# --- GPU: the same bits on the device, made there --------------------------------------------------


@pytest.mark.gpu
def test_gpu_draws_equal_cpu_bit_for_bit() -> None:
    for shape in [(7,), (1000, 333), (4096, 4096 + 3), (3, 1 << 26)]:  # the last spans several GPU chunks
        key = rng.stream_key(11, "model.layers.9.mlp.down_proj", "dare", f"adapter{len(shape)}")
        cpu = rng.counter_uniform(shape, key, "cpu")
        gpu = rng.counter_uniform(shape, key, "cuda")
        assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu), shape


@pytest.mark.gpu
def test_gpu_dare_and_della_masks_equal_cpu() -> None:
    """Given the same delta, DARE and DELLA keep exactly the same entries on both devices."""
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(512, 384, generator=g)
    delta[:, ::7] = 0.25  # ties in |.|: DELLA's ranks must break them the same way on both devices
    ctx = MergeContext("model.layers.2.self_attn.v_proj", None, 3, sources=("math", "code"))
    for salt, keep_cpu in (("dare", 0.3), ("della", della_keep_probability(delta, 0.4, 0.1))):
        keep_gpu = keep_cpu.cuda() if isinstance(keep_cpu, torch.Tensor) else keep_cpu
        if isinstance(keep_cpu, torch.Tensor):
            assert torch.equal(della_keep_probability(delta.cuda(), 0.4, 0.1).cpu(), keep_cpu)
        cpu = drop_and_rescale(delta, keep_cpu, ctx.uniform(delta.shape, torch.device("cpu"), salt, 1))
        gpu = drop_and_rescale(delta.cuda(), keep_gpu, ctx.uniform(delta.shape, torch.device("cuda"), salt, 1))
        assert torch.equal(gpu.cpu() != 0, cpu != 0), salt
        assert torch.allclose(gpu.cpu(), cpu, rtol=1e-6, atol=0), salt
