"""The model ``fit-alpha`` trains: a frozen base with ONE concatenated low-rank path per target module.

For a module with adapters i = 1..n present (scale folded into B_i):

    y = W0 x + B_cat ((A_cat x) * w_rank),   A_cat = [A_1; ...; A_n] (R, d_in),  B_cat = [B_1, ..., B_n] (d_out, R)

with R = sum_i r_i and ``w_rank`` (R,) the adapter weights repeated over each adapter's rank. This
equals ``sum_i w_i B_i A_i x`` exactly (CAT), costs two thin matmuls, and keeps for backward only
``A_cat x`` (tokens x R) per module: one path per adapter that scales each adapter's output
(d_out wide) must keep n outputs of d_out per module instead. Only the weight logits train.
While fitting, each target Linear is swapped for a ``CatLinear`` (catlinear.py: base and path fused
in one autograd Function); ``detach_paths`` puts the originals back.

Parametrisation (``constraint``): ``softmax`` -- per module, w = softmax of the logits of the
adapters present (LoRA Soups' convex combination; a module with one adapter gets weight 1);
``free`` -- w = the logits themselves. ``granularity`` shares logits across a layer's modules
(``layer``) or across the whole model (``adapter``) instead of one set per module (``module``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from soupkit.errors import SoupkitError
from soupkit.fit.catlinear import CatLinear
from soupkit.fit.data import IGNORE
from soupkit.recipe.schema import Recipe

Granularity = Literal["module", "layer", "adapter"]
Constraint = Literal["softmax", "free"]


@dataclass(frozen=True)
class TargetModule:
    """One module the fit adapts: its path, layer, the adapters present and their ranks."""

    path: str
    layer: int | None
    adapters: tuple[int, ...]  # indices into the recipe's adapters, in recipe order
    ranks: tuple[int, ...]

    @property
    def leaf(self) -> str:
        return self.path.rsplit(".", 1)[-1]


class LowRankPath(nn.Module):
    """Frozen concatenated factors of one module: A (R, d_in) and B (d_out, R).

    Frozen parameters, not buffers: FSDP shards parameters only, so as parameters of the
    ``CatLinear`` inside each transformer block they are sharded with that block's weights.
    """

    def __init__(self, A: torch.Tensor, B: torch.Tensor, start: int) -> None:
        super().__init__()
        self.A = nn.Parameter(A, requires_grad=False)
        self.B = nn.Parameter(B, requires_grad=False)
        self.start, self.end = start, start + A.shape[0]  # this module's slice of the flat rank weights


def group_ids(targets: list[TargetModule], granularity: Granularity) -> list[int]:
    """Which logit group each module uses: its own, its layer's, or the single global one."""
    if granularity == "adapter":
        return [0] * len(targets)
    keys = [t.path if granularity == "module" else t.layer for t in targets]
    order = list(dict.fromkeys(keys))
    return [order.index(k) for k in keys]


