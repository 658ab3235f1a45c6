"""LoRA layers that read the same input as one product: q, k and v of an attention module.

Three :class:`zhtune.train.fused.LoraLinear` calls on one input each read it for their frozen
matmul and their ``A``, and backward each multiply their own gradient back into an input
gradient that autograd then adds up. :class:`StackedLora` runs them as one LoRA layer whose frozen
weight is the three stacked, whose ``A`` is the three stacked and whose ``B`` is block-diagonal
(each block scaled by its layer's scaling), so the low-rank products of one layer never meet
another's; backward splits the gradients of ``A`` and ``B`` back out.
"""

from __future__ import annotations

from typing import Any

import torch

from zhtune.train.fused import _lora_forward, _lora_plain
from zhtune.train.loss import compute_dtype


class StackedLora(torch.autograd.Function):
    """``x [W_1; ...; W_k]^T + [b] + (x [A_1; ...; A_k]^T) diag(s_i B_i)^T`` for ``x`` ``(n, in)``;
    returns ``(n, sum out_i)`` in the compute dtype. ``weights``, ``biases``, ``lora_a``,
    ``lora_b``: tuples of the k layers' tensors; ``scales``: their scalings."""

    @staticmethod
    def forward(ctx: Any, x2: torch.Tensor, n: int, scales: tuple[float, ...], *tensors: torch.Tensor) -> torch.Tensor:
        weights, biases, lora_a, lora_b = (tensors[i * n : (i + 1) * n] for i in range(4))
        dtype = compute_dtype(x2)
        with torch.autocast(x2.device.type, enabled=False):
            x2 = x2.to(dtype)
            w = torch.cat([t.to(dtype) for t in weights])
            a = torch.cat([t.to(dtype) for t in lora_a])
            b = torch.block_diag(*[t.to(dtype) * s for t, s in zip(lora_b, scales)])
            xa = x2 @ a.T  # (n, k r)
            y = x2 @ w.T
            if biases[0] is not None:
                y += torch.cat([t.to(dtype) for t in biases])
            y.addmm_(xa, b.T)
        ctx.save_for_backward(x2, xa, w, a, b)
        ctx.n, ctx.scales = n, scales
        ctx.a_dtypes, ctx.b_dtypes = [t.dtype for t in lora_a], [t.dtype for t in lora_b]
        ctx.rows = [t.shape[0] for t in lora_a], [t.shape[0] for t in weights]
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        x2, xa, w, a, b = ctx.saved_tensors
        ranks, outs = ctx.rows
        with torch.autocast(grad.device.type, enabled=False):
            g = grad.to(w.dtype)
            gb = g @ b  # (n, k r): each layer's s_i g_i B_i
            grad_a = torch.mm(gb.T, x2).split(ranks)
            grad_b_all = torch.mm(xa.T, g)  # (k r, sum out); the diagonal blocks are the layers'
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_x = (g @ w).addmm_(gb, a)
        grad_b, r0, o0 = [], 0, 0
        for r, o, s, dt in zip(ranks, outs, ctx.scales, ctx.b_dtypes):
            grad_b.append(grad_b_all[r0 : r0 + r, o0 : o0 + o].T.mul(s).to(dt))
            r0, o0 = r0 + r, o0 + o
        grad_a = [t.to(dt) for t, dt in zip(grad_a, ctx.a_dtypes)]
        n = ctx.n
        return grad_x, None, None, *([None] * (2 * n)), *grad_a, *grad_b


def stacked_projections(x: torch.Tensor, layers: list[Any]) -> list[torch.Tensor] | None:
    """The outputs of peft LoRA ``layers`` (q, k, v) on the same ``x`` ``(..., in)`` through
    :class:`StackedLora`, each ``(..., out_i)``; None (the caller runs them one by one) unless
    every layer is one :class:`zhtune.train.fused.LoraLinear` would run and gradients are on."""
    if not torch.is_grad_enabled():
        return None
    names = [_lora_plain(m) if getattr(vars(m).get("forward"), "__func__", None) is _lora_forward else None for m in layers]
    if None in names or len({m.base_layer.bias is None for m in layers}) != 1:
        return None
    tensors = (
        [m.base_layer.weight for m in layers]
        + [m.base_layer.bias for m in layers]
        + [m.lora_A[name].weight for m, name in zip(layers, names)]
        + [m.lora_B[name].weight for m, name in zip(layers, names)]
    )
    scales = tuple(m.scaling[name] for m, name in zip(layers, names))
    y = StackedLora.apply(x.reshape(-1, x.shape[-1]), len(layers), scales, *tensors)
    outs = [m.base_layer.weight.shape[0] for m in layers]
    return [t.view(*x.shape[:-1], t.shape[-1]) for t in y.split(outs, dim=1)]
