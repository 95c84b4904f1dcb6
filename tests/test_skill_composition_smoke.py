"""The skill-composition experiment: safe evaluator, data, report, and the --smoke pipeline end to end."""

from __future__ import annotations

import builtins
import json
import math

import pytest
import torch

from examples.skill_composition import data as D
from examples.skill_composition.report import METRICS, aggregate, markdown_table
from examples.skill_composition.safe_eval import Refused, evaluate_program, program_shape, score_math, score_program


def test_safe_evaluator_computes_arithmetic(monkeypatch):
    # The evaluator must never run text: make exec/eval explode while it works (ast.parse only
    # compiles to a syntax tree, which it then interprets itself).
    for name in ("exec", "eval"):
        monkeypatch.setattr(builtins, name, lambda *a, **k: pytest.fail("exec/eval was called"))
    src = "def solution():\n    x = 7\n    y = x * 3 - 4\n    x += y // 2\n    z = -x % 5 + 1.5 / 3\n    return z"
    x = 7
    y = x * 3 - 4
    x += y // 2
    assert evaluate_program(src) == pytest.approx(-x % 5 + 1.5 / 3)
    assert score_program("junk\ndef solution():\n    x = 3412\n    x = x + 4519\n    return x\nmore", 7931) == (True, True)
    assert score_program("def solution():\n    x = 1\n    return x", 2) == (True, False)


REFUSED = [
    "import os\ndef solution():\n    return 1",
    "def solution():\n    import os\n    return 1",
    "def solution():\n    x = __import__('os').system('echo hi')\n    return x",
    "def solution():\n    x = open('/etc/passwd')\n    return x",
    "def solution():\n    x = print(1)\n    return x",
    "def solution():\n    x = (1).real\n    return x",
    "def solution():\n    x = [1, 2][0]\n    return x",
    "def solution():\n    x = 'abc'\n    return x",
    "def solution():\n    x = 2 ** 10\n    return x",
    "def solution():\n    x = lambda: 1\n    return x",
    "def solution():\n    for i in range(3):\n        x = i\n    return x",
    "def solution():\n    while True:\n        x = 1\n    return x",
    "def solution():\n    if 1:\n        x = 1\n    return x",
    "def solution():\n    x = 1 if 1 else 2\n    return x",
    "def solution():\n    x = 1 < 2\n    return x",
    "def solution():\n    x = True\n    return x",
    "def solution():\n    global y\n    return 1",
    "def solution():\n    x, y = 1, 2\n    return x",
    "def solution():\n    x.a = 1\n    return x",
    "def solution():\n    return y",
    "def solution():\n    x = 1",
    "def solution():\n    return",
    "def solution():\n    x = 1 / 0\n    return x",
    "def solution(a):\n    return a",
    "@decorator\ndef solution():\n    return 1",
    "def other():\n    return 1",
    "def solution():\n    return 1\ndef solution():\n    return 2",
    "x = 1",
    "def solution():\n    x = 10 ** 2\n    return x",
    "def solution():\n" + "".join(f"    x{i} = 99999999 * 99999999 * 99999999 * 99999999\n" for i in range(1)) + "    return x0",
    "def solution():\n    def inner():\n        return 1\n    return 1",
    "def solution():\n    x = [i for i in range(9)]\n    return x",
    "def solution(\n",
]


@pytest.mark.parametrize("source", REFUSED)
def test_safe_evaluator_refuses_anything_but_arithmetic(source):
    with pytest.raises(Refused):
        evaluate_program(source)


def test_data_is_seeded_and_gold_answers_score_correct():
    assert D.make_split("composite", 20, 3) == D.make_split("composite", 20, 3)
    assert D.make_split("math", 20, 3) != D.make_split("math", 20, 4)
    for ex in D.make_split("math", 50, 0):
        assert score_math(ex.completion, ex.answer) == (True, True)
    for kind in ("code", "composite"):
        for ex in D.make_split(kind, 50, 0):
            assert score_program(ex.completion, ex.answer) == (True, True)
            ops, numbers = program_shape(ex.completion)
            assert len(numbers) == len(ops) + 1
    composite = D.make_split("composite", 50, 0)
    assert all(ex.prompt.startswith("Problem: ") and ex.prompt.endswith("\nCode:") for ex in composite)
    assert min(program_shape(ex.completion)[1][0] for ex in composite) >= 1000  # large numbers, as GSM-Hard
    corpus = D.pretrain_corpus(2000, 0)
    for marker in ("Problem:", "Answer:", "Task:", "Code:", "def solution", "The answer is"):
        assert marker not in corpus  # the generic corpus never shows the task formats


