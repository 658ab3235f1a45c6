"""Fused training kernels in plain PyTorch: a LoRA linear layer and LLaMA's RMSNorm.

Eager PyTorch runs a LoRA layer as six kernels forward (the frozen matmul, dropout, A, B, the
scaling, the sum) and as many backward, each reading and writing full-size activations; an
RMSNorm is eight forward (an fp32 copy, square, mean, add, rsqrt, multiply, a cast back, the
weight) and a dozen backward. On a small model (SmolLM2-135M: 30 blocks, hidden 576) those
elementwise passes cost about as much as the matmuls. The two :class:`torch.autograd.Function`
here compute the same values with fewer passes:

* :class:`LoraLinear`: ``y = x W^T + b + s (x A^T) B^T`` as one matmul plus one ``addmm`` that
  adds the low-rank product into ``y`` with the scaling folded in; backward is only the matmuls
  the gradients need (``dx = g W + s (g B) A``, skipped when ``x`` needs none; ``dA = s (g B)^T x``;
  ``dB = s g^T (x A^T)``), again with the scaling folded into ``addmm``.
* :class:`RMSNorm`: one fp32 pass for the statistics, the normalised output and, backward, the
  closed-form gradient from the saved reciprocal RMS. That is still a chain of fp32 passes;
  with ``compile: kernels`` (the default on a CPU with a C++ compiler, see
  :mod:`zhtune.train.compile`) the same function, :func:`llama_rms_norm`, runs through
  ``torch.compile`` instead: one read and one write each way, ~4x faster.

:func:`fuse_for_training` swaps them in for peft's LoRA ``Linear`` layers and the RMSNorms whose
code is LLaMA's (:func:`is_llama_rmsnorm`) by replacing the modules' ``forward`` (parameters, state-dict names and
saving are untouched). A LoRA layer falls back to peft's own forward whenever it is in a state the
fused one does not cover (adapters disabled or merged, several active adapters, dropout, DoRA or
another variant, a LoRA bias, trained base weights, ``adapter_names``), so switching is never
wrong, only sometimes not faster. Same values and gradients to float rounding (tested).
"""

from __future__ import annotations

import types
from typing import Any

import torch

from zhtune.train.loss import compute_dtype


def _same_code(f: Any, g: Any) -> bool:
    """Whether two functions compile to the same code (one copied from the other, as
    transformers' modular converter copies LLaMA's modules into other families)."""
    f, g = getattr(f, "__code__", None), getattr(g, "__code__", None)
    return f is not None and g is not None and (f.co_code, f.co_names, f.co_consts, f.co_varnames) == (
        g.co_code, g.co_names, g.co_consts, g.co_varnames
    )  # fmt: skip


def is_llama_rmsnorm(module: Any) -> bool:
    """Whether ``module``'s forward is LLaMA's RMSNorm (``weight * (x * rsqrt(mean(x^2) + eps))
    .to(dtype)``, statistics in fp32) token for token: Qwen2/3, Mistral, Phi-3, DeepSeek and a
    hundred other families copy it; Gemma's ``(1 + weight)``, OLMo-2's order and the rest differ
    and are left alone."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return isinstance(getattr(module, "weight", None), torch.Tensor) and hasattr(module, "variance_epsilon") and (
        _same_code(type(module).forward, LlamaRMSNorm.forward)
    )  # fmt: skip


class LoraLinear(torch.autograd.Function):
    """``x W^T + b + scale * (x A^T) B^T`` for ``x`` ``(..., in)``, frozen ``W`` ``(out, in)`` and
    ``b`` ``(out,)`` or None, trained ``A`` ``(r, in)`` and ``B`` ``(out, r)``; ``(..., out)`` in the
    compute dtype (autocast's, else ``x``'s), as peft's layer under autocast returns it."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        dtype = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            w, a, b = weight.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
            xa = x2 @ a.T  # (n, r)
            y = torch.addmm(bias.to(dtype), x2, w.T) if bias is not None else x2 @ w.T
            y.addmm_(xa, b.T, alpha=scale)
        ctx.save_for_backward(x2, xa, w, a, b)
        ctx.scale, ctx.x_dtype, ctx.a_dtype, ctx.b_dtype = scale, x.dtype, lora_a.dtype, lora_b.dtype
        return y.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        x2, xa, w, a, b = ctx.saved_tensors
        s = ctx.scale
        with torch.autocast(grad.device.type, enabled=False):
            g = grad.reshape(-1, grad.shape[-1]).to(w.dtype)
            gb = g @ b  # (n, r)
            grad_a = torch.mm(gb.T, x2).mul_(s).to(ctx.a_dtype)
            # (r, n) @ (n, out), transposed back: the skinny side leads (~2x faster in oneDNN at out = 576)
            grad_b = torch.mm(xa.T, g).mul_(s).T.to(ctx.b_dtype)
            grad_x = None
            if ctx.needs_input_grad[0]:  # (not for the first block's input: the embeddings are frozen)
                grad_x = g @ w
                grad_x = grad_x.addmm_(gb, a, alpha=s).view(*grad.shape[:-1], x2.shape[-1]).to(ctx.x_dtype)
        return grad_x, None, None, grad_a, grad_b, None


