"""fit-alpha on the tiny example: gradients, PEFT equivalence, fitting direction, merge round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from soupkit.cli import main
from soupkit.fit.data import IGNORE, load_examples, tokenize_record
from soupkit.fit.lorahub import cma_es
from soupkit.fit.model import build_fit_model
from soupkit.recipe import Recipe, load_recipe

from conftest import TINY, tiny_recipe, write_recipe

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors run faster on one thread


def fit_model(constraint: str = "free", granularity: str = "module", dtype: torch.dtype = torch.float32):
    recipe = Recipe.from_dict(tiny_recipe("cat"), TINY)
    return build_fit_model(recipe, granularity, constraint, CPU, dtype)


def peft_both_adapters(weights: torch.Tensor, targets: list) -> torch.nn.Module:
    """PEFT with math and code both active, each module's scaling multiplied by that module's weight."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(TINY / "base", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, TINY / "adapters" / "math", adapter_name="math")
    model.load_adapter(TINY / "adapters" / "code", adapter_name="code")
    model.base_model.set_adapter(["math", "code"])
    row = {t.path: m for m, t in enumerate(targets)}
    for name, module in model.named_modules():
        path = name.removeprefix("base_model.model.")
        if path in row and isinstance(getattr(module, "scaling", None), dict):
            for a, adapter in enumerate(["math", "code"]):
                if adapter in module.scaling:
                    module.scaling[adapter] *= float(weights[row[path], a])
    return model.eval()