def test_report_aggregates_mean_and_spread():
    def seed(acc: float, ok: bool = True) -> dict:
        metrics = {m: acc for m in METRICS}
        rows = [{"name": "a", "status": "ok", "metrics": metrics}]
        failed = {"name": "b", "status": "not available", "reason": "gone"}
        rows.append({"name": "b", "status": "ok", "metrics": metrics} if ok else failed)
        return {"rows": rows}

    table = aggregate({0: seed(0.2), 1: seed(0.4, ok=False), 2: seed(0.9, ok=False)})
    a, b = table
    assert a["composite_acc"]["mean"] == pytest.approx(0.5)
    assert a["composite_acc"]["std"] == pytest.approx(math.sqrt(((0.3**2) + (0.1**2) + (0.4**2)) / 2))
    assert (b["seeds_ok"], b["seeds"], b["not_available"]) == (1, 3, "gone")
    text = markdown_table(aggregate({0: seed(0.1, ok=False)}))
    assert "| b | not available" in text and "gone" in text


def _dense(adapter_dir) -> dict[str, torch.Tensor]:
    """Plain s * B @ A per module, read straight from the PEFT files."""
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    scale = config["lora_alpha"] / config["r"]
    out = {}
    for key, a in tensors.items():
        if key.endswith("lora_A.weight"):
            b = tensors[key.replace("lora_A", "lora_B")]
            out[key.removesuffix(".lora_A.weight")] = scale * b.double() @ a.double()
    return out


def test_smoke_pipeline_end_to_end(tmp_path):
    from soupkit.cli import main as cli
    from soupkit.methods import REGISTRY

    from examples.skill_composition.config import SMOKE
    from examples.skill_composition.merges import rows, slug
    from examples.skill_composition.run import main

    results = main(["--out", str(tmp_path), "--smoke"])
    for name in ("results.json", "table.md", "chart.png", "fitted_weights.png"):
        assert (tmp_path / name).stat().st_size > 0
    by_name = {e["name"]: e for e in results["table"]}
    assert list(by_name) == [r.name for r in rows(SMOKE)]
    assert {f"{m} 1/1" for m in REGISTRY} <= set(by_name)  # every registered method appears by itself
    seed = tmp_path / f"run-{SMOKE.key()}" / "seed0"
    for row in rows(SMOKE):
        entry = by_name[row.name]
        runnable = row.kind in ("base", "adapter", "train", "sweep", "moe") or (row.kind == "merge" and row.method in REGISTRY)
        runnable = runnable or (row.kind == "fit" and "fit-alpha" in cli.commands)
        if runnable:  # rows soupkit can run must run; the rest say why not
            assert entry["seeds_ok"] == 1, entry.get("not_available")
        else:
            assert entry["not_available"]
        if entry["seeds_ok"]:
            assert 0.0 <= entry["composite_acc"]["mean"] <= 1.0
        if row.kind in ("merge", "fit") and entry["seeds_ok"]:
            assert (seed / "merged" / slug(row.name) / "adapter_model.safetensors").is_file()
            assert (seed / "recipes" / f"{slug(row.name)}.yaml").is_file()
    # The recipe of 'cat 1/1' points at the right adapters with the right weights: its merged
    # adapter equals the plain sum of the two skill deltas.
    merged = _dense(seed / "merged" / "cat_1_1")
    math_d, code_d = _dense(seed / "adapters" / "math"), _dense(seed / "adapters" / "code")
    assert set(merged) == set(math_d)
    for key, delta in merged.items():
        torch.testing.assert_close(delta, math_d[key] + code_d[key], atol=1e-5, rtol=1e-4)
    stats = json.loads((seed / "adapters.json").read_text())["adapter_stats"]
    assert set(stats["ratio"]) >= {"math", "code", "mix"}
    assert -1.0 <= stats["cosine"]["mean"] <= 1.0
    sweep = next(r for r in results["per_seed"]["0"]["rows"] if r["kind"] == "sweep")
    assert len(sweep["sweep"]["grid"]) == len(SMOKE.sweep_math) * len(SMOKE.sweep_code)

    _new_stages_in_the_same_folder(tmp_path, seed)

    # Other settings in the same folder: new stage folders, the first run's untouched, the right config
    # reported (a full run on a smoke folder used to reuse the smoke base and report the wrong config).
    before = {p: p.stat().st_mtime_ns for p in seed.rglob("*") if p.is_file()}
    other = main(["--out", str(tmp_path), "--smoke", "--seeds", "7", "--minutes", "0"])
    assert list(other["config"]["seeds"]) == [7] and other["run_dir"] != results["run_dir"]
    assert all(e["seeds_ok"] == 0 for e in other["table"])  # nothing reused from the first run
    assert {p: p.stat().st_mtime_ns for p in seed.rglob("*") if p.is_file()} == before


