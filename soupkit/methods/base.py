"""The contract every merge method implements.

A method sees ONE module at a time: the low-rank factors of every adapter that targets that
module (scale already folded into B, so each update is ``delta_i = B_i @ A_i``), one weight
per adapter, its validated parameters and a context (module name, rank budget, seeded RNG).
It returns the merged update as factors. The executor owns reading, padding and writing.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict

from soupkit.ops import LoraFactors
from soupkit.rng import counter_uniform, stream_key

Space = Literal["factors", "delta"]


class MethodParams(BaseModel):
    """Base of every method's parameter model: strict, so a typo like ``densty`` fails."""

    # No .nan / .inf; strict: a YAML `true` is not the number 1, a quoted "0.5" is not a number.
    # defer_build: a validator is built when a model first validates, not at import: a merge uses one
    # method's model of the 18 (about 10 ms of every command's start-up, issue 22).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True, defer_build=True)


class NoParams(MethodParams):
    """For methods with no parameters beyond weights and rank."""


@dataclass(frozen=True)
class MergeContext:
    """What a method may know besides its inputs.

    Attributes:
        module: module path, e.g. ``model.layers.0.self_attn.q_proj``.
        rank: the recipe's output rank budget (``merge.rank``), or None.
        seed: the recipe seed.
        device: where the maths runs.
        state: what the method's ``prepare`` returned for this run (e.g. global thresholds), or None.
        sources: recipe names of the adapters whose factors ``merge`` receives, aligned with them
            (random methods salt their draws with these, so reordering adapters changes nothing).
    """

    module: str
    rank: int | None
    seed: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    state: Any = None
    sources: tuple[str, ...] = ()

    def source(self, j: int) -> str:
        """Name of the j-th input (its position if names are unknown)."""
        return self.sources[j] if j < len(self.sources) else f"#{j}"

    def uniform(self, shape: torch.Size | tuple[int, ...], device: torch.device, salt: str, j: int) -> torch.Tensor:
        """float32 U[0,1) draws of ``shape`` for input j, made on ``device`` by the counter-based
        generator (``soupkit.rng``) keyed by (seed, module, salt, adapter name): bit-identical on
        every device and independent of adapter order. Used for every per-element draw (DARE, DELLA)."""
        return counter_uniform(shape, stream_key(self.seed, self.module, salt, self.source(j)), device)

    def generator(self, salt: str = "") -> torch.Generator:
        """A CPU generator seeded by (seed, module, salt), for the few small draws that need torch's
        samplers (k-means++, PEFT's Bernoulli masks, the range finder's start): device independent."""
        digest = hashlib.sha256(f"{self.seed}|{self.module}|{salt}".encode()).digest()
        gen = torch.Generator(device="cpu")
        gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        return gen


@dataclass(frozen=True)
class MergeResult:
    """A merged module: its factors, and the Frobenius energy kept if it was truncated."""

    factors: LoraFactors
    energy_kept: float | None = None


@dataclass(frozen=True)
class ModuleInputs:
    """One module's inputs as ``prepare`` sees them (``ctx.sources`` names each factor's adapter)."""

    ctx: MergeContext
    factors: list[LoraFactors]
    weights: list[float]


@dataclass(frozen=True)
class RunInputs:
    """The whole run for ``MergeMethod.prepare``: adapter count and a re-iterable module stream."""

    n_adapters: int
    modules: Callable[[], Iterator[ModuleInputs]]


def sum_rank_within(input_ranks: list[int], budget: int | None) -> int:
    """Output rank of a merge whose result lies in the span of all inputs: sum r_i, or ``merge.rank`` if smaller."""
    total = sum(input_ranks)
    return total if budget is None else min(budget, total)


class MergeMethod(ABC):
    """One merge method. Subclasses set the class attributes and implement ``merge``.

    Attributes:
        name: the recipe's ``merge.method`` value (snake_case).
        space: ``factors`` (exact, never forms the dense delta) or ``delta`` (needs d_out x d_in).
        paper: citation of the algorithm, shown by ``soupkit methods``.
        summary: the formula in one line.
        Params: the pydantic model of its parameters (extra keys are an error).
    """

    name: ClassVar[str]
    space: ClassVar[Space]
    paper: ClassVar[str]
    summary: ClassVar[str]
    Params: ClassVar[type[MethodParams]] = NoParams
    # Parameters under which one adapter with weight 1 comes back unchanged (contract tests).
    identity_params: ClassVar[dict] = {}
    # True for rules that flatten the spectrum (Iso-C): only an update whose nonzero singular values
    # are all equal is a fixed point, so the contract tests' identity check uses such an input.
    identity_needs_flat_spectrum: ClassVar[bool] = False
    # False for methods whose output rank is fixed by the inputs (``merge.rank`` is refused, not ignored).
    uses_rank: ClassVar[bool] = True
    # False for methods whose result depends on adapter order beyond float rounding.
    order_invariant: ClassVar[bool] = True

    def output_rank(self, input_ranks: list[int], params: MethodParams, budget: int | None) -> int:
        """Upper bound of the merged rank of one module, from header information only."""
        return budget if budget is not None else sum(input_ranks)

    def forms_dense(self, params: MethodParams) -> bool:
        """Whether merging one module builds d_out x d_in matrices (memory estimate of ``plan``)."""
        return self.space == "delta"

    def check_weights(self, params: MethodParams, weights: list[float]) -> str | None:
        """Return why these recipe weights (every value written, gradients and overrides included) cannot
        be used with these parameters (or None)."""
        return None

    def check_inputs(self, input_ranks: list[list[int]], params: MethodParams) -> str | None:
        """Return why these adapters cannot be merged by this method (or None).

        Args:
            input_ranks: per adapter, the ranks of its modules.
            params: validated parameters.
        """
        return None

    def prepare(self, params: MethodParams, run: RunInputs) -> Any:
        """Optional first pass over the whole run, before any module is merged (default: none).

        Used by global-scope trimming, which needs a threshold over every module of each
        adapter. ``run.modules()`` loads one module at a time, so memory stays bounded; it may
        be iterated more than once. The return value reaches ``merge`` as ``ctx.state``.
        """
        return None

    # How whole-tensor deltas are merged (modules_to_save copies minus the base, lora_bias vectors): docs/adapters.md
    full_tensor_rule: ClassVar[str] = "weighted sum: sum_i w_i d_i"

    def merge_full(
        self, deltas: list[torch.Tensor], weights: list[float], params: MethodParams, ctx: MergeContext
    ) -> torch.Tensor:
        """Merge whole-tensor deltas d_i (any shape, float32), one per adapter that has the tensor.

        Default: the weighted sum, the rule every factor-space method applies to its updates
        (exact for cat and linear). Dense-delta methods override it with their own rule.
        """
        merged = torch.zeros_like(deltas[0])
        for delta, w in zip(deltas, weights):
            merged.add_(delta, alpha=w)
        return merged

    @abstractmethod
    def merge(self, factors: list[LoraFactors], weights: list[float], params: MethodParams, ctx: MergeContext) -> MergeResult:
        """Merge one module. ``factors`` and ``weights`` are aligned, one entry per adapter present."""