class CatFitModel(nn.Module):
    """A causal LM with frozen concatenated LoRA paths whose per-adapter weights are learned.

    Args:
        base: a transformers causal LM (frozen here).
        targets: the modules to adapt, in a fixed order (that order is the row order of weights).
        factors: per target, the adapters' (A_i, B_i) with scale folded into B, aligned with ``adapters``.
        n_adapters: number of adapters in the recipe.
        granularity, constraint: see the module docstring.
    """

    def __init__(
        self,
        base: nn.Module,
        targets: list[TargetModule],
        factors: list[list[tuple[torch.Tensor, torch.Tensor]]],
        n_adapters: int,
        granularity: Granularity,
        constraint: Constraint,
    ) -> None:
        super().__init__()
        self.base, self.targets, self.constraint, self.n_adapters = base, targets, constraint, n_adapters
        for p in self.base.parameters():
            p.requires_grad_(False)
        groups = group_ids(targets, granularity)
        self.logits = nn.Parameter(torch.zeros(max(groups) + 1, n_adapters))
        mask = torch.zeros(len(targets), n_adapters, dtype=torch.bool)
        # a plain list: each LowRankPath is registered once, as a child of its CatLinear in the base
        self.paths: list[LowRankPath] = []
        rank_index, start = [], 0
        dtype = next(base.parameters()).dtype
        for m, (target, pairs) in enumerate(zip(targets, factors, strict=True)):
            for a, r in zip(target.adapters, target.ranks, strict=True):
                mask[m, a] = True
                rank_index += [m * n_adapters + a] * r  # flat (module, adapter) index of every rank column
            A = torch.cat([p[0] for p in pairs], dim=0).to(dtype)
            B = torch.cat([p[1] for p in pairs], dim=1).to(dtype)
            self.paths.append(LowRankPath(A, B, start))
            start += A.shape[0]
        self.register_buffer("group", torch.tensor(groups), persistent=False)
        self.register_buffer("mask", mask, persistent=False)
        self.register_buffer("rank_index", torch.tensor(rank_index), persistent=False)
        self.fixed: torch.Tensor | None = None  # (M, n) weights that bypass the logits (evaluation, search)
        self._w_rank: torch.Tensor | None = None
        self._originals: dict[str, nn.Linear] = {}
        self.attach_paths()

    def _w_rank_of(self, path: LowRankPath) -> Callable[[], torch.Tensor]:
        def w_rank() -> torch.Tensor:
            if self._w_rank is None:
                raise RuntimeError("call CatFitModel.forward, not the base model, while the paths are attached")
            return self._w_rank[path.start : path.end]

        return w_rank

    def weights(self) -> torch.Tensor:
        """Per-module adapter weights (M, n): 0 where an adapter is absent; differentiable in the logits."""
        if self.fixed is not None:
            return self.fixed.to(self.logits.device) * self.mask
        logits = self.logits[self.group]
        if self.constraint == "softmax":
            return logits.masked_fill(~self.mask, -math.inf).softmax(dim=-1)
        return logits * self.mask

    def logits_for(self, weights: torch.Tensor) -> torch.Tensor:
        """Logits (G, n) that reproduce per-module ``weights`` (M, n) at init; refuses what cannot be.

        softmax keeps only each module's proportions (log w), so weights must be positive; with a
        shared group the modules of a group must agree.
        """
        if self.constraint == "softmax":
            if bool((weights[self.mask] <= 0).any()):
                raise SoupkitError(
                    "--init recipe", "positive recipe weights with --constraint softmax", "a weight <= 0", "use --constraint free"
                )
            values = torch.where(self.mask, weights.clamp_min(1e-30).log(), torch.zeros_like(weights))
        else:
            values = torch.where(self.mask, weights, torch.zeros_like(weights))
        logits = torch.zeros_like(self.logits)
        seen = torch.zeros_like(self.logits, dtype=torch.bool)
        for m, g in enumerate(self.group.tolist()):
            for a in torch.nonzero(self.mask[m]).flatten().tolist():
                if seen[g, a] and not torch.isclose(logits[g, a], values[m, a]):
                    raise SoupkitError(
                        "--init recipe",
                        "recipe weights equal within each shared group",
                        "weights that differ",
                        "use --granularity module",
                    )
                logits[g, a], seen[g, a] = values[m, a], True
        return logits

    def lm_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The adapted model's logits (batch, length, vocab) under the current weights.

        ``_w_rank`` stays set after the call: activation checkpointing re-runs the blocks' forward
        during backward, and they read it then.
        """
        self._w_rank = self.weights().flatten()[self.rank_index]
        return self.base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token cross-entropy over label tokens (float32 or wider scalar) and their count."""
        logits = self.lm_logits(input_ids, attention_mask)
        targets = labels[:, 1:]
        scores = logits[:, :-1].flatten(0, 1)
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32))  # bf16 -> float32; float64 stays
        loss = F.cross_entropy(scores, targets.flatten(), ignore_index=IGNORE, reduction="sum")
        return loss, (targets != IGNORE).sum()

    def attach_paths(self) -> None:
        """Put a CatLinear in place of each target Linear (done at construction; again after detach)."""
        if self._originals:
            return
        for target, path in zip(self.targets, self.paths, strict=True):
            parent_name, _, leaf = target.path.rpartition(".")
            parent, linear = self.base.get_submodule(parent_name), self.base.get_submodule(target.path)
            if not isinstance(linear, nn.Linear):
                raise SoupkitError(
                    target.path,
                    "an nn.Linear in the loaded base",
                    type(linear).__name__,
                    "fit-alpha supports Linear targets only",
                )
            self._originals[target.path] = linear
            setattr(parent, leaf, CatLinear(linear, path, self._w_rank_of(path)))

    def detach_paths(self) -> None:
        """Put the original Linears back: the base model is plain again."""
        for path, linear in self._originals.items():
            parent_name, _, leaf = path.rpartition(".")
            setattr(self.base.get_submodule(parent_name), leaf, linear)
        self._originals, self._w_rank = {}, None


