"""``merge.space: core`` (Core Space merging), TSV-Merge and Iso-C against dense float64 references
written plainly here from docs/methods.md (Merge space, tsv, iso_c): module level on random adapters of different
ranks, whole runs on examples/tiny (ranks 4 and 8, different target sets), and the shipped recipes via
the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from soupkit.cli import main
from soupkit.execute import RunOptions
from soupkit.merge import merge_recipe
from soupkit.methods import REGISTRY, LoraFactors, MergeContext
from soupkit.recipe import Recipe

from conftest import ROOT, TINY, reference_deltas, tiny_recipe, write_recipe

QUIET = RunOptions(progress=False)
D_OUT, D_IN = 40, 28
SPACED = sorted(n for n, m in REGISTRY.items() if "space" in m.Params.model_fields)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors run faster on one thread


# --- plain float64 references ------------------------------------------------------------


def plain_basis(Bs: list[torch.Tensor], As: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """U_ref: left singular vectors of [B_1 ... B_T]; V_ref: right singular vectors (rows) of [A_1; ...; A_T]."""
    U = torch.linalg.svd(torch.cat(Bs, dim=1), full_matrices=False).U
    V = torch.linalg.svd(torch.cat(As, dim=0), full_matrices=False).Vh
    return U, V


def plain_core(Bs: list[torch.Tensor], As: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Basis and core matrices M_i = U^T (B_i A_i) V^T, through the dense products (B_i carry w_i s_i)."""
    U, V = plain_basis(Bs, As)
    return U, V, [U.T @ (B @ A) @ V.T for B, A in zip(Bs, As)]


def plain_trim(x: torch.Tensor, density: float) -> torch.Tensor:
    k = int(density * x.numel())
    mask = torch.zeros(x.numel(), dtype=torch.bool)
    if k > 0:
        mask[x.abs().flatten().topk(k).indices] = True
    return x * mask.view(x.shape)


def plain_ties(mats: list[torch.Tensor], density: float, lam: float) -> torch.Tensor:
    """TIES on already-weighted matrices: trim, sign of the sum (0 -> +), mean of the agreeing entries."""
    trimmed = [plain_trim(m, density) for m in mats]
    elected = torch.sign(sum(trimmed))
    elected[elected == 0] = 1
    agree = [torch.sign(t) == elected for t in trimmed]
    total = sum(t * a for t, a in zip(trimmed, agree))
    count = sum(a.double() for a in agree).clamp(min=1)
    return lam * total / count


def nonzero_svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Singular triplets above 1e-4 of the largest (docs/methods.md, rank-revealing tolerance)."""
    U, S, Vh = torch.linalg.svd(x, full_matrices=False)
    k = int((S > 1e-4 * S[0]).sum())
    return U[:, :k], S[:k], Vh[:k]


def plain_polar(x: torch.Tensor) -> torch.Tensor:
    """Rank-revealing polar factor P_n Q_n^T (n singular values above 1e-4 of the largest)."""
    P, _, Qh = nonzero_svd(x)
    return P @ Qh


def plain_tsv(mats: list[torch.Tensor], lam: float) -> torch.Tensor:
    """docs/methods.md ``tsv`` on (weighted) task matrices: top min(rank_i, dim // T) triplets, whiten U and V."""
    cap = min(mats[0].shape) // len(mats)
    parts = [nonzero_svd(m) for m in mats]
    U = torch.cat([u[:, :cap] for u, _, _ in parts], dim=1)
    S = torch.cat([s[:cap] for _, s, _ in parts])
    V = torch.cat([vh[:cap] for _, _, vh in parts], dim=0).T
    return lam * plain_polar(U) @ torch.diag(S) @ plain_polar(V).T


def plain_iso(total: torch.Tensor, lam: float) -> torch.Tensor:
    """docs/methods.md ``iso_c``: mean of the nonzero singular values times U V^T."""
    U, S, Vh = nonzero_svd(total)
    return lam * S.mean() * U @ Vh


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / max(float(want.norm()), 1e-300))


# --- module level: random adapters of different ranks ------------------------------------


def random_factors(seed: int, rank: int, scale: float = 2.0) -> LoraFactors:
    g = torch.Generator().manual_seed(seed)
    return LoraFactors(A=torch.randn(rank, D_IN, generator=g), B=scale * 0.1 * torch.randn(D_OUT, rank, generator=g), scale=scale)


INPUTS = [random_factors(1, 3), random_factors(2, 6), random_factors(3, 4)]
WEIGHTS = [0.7, 1.2, -0.5]


