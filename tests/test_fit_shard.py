"""fit-alpha sharded with FSDP2 on the CPU (gloo): what is trainable, sharded, loaded and saved.

FSDP2 (torch.distributed.fsdp.fully_shard) runs on the CPU with gloo in torch 2.13, so the sharded
path is tested end to end: 2 processes (torchrun) against 1 unsharded process, same global batch.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from click.testing import CliRunner

from soupkit.cli import main
from soupkit.fit.model import build_fit_model
from soupkit.fit.shard import build_sharded_fit_model, checkpoint_key, enable_checkpointing
from soupkit.recipe import Recipe

from conftest import TINY, tiny_recipe, write_recipe

CPU = torch.device("cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_process_group() -> object:
    """A world of one gloo process, so fully_shard can run inside the test process."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def random_text(n: int, seed: int) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    chars = "abcdefghij +=0123456789"
    return [
        "".join(chars[i] for i in torch.randint(0, len(chars), (int(length),), generator=gen).tolist())
        for length in torch.randint(12, 40, (n,), generator=gen)
    ]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def test_checkpoint_key_maps_catlinear_names_back_to_the_base() -> None:
    targets = {"model.layers.0.self_attn.q_proj"}
    assert (
        checkpoint_key("base.model.layers.0.self_attn.q_proj.base_layer.weight", targets)
        == "model.layers.0.self_attn.q_proj.weight"
    )
    assert checkpoint_key("base.model.layers.0.self_attn.o_proj.weight", targets) == "model.layers.0.self_attn.o_proj.weight"
    assert checkpoint_key("base.lm_head.weight", targets) == "lm_head.weight"


