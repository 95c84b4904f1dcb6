"""Full-model export checked against PEFT's merge_and_unload, on values, plus the streaming file layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from soupkit.execute import RunOptions
from soupkit.io.sharded import parse_size, plan_shards, tensor_ranges
from soupkit.io.tensor_index import TensorIndex
from soupkit.merge import merge_recipe
from soupkit.methods import REGISTRY
from soupkit.recipe import Recipe

from conftest import TINY, reference_deltas, tiny_recipe, write_recipe

QUIET = RunOptions(progress=False)
IDS = torch.randint(4, 100, (2, 12), generator=torch.Generator().manual_seed(0))


def export(tmp_path: Path, recipe: dict, name: str = "model", options: RunOptions = QUIET) -> Path:
    out = tmp_path / name
    merge_recipe(Recipe.from_dict({**recipe, "output": "model"}, tmp_path), out, options)
    return out


def load(path: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


def one_adapter(base: Path, lora: Path, weight: float) -> dict:
    return {"base_model": str(base), "adapters": [{"name": "a", "path": str(lora), "weight": weight}], "merge": {"method": "cat"}}


def peft_merged(
    base: Path, adapters: dict[str, Path], weights: list[float], dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """PEFT's own path: load base + adapters, add_weighted_adapter(cat), merge_and_unload."""
    from peft import PeftModel

    names = list(adapters)
    model = PeftModel.from_pretrained(load(base, dtype), adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    model.add_weighted_adapter(names, weights, "soup", combination_type="cat")
    model.set_adapter("soup")
    return model.merge_and_unload(adapter_names=["soup"]).eval()


def raw_tensors(directory: Path) -> dict[str, tuple[str, bytes]]:
    """key -> (dtype tag, raw bytes) of every tensor of a model directory (one file or shards)."""
    index = TensorIndex.from_dir(directory, "model")
    assert index is not None
    out = {}
    for key, where in tensor_ranges(index.files).items():
        with open(where.file, "rb") as fh:
            fh.seek(where.offset)
            out[key] = (index.infos[key].dtype, fh.read(where.nbytes))
    return out


def test_cat_float32_equals_peft_merge_and_unload(tmp_path: Path) -> None:
    weights = [0.7, -0.4]
    out = export(tmp_path, tiny_recipe("cat", tuple(weights)))
    adapters = {n: TINY / "adapters" / n for n in ("math", "code")}
    reference = peft_merged(TINY / "base", adapters, weights)
    got = load(out)
    torch.testing.assert_close(logits(got), logits(reference), rtol=0, atol=1e-5)
    want = reference.state_dict()
    for key, value in got.state_dict().items():
        torch.testing.assert_close(value, want[key], rtol=1e-6, atol=1e-6)
    assert (out / "tokenizer.json").read_bytes() == (TINY / "base" / "tokenizer.json").read_bytes()
    assert (out / "generation_config.json").is_file() and (out / "soupkit.lock.yaml").is_file()


DENSE = next((m for m in ("ties", "dare_ties", "magnitude_prune", "linear") if m in REGISTRY), "linear")


def test_dense_method_export_equals_peft_folding_its_adapter(tmp_path: Path) -> None:
    """The export folds exactly the adapter the same recipe writes: PEFT merging that adapter agrees."""
    from peft import PeftModel

    recipe = tiny_recipe(DENSE, (0.8, 0.5), rank=6)
    out = export(tmp_path, recipe)
    adapter = tmp_path / "adapter"
    merge_recipe(Recipe.from_dict(recipe, tmp_path), adapter, QUIET)  # float32 factors
    reference = PeftModel.from_pretrained(load(TINY / "base"), adapter).merge_and_unload()
    torch.testing.assert_close(logits(load(out)), logits(reference), rtol=0, atol=1e-5)
    base = load(TINY / "base").state_dict()
    changed = [k for k, v in load(out).state_dict().items() if not torch.equal(v, base[k])]
    assert len(changed) == 14  # the 14 targeted projections of the two layers, nothing else


@pytest.fixture(scope="module")
def bf16_fixture(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from soupkit.testing import make_base, make_lora

    root = tmp_path_factory.mktemp("bf16")
    base = make_base(root / "base", seed=3, dtype=torch.bfloat16)
    return base, make_lora(base, root / "lora", seed=4, r=4, lora_alpha=8, b_scale=4.0)


def test_bf16_base_within_bf16_rounding(tmp_path: Path, bf16_fixture: tuple[Path, Path]) -> None:
    """Ours is W + delta rounded once to bf16; PEFT rounds delta to bf16, then the sum: both within bf16 rounding."""
    base, lora = bf16_fixture
    recipe = one_adapter(base, lora, 1.0)
    got = load(export(tmp_path, recipe), torch.bfloat16)
    reference = peft_merged(base, {"a": lora}, [1.0], torch.bfloat16)
    base_weights, deltas, want = load(base, torch.bfloat16).state_dict(), reference_deltas(lora), reference.state_dict()
    u = 2.0**-8  # bf16 unit roundoff (8 significant bits)
    for key, value in got.state_dict().items():
        assert value.dtype == torch.bfloat16
        w = base_weights[key].double()
        delta = deltas.get(key.removesuffix(".weight"), torch.zeros_like(w))
        exact = w + delta
        f32 = 2.0**-20 * float(delta.abs().max())  # float32 error of B @ A (cancelling terms of that size)
        assert bool(((value.double() - exact).abs() <= u * exact.abs() + f32).all()), key  # one rounding
        peft_bound = 2 * u * (w.abs() + delta.abs()) + f32  # PEFT: two roundings
        assert bool(((value.double() - want[key].double()).abs() <= peft_bound).all()), key
        if key not in {f"{p}.weight" for p in deltas}:
            assert torch.equal(value, base_weights[key])
    torch.testing.assert_close(logits(got), logits(reference), rtol=0.02, atol=0.05)


def test_multi_shard_base_round_trips_and_keeps_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from soupkit.testing import make_base, make_lora

    monkeypatch.setattr("soupkit.export.BLOCK_ELEMENTS", 300)  # many row blocks per tensor: the buffer ring is reused

    sharded = make_base(tmp_path / "sharded", seed=0, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    lora = make_lora(sharded, tmp_path / "lora", seed=1, target_modules=["q_proj", "down_proj"])
    recipe = one_adapter(sharded, lora, 0.5)
    out = export(tmp_path, recipe, "out", RunOptions(progress=False, shard_bytes=60_000))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    got, base = raw_tensors(out), raw_tensors(sharded)
    assert set(got) == set(base) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(len(raw) for _, raw in got.values())
    targets = {k for k in base if k.endswith(("q_proj.weight", "down_proj.weight"))}
    assert all(got[k] == base[k] for k in set(base) - targets)  # untouched: bit-identical
    assert all(got[k][0] == base[k][0] and got[k][1] != base[k][1] for k in targets)
    reference = peft_merged(sharded, {"a": lora}, [0.5])
    torch.testing.assert_close(logits(load(out)), logits(reference), rtol=0, atol=1e-5)


def test_gpt2_fan_in_fan_out_equals_peft(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import GPT2Config

    from soupkit.testing import make_base, make_lora

    monkeypatch.setattr("soupkit.export.BLOCK_ELEMENTS", 200)  # transposed rows split over several blocks

    config = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=1, eos_token_id=2)
    base = make_base(tmp_path / "gpt2", seed=5, config=config)
    lora = make_lora(base, tmp_path / "lora", seed=6, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    recipe = one_adapter(base, lora, 0.9)
    out = export(tmp_path, recipe)
    reference = peft_merged(base, {"a": lora}, [0.9])
    torch.testing.assert_close(logits(load(out)), logits(reference), rtol=0, atol=1e-5)
    want = reference.state_dict()
    for key, value in load(out).state_dict().items():
        torch.testing.assert_close(value, want[key], rtol=1e-6, atol=1e-6)


def test_tied_embedding_target_is_untied(tmp_path: Path) -> None:
    """A LoRA on a tied input embedding changes the input side only: the export unties the head."""
    from peft import PeftModel

    from soupkit.testing import make_base, make_lora, tiny_llama_config

    base = make_base(tmp_path / "tied", seed=7, config=tiny_llama_config(tie_word_embeddings=True))
    assert "lm_head.weight" not in raw_tensors(base)
    lora = make_lora(base, tmp_path / "lora", seed=8, target_modules=["embed_tokens", "q_proj"])
    recipe = one_adapter(base, lora, 1.0)
    out = export(tmp_path, recipe)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    got, base_raw = raw_tensors(out), raw_tensors(base)
    assert got["lm_head.weight"] == base_raw["model.embed_tokens.weight"]
    assert got["model.embed_tokens.weight"] != base_raw["model.embed_tokens.weight"]
    with_adapter = PeftModel.from_pretrained(load(base), lora).eval()  # unmerged: the ground truth
    torch.testing.assert_close(logits(load(out)), logits(with_adapter), rtol=0, atol=1e-5)


def test_quantised_target_weight_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from soupkit.errors import SoupkitError

    base = tmp_path / "int8"
    base.mkdir()
    tensors = load_file(TINY / "base" / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    tensors[key] = tensors[key].to(torch.int8)
    save_file(tensors, base / "model.safetensors", {"format": "pt"})
    (base / "config.json").write_bytes((TINY / "base" / "config.json").read_bytes())
    recipe = tiny_recipe("cat")
    recipe["base_model"] = str(base)
    with pytest.raises(SoupkitError, match=f"{key}: expected a floating-point weight"):
        export(tmp_path, recipe)
    assert not (tmp_path / "model").exists()


def test_plan_shards_budget_and_names() -> None:
    specs = {f"t{i}": ("BF16", (10, 10)) for i in range(5)}  # 200 bytes each
    shards = plan_shards(specs, 450)
    assert [name for name, _ in shards] == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    assert [list(group) for _, group in shards] == [["t0", "t1"], ["t2", "t3"], ["t4"]]
    assert plan_shards({"big": ("F32", (1000,))}, 10) == [("model.safetensors", {"big": ("F32", (1000,))})]
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("1.5 MB") == 1_500_000


def test_cli_model_export_and_bad_shard_size(tmp_path: Path) -> None:
    from soupkit.cli import main

    recipe = write_recipe(tmp_path, tiny_recipe("cat"))
    runner = CliRunner()
    model = ["--output-type", "model"]
    bad = runner.invoke(main, ["merge", str(recipe), "-o", str(tmp_path / "bad"), *model, "--shard-size", "5XB"])
    assert bad.exit_code == 2 and "--shard-size" in bad.output and not (tmp_path / "bad").exists()
    args = ["merge", str(recipe), "-o", str(tmp_path / "m"), "--output-type", "model", "--shard-size", "100KB", "--quiet"]
    ok = runner.invoke(main, args)
    assert ok.exit_code == 0, ok.output
    assert len(list((tmp_path / "m").glob("model-*-of-*.safetensors"))) > 1
    with safe_open(str(next((tmp_path / "m").glob("model-00001-*"))), "pt") as fh:
        assert fh.metadata() == {"format": "pt"}


@pytest.mark.gpu
def test_cuda_export_matches_cpu(tmp_path: Path) -> None:
    recipe = tiny_recipe("cat", (0.6, 0.3))
    cpu = raw_tensors(export(tmp_path, recipe, "cpu"))
    gpu = raw_tensors(export(tmp_path, recipe, "gpu", RunOptions(device="cuda", progress=False)))
    for key, (_tag, data) in cpu.items():
        a = torch.frombuffer(bytearray(data), dtype=torch.float32)
        b = torch.frombuffer(bytearray(gpu[key][1]), dtype=torch.float32)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
