"""Issue 23's additions to the skill-composition experiment: distractor skills, the scorer, the batched
LoRA trainer, and which rows each stage runs. The stages end to end: tests/test_skill_composition_smoke.py."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from examples.skill_composition import data as D
from examples.skill_composition import distractors as X
from examples.skill_composition.scoring import score


@pytest.mark.parametrize("kind", X.NAMES)
def test_distractors_are_seeded_and_their_gold_answers_score(kind):
    a, b = X.make_split(kind, 40, 3), X.make_split(kind, 40, 4)
    assert a == X.make_split(kind, 40, 3) and a != b
    assert len({e.prompt for e in a}) > 20  # varied, not one prompt repeated
    for e in a:
        assert score(e.prompt, e.completion, e.completion) == 1.0
        assert score(e.prompt, e.completion + " extra", e.completion) == 0.0
        assert "def solution" not in e.completion and "The answer is" not in e.completion  # never math or code


def test_distractor_answers_are_right():
    sort = X.make_split("sort", 20, 0)
    for e in sort:
        numbers = [int(n) for n in e.prompt.split(": ")[1].split(", ")]
        assert e.completion == ", ".join(map(str, sorted(numbers)))
    for e in X.make_split("weekday", 20, 0):
        n, start = int(e.prompt.split()[6]), e.prompt.split()[-1].rstrip("?")
        assert e.completion == X.DAYS[(X.DAYS.index(start) + n) % 7]
    for e in X.make_split("count", 20, 0):
        assert e.completion == f"There are {len(e.prompt.split(': ')[1].rstrip('?').split(', '))} items."


def test_scorer_reads_the_task_from_the_reference():
    for kind in ("math", "code", "composite"):
        for e in D.make_split(kind, 20, 1, "chat"):
            assert score(e.prompt, e.completion, e.completion) == 1.0
    program = "def solution():\n    x = 10\n    x = x + 5\n    return x"
    assert score("", "def solution():\n    x = 15\n    return x", program) == 1.0  # same value, other program
    assert score("", "def solution():\n    x = 16\n    return x", program) == 0.0
    assert score("", "2 + 3 = 5. The answer is 5.", "The answer is 5.") == 1.0
    assert score("", "The answer is 6.", "2 + 3 = 5. The answer is 5.") == 0.0
    assert score("", "anything", None) == 0.0


@pytest.mark.parametrize("checkpointing", [False, True])
def test_batched_trainer_equals_training_each_lora_alone(tmp_path, monkeypatch, checkpointing):
    """train_many (one forward for all LoRAs, blocks of unequal batch sizes, unequal step counts; with
    and without recomputing the layers in the backward pass) saves the same adapters as
    model.train_lora run once per LoRA."""
    from examples.skill_composition import multilora

    monkeypatch.setattr(multilora, "CHECKPOINT_ROWS", 0 if checkpointing else 10_000)
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from soupkit.testing import tiny_llama_config

    from examples.skill_composition.config import SMOKE
    from examples.skill_composition.model import CharCodec, train_lora
    from examples.skill_composition.multilora import Job, train_many

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_llama_config()).eval()
    cfg = replace(SMOKE, targets=("q_proj", "v_proj", "down_proj"), lora_lr=5e-3)
    codec = CharCodec()
    sets = [D.make_split("math", 16, 0), X.make_split("upper", 16, 0, "toy"), D.make_split("code", 12, 1)]
    jobs = [
        Job(sets[0], 2, 4, 11, tmp_path / "a"),
        Job(sets[1], 3, 4, 11, tmp_path / "b"),
        Job(sets[2], 1, 2, 13, tmp_path / "c"),
    ]
    infos = train_many(base, cfg, jobs, codec, lambda _: None, max_rows=6)  # 2 forwards a step at first
    assert [i["steps"] for i in infos] == [2, 3, 1]
    for job in jobs:
        ref = tmp_path / f"ref_{job.out.name}"
        train_lora(base, cfg, job.examples, job.steps, job.seed, ref, lambda _: None, codec, None, job.batch)
        got, want = (load_file(str(p / "adapter_model.safetensors")) for p in (job.out, ref))
        assert set(got) == set(want) and len(want) == 2 * 3 * 2
        assert json.loads((job.out / "adapter_config.json").read_text())["r"] == cfg.rank
        for key, tensor in want.items():
            torch.testing.assert_close(got[key], tensor, rtol=1e-4, atol=1e-6)
        assert any(float(t.abs().max()) > 0 for k, t in want.items() if "lora_B" in k)  # it trained


def test_stages_select_their_rows_once():
    from examples.skill_composition.config import SMOLLM2
    from examples.skill_composition.merges import rows
    from examples.skill_composition.stages import NEW_STAGES, needed_adapters, select_rows

    core = select_rows(SMOLLM2, ("core",))
    assert [r.name for r in core] == [r.name for r in rows(SMOLLM2)]
    new = select_rows(SMOLLM2, NEW_STAGES)
    names = [r.name for r in new]
    assert len(names) == len(set(names))
    fits = [r for r in new if r.kind == "fit" and not r.name.startswith("pool")]
    assert len({(r.regime, r.fit.get("granularity", "module"), r.fit.get("constraint")) for r in fits}) == len(fits)
    pool = [r for r in new if r.name.startswith("pool: cat fit")]
    assert len(pool) == 4 and all(len(r.sources) == 8 and sum(r.weights) == pytest.approx(1) for r in pool)
    assert sum(r.kind == "search" for r in new) == 3  # a CAT-weights sweep per pool regime, the every-method sweep
    adapters = needed_adapters(SMOLLM2, NEW_STAGES)
    assert adapters[:3] == ["math", "code", "mix"] and set(X.NAMES) <= set(adapters)
    assert {r.sources[0] for r in new if r.name.startswith("control: fresh")} <= set(adapters)
    # 1, 2.5, 5, 10, 20% of the skill data, with 0 and 16 target examples: fit and fresh LoRA each
    assert sum(r.name.startswith("control: fresh LoRA [") for r in new) == 11  # k=16 target alone, too


def test_lora_packs_cover_every_adapter_once(tmp_path):
    """Each needed LoRA is in exactly one pack: data-mix alone, like LoRAs together within PACK_ROWS rows."""
    from examples.skill_composition import run
    from examples.skill_composition.config import SMOLLM2
    from examples.skill_composition.stages import NEW_STAGES, needed_adapters

    ctx = run.Context.__new__(run.Context)
    ctx.cfg, ctx.stages, ctx.run_dir, ctx._sets = SMOLLM2, NEW_STAGES, tmp_path, {}
    ctx.sets = lambda seed: (
        {k: [None] * 200 for k in ("math", "code", "mix", *SMOLLM2.distractors)}
        | {f"calib:{r}": [None] * 40 for r in run.all_regimes(SMOLLM2)}
    )
    packs = run.lora_packs(ctx, 0)
    names = [n for p in packs for n in p]
    assert sorted(names) == sorted(needed_adapters(SMOLLM2, NEW_STAGES))
    assert packs[0] == ["mix"]  # the longest pack, alone, first
    for pack in packs[1:]:
        assert len({n.startswith("fresh_") for n in pack}) == 1  # skills and controls apart
        assert sum(run.adapter_job(ctx, 0, n).batch for n in pack) <= run.PACK_ROWS
    assert len(packs) == 4  # 8 skill LoRAs in two packs of 4 (32 rows each), 11 controls of 8 rows in one


def test_a_sweep_cut_by_the_deadline_is_deferred_and_resumed(tmp_path, monkeypatch):
    """A sweep row that reaches the run's deadline before its trials saves no row file (the next run
    takes it again) and asks the resumed study for the rest of the trials, never a short study."""
    from types import SimpleNamespace

    from examples.skill_composition import run, sweeps
    from examples.skill_composition.config import SMOKE
    from examples.skill_composition.merges import Row

    asked: list[int] = []

    def fake_sweep(cmd, **_):  # `python -m soupkit sweep SPEC -o OUT --trials N ...`
        asked.append(int(cmd[cmd.index("--trials") + 1]))
        return SimpleNamespace(returncode=0, stdout="", stderr="")

    monkeypatch.setattr(sweeps.subprocess, "run", fake_sweep)
    monkeypatch.setattr(sweeps, "sweep_file", lambda ctx, seed, row, folder: folder / "sweep.yaml")
    cfg = replace(SMOKE, search_trials=4, search_chunk=2)
    model = SimpleNamespace(reset=lambda: None)
    ctx = SimpleNamespace(cfg=cfg, run_dir=tmp_path, device=SimpleNamespace(type="cpu"), deadline=0.0, eval_model=lambda: model)
    row = Row("a sweep", "search", ("math", "code"), (0.5, 0.5), "cat", fit={"methods": ["cat"], "weights": [0, 1]})
    (tmp_path / "seed0" / "rows").mkdir(parents=True)
    run.run_task(ctx, 0, row)  # the deadline is long past: one chunk, then deferred
    assert asked == [2] and not any((tmp_path / "seed0" / "rows").iterdir())
    assert "--trials 2" in (tmp_path / "seed0" / "search" / "a_sweep" / "sweep.log").read_text()
    out = tmp_path / "seed0" / "search" / "a_sweep" / "out"
    out.mkdir()
    (out / "leaderboard.json").write_text(json.dumps({"trials": [{}, {}]}))  # the first chunk's two trials
    with pytest.raises(sweeps.Deferred, match="4 of 6 trials"):
        sweeps.run_sweep(SimpleNamespace(**{**vars(ctx), "cfg": replace(cfg, search_trials=6)}), 0, row, {})
    assert asked == [2, 4]  # resumed after the study's two trials, one chunk, deferred again