def sample_text(n: int, length: int, temperature: float, seed: int) -> list[str]:
    """Text sampled from the base with the math adapter alone (PEFT, not soupkit), one char per token."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TINY / "base")
    base = AutoModelForCausalLM.from_pretrained(TINY / "base", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, TINY / "adapters" / "math").eval()
    torch.manual_seed(seed)
    start = torch.full((n, 1), tokenizer.bos_token_id)
    with torch.no_grad():  # special tokens suppressed: printable characters only, so the text round-trips
        ids = model.generate(
            start,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            max_new_tokens=length,
            min_new_tokens=length,
            suppress_tokens=[0, 1, 2, 3],
        )
    return tokenizer.batch_decode(ids[:, 1:], skip_special_tokens=True)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("constraint", ["free", "softmax"])
def test_gradient_matches_finite_differences(constraint: str) -> None:
    model, _ = fit_model(constraint, dtype=torch.float64)
    model.double()
    with torch.no_grad():
        model.logits.copy_(torch.randn(model.logits.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    ids = torch.randint(4, 100, (2, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)

    def loss() -> torch.Tensor:
        total, count = model(ids, mask, ids)
        return total / count

    loss().backward()
    grad = model.logits.grad.clone()
    # Five-point central differences with a large step: transformers' RMSNorm computes in float32 even
    # in a float64 model, so the loss carries float32 rounding (~1e-7) and a tiny step would drown in it.
    eps, checked = 1e-2, 0
    for m, target in enumerate(model.targets):
        for a in target.adapters:
            values = []
            with torch.no_grad():
                for k in (2, 1, -1, -2):
                    model.logits[m, a] += k * eps
                    values.append(float(loss()))
                    model.logits[m, a] -= k * eps
            numeric = (-values[0] + 8 * values[1] - 8 * values[2] + values[3]) / (12 * eps)
            assert float(grad[m, a]) == pytest.approx(numeric, rel=1e-3, abs=1e-6)
            checked += 1
    assert checked == sum(len(t.adapters) for t in model.targets) > 14  # every weight of every module
    assert float(grad.abs().max()) > 1e-4  # the gradients compared are not all zero


def test_concatenated_forward_equals_peft_with_both_adapters_scaled() -> None:
    model, _ = fit_model("free")
    weights = torch.rand(len(model.targets), 2, generator=torch.Generator().manual_seed(3)) * 2 - 0.5
    model.fixed = weights
    ids = torch.randint(4, 100, (3, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = model.lm_logits(ids)
        want = peft_both_adapters(weights, model.targets)(ids).logits
        base = peft_both_adapters(torch.zeros_like(weights), model.targets)(ids).logits
    assert float((want - base).abs().max()) > 1e-2  # the adapters change the logits: the comparison has teeth
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("constraint", ["free", "softmax"])
def test_gpu_loss_and_gradient_equal_cpu(constraint: str) -> None:
    """The fused float32 path on the GPU: the CPU's loss and logit gradients (float32 rounding apart)."""
    recipe = Recipe.from_dict(tiny_recipe("cat"), TINY)
    ids = torch.randint(4, 100, (3, 24), generator=torch.Generator().manual_seed(6))
    models = {d: build_fit_model(recipe, "module", constraint, torch.device(d), torch.float32)[0] for d in ("cpu", "cuda")}
    init = torch.randn(models["cpu"].logits.shape, generator=torch.Generator().manual_seed(7))
    results = {}
    for device, model in models.items():
        with torch.no_grad():
            model.logits.copy_(init.to(model.logits.device))
        total, count = model(ids.to(device), torch.ones_like(ids).to(device), ids.to(device))
        loss = total / count
        loss.backward()
        assert model.logits.device.type == device
        results[device] = (loss.detach().item(), model.logits.grad.detach().cpu())
    assert results["cuda"][0] == pytest.approx(results["cpu"][0], rel=1e-5)
    assert float(results["cpu"][1].abs().max()) > 1e-4  # gradients with something to compare
    torch.testing.assert_close(results["cuda"][1], results["cpu"][1], rtol=1e-3, atol=1e-6)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One CLI fit on text generated by base + math alone (math is adapter A)."""
    tmp = tmp_path_factory.mktemp("fit")
    texts = sample_text(72, 40, temperature=0.3, seed=0)
    train = write_jsonl(tmp / "calib.jsonl", [{"text": t} for t in texts[:56]])
    heldout = write_jsonl(tmp / "heldout.jsonl", [{"text": t} for t in texts[56:]])
    recipe = write_recipe(tmp, tiny_recipe("cat"))
    out = tmp / "fitted" / "cat-fitted.yaml"
    args = ["fit-alpha", str(recipe), "--data", str(train), "--eval-data", str(heldout), "-o", str(out)]
    result = CliRunner().invoke(
        main, [*args, "--steps", "30", "--batch-size", "8", "--lr", "0.1", "--eval-every", "5", "--patience", "10"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp / "fitted" / "cat-fitted-report" / "fit_report.json").read_text())
    return {"tmp": tmp, "out": out, "report": report, "recipe": recipe}


def test_fit_moves_weights_toward_the_generating_adapter_and_lowers_heldout_loss(fitted: dict) -> None:
    report = fitted["report"]
    shared = [w for w in report["weights"].values() if len(w) == 2]
    assert len(shared) == 8  # q, v, up, down in 2 layers carry both adapters
    math_weight = np.mean([w["math"] for w in shared])
    assert math_weight > 0.65, f"mean math weight {math_weight:.3f} did not move from 0.5 toward math"
    assert all(w["math"] + w["code"] == pytest.approx(1.0, abs=1e-6) for w in shared)  # softmax: convex per module
    heldout = report["heldout_loss"]
    assert heldout["fitted"] < heldout["uniform"] - 0.01
    for name in ("fit_report.json", "weights.png", "loss.png"):
        assert (fitted["out"].parent / "cat-fitted-report" / name).stat().st_size > 0


@pytest.mark.gpu
def test_gpu_bf16_fit_moves_toward_the_generating_adapter(fitted: dict, tmp_path: Path) -> None:
    """`--device cuda` (bf16 by default there) on the same data as the CPU fit: the same conclusion."""
    tmp = fitted["tmp"]
    out = tmp_path / "gpu-fitted.yaml"
    args = ["fit-alpha", str(fitted["recipe"]), "--data", str(tmp / "calib.jsonl"), "--eval-data", str(tmp / "heldout.jsonl")]
    args += ["-o", str(out), "--steps", "30", "--batch-size", "8", "--lr", "0.1", "--eval-every", "5", "--patience", "10"]
    result = CliRunner().invoke(main, [*args, "--device", "cuda"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "gpu-fitted-report" / "fit_report.json").read_text())
    assert report["device"] != "cpu"
    shared = [w for w in report["weights"].values() if len(w) == 2]
    assert np.mean([w["math"] for w in shared]) > 0.65
    assert report["heldout_loss"]["fitted"] < report["heldout_loss"]["uniform"] - 0.01


def test_fitted_recipe_merges_to_the_fitted_models_logits(fitted: dict) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from soupkit.execute import RunOptions
    from soupkit.merge import merge_recipe

    recipe = load_recipe(fitted["out"])  # a plain recipe: soupkit merge consumes it unchanged
    assert recipe.merge.method == "cat" and len(recipe.merge.modules) == 14
    merged_dir = fitted["tmp"] / "merged"
    merge_recipe(recipe, merged_dir, RunOptions(progress=False))
    model, _ = fit_model("softmax")
    names = ["math", "code"]
    model.fixed = torch.tensor([[fitted["report"]["weights"][t.path].get(n, 0.0) for n in names] for t in model.targets])
    ids = torch.randint(4, 100, (2, 20), generator=torch.Generator().manual_seed(5))
    base = AutoModelForCausalLM.from_pretrained(TINY / "base", dtype=torch.float32)
    with torch.no_grad():
        want = model.lm_logits(ids)
        got = PeftModel.from_pretrained(base, merged_dir)(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_accumulation_splits_give_the_same_weights(tmp_path: Path) -> None:
    """One global batch of 8, as 1 x 8 or 4 x 2 micro-batches: the same normalisation, the same fit."""
    texts = sample_text(24, 30, temperature=1.0, seed=1)
    train = write_jsonl(tmp_path / "calib.jsonl", [{"text": t[: 10 + i]} for i, t in enumerate(texts)])  # unequal lengths
    recipe = write_recipe(tmp_path, tiny_recipe("cat"))
    weights = []
    for batch, accum in ((8, 1), (2, 4)):
        out = tmp_path / f"b{batch}.yaml"
        args = [
            "fit-alpha",
            str(recipe),
            "--data",
            str(train),
            "-o",
            str(out),
            "--steps",
            "4",
            "--batch-size",
            str(batch),
            "--grad-accum",
            str(accum),
        ]
        result = CliRunner().invoke(main, [*args, "--granularity", "layer", "--constraint", "free"])
        assert result.exit_code == 0, result.output
        weights.append(json.loads((tmp_path / f"b{batch}-report" / "fit_report.json").read_text())["weights"])
    assert weights[0] != {p: {a: 1 / 2 for a in w} for p, w in weights[0].items()}  # it moved from the init
    for path, w in weights[0].items():
        for adapter, value in w.items():
            assert weights[1][path][adapter] == pytest.approx(value, abs=1e-5)


def test_two_processes_give_the_weights_of_one_with_the_same_global_batch(tmp_path: Path) -> None:
    """Data parallel on CPU (torchrun, gloo): 2 processes x batch 4 == 1 process x batch 4 x accum 2."""
    import os
    import socket
    import subprocess
    import sys

    texts = sample_text(28, 30, temperature=0.3, seed=3)
    train = write_jsonl(tmp_path / "calib.jsonl", [{"text": t[: 12 + i]} for i, t in enumerate(texts[:20])])  # unequal lengths
    heldout = write_jsonl(tmp_path / "heldout.jsonl", [{"text": t} for t in texts[20:]])
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
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as probe:  # a free port: a fixed one collides with other test runs on the machine
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), "-m", "soupkit"]
    subprocess.run([*launch, *args, "-o", str(tmp_path / "two.yaml")], check=True, env=env, capture_output=True)
    result = CliRunner().invoke(main, [*args, "--grad-accum", "2", "-o", str(tmp_path / "one.yaml")])
    assert result.exit_code == 0, result.output
    one, two = (json.loads((tmp_path / f"{n}-report" / "fit_report.json").read_text()) for n in ("one", "two"))
    assert (one["num_processes"], two["num_processes"]) == (1, 2)
    assert any(abs(w - 0.5) > 1e-2 for m in one["weights"].values() for w in m.values())  # the weights moved
    for path, w in one["weights"].items():
        for adapter, value in w.items():
            assert two["weights"][path][adapter] == pytest.approx(value, abs=1e-5)


def test_cma_es_finds_interior_and_box_edge_minima() -> None:
    interior = np.array([0.7, -0.3])
    best, value, history = cma_es(lambda x: float(((x - interior) ** 2).sum()), np.zeros(2), 0.5, -1.5, 1.5, 200, seed=0)
    assert len(history) == 200 and value == min(history)
    np.testing.assert_allclose(best, interior, atol=1e-3)
    outside = np.array([0.7, -2.0])  # the optimum over the box is on its edge, at (0.7, -1.5), value 0.25
    best, value, _ = cma_es(lambda x: float(((x - outside) ** 2).sum()), np.zeros(2), 0.5, -1.5, 1.5, 200, seed=0)
    # cmaes keeps candidates inside the box (resampling), so the edge is approached, not clipped onto
    assert abs(best[1] + 1.5) < 1e-2 and abs(best[0] - 0.7) < 1e-2 and value == pytest.approx(0.25, abs=1e-3)
    one_d, value, _ = cma_es(lambda x: float((x[0] - 0.4) ** 2), np.zeros(1), 0.5, -1.5, 1.5, 60, seed=0)
    assert abs(one_d[0] - 0.4) < 1e-2 and value < 1e-4


def test_lorahub_search_writes_one_weight_per_adapter(tmp_path: Path) -> None:
    texts = sample_text(12, 30, temperature=0.3, seed=2)
    train = write_jsonl(tmp_path / "calib.jsonl", [{"text": t} for t in texts])
    recipe = write_recipe(tmp_path, tiny_recipe("cat"))
    out = tmp_path / "hub.yaml"
    result = CliRunner().invoke(
        main, ["fit-alpha", str(recipe), "--data", str(train), "-o", str(out), "--search", "lorahub", "--budget", "12"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "hub-report" / "fit_report.json").read_text())
    values = {a: {w[a] for w in report["weights"].values() if a in w} for a in ("math", "code")}
    assert all(len(v) == 1 for v in values.values())  # one weight per adapter, the same in every module
    assert all(-1.5 <= next(iter(v)) <= 1.5 for v in values.values())
    assert len(report["loss_curve"]) == 12
    overrides = yaml.safe_load(out.read_text())["merge"]["modules"]
    assert {o["match"] for o in overrides} == set(report["weights"])


def test_prompt_completion_puts_loss_on_the_completion_only() -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TINY / "base")
    example = tokenize_record({"prompt": "2+2=", "completion": "4!"}, tokenizer, 64, "r")
    assert example.labels[-2:] == example.input_ids[-2:] and example.labels[-2:] != [IGNORE, IGNORE]
    assert all(t == IGNORE for t in example.labels[:-2]) and example.n_target == 2
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"
    )
    chat = {"messages": [{"role": "u", "content": "hi"}, {"role": "a", "content": "yo!"}]}
    example = tokenize_record(chat, tokenizer, 64, "r")
    assert tokenizer.decode(example.input_ids) == "<u>hi<a>yo!"
    assert tokenizer.decode([t for t in example.labels if t != IGNORE]) == "yo!"  # the reply carries the loss


def test_user_errors_are_one_line(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    tokenizer = AutoTokenizer.from_pretrained(TINY / "base")
    with pytest.raises(Exception, match="chat template"):
        load_examples(str(data), tokenizer, 32, "--data")
    svd = write_recipe(tmp_path, tiny_recipe("svd", rank=4), "svd.yaml")
    result = CliRunner().invoke(main, ["fit-alpha", str(svd), "--data", str(data)])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "merge.method" in result.output
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    cat = write_recipe(tmp_path, tiny_recipe("cat"), "cat.yaml")
    result = CliRunner().invoke(
        main, ["fit-alpha", str(cat), "--data", str(tmp_path / "bad.jsonl"), "-o", str(tmp_path / "x.yaml")]
    )
    assert result.exit_code == 2 and "bad.jsonl:1" in result.output and not (tmp_path / "x.yaml").exists()
