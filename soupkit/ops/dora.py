"""DoRA (Liu et al. 2024, arXiv 2402.09353) as PEFT merges it: an adapter's exact task vector.

PEFT's ``merge_and_unload`` of one DoRA adapter writes ``W' = m * (W + s B A) / ||W + s B A||``,
the norm taken per output (over the inputs) in the (d_out, d_in) orientation, whatever the
layer stores (a Conv1D or an Embedding stores the transpose; PEFT's ``fan_in_fan_out`` handling
gives the same per-output norm). The task vector ``t = W' - W`` is full rank in general.
"""

from __future__ import annotations

import torch

from soupkit.ops.linalg import LoraFactors


def dora_task_vector(weight: torch.Tensor, factors: LoraFactors, magnitude: torch.Tensor) -> torch.Tensor:
    """``t = m / ||W + B A||_row * (W + B A) - W`` (scale already in B), float32.

    Args:
        weight: the base weight W, (d_out, d_in), in the (out, in) orientation.
        factors: A (r, d_in) and B (d_out, r), the LoRA scale folded into B.
        magnitude: m, (d_out,).
    Returns:
        t, (d_out, d_in).
    """
    adapted = torch.addmm(weight.float(), factors.B, factors.A)
    norm = torch.linalg.norm(adapted, dim=1)  # (d_out,), as PEFT's get_weight_norm
    return (magnitude.float() / norm)[:, None] * adapted - weight.float()


def exact_factors(delta: torch.Tensor) -> LoraFactors:
    """Factors whose product is exactly ``delta`` (d_out, d_in): identity on the smaller side, rank min(d_out, d_in)."""
    d_out, d_in = delta.shape
    if d_out <= d_in:
        return LoraFactors(A=delta.contiguous(), B=torch.eye(d_out, dtype=delta.dtype, device=delta.device))
    return LoraFactors(A=torch.eye(d_in, dtype=delta.dtype, device=delta.device), B=delta.contiguous())


def rank_for_energy(singular_values: torch.Tensor, min_energy: float) -> int:
    """The smallest rank whose top singular values keep ``min_energy`` of the Frobenius energy."""
    energy = singular_values.double().square()
    total = float(energy.sum())
    if total == 0.0:
        return 0
    kept = torch.cumsum(energy, 0) / total
    return int(torch.searchsorted(kept, torch.tensor(min_energy, dtype=kept.dtype) - 1e-12).item()) + 1