def module_merge(name: str, inputs: list[LoraFactors], weights: list[float], rank: int | None = None, **params) -> torch.Tensor:
    method = REGISTRY[name]
    p = method.Params.model_validate(params)
    ctx = MergeContext("model.layers.0.mlp.up_proj", rank, 0, sources=("math", "code", "chat")[: len(inputs)])
    f = method.merge(inputs, weights, p, ctx).factors
    assert f.rank <= method.output_rank([x.rank for x in inputs], p, rank)
    return f.B.double() @ f.A.double()


def weighted(inputs: list[LoraFactors], weights: list[float]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(w_i s_i B_i, A_i) in float64: the scale is already in B."""
    return [w * f.B.double() for f, w in zip(inputs, weights)], [f.A.double() for f in inputs]


@pytest.mark.parametrize("n", [1, 2, 3])
def test_core_linear_is_the_exact_weighted_sum(n: int) -> None:
    inputs, weights = INPUTS[:n], WEIGHTS[:n]
    want = sum(w * f.B.double() @ f.A.double() for f, w in zip(inputs, weights))
    assert rel(module_merge("linear", inputs, weights, space="core"), want) < 1e-6


@pytest.mark.parametrize("n", [2, 3])
def test_core_ties_equals_reference(n: int) -> None:
    Bs, As = weighted(INPUTS[:n], WEIGHTS[:n])
    U, V, M = plain_core(Bs, As)
    want = U @ plain_ties(M, 0.3, 1.3) @ V
    got = module_merge("ties", INPUTS[:n], WEIGHTS[:n], space="core", density=0.3, **{"lambda": 1.3})
    assert rel(got, want) < 1e-5


@pytest.mark.parametrize("n", [2, 3])
def test_core_tsv_equals_reference(n: int) -> None:
    Bs, As = weighted(INPUTS[:n], WEIGHTS[:n])
    U, V, M = plain_core(Bs, As)
    want = U @ plain_tsv(M, 0.8) @ V
    assert rel(module_merge("tsv", INPUTS[:n], WEIGHTS[:n], space="core", **{"lambda": 0.8}), want) < 1e-5


@pytest.mark.parametrize("n", [2, 3])
def test_full_tsv_equals_reference(n: int) -> None:
    deltas = [B @ A for B, A in zip(*weighted(INPUTS[:n], WEIGHTS[:n]))]
    want = plain_tsv(deltas, 0.8)
    assert rel(module_merge("tsv", INPUTS[:n], WEIGHTS[:n], space="full", **{"lambda": 0.8}), want) < 1e-5


def test_core_and_full_tsv_differ_only_by_the_core_cap() -> None:
    """Ranks 3 and 6: the core cap floor(9 / 2) = 4 cuts the rank-6 spectrum, the full cap (28 / 2) does not."""
    full = module_merge("tsv", INPUTS[:2], WEIGHTS[:2], space="full")
    core = module_merge("tsv", INPUTS[:2], WEIGHTS[:2], space="core")
    assert torch.linalg.matrix_rank(full).item() == 9 and torch.linalg.matrix_rank(core).item() == 7
    equal_ranks = [random_factors(5, 4), random_factors(6, 4)]
    assert rel(module_merge("tsv", equal_ranks, [1.0, 0.6], space="core"), module_merge("tsv", equal_ranks, [1.0, 0.6])) < 1e-5


@pytest.mark.parametrize("space", ["full", "core"])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_iso_c_equals_reference(space: str, n: int) -> None:
    total = sum(B @ A for B, A in zip(*weighted(INPUTS[:n], WEIGHTS[:n])))
    want = plain_iso(total, 1.5)
    assert rel(module_merge("iso_c", INPUTS[:n], WEIGHTS[:n], space=space, **{"lambda": 1.5}), want) < 1e-5


def test_iso_c_rank_budget_keeps_the_largest_directions() -> None:
    total = sum(B @ A for B, A in zip(*weighted(INPUTS[:2], WEIGHTS[:2])))
    U, S, Vh = nonzero_svd(total)
    want = S.mean() * U[:, :5] @ Vh[:5]
    for space in ("full", "core"):
        assert rel(module_merge("iso_c", INPUTS[:2], WEIGHTS[:2], rank=5, space=space), want) < 1e-5


def test_core_ties_one_adapter_density_one_is_the_identity() -> None:
    f = INPUTS[1]
    got = module_merge("ties", [f], [1.0], space="core", density=1.0)
    assert rel(got, f.B.double() @ f.A.double()) < 1e-6


@pytest.mark.parametrize("space,r2", [("full", 4), ("core", 3)])
def test_tsv_of_orthogonal_singular_spaces_is_the_sum(space: str, r2: int) -> None:
    """Delta_1 and Delta_2 with orthogonal column spaces and orthogonal row spaces: nothing to whiten.
    (Core space caps each task at floor(R / T) directions, so there the ranks are equal.)"""
    g = torch.Generator().manual_seed(9)
    Q_out = torch.linalg.qr(torch.randn(D_OUT, 3 + r2, generator=g, dtype=torch.float64))[0]
    Q_in = torch.linalg.qr(torch.randn(D_IN, 3 + r2, generator=g, dtype=torch.float64))[0]
    one = LoraFactors(A=(torch.randn(3, 3, generator=g, dtype=torch.float64) @ Q_in[:, :3].T).float(), B=Q_out[:, :3].float())
    two = LoraFactors(A=(torch.randn(r2, r2, generator=g, dtype=torch.float64) @ Q_in[:, 3:].T).float(), B=Q_out[:, 3:].float())
    want = 0.9 * one.B.double() @ one.A.double() + 0.5 * two.B.double() @ two.A.double()
    assert rel(module_merge("tsv", [one, two], [0.9, 0.5], space=space), want) < 1e-5


@pytest.mark.parametrize("name,params", [("magnitude_prune", {"density": 0.4}), ("breadcrumbs", {"density": 0.5, "gamma": 0.1})])
def test_core_magnitude_rules_equal_reference(name: str, params: dict) -> None:
    Bs, As = weighted(INPUTS[:2], WEIGHTS[:2])
    U, V, M = plain_core(Bs, As)
    if name == "magnitude_prune":
        merged = sum(plain_trim(m, 0.4) for m in M)
    else:  # ranks 10%..60% by |.|: top 60% minus top 10%
        merged = sum(plain_trim(m, 0.6) - plain_trim(m, 0.1) for m in M)
    assert rel(module_merge(name, INPUTS[:2], WEIGHTS[:2], space="core", **params), U @ merged @ V) < 1e-5


@pytest.mark.parametrize("name,params", [("dare_linear", {"density": 0.4}), ("della", {"density": 0.5, "epsilon": 0.2})])
def test_core_random_drops_are_unbiased(name: str, params: dict) -> None:
    """Mean over seeds of a core-space drop-and-rescale merge (one adapter for DELLA, whose election is
    not linear) equals the weighted sum within 5 standard errors."""
    n = 2 if name == "dare_linear" else 1
    inputs, weights = INPUTS[:n], WEIGHTS[:n]
    want = sum(w * f.B.double() @ f.A.double() for f, w in zip(inputs, weights))
    method = REGISTRY[name]
    p = method.Params.model_validate({**params, "space": "core"})
    draws = []
    for seed in range(600):
        ctx = MergeContext("model.layers.0.mlp.up_proj", None, seed, sources=("math", "code")[:n])
        f = method.merge(inputs, weights, p, ctx).factors
        draws.append(f.B.double() @ f.A.double())
    stack = torch.stack(draws)
    assert float(stack.std(dim=0).max()) > 0.01  # it really is random
    stderr = stack.std(dim=0) / len(draws) ** 0.5
    assert bool(((stack.mean(dim=0) - want).abs() <= 5 * stderr + 1e-6).all())


# --- the contract of every space-aware method, in core space -----------------------------


def contract_params(name: str) -> dict:
    params = {**REGISTRY[name].identity_params, "space": "core"}
    return params


@pytest.mark.parametrize("name", SPACED)
def test_core_identity_zero_order_negation(name: str) -> None:
    method = REGISTRY[name]
    g = torch.Generator().manual_seed(4)
    if method.identity_needs_flat_spectrum:
        Q_out = torch.linalg.qr(torch.randn(D_OUT, 5, generator=g))[0]
        Q_in = torch.linalg.qr(torch.randn(D_IN, 5, generator=g))[0]
        single = LoraFactors(A=Q_in.T.contiguous(), B=0.4 * Q_out)
    else:
        single = INPUTS[1]
    got = module_merge(name, [single], [1.0], **contract_params(name))
    assert rel(got, single.B.double() @ single.A.double()) < 1e-5, "identity"
    trimmed = {**contract_params(name), **({"density": 0.5} if "density" in method.Params.model_fields else {})}
    if name == "breadcrumbs":
        trimmed.update(density=0.6, gamma=0.05)
    if name == "della":
        trimmed.update(epsilon=0.1)
    zero = module_merge(name, INPUTS[:2], [0.0, 0.0], **trimmed)
    assert float(zero.abs().max()) == 0.0, "zero weights"
    a, b = INPUTS[0], INPUTS[1]
    forward = module_merge(name, [a, b], [0.7, 0.4], **trimmed)
    assert float(forward.norm()) > 0
    method_b = REGISTRY[name]
    ctx = MergeContext("model.layers.0.mlp.up_proj", None, 0, sources=("code", "math"))
    back = method_b.merge([b, a], [0.4, 0.7], method_b.Params.model_validate(trimmed), ctx).factors
    assert rel(back.B.double() @ back.A.double(), forward) < 1e-5, "order invariance"
    assert rel(module_merge(name, [a, b], [-0.7, -0.4], **trimmed), -forward) < 1e-5, "negation"


# --- whole runs on examples/tiny (ranks 4 and 8, different target sets) ------------------


def tiny_factors(name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(s * B, A) in float64 per module path, read plainly from the adapter files."""
    directory = TINY / "adapters" / name
    config = json.loads((directory / "adapter_config.json").read_text())
    tensors = load_file(directory / "adapter_model.safetensors")
    out = {}
    for key, A in tensors.items():
        if key.endswith("lora_A.weight"):
            path = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            scale = config["lora_alpha"] / A.shape[0]
            out[path] = (scale * tensors[key.replace("lora_A", "lora_B")].double(), A.double())
    return out


def tiny_reference(weights: list[float], rule) -> dict[str, torch.Tensor]:
    """Per module, ``rule`` on the weighted (w_i s_i B_i, A_i) of the adapters that target it."""
    math, code = tiny_factors("math"), tiny_factors("code")
    out = {}
    for path in sorted(set(math) | set(code)):
        present = [(f[path], w) for f, w in ((math, weights[0]), (code, weights[1])) if path in f]
        out[path] = rule([w * B for (B, _), w in present], [A for (_, A), _ in present])
    return out


def core_rule(rule):
    def apply(Bs, As):
        U, V, M = plain_core(Bs, As)
        return U @ rule(M) @ V

    return apply


CASES = {
    "linear-core": ({"space": "core"}, core_rule(lambda M: sum(M))),
    "ties-core": ({"space": "core", "density": 0.3, "lambda": 1.4}, core_rule(lambda M: plain_ties(M, 0.3, 1.4))),
    "tsv-full": ({"space": "full", "lambda": 0.7}, lambda Bs, As: plain_tsv([B @ A for B, A in zip(Bs, As)], 0.7)),
    "tsv-core": ({"space": "core", "lambda": 0.7}, core_rule(lambda M: plain_tsv(M, 0.7))),
    "iso_c-full": ({"space": "full"}, lambda Bs, As: plain_iso(sum(B @ A for B, A in zip(Bs, As)), 1.0)),
    "iso_c-core": ({"space": "core"}, lambda Bs, As: plain_iso(sum(B @ A for B, A in zip(Bs, As)), 1.0)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_tiny_runs_equal_reference(case: str, tmp_path: Path) -> None:
    params, rule = CASES[case]
    weights = [0.8, 0.6]
    out = tmp_path / "out"
    merge_recipe(Recipe.from_dict(tiny_recipe(case.split("-")[0], tuple(weights), **params), tmp_path), out, QUIET)
    got = reference_deltas(out)
    want = tiny_reference(weights, rule)
    assert set(got) == set(want)
    for path in want:
        assert rel(got[path], want[path]) < 1e-5, (case, path)


def test_tiny_core_ties_global_scope_equals_reference(tmp_path: Path) -> None:
    """One magnitude threshold per adapter over all of its (unweighted) core matrices."""
    weights, density = [0.8, 0.6], 0.3
    out = tmp_path / "out"
    recipe = tiny_recipe("ties", tuple(weights), space="core", density=density, scope="global")
    merge_recipe(Recipe.from_dict(recipe, tmp_path), out, QUIET)
    math, code = tiny_factors("math"), tiny_factors("code")
    cores: dict[str, tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]] = {}
    for path in sorted(set(math) | set(code)):
        present = [(n, f[path], w) for n, f, w in (("math", math, 0.8), ("code", code, 0.6)) if path in f]
        U, V = plain_basis([w * B for _, (B, _), w in present], [A for _, (_, A), _ in present])
        cores[path] = (U, V, {n: U.T @ B @ A @ V.T for n, (B, A), _ in present})
    threshold = {}
    for name in ("math", "code"):
        everything = torch.cat([c[2][name].abs().flatten() for c in cores.values() if name in c[2]])
        threshold[name] = everything.topk(int(density * everything.numel())).values[-1]
    got = reference_deltas(out)
    for path, (U, V, M) in cores.items():
        w = {"math": 0.8, "code": 0.6}
        trimmed = [w[n] * m * (m.abs() >= threshold[n]) for n, m in M.items()]
        want = U @ plain_ties(trimmed, 1.0, 1.0) @ V  # density 1: the trim above is the global one
        assert rel(got[path], want) < 1e-4, path


# --- the shipped recipes through the CLI, and the one-line refusals ----------------------


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


RECIPE_CASES = {
    "tsv": lambda Bs, As: plain_tsv([B @ A for B, A in zip(Bs, As)], 1.0),
    "iso_c": lambda Bs, As: plain_iso(sum(B @ A for B, A in zip(Bs, As)), 1.0),
    "ties_core": core_rule(lambda M: plain_ties(M, 0.3, 1.0)),
}


@pytest.mark.parametrize("recipe", sorted(RECIPE_CASES))
def test_shipped_recipe_merges_via_cli(recipe: str, tmp_path: Path) -> None:
    out = tmp_path / recipe
    result = invoke("merge", str(ROOT / "recipes" / f"{recipe}.yaml"), "-o", str(out), "--quiet")
    assert result.exit_code == 0, result.output
    got = reference_deltas(out)
    want = tiny_reference([1.0, 1.0], RECIPE_CASES[recipe])
    assert set(got) == set(want)
    for path in want:  # the recipes write bfloat16: 8 bits of mantissa
        assert rel(got[path], want[path]) < 2e-2, (recipe, path)


@pytest.mark.parametrize(
    "merge,where,found",
    [
        ({"method": "cat", "space": "core"}, "merge.space: expected no 'space' key for method 'cat'", "found 'core'"),
        ({"method": "knots", "space": "full"}, "merge.space: expected no 'space' key for method 'knots'", "found 'full'"),
        ({"method": "ties", "space": "cores"}, "merge.space: expected 'full' or 'core'", "'cores'"),
    ],
)
def test_space_errors_are_one_line(merge: dict, where: str, found: str, tmp_path: Path) -> None:
    recipe = tiny_recipe()
    recipe["merge"] = merge
    out = tmp_path / "out"
    result = invoke("merge", str(write_recipe(tmp_path, recipe)), "-o", str(out), "--quiet")
    assert result.exit_code == 2 and where in result.output and found in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()


def test_plan_memory_of_core_space_has_no_dense_matrix(tmp_path: Path) -> None:
    from soupkit.execute import plan_recipe

    plans = {}
    for space in ("full", "core"):
        plans[space] = plan_recipe(Recipe.from_dict(tiny_recipe("ties", space=space, density=0.3), tmp_path))[0]
    assert plans["core"].peak_bytes < plans["full"].peak_bytes


def test_core_lock_file_reruns_byte_identical(tmp_path: Path) -> None:
    """The lock records ``space: core``; merging the lock again writes the same bytes."""
    out, rerun = tmp_path / "out", tmp_path / "rerun"
    assert invoke("merge", str(ROOT / "recipes" / "ties_core.yaml"), "-o", str(out), "--quiet").exit_code == 0
    assert "space: core" in (out / "soupkit.lock.yaml").read_text()
    result = invoke("merge", str(out / "soupkit.lock.yaml"), "-o", str(rerun), "--quiet")
    assert result.exit_code == 0, result.output
    assert (rerun / "adapter_model.safetensors").read_bytes() == (out / "adapter_model.safetensors").read_bytes()


def test_methods_listing_shows_space_for_each_space_aware_method() -> None:
    """``soupkit methods``: a ``space`` parameter line under exactly the methods that accept one."""
    result = invoke("methods")
    assert result.exit_code == 0
    lines = result.output.splitlines()
    for name in REGISTRY:
        start = next(i for i, line in enumerate(lines) if line.startswith(f"{name}  ["))
        block = []
        for line in lines[start + 1 :]:
            if not line.startswith("    "):
                break
            block.append(line)
        has_space = any(line.strip().startswith("space (") for line in block)
        assert has_space == (name in SPACED), name


def test_the_methods_with_a_core_space_are_the_issue_list() -> None:
    assert SPACED == sorted(
        ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune", "della", "breadcrumbs", "tsv", "iso_c"]
    )