class RMSNorm(torch.autograd.Function):
    """LLaMA's RMSNorm: ``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`` for ``x``
    ``(..., h)`` and ``weight`` ``(h,)``, the statistics in fp32; the result's dtype is what
    that product promotes to (as the module's own forward gives)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True).add_(eps))
        normed = (xf * rstd).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return weight * normed

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        x, weight, rstd = ctx.saved_tensors
        xhat = x.float().mul_(rstd)  # the normalised input, fp32
        grad_weight = None
        if ctx.needs_input_grad[1]:
            lead = tuple(range(grad.ndim - 1))
            grad_weight = (grad * xhat.to(x.dtype)).sum(lead).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            gn = (grad * weight).float()
            dot = (gn * xhat).mean(-1, keepdim=True)
            grad_x = gn.sub_(xhat.mul_(dot)).mul_(rstd).to(x.dtype)
        return grad_x, grad_weight, None


def _rmsnorm_forward(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    return RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def llama_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LLaMA's RMSNorm as plain ops (what :class:`RMSNorm` computes), for ``torch.compile``."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)).to(x.dtype)


_compiled_norm: Any = None


def _rmsnorm_compiled_forward(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    """:func:`llama_rms_norm` through ``torch.compile``, one graph for any number of tokens: the
    input is flattened to ``(tokens, hidden)`` and its first dimension marked dynamic, so the
    hidden size stays a constant of the kernel and a new batch shape compiles nothing."""
    global _compiled_norm
    if _compiled_norm is None:
        _compiled_norm = torch.compile(llama_rms_norm)
    x = hidden_states.reshape(-1, hidden_states.shape[-1])
    torch._dynamo.maybe_mark_dynamic(x, 0)
    return _compiled_norm(x, self.weight, self.variance_epsilon).view(*hidden_states.shape[:-1], -1)


def _lora_plain(module: Any) -> str | None:
    """The one active adapter of a peft LoRA ``Linear`` when :class:`LoraLinear` computes what
    its forward would, else None."""
    if module.disable_adapters or module.merged:
        return None
    active = [name for name in module.active_adapters if name in module.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    base = module.base_layer
    if (
        name in module.lora_variant
        or not isinstance(module.lora_dropout[name], torch.nn.Identity)
        or module.lora_B[name].bias is not None
        or base.weight.requires_grad
        or (base.bias is not None and base.bias.requires_grad)
    ):
        return None
    return name


def _lora_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    name = None if args or kwargs else _lora_plain(self)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    base = self.base_layer
    return LoraLinear.apply(
        x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
    )


def fuse_for_training(model: Any, compiled_norm: bool = False) -> dict[str, int]:
    """Swap :class:`LoraLinear` and :class:`RMSNorm` (``compiled_norm``: :func:`llama_rms_norm`
    through ``torch.compile`` instead) into ``model`` in place (see the module's docstring for when
    a LoRA layer still runs peft's forward); returns how many of each."""
    from peft.tuners.lora import layer as lora_layer

    norm_forward = _rmsnorm_compiled_forward if compiled_norm else _rmsnorm_forward
    counts = {"lora": 0, "rmsnorm": 0}
    for module in model.modules():
        if type(module) is lora_layer.Linear and not module.fan_in_fan_out:
            if type(module.base_layer) is torch.nn.Linear:
                module.forward = types.MethodType(_lora_forward, module)
                counts["lora"] += 1
        elif is_llama_rmsnorm(module):
            module.forward = types.MethodType(norm_forward, module)
            counts["rmsnorm"] += 1
    return counts