def _new_stages_in_the_same_folder(tmp_path, seed) -> None:
    """Issue 23/19's stages after the core run: the base, the skill LoRAs and the rows both share are
    reused (same settings, same key); the distractor and control LoRAs are trained and every new row runs."""
    from soupkit.cli import main as cli

    from examples.skill_composition.config import SMOKE
    from examples.skill_composition.run import main
    from examples.skill_composition.stages import NEW_STAGES, select_rows

    shared = seed / "rows" / "cat_fit_softmax_k_16_target.json"
    before = (shared.stat().st_mtime_ns, (seed / "adapters" / "math" / "adapter_model.safetensors").stat().st_mtime_ns)
    results = main(["--out", str(tmp_path), "--smoke", "--stages", "new"])
    by_name = {e["name"]: e for e in results["table"]}
    assert list(by_name) == [r.name for r in select_rows(SMOKE, NEW_STAGES)]
    for row in select_rows(SMOKE, NEW_STAGES):
        entry = by_name[row.name]
        if row.kind == "search" and "sweep" not in cli.commands:
            assert "does not exist" in entry["not_available"]
        else:
            assert entry["seeds_ok"] == 1, (row.name, entry.get("not_available"))
    assert (shared.stat().st_mtime_ns, (seed / "adapters" / "math" / "adapter_model.safetensors").stat().st_mtime_ns) == before
    for d in SMOKE.distractors:  # every row is scored on the distractor skills too
        assert 0.0 <= by_name[f"{d} LoRA"][f"{d}_acc"]["mean"] <= 1.0
        assert (seed / "adapters" / d / "adapter_model.safetensors").is_file()
    pool = by_name["pool: cat fit softmax [k=16 target]"]["fitted_weights"][0]
    assert set(pool) == {"math", "code", *SMOKE.distractors}
    assert sum(w["mean"] for w in pool.values()) == pytest.approx(1.0, abs=1e-3)  # softmax per module
    per_adapter = by_name["cat fit free, per adapter [k=16 target]"]["fitted_weights"][0]
    assert all(w["min"] == pytest.approx(w["max"]) for w in per_adapter.values())  # one weight per adapter
    text = (tmp_path / "questions.md").read_text()
    for heading in ("A pool of LoRAs", "Weight granularity", "Calibration size", "soupkit sweep beside"):
        assert heading in text
    for png in ("pool.png", "granularity.png", "calibration_size.png", "search.png"):
        assert (tmp_path / png).stat().st_size > 0


def test_stage_keys_follow_the_settings():
    from dataclasses import replace

    from examples.skill_composition.config import BASE_FIELDS, SMOKE, SMOLLM2, TOY

    assert SMOKE.key() != TOY.key() != SMOLLM2.key()
    assert SMOKE.key(BASE_FIELDS) != TOY.key(BASE_FIELDS)  # a smoke base is never taken for the full toy base
    more_steps = replace(SMOKE, lora_steps=SMOKE.lora_steps + 1)
    assert more_steps.key() != SMOKE.key() and more_steps.key(BASE_FIELDS) == SMOKE.key(BASE_FIELDS)


def test_no_training_set_holds_the_composite_format():
    from examples.skill_composition.config import SMOLLM2_TINY
    from examples.skill_composition.run import splits

    sets = splits(SMOLLM2_TINY, 0)
    for name in ("math", "code", "mix"):
        assert not any(D.COMPOSITE_ASK in e.prompt for e in sets[name])
        assert all(e.task in ("math", "code") for e in sets[name])
    assert all(e.prompt.startswith(D.COMPOSITE_ASK) for e in sets["eval_composite"] + sets["val_composite"])
    for e in D.make_split("composite", 50, 0, "chat"):
        assert score_program(e.completion, e.answer) == (True, True)
        assert min(program_shape(e.completion)[1][0], e.answer) >= 0 and program_shape(e.completion)[1][0] >= 1000
    for e in D.make_split("math", 50, 0, "chat"):
        assert score_math(e.completion, e.answer) == (True, True)
    test_prompts = {e.prompt for e in sets["eval_composite"]}
    assert not test_prompts & {e.prompt for e in sets["val_composite"] + sets["calib:k=16 target"]}