def test_sharded_build_is_the_loaded_model_with_only_the_logits_trainable(one_process_group: object) -> None:
    """Meta construction + per-rank row loading gives the same adapted logits as from_pretrained;
    every weight and factor is an FSDP shard (DTensor) under a block unit, the logits alone are plain."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    recipe = Recipe.from_dict(tiny_recipe("cat"), TINY)
    sharded, recipe_weights = build_sharded_fit_model(recipe, "module", "free", CPU, torch.float32, checkpointing=False)
    plain, plain_weights = build_fit_model(recipe, "module", "free", CPU, torch.float32)
    torch.testing.assert_close(recipe_weights, plain_weights, rtol=0, atol=0)
    trainable = [n for n, p in sharded.named_parameters() if p.requires_grad]
    assert trainable == ["logits"] and not isinstance(sharded.logits, DTensor)
    frozen = {n: p for n, p in sharded.named_parameters() if n != "logits"}
    assert all(isinstance(p, DTensor) for p in frozen.values())
    factor_names = [n for n in frozen if n.endswith(("factors.A", "factors.B"))]
    assert len(factor_names) == 2 * len(sharded.targets) and all(".layers." in n for n in factor_names)
    blocks = sharded.base.model.layers
    assert all(isinstance(b, FSDPModule) for b in blocks) and isinstance(sharded, FSDPModule)
    weights = torch.rand(len(plain.targets), 2, generator=torch.Generator().manual_seed(0)) * 2 - 0.5
    ids = torch.randint(4, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    sharded.fixed, plain.fixed = weights, weights
    with torch.no_grad():
        got, want = sharded.lm_logits(ids), plain.lm_logits(ids)
        plain.fixed = torch.zeros_like(weights)
        unadapted = plain.lm_logits(ids)
    assert float((want - unadapted).abs().max()) > 1e-2  # the adapters matter: the comparison has teeth
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_checkpointing_recomputes_blocks_and_keeps_the_gradient() -> None:
    torch.set_num_threads(1)
    recipe = Recipe.from_dict(tiny_recipe("cat"), TINY)
    ids = torch.randint(4, 100, (2, 12), generator=torch.Generator().manual_seed(2))
    grads, calls = [], []
    for checkpointing in (False, True):
        model, _ = build_fit_model(recipe, "module", "free", CPU, torch.float32)
        if checkpointing:
            assert enable_checkpointing(model.base) == 2
        seen: list[int] = []
        model.base.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *_, seen=seen: seen.append(1))
        loss, count = model(ids, torch.ones_like(ids), ids)
        (loss / count).backward()
        grads.append(model.logits.grad)
        calls.append(len(seen))
    assert calls == [1, 2]  # the checkpointed block ran again in backward
    assert float(grads[0].abs().max()) > 1e-4
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-9)


def test_two_sharded_processes_give_the_weights_of_one_unsharded(tmp_path: Path) -> None:
    """FSDP2 on gloo, 2 processes x batch 4, activation checkpointing == 1 process x batch 4 x accum 2."""
    texts = random_text(28, seed=3)
    train, heldout = write_jsonl(tmp_path / "calib.jsonl", texts[:20]), write_jsonl(tmp_path / "heldout.jsonl", texts[20:])
    recipe = write_recipe(tmp_path, tiny_recipe("cat"))
    args = [
        "fit-alpha",
        str(recipe),
        "--data",
        str(train),
        "--eval-data",
        str(heldout),
        "--steps",
        "4",
        "--batch-size",
        "4",
        "--lr",
        "0.1",
        "--constraint",
        "free",
        "--eval-every",
        "4",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "soupkit",
    ]
    done = subprocess.run(
        [*launch, *args, "--shard", "--checkpointing", "-o", str(tmp_path / "two.yaml")],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1  # rank 0 alone reports (and writes)
    result = CliRunner().invoke(main, [*args, "--grad-accum", "2", "-o", str(tmp_path / "one.yaml")])
    assert result.exit_code == 0, result.output
    one, two = (json.loads((tmp_path / f"{n}-report" / "fit_report.json").read_text()) for n in ("one", "two"))
    assert (one["num_processes"], two["num_processes"]) == (1, 2)
    assert (two["options"]["shard"], two["options"]["checkpointing"], one["options"]["shard"]) == (True, True, False)
    assert max(abs(w - 0.5) for m in one["weights"].values() for w in m.values() if len(m) == 2) > 1e-2  # the weights moved
    for path, w in one["weights"].items():
        for adapter, value in w.items():
            assert two["weights"][path][adapter] == pytest.approx(value, abs=1e-6)


def test_shard_without_a_launcher_is_a_one_line_error(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "calib.jsonl", random_text(4, seed=0))
    recipe = write_recipe(tmp_path, tiny_recipe("cat"))
    out = tmp_path / "x.yaml"
    result = CliRunner().invoke(main, ["fit-alpha", str(recipe), "--data", str(train), "--shard", "-o", str(out)])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "accelerate launch" in result.output, result.output
    assert not out.exists() and not (tmp_path / "x-report").exists()


HELDOUT_SIZES = (1, 3, 9, 14)  # 2 processes x batch 4: rank 1 has 0, 1, 4 and 7 examples (1 and 9: fewer batches)


def test_sharded_heldout_loss_of_any_size_finishes_and_equals_the_unsharded_loss(tmp_path: Path) -> None:
    """FSDP forwards are collectives: a process with fewer held-out batches must still run as many forwards.

    One launch evaluates every size in turn (a hang at any size stops the rest), under a timeout."""
    from shard_eval_child import fixed_weights

    from soupkit.fit.data import load_examples
    from soupkit.fit.run import load_tokenizer
    from soupkit.fit.train import evaluate
    from soupkit.recipe import load_recipe

    data = write_jsonl(tmp_path / "heldout.jsonl", random_text(max(HELDOUT_SIZES), seed=5))
    recipe_path = write_recipe(tmp_path, tiny_recipe("cat"))
    child = Path(__file__).with_name("shard_eval_child.py")
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    # A new session, so that a hang kills torchrun's workers too, not just torchrun.
    with subprocess.Popen(
        [*launch, str(child), str(recipe_path), str(data), "4", *map(str, HELDOUT_SIZES)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as done:
        try:
            stdout, stderr = done.communicate(timeout=150)
        except subprocess.TimeoutExpired:
            os.killpg(done.pid, signal.SIGKILL)
            stdout, _ = done.communicate()
            pytest.fail(f"sharded evaluation hung; sizes finished before the hang: {stdout.splitlines()}")
    assert done.returncode == 0, stderr[-3000:]
    sharded = {row["size"]: row["loss"] for row in map(json.loads, stdout.splitlines())}
    assert sorted(sharded) == sorted(HELDOUT_SIZES), stdout

    torch.set_num_threads(1)
    recipe = load_recipe(recipe_path)
    tokenizer, pad_id = load_tokenizer(recipe)
    examples = load_examples(str(data), tokenizer, 64, "--data")
    plain, _ = build_fit_model(recipe, "module", "free", CPU, torch.float32)
    plain.fixed = fixed_weights(len(plain.targets), plain.n_adapters)
    one_process = SimpleNamespace(process_index=0, num_processes=1, device=CPU, reduce=lambda t, reduction: t)
    for size in HELDOUT_SIZES:
        want = evaluate(one_process, plain, examples[:size], 4, pad_id)
        assert sharded[size] == pytest.approx(want, rel=1e-5), size
