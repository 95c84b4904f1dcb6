"""``soupkit analyze``: every number against a dense float64 computation written plainly here."""

from __future__ import annotations

import json
import math
from itertools import combinations
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from soupkit.analyze import analyze_recipe
from soupkit.analyze.run import module_record
from soupkit.cli import main
from soupkit.methods import LoraFactors
from soupkit.plan import ModulePlan
from soupkit.recipe import Recipe

from conftest import TINY, reference_deltas, tiny_recipe, write_recipe

RTOL = 1e-5
NAMES = ("math", "code", "chat")


def three_adapter_recipe(**merge: object) -> dict:
    recipe = tiny_recipe("ties", (0.7, -0.5), density=0.3, **merge)
    recipe["adapters"].append({"name": "chat", "path": str(TINY / "adapters" / "chat"), "weight": 0.4})
    return recipe


def dense_bases(D: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left and right singular vectors of D with s > 1e-6 s_1 (numpy-style full SVD, float64)."""
    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    keep = S > S[0] * 1e-6
    return U[:, keep], Vh[keep].T


def dense_overlap(X: torch.Tensor, Y: torch.Tensor) -> tuple[float, float]:
    cos = torch.linalg.svdvals(X.T @ Y)
    return float(cos.square().sum()) / min(X.shape[1], Y.shape[1]), float(cos.max())


def dense_conflict(deltas: list[torch.Tensor], density: float) -> float:
    """Trim each delta to its top int(density * n) |.| (ties kept), then count sign conflicts plainly."""
    trimmed = []
    for d in deltas:
        k = int(density * d.numel())
        threshold = d.abs().flatten().sort(descending=True).values[k - 1]
        trimmed.append(torch.where(d.abs() >= threshold, d, torch.zeros_like(d)))
    stack = torch.stack(trimmed)
    nonzero = (stack != 0).sum(dim=0)
    both = ((stack > 0).any(dim=0)) & ((stack < 0).any(dim=0))
    return float((both & (nonzero >= 2)).sum()) / float((nonzero >= 2).sum())


def close(a: float, b: float, tol: float = RTOL) -> bool:
    return abs(a - b) <= tol * max(abs(b), 1e-12)


@pytest.fixture(scope="module")
def analysed(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    recipe = Recipe.from_dict(three_adapter_recipe(), tmp_path_factory.mktemp("analyze"))
    result = analyze_recipe(recipe, dense=True)
    deltas = {n: reference_deltas(TINY / "adapters" / n) for n in NAMES}
    return result, deltas


def test_module_numbers_equal_dense(analysed: tuple[dict, dict]) -> None:
    result, deltas = analysed
    weights = {"math": 0.7, "code": -0.5, "chat": 0.4}
    base = load_file(TINY / "base" / "model.safetensors")
    assert len(result["modules"]) == len({p for d in deltas.values() for p in d})
    for record in result["modules"]:
        path = record["path"]
        present = [n for n in NAMES if path in deltas[n]]
        assert record["adapters"] == present
        D = {n: deltas[n][path] for n in present}
        W = base[f"{path}.weight"].double()
        for n in present:
            assert close(record["norm"][n], float(D[n].norm()))
            assert close(record["relative_norm"][n], float(D[n].norm() / W.norm()))
            assert record["delta_rank"][n] == int(torch.linalg.matrix_rank(D[n]))
        for pair in record["pairs"]:
            a, b = pair["pair"]
            assert close(pair["cosine"], float((D[a] * D[b]).sum() / (D[a].norm() * D[b].norm())), 1e-4)
            (Ua, Va), (Ub, Vb) = dense_bases(D[a]), dense_bases(D[b])
            col, col_max = dense_overlap(Ua, Ub)
            row, row_max = dense_overlap(Va, Vb)
            assert close(pair["col_overlap"], col) and close(pair["col_max_cos"], col_max)
            assert close(pair["row_overlap"], row) and close(pair["row_max_cos"], row_max)
        assert [p["pair"] for p in record["pairs"]] == [list(p) for p in combinations(present, 2)]
        assert record["cat_rank"] == sum(int(torch.linalg.matrix_rank(D[n])) for n in present)  # full-rank adapters
        # full-rank factors here: the core space (stacked factors) has the dimension of the deltas' joint span
        wide, tall = torch.cat(list(D.values()), dim=1), torch.cat(list(D.values()), dim=0)
        assert record["core_rank"] == min(int(torch.linalg.matrix_rank(wide)), int(torch.linalg.matrix_rank(tall)))
        if len(present) > 1:
            assert close(record["sign_conflict"], dense_conflict([weights[n] * D[n] for n in present], 0.3))
        else:
            assert math.isnan(record["sign_conflict"])


def test_layer_and_model_summaries_equal_dense(analysed: tuple[dict, dict]) -> None:
    """Per layer: Frobenius norm and cosine of the adapters' concatenated deltas over that layer."""
    result, deltas = analysed
    base = load_file(TINY / "base" / "model.safetensors")
    for summary in [*result["layers"], result["model"]]:
        label = summary["layer"]
        paths = [r["path"] for r in result["modules"] if label == "model" or r["layer"] == label]
        flat = {
            n: torch.cat([deltas[n].get(p, torch.zeros_like(base[f"{p}.weight"].double())).flatten() for p in paths])
            for n in NAMES
        }
        W = torch.cat([base[f"{p}.weight"].double().flatten() for p in paths])
        for n in NAMES:
            assert close(summary["norm"][n], float(flat[n].norm()))
            assert close(summary["relative_norm"][n], float(flat[n].norm() / W.norm()))
        for pair in summary["pairs"]:
            a, b = pair["pair"]
            assert close(pair["cosine"], float(flat[a] @ flat[b] / (flat[a].norm() * flat[b].norm())), 1e-4)


def test_rank_deficient_factors_use_the_delta_spaces() -> None:
    """A with two equal rows: delta has rank 4 < r = 5, and its column space is not span(B)."""
    g = torch.Generator().manual_seed(0)
    A1, B1 = torch.randn(5, 20, generator=g), torch.randn(30, 5, generator=g)
    A1[4] = A1[3]
    A2, B2 = torch.randn(3, 20, generator=g), torch.randn(30, 3, generator=g)
    B2[:, 2] = B1[:, 0]  # shared direction: the column spaces overlap
    module = ModulePlan("model.layers.0.mlp.up_proj", "linear", 0, 20, 30, (), 8)
    record = module_record(module, ("x", "y"), [LoraFactors(A1, B1), LoraFactors(A2, B2)], [1.0, 1.0], None, False)
    D1, D2 = B1.double() @ A1.double(), B2.double() @ A2.double()
    assert record["delta_rank"] == {"x": 4, "y": 3}
    (U1, V1), (U2, V2) = dense_bases(D1), dense_bases(D2)
    pair = record["pairs"][0]
    assert close(pair["col_overlap"], dense_overlap(U1, U2)[0]) and close(pair["row_overlap"], dense_overlap(V1, V2)[0])
    assert close(pair["col_max_cos"], dense_overlap(U1, U2)[1])
    # the core space is spanned by the stacked factors (docs/methods.md, "Merge space"), here wider than the deltas' span (6)
    B_stack, A_stack = torch.cat([B1, B2], 1).double(), torch.cat([A1, A2], 0).double()
    assert record["core_rank"] == min(int(torch.linalg.matrix_rank(B_stack)), int(torch.linalg.matrix_rank(A_stack))) == 7


def test_cli_writes_json_table_heatmaps_and_refuses_a_taken_path(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, three_adapter_recipe())
    out = tmp_path / "analysis"
    result = CliRunner().invoke(main, ["analyze", str(recipe), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "| model |" in result.output
    data = json.loads((out / "analysis.json").read_text())
    assert data["adapters"] == list(NAMES) and "sign_conflict" not in data["model"]
    assert {p.name for p in out.glob("*.png")} == {
        f"{s}.png" for s in ("norm", "relative_norm", "cosine", "col_overlap", "row_overlap", "cat_rank", "core_rank")
    }
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir())
    again = CliRunner().invoke(main, ["analyze", str(recipe), "-o", str(out)])
    assert again.exit_code == 2 and again.output.count("\n") == 1 and "--overwrite" in again.output
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir()) == before
    assert not (tmp_path / "analysis" / "sign_conflict.png").exists()