def fit_targets(recipe: Recipe) -> tuple[list[TargetModule], torch.Tensor, Any]:
    """The modules a fit adapts, the recipe's own per-module weights (M, n), and the planned inputs.

    Refuses what fit-alpha does not handle: a method other than cat, non-Linear targets.
    """
    from soupkit.execute import plan_recipe

    if recipe.merge.method != "cat":
        raise SoupkitError(
            "merge.method", "cat (fit-alpha learns CAT's weights)", repr(recipe.merge.method), "set merge.method: cat"
        )
    plan, inputs = plan_recipe(recipe)
    if plan.fan_in_fan_out or any(m.kind != "linear" for m in plan.modules if m.sources):
        kinds = {m.kind for m in plan.modules if m.sources} - {"linear"}
        raise SoupkitError(
            "adapters",
            "LoRA on nn.Linear modules",
            "LoRA on targeted parameters (MoE experts, target_parameters)"
            if "param" in kinds
            else "embedding or Conv1D (fan_in_fan_out) LoRA",
            "fit-alpha supports Linear targets only",
        )
    dora = [a.name for a in inputs.adapters if a.magnitudes]
    if dora:  # the fitted model is W + sum_i alpha_i B_i A_i: a DoRA update is not B A
        raise SoupkitError(
            "adapters",
            "plain LoRA updates (fit-alpha models W + sum_i alpha_i B_i A_i)",
            f"DoRA adapter(s) {', '.join(dora)}",
            "merge DoRA adapters with soupkit merge (their task vectors merge exactly there)",
        )
    if plan.saved or plan.biased:  # the fitted model would leave them out: its weights would not fit the merge
        found = f"modules_to_save {plan.saved[0].name}" if plan.saved else f"lora_bias on {plan.biased[0]}"
        raise SoupkitError(
            "adapters",
            "plain LoRA updates (fit-alpha models no modules_to_save or lora_bias)",
            found,
            "fit on adapters without them",
        )
    modules = [m for m in plan.modules if m.sources]
    targets = [
        TargetModule(m.path, m.layer, tuple(s.adapter for s in m.sources), tuple(s.rank for s in m.sources)) for m in modules
    ]
    recipe_weights = torch.zeros(len(modules), len(recipe.adapters))
    for i, m in enumerate(modules):
        for s in m.sources:
            recipe_weights[i, s.adapter] = s.weight
    return targets, recipe_weights, inputs


def load_factors(
    inputs: Any, target: TargetModule, device: torch.device | str = "cpu"
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One target's (A_i, B_i) per adapter present, float32, scale folded into B."""
    pairs = []
    for a in target.adapters:
        f = inputs.adapters[a].load(target.path)
        pairs.append((f.A.to(device), f.B.to(device)))
    return pairs


def build_fit_model(
    recipe: Recipe, granularity: Granularity, constraint: Constraint, device: torch.device, dtype: torch.dtype
) -> tuple[CatFitModel, torch.Tensor]:
    """Load the recipe's base (frozen, ``dtype``, on ``device``) and attach one path per planned module.

    Every process reads the whole base (``shard.build_sharded_fit_model`` is the sharded loader).

    Returns:
        the model, and the recipe's own per-module weights (M, n) as the plan resolves them.
    """
    from transformers import AutoModelForCausalLM

    targets, recipe_weights, inputs = fit_targets(recipe)
    factors = [load_factors(inputs, t, device) for t in targets]
    base = AutoModelForCausalLM.from_pretrained(inputs.base.directory, dtype=dtype).to(device)
    base.eval()  # no dropout: the loss is a deterministic function of the weights
    model = CatFitModel(base, targets, factors, len(recipe.adapters), granularity, constraint).to(device)
    return model, recipe_weights
