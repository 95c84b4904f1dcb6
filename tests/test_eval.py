"""soupkit eval: scores checked against plain computations written here (PEFT / transformers, float64 sums)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from soupkit.cli import main
from soupkit.eval.generate import generate
from soupkit.eval.metrics import contains, exact, regex_scorer

from conftest import TINY, reference_deltas, tiny_recipe, weighted_sum, write_recipe

DATA = TINY / "calib.jsonl"


def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def eval_json(*args: str) -> dict:
    code, out, err = cli("eval", *args, "--json", "--device", "cpu")
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


def plain_loss(model: torch.nn.Module, tokenizer, texts: list[str]) -> float:
    """Per-token NLL over every text, one text at a time, summed in float64: the reference."""
    total, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
        total += -float(logp.gather(1, ids[0, 1:, None]).sum())
        count += ids.shape[1] - 1
    return total / count


def merged_base(weights: tuple[float, float]) -> torch.nn.Module:
    """The tiny base with sum_i w_i s_i B_i A_i added to each weight, computed in float64 from the files."""
    model = AutoModelForCausalLM.from_pretrained(TINY / "base", dtype=torch.float32)
    deltas = weighted_sum([reference_deltas(TINY / "adapters" / n) for n in ("math", "code")], list(weights))
    with torch.no_grad():
        for path, delta in deltas.items():
            weight = model.get_submodule(path).weight
            weight.copy_((weight.double() + delta).float())
    return model.eval()


def test_loss_equals_a_plain_computation(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, tiny_recipe("cat", (0.7, 0.4)))
    got = eval_json(str(recipe), "--data", str(DATA))
    texts = [json.loads(line)["text"] for line in DATA.read_text().splitlines()]
    want = plain_loss(merged_base((0.7, 0.4)), AutoTokenizer.from_pretrained(TINY / "base"), texts)
    assert got["metric"] == "loss" and got["n"] == len(texts)
    assert math.isclose(got["score"], want, rel_tol=1e-5)
    assert got["stderr"] > 0


def test_recipe_scores_as_the_adapter_it_writes(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, tiny_recipe("ties", (0.6, 0.4), density=0.5))
    code, _, err = cli("merge", str(recipe), "-o", str(tmp_path / "merged"))
    assert code == 0, err
    in_memory = eval_json(str(recipe), "--data", str(DATA))
    written = eval_json(str(tmp_path / "merged"), "--data", str(DATA))
    assert in_memory == written


def test_full_model_folder_is_scored(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, {**tiny_recipe("cat", (0.7, 0.4)), "output": "model"})
    code, _, err = cli("merge", str(recipe), "-o", str(tmp_path / "full"))
    assert code == 0, err
    got = eval_json(str(tmp_path / "full"), "--data", str(DATA))
    texts = [json.loads(line)["text"] for line in DATA.read_text().splitlines()]
    want = plain_loss(merged_base((0.7, 0.4)), AutoTokenizer.from_pretrained(TINY / "base"), texts)
    assert math.isclose(got["score"], want, rel_tol=1e-5)


def greedy_reference(model: torch.nn.Module, tokenizer, prompt: str, n: int) -> str:
    """Greedy decoding one token at a time, no cache, no padding: the reference for generate()."""
    ids = tokenizer(prompt)["input_ids"]
    start = len(ids)
    for _ in range(n):
        with torch.no_grad():
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        if nxt == tokenizer.eos_token_id:
            break
        ids.append(nxt)
    return tokenizer.decode(ids[start:], skip_special_tokens=True)


def test_batched_left_padded_generation_equals_one_by_one_greedy() -> None:
    model = merged_base((1.0, 1.0))
    tokenizer = AutoTokenizer.from_pretrained(TINY / "base")
    prompts = ["ab", "a longer prompt here", "x", "12+7="]
    got = generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    assert got == [greedy_reference(model, tokenizer, p, 6) for p in prompts]
    tokenizer.pad_token = None  # as SmolLM2's tokenizer comes from its GGUF: padding still works, and is undone
    assert generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=3) == got
    assert tokenizer.pad_token is None


def test_scorers() -> None:
    assert exact("", "  42 \n", "42") == 1.0 and exact("", "420", "42") == 0.0
    assert contains("", "the answer is 42.", "42") == 1.0 and contains("", "41", "42") == 0.0
    score = regex_scorer(r"answer: (\d+)")
    assert score("", "so answer: 17 ok", "17") == 1.0
    assert score("", "answer: 18", "17") == 0.0
    assert score("", "no match", None) == 0.0 and score("", "answer: 3", None) == 1.0


def test_python_scorer_and_per_example_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_scorer.py").write_text("def score(prompt, generation, reference):\n    return len(generation) / 10\n")
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "reference": "x"}) + "\n" for p in ["ab", "cd", "hello"]))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "my_scorer", raising=False)
    recipe = write_recipe(tmp_path, tiny_recipe("cat", (1.0, 1.0)))
    args = ("--data", str(data), "--metric", "python:my_scorer:score", "--max-new-tokens", "5")
    got = eval_json(str(recipe), *args, "--out", "per.jsonl")
    lines = [json.loads(line) for line in (tmp_path / "per.jsonl").read_text().splitlines()]
    assert lines[0]["written_by"] == "soupkit eval" and len(lines) == 4
    model, tokenizer = merged_base((1.0, 1.0)), AutoTokenizer.from_pretrained(TINY / "base")
    expected = [len(greedy_reference(model, tokenizer, p, 5)) / 10 for p in ["ab", "cd", "hello"]]
    assert [row["score"] for row in lines[1:]] == pytest.approx(expected)
    assert got["score"] == pytest.approx(sum(expected) / 3) and got["n"] == 3
    code, _, err = cli("eval", str(recipe), *args, "--out", "per.jsonl", "--device", "cpu")
    assert code == 2 and "--overwrite" in err  # an existing output is kept unless --overwrite


@pytest.mark.parametrize(
    ("extra", "expect"),
    [
        (("--metric", "bleu"), "expected one of loss, exact"),
        (("--metric", "python:no_such_module_xyz:f"), "an importable module 'no_such_module_xyz'"),
        (("--metric", "lm-eval:hellaswag"), 'pip install "soupkit[eval]"'),
        (("--metric", "exact"), "a 'prompt' or 'messages' field"),
    ],
)
def test_user_errors_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: tuple, expect: str) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if the [eval] extra were not installed
    recipe = write_recipe(tmp_path, tiny_recipe())
    code, _, err = cli("eval", str(recipe), "--data", str(DATA), *extra)
    assert code == 2 and expect in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_empty_data_and_out_onto_an_input_are_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    recipe = write_recipe(tmp_path, tiny_recipe())
    code, _, err = cli("eval", str(recipe), "--data", str(empty))
    assert code == 2 and "at least one record" in err
    before = DATA.read_bytes()
    code, _, err = cli("eval", str(recipe), "--data", str(DATA), "--out", str(DATA))
    assert code == 2 and len(err.strip().splitlines()) == 1 and DATA.read_bytes() == before


def test_cached_factors_and_fused_cat_merge_as_from_the_files() -> None:
    from soupkit.eval.target import RecipeScorer
    from soupkit.execute import iter_merged, plan_recipe
    from soupkit.recipe import Recipe

    def recipe(method: str, **merge: object) -> Recipe:
        return Recipe.from_dict(tiny_recipe(method, (0.7, 0.4), **merge))

    scorer = RecipeScorer(recipe("cat"), torch.device("cpu"), fused=True)
    ties = recipe("ties", density=0.5)
    first = scorer.merged_updates(ties)
    scorer.merged_updates(recipe("dare_ties", density=0.3))  # another method over the same cached factors
    again = scorer.merged_updates(ties)
    plan, inputs = plan_recipe(ties)  # no cache: every factor read from the files
    fresh = {m.path: f for m, f, _ in iter_merged(ties, plan, inputs, torch.device("cpu")) if m.sources}
    assert set(first) == set(fresh)
    for path, update in first.items():
        assert torch.equal(update.A, again[path].A) and torch.equal(update.B, again[path].B)
        assert torch.equal(update.B @ update.A, fresh[path].B @ fresh[path].A)
    deltas = weighted_sum([reference_deltas(TINY / "adapters" / n) for n in ("math", "code")], [0.7, 0.4])
    fused = scorer.merged_updates(recipe("cat"))
    assert set(fused) == set(deltas)
    for path, u in fused.items():
        got = (u.B.double() * u.rank_scale.double()) @ u.A.double()
        torch.testing.assert_close(got, deltas[path], rtol=1e-5, atol=1e-7)
    # the next trial's weights, on the plan cached for the first (only the weights differ)
    other = Recipe.from_dict(tiny_recipe("cat", (-0.3, 1.2)))
    deltas = weighted_sum([reference_deltas(TINY / "adapters" / n) for n in ("math", "code")], [-0.3, 1.2])
    for path, u in scorer.merged_updates(other).items():
        got = (u.B.double() * u.rank_scale.double()) @ u.A.double()
        torch.testing.assert_close(got, deltas[path], rtol=1e-5, atol=1e-7)


def test_linear_without_a_rank_cut_is_scored_as_the_weighted_sum() -> None:
    from soupkit.eval.target import RecipeScorer, is_weighted_sum
    from soupkit.recipe import Recipe

    scorer = RecipeScorer(Recipe.from_dict(tiny_recipe("cat")), torch.device("cpu"), fused=True)
    exact, cut = Recipe.from_dict(tiny_recipe("linear", (0.7, 0.4))), Recipe.from_dict(tiny_recipe("linear", rank=2))
    assert is_weighted_sum(exact, scorer.merger.plan(exact)) and not is_weighted_sum(cut, scorer.merger.plan(cut))
    deltas = weighted_sum([reference_deltas(TINY / "adapters" / n) for n in ("math", "code")], [0.7, 0.4])
    for path, u in scorer.merged_updates(exact).items():
        assert u.rank_scale is not None
        torch.testing.assert_close((u.B.double() * u.rank_scale.double()) @ u.A.double(), deltas[path], rtol=1e-5, atol=1e-7)
    assert all(u.rank_scale is None and u.A.shape[0] == 2 for u in scorer.merged_updates(cut).values())


def test_lm_eval_local_task_scores_the_merged_model(tmp_path: Path) -> None:
    """With the [eval] extra: a local task file, offline; the score equals lm-eval's own on the model merged by hand."""
    lm_eval = pytest.importorskip("lm_eval", reason='needs the eval extra: pip install "soupkit[eval]"')
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    rows = [
        {"question": q, "choices": [q[::-1], q.upper(), q + q], "label": i % 3}
        for i, q in enumerate(["abc", "hgf", "dab", "ccd"])
    ]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = tmp_path / "tiny_mc.yaml"
    task.write_text(
        "task: soupkit_test_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'data.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}} ->"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
    )
    recipe = write_recipe(tmp_path, tiny_recipe("cat", (0.7, 0.4)))
    got = eval_json(str(recipe), "--metric", f"lm-eval:{task}")
    lm = HFLM(pretrained=merged_base((0.7, 0.4)), tokenizer=AutoTokenizer.from_pretrained(TINY / "base"), batch_size=8)
    out = lm_eval.simple_evaluate(model=lm, tasks=["soupkit_test_mc"], task_manager=TaskManager(include_path=str(tmp_path)))
    assert got["n"] == 4 and got["score"] == pytest.approx(out["results"]["soupkit_test_mc"]["acc_norm,none"])
