"""soupkit sweep: the search finds the generating adapter, trials equal what best.yaml writes, resumes, workers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from soupkit.cli import main
from soupkit.testing import make_base, make_lora

from conftest import TINY

pytest.importorskip("optuna")


def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def sampled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base, two strong adapters a and b, and text sampled from base + a alone (by PEFT, not soupkit)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("sampled")
    base = make_base(root / "base", seed=1)
    make_lora(base, root / "a", seed=2, r=4, lora_alpha=8, b_scale=4.0)
    make_lora(base, root / "b", seed=3, r=4, lora_alpha=8, b_scale=4.0)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), root / "a").eval()
    tokenizer = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(0)
    prompt = tokenizer(["a"] * 24, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**prompt, do_sample=True, max_new_tokens=40, min_new_tokens=40, pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    for name, part in (("val", texts[:16]), ("test", texts[16:24])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
    return root


def sweep_file(root: Path, name: str = "sweep.yaml", **search: object) -> Path:
    spec = {
        "base_model": "base",
        "adapters": [{"name": "a", "path": "a", "weight": 0.5}, {"name": "b", "path": "b", "weight": 0.5}],
        "merge": {"method": "cat"},
        "dtype": "float32",
        "search": {"data": {"validation": "val.jsonl", "test": "test.jsonl"}, "trials": 8, "weights": [0.0, 1.5], **search},
    }
    path = root / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def eval_score(target: Path, data: Path) -> float:
    code, out, err = cli("eval", str(target), "--data", str(data), "--json", "--device", "cpu")
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])["score"]


def test_sweep_finds_the_generating_adapter_and_best_yaml_merges_to_the_trial(sampled: Path, tmp_path: Path) -> None:
    out = tmp_path / "sw"
    code, _, err = cli("sweep", str(sweep_file(sampled)), "-o", str(out), "--device", "cpu")
    assert code == 0, err
    board = json.loads((out / "leaderboard.json").read_text())
    best = next(t for t in board["trials"] if t["number"] == board["best"])
    assert best["weights"]["a"] > best["weights"]["b"]
    recipe = {k: v for k, v in yaml.safe_load((sampled / "sweep.yaml").read_text()).items() if k != "search"}
    (sampled / "uniform.yaml").write_text(yaml.safe_dump(recipe))  # the recipe itself: 0.5 / 0.5
    uniform = eval_score(sampled / "uniform.yaml", sampled / "val.jsonl")
    assert best["validation"] < uniform
    assert {p.name for p in out.iterdir()} >= {"best.yaml", "leaderboard.json", "leaderboard.md", "study.db", "validation.png"}
    assert sum(t["test"] is not None for t in board["trials"]) == 5  # the top 5 only
    # the in-memory trial equals what best.yaml writes
    code, _, err = cli("merge", str(out / "best.yaml"), "-o", str(tmp_path / "merged"))
    assert code == 0, err
    assert eval_score(tmp_path / "merged", sampled / "val.jsonl") == pytest.approx(best["validation"], rel=1e-6)
    assert "search" not in yaml.safe_load((out / "best.yaml").read_text())


def test_resume_continues_and_a_changed_space_is_refused(sampled: Path, tmp_path: Path) -> None:
    path, out = sweep_file(sampled, "resume.yaml", trials=3, methods=["cat", "linear"]), tmp_path / "sw"
    assert cli("sweep", str(path), "-o", str(out), "--device", "cpu")[0] == 0
    first = json.loads((out / "leaderboard.json").read_text())["trials"]
    code, _, err = cli("sweep", str(path), "-o", str(out), "--trials", "5", "--device", "cpu")
    assert code == 0, err
    again = json.loads((out / "leaderboard.json").read_text())["trials"]
    assert len(again) == 5
    for old, new in zip(first, again):
        assert {k: old[k] for k in ("number", "method", "weights", "validation")} == {
            k: new[k] for k in ("number", "method", "weights", "validation")
        }
    changed = sweep_file(sampled, "resume.yaml", trials=3, methods=["cat", "ties"])
    code, _, err = cli("sweep", str(changed), "-o", str(out), "--device", "cpu")
    assert code == 2 and "changed search" in err and len(err.strip().splitlines()) == 1


def test_two_workers_share_one_study(sampled: Path, tmp_path: Path) -> None:
    path, out = sweep_file(sampled, "workers.yaml", trials=4, sampler="random", top_k=0), tmp_path / "sw"
    code, _, err = cli("sweep", str(path), "-o", str(out), "--workers", "2", "--device", "cpu")
    assert code == 0, err
    trials = json.loads((out / "leaderboard.json").read_text())["trials"]
    assert len(trials) >= 4 and all(t["state"] == "complete" for t in trials)
    assert sorted(t["number"] for t in trials) == list(range(len(trials)))
    assert len({json.dumps(t["weights"], sort_keys=True) for t in trials}) == len(trials)


def test_a_diverging_trial_is_recorded_as_failed(sampled: Path, tmp_path: Path) -> None:
    path = sweep_file(sampled, "nan.yaml", trials=2, weights={"a": [1e36, 3e36]}, top_k=0)
    code, _, err = cli("sweep", str(path), "-o", str(tmp_path / "sw"), "--device", "cpu")
    assert code == 0, err
    trials = json.loads((tmp_path / "sw" / "leaderboard.json").read_text())["trials"]
    assert [t["state"] for t in trials] == ["fail", "fail"] and all("finite" in t["error"] for t in trials)


@pytest.mark.parametrize(
    ("search", "expect"),
    [
        ({"data": {"validation": "val.jsonl", "test": "val.jsonl"}}, "different validation and test files"),
        ({"metric": "bleu"}, "expected one of loss, exact"),
        ({"metric": "python:no_such_mod_q:f"}, "an importable module"),
        ({"methds": ["ties"]}, "did you mean 'methods'"),
        ({"params": {"densty": [0.1, 0.9]}, "methods": ["ties"]}, "did you mean 'density'"),
    ],
)
def test_sweep_user_errors_are_one_line(sampled: Path, tmp_path: Path, search: dict, expect: str) -> None:
    path = sweep_file(sampled, "bad.yaml", **search)
    code, _, err = cli("sweep", str(path), "-o", str(tmp_path / "sw"), "--device", "cpu")
    assert code == 2 and expect in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "sw").exists()


def test_overlapping_and_empty_data_are_refused(sampled: Path, tmp_path: Path) -> None:
    lines = (sampled / "val.jsonl").read_text().splitlines()
    (tmp_path / "t.jsonl").write_text(lines[0] + "\n")
    (tmp_path / "e.jsonl").write_text("")
    for test, expect in (("t.jsonl", "shared record"), ("e.jsonl", "at least one record")):
        spec = yaml.safe_load(sweep_file(sampled, "ov.yaml").read_text())
        spec["search"]["data"] = {"validation": str(sampled / "val.jsonl"), "test": test}
        for key in ("base_model",):
            spec[key] = str(sampled / spec[key])
        for adapter in spec["adapters"]:
            adapter["path"] = str(sampled / adapter["path"])
        (tmp_path / "ov.yaml").write_text(yaml.safe_dump(spec))
        code, _, err = cli("sweep", str(tmp_path / "ov.yaml"), "-o", str(tmp_path / "sw"), "--device", "cpu")
        assert code == 2 and expect in err, err


def test_tiny_example_sweep_file_is_valid() -> None:
    from soupkit.sweep.spec import load_sweep

    sweep = load_sweep(TINY.parent / "sweep" / "tiny_sweep.yaml")
    assert sweep.search.methods == ["cat", "ties", "linear"]


def test_sweep_folder_safety(sampled: Path, tmp_path: Path) -> None:
    """-o must be new, empty or a sweep soupkit wrote; never an input. Refusals leave everything as it was."""
    path = sweep_file(sampled, "safe.yaml", trials=1, top_k=0)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    for out, expect in ((mine, "a folder soupkit did not write"), (sampled / "a", "adapter 'a'"), (sampled, "")):
        before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
        code, _, err = cli("sweep", str(path), "-o", str(out), "--device", "cpu")
        assert code == 2 and expect in err and len(err.strip().splitlines()) == 1, err
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