def test_plain_delta_reader_equals_peft_merge_and_unload(tmp_path):
    """The working model's deltas (W0 + s B A, rank/alpha patterns) equal PEFT's merge_and_unload."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from soupkit.testing import tiny_llama_config

    from examples.skill_composition.weights import WorkingModel, adapter_deltas, peft_deltas

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_llama_config()).eval()
    spec = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "down_proj"],
        rank_pattern={"down_proj": 2},
        alpha_pattern={"down_proj": 6},
        init_lora_weights=False,
    )
    get_peft_model(base, spec).save_pretrained(tmp_path / "a")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_llama_config()).eval()  # unwrapped again (PEFT wrapped the first)
    want = peft_deltas(base, tmp_path / "a")
    got = adapter_deltas(tmp_path / "a", torch.device("cpu"))
    assert set(got) == set(want) and len(got) == 4
    for path, delta in want.items():
        torch.testing.assert_close(got[path], delta, rtol=1e-5, atol=1e-6)
    model = WorkingModel(base)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model.set_adapter(tmp_path / "a")
    assert not torch.equal(
        base.state_dict()["model.layers.0.self_attn.q_proj.weight"], before["model.layers.0.self_attn.q_proj.weight"]
    )
    model.reset()
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_two_workers_share_the_queue_and_a_rerun_frees_stale_claims(tmp_path):
    """--workers 2: both processes take tasks (LoRAs, then rows) and every row is done once; a task
    claimed by a run that was cut short (claim file, no result) is run again by the next run."""
    from dataclasses import replace

    from examples.skill_composition.config import SMOKE
    from examples.skill_composition.merges import rows, slug
    from examples.skill_composition.run import main

    # no calibration regimes (no fit-alpha, MoE or control rows): still enough rows for two workers, cheaper
    args = ["--out", str(tmp_path), "--smoke", "--config", '{"regimes": []}']
    cfg = replace(SMOKE, regimes=())
    results = main([*args, "--workers", "2"])
    assert all(e["seeds_ok"] == 1 for e in results["table"]), [e["name"] for e in results["table"] if not e["seeds_ok"]]
    assert len(results["table"]) == len(rows(cfg)) > 20
    logs = [(tmp_path / "logs" / f"worker{i}.log").read_text() for i in range(2)]
    assert all("[seed 0]" in log for log in logs)  # each worker ran something
    trained = [line.split("LoRAs ")[1].split(":")[0] for log in logs for line in log.splitlines() if "trained together" in line]
    assert sorted(trained) == ["math, code", "mix"]  # two packs (data-mix has twice the steps), each trained once

    seed = tmp_path / f"run-{cfg.key()}" / "seed0"
    row = slug(rows(cfg)[1].name)
    (seed / "rows" / f"{row}.json").unlink()
    (seed / "claims" / row).touch()  # as a worker killed mid-row leaves it
    again = main(args)
    assert all(e["seeds_ok"] == 1 for e in again["table"])
    assert (seed / "rows" / f"{row}.json").is_file()


def test_resume_retrains_a_pack_bit_for_bit_and_finishes_the_row(tmp_path):
    """resume.py after the cached LoRAs are lost: the row's pack is retrained equal to the run's record
    (final losses and norm ratios), and the sweep row is run again from its study."""
    import shutil

    from examples.skill_composition import resume
    from examples.skill_composition.config import SMOKE
    from examples.skill_composition.run import main

    main(["--out", str(tmp_path), "--smoke", "--stages", "search"])
    seed = tmp_path / f"run-{SMOKE.key()}" / "seed0"
    record = tmp_path / "record"
    shutil.copytree(seed / "trained", record / "trained")
    shutil.copy(seed / "adapters.json", record)
    for gone in (seed / "adapters", seed / "trained"):
        shutil.rmtree(gone)
    row = next(seed.glob("rows/soupkit_sweep_every_method*.json"))
    row.unlink()
    args = ["--smoke", "--source", "unused", "--out", str(tmp_path), "--seed", "0", "--stages", "search"]
    resume.main([*args, "--row", "soupkit sweep: every method", "--record", str(record)])
    report = json.loads((tmp_path / "resume-seed0.json").read_text())
    assert report["pack"] == ["math", "code"]  # data-mix (twice the steps) is its own pack
    assert all(c["identical"] for c in report["check"].values()), report["check"]
    assert report["status"] == "ok" and report["search"] == SMOKE.search_trials and row.is_file()
