"""One target Linear with its concatenated low-rank path, fused by hand for speed and memory.

    y = x W^T (+ bias) + ((x A^T) * w) B^T          A (R, d_in), B (d_out, R), w (R,)

Written as one autograd Function so that (a) the low-rank update is accumulated into the base
output by the matmul itself (``addmm_``, beta = 1) instead of a separate add, (b) backward does the
same for the input gradient (g W, then += ((g B) * w) A), and (c) only ``u = x A^T`` (tokens x R)
is saved. Gradients flow to x and w only; W, A and B are frozen.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class CatLinearFunction(torch.autograd.Function):
    """Forward and backward of the fused base + concatenated low-rank Linear."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, w_rank):
        x2 = x.reshape(-1, x.shape[-1]).to(weight.dtype)
        y = F.linear(x2, weight, bias)
        u = F.linear(x2, A)  # (N, R)
        y.addmm_(u * w_rank.to(u.dtype), B.t())
        ctx.save_for_backward(weight, A, B, w_rank, u)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        weight, A, B, w_rank, u = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(weight.dtype)
        gu = g @ B  # (N, R)
        grad_w = (gu.to(w_rank.dtype) * u.to(w_rank.dtype)).sum(0) if ctx.needs_input_grad[5] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ weight
            grad_x.addmm_(gu * w_rank.to(gu.dtype), A)
            grad_x = grad_x.view(*grad.shape[:-1], grad_x.shape[-1])
        return grad_x, None, None, None, None, grad_w


class CatLinear(nn.Module):
    """Stands in for a target ``nn.Linear`` while fitting; ``base_layer`` is the original module.

    Args:
        base_layer: the frozen Linear.
        factors: a module with frozen parameters ``A`` and ``B``, registered here (inside the
            transformer block, so FSDP shards it with the block) and read at each call.
        w_rank: returns this module's weights expanded over the rank, (R,), for the current forward.
    """

    def __init__(self, base_layer: nn.Linear, factors: nn.Module, w_rank: Callable[[], torch.Tensor]) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.factors = factors
        self._w_rank = w_rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factors = self.factors
        return CatLinearFunction.apply(x, self.base_layer.weight, self.base_layer.bias, factors.A, factors.B, self._w_rank())
