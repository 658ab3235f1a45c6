"""Fused training kernels in plain PyTorch: LLaMA's RMSNorm and MLP, trained linear layers under
autocast, and (swapped in here, written in :mod:`zhtune.train.lora`) LoRA layers.

Eager PyTorch runs an RMSNorm as eight kernels forward (an fp32 copy, square, mean, add, rsqrt,
multiply, a cast back, the weight) and a dozen backward. On a small model (SmolLM2-135M: 30
blocks, hidden 576) such elementwise passes cost about as much as the matmuls. The functions here
compute the same values with fewer passes:

* :class:`RMSNorm`: one fp32 pass for the statistics, the normalised output and, backward, the
  closed-form gradient from the saved reciprocal RMS. That is still a chain of fp32 passes;
  with ``compile: kernels`` (the default on a CPU with a C++ compiler, see
  :mod:`zhtune.train.compile`) the same function, :func:`llama_rms_norm`, runs through
  ``torch.compile`` instead: one read and one write each way, ~4x faster. With zhtune's native
  kernels (``native``: bf16 on a CPU with AVX-512 bf16, ``csrc/cpu_ops.cpp``) a bf16 norm runs
  :class:`NativeRMSNorm` instead, compiled or not: the same one pass each way, with no
  ``torch.compile`` (no Dynamo tracing in the run's first step).

More keep less for backward, which is most of full fine-tuning's peak memory (a SmolLM2
step of 4 x 512 tokens kept 1.84 GiB, now 0.56; ``bench/memory_step.py``):

* :class:`CastLinear`: a trained fp32 weight under bf16 autocast, whose bf16 copy autocast keeps
  from the forward to the backward; here the weight is cast again in backward.
* :class:`SwiGLU` and :class:`SwiGLUDown`: LLaMA's MLP keeps its gate and up projections'
  outputs only; ``silu(gate)`` and, with a trained fp32 down projection under autocast, the
  product ``silu(gate) * up`` are computed again in backward.
* :class:`RecomputedMLP`: with all three projections trained (full fine-tuning), the MLP keeps
  only its input; gate and up are computed again in backward (one stacked matmul). Under
  ``compile: kernels`` its activation and the activation's gradients are one compiled loop each.
* :class:`StackedSwiGLU`: with gate and up LoRA layers, the MLP runs them as one
  :class:`zhtune.train.lora.StackedLora` product and its activation on the two side by side;
  backward hands that product one gradient, no concatenation (compiled as above).
* The two norms of a LLaMA decoder layer hand their projections the autocast dtype
  (:func:`_norm_out_dtype`): one bf16 copy for q, k and v instead of one each; on a wider input
  (full fine-tuning's fp32 residual stream) they keep the normalised input in that dtype, not
  the fp32 input (:class:`NarrowRMSNorm`).

:func:`fuse_for_training` swaps them in for peft's LoRA ``Linear`` layers, the RMSNorms and MLPs
whose code is LLaMA's (:func:`is_llama_rmsnorm`, :func:`is_llama_mlp`) and trained plain linear
layers by replacing the modules' ``forward`` (parameters, state-dict names and saving are
untouched). A LoRA layer falls back to peft's own forward whenever it is in a state the fused one
does not cover (:func:`zhtune.train.lora.lora_plain`), so switching is never wrong, only sometimes
not faster. Same values and gradients to float rounding (tested).
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from zhtune.train.lora import lora_forward, stacked_lora, stacked_rank
from zhtune.train.loss import compute_dtype, native_transposes


def _same_code(f: Any, g: Any) -> bool:
    """Whether two functions compile to the same code (one copied from the other, as
    transformers' modular converter copies LLaMA's modules into other families). Decorated
    functions are compared by what they wrap: every wrapper a decorator makes has the same code."""
    f, g = getattr(inspect.unwrap(f), "__code__", None), getattr(inspect.unwrap(g), "__code__", None)
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


class RMSNorm(torch.autograd.Function):
    """LLaMA's RMSNorm: ``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`` for ``x``
    ``(..., h)`` and ``weight`` ``(h,)``, the statistics in fp32; the result's dtype is what
    that product promotes to (as the module's own forward gives)."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        xf = x.float()
        rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True).add_(eps))
        normed = (xf * rstd).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        y = weight * normed
        ctx.y_dtype = y.dtype
        return y if out_dtype is None else y.to(out_dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        x, weight, rstd = ctx.saved_tensors
        grad = grad.to(ctx.y_dtype)  # (what the cast to out_dtype hands back)
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
        return grad_x, grad_weight, None, None


class NativeRMSNorm(torch.autograd.Function):
    """:func:`llama_rms_norm` of bf16 ``x`` ``(..., h)`` with a bf16 ``weight``, by the native
    kernels (``rms_norm``: fp32 statistics, ``x * rstd`` rounded to bf16 as the module rounds
    it, the weight's product rounded once); keeps ``x`` and the fp32 ``rstd`` for the closed-form
    backward (the weight's gradient only when it is trained).

    ``extra`` > 0: the output is the first ``h`` columns of an ``(..., h + extra)`` tensor, a
    view whose last columns :class:`zhtune.train.lora.StackedLora` fills with its input's
    low-rank projection, so its widened input needs no copy (:func:`zhtune.train.lora.widened`)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float, extra: int = 0) -> torch.Tensor:
        y, rstd = torch.ops.zhtune_cpu_ops.rms_norm(x, weight, eps, extra)
        ctx.save_for_backward(x, rstd, weight)
        return y[..., : x.shape[-1]] if extra else y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        x, rstd, weight = ctx.saved_tensors
        dx, dw = torch.ops.zhtune_cpu_ops.rms_norm_backward(grad, x, rstd, weight, ctx.needs_input_grad[1])
        return dx, dw if ctx.needs_input_grad[1] else None, None, None


def _widen(norm: Any) -> int:
    """The extra columns a norm's output is allocated with (:class:`NativeRMSNorm`'s ``extra``)."""
    return getattr(norm, "_zhtune_widen", 0)


def native_bf16_norm(norm: Any, x: torch.Tensor) -> bool:
    """Whether ``norm`` (a LLaMA RMSNorm module) runs :class:`NativeRMSNorm` on ``x``: on a CPU,
    a bf16 input and weight, its output in their dtype (:func:`_norm_out_dtype`)."""
    return x.device.type == "cpu" and x.dtype == norm.weight.dtype == torch.bfloat16 and _norm_out_dtype(norm, x) is None


def _rmsnorm_native_forward(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    """On a CPU: :class:`NativeRMSNorm` for a bf16 input and weight; for an fp32 input handing
    bf16 on (full fine-tuning), :class:`NarrowRMSNorm` with the native kernels
    (:data:`_NATIVE_NARROW`); anything else the eager kernels."""
    x, weight = hidden_states, self.weight
    out_dtype = _norm_out_dtype(self, x)
    if x.device.type == "cpu" and out_dtype is not None and torch.is_grad_enabled():
        return NarrowRMSNorm.apply(x, weight, self.variance_epsilon, out_dtype, _NATIVE_NARROW)
    if native_bf16_norm(self, x):
        extra = _widen(self) if torch.is_grad_enabled() else 0
        return NativeRMSNorm.apply(x, weight, self.variance_epsilon, extra)
    return _rmsnorm_forward(self, x)


def _native_narrow(
    x2: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`narrow_rms_norm` by the native kernel for fp32 rows and weight handing bf16 on (the
    same values: the product in fp32, each result rounded once), else the eager one."""
    if x2.dtype == weight.dtype == torch.float32 and out_dtype == torch.bfloat16:
        return torch.ops.zhtune_cpu_ops.narrow_rms_norm(x2, weight, eps)
    return narrow_rms_norm(x2, weight, eps, out_dtype)


def _native_narrow_backward(
    grad: torch.Tensor, xhat: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor, x_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`narrow_rms_norm_backward` by the native kernel where :func:`_native_narrow` ran it
    (the weight's gradient only when it is trained), else the eager one."""
    if xhat.dtype == torch.bfloat16 and weight.dtype == x_dtype == torch.float32:
        return torch.ops.zhtune_cpu_ops.narrow_rms_norm_backward(grad, xhat, rstd, weight, weight.requires_grad)
    return narrow_rms_norm_backward(grad, xhat, rstd, weight, x_dtype)


def _stacked(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """The ``(n, 2 inter)`` tensor whose halves ``gate`` and ``up`` are (the stacked product's two
    views), or None when they are not such halves."""
    n, inter = gate.shape
    stacked = gate.as_strided((n, 2 * inter), (2 * inter, 1))
    ok = gate.stride() == up.stride() == (2 * inter, 1) and up.data_ptr() == gate.data_ptr() + inter * gate.element_size()
    return stacked if ok and gate.dtype == torch.bfloat16 and gate.device.type == "cpu" else None


def _native_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    stacked = _stacked(gate, up)
    return _swiglu(gate, up) if stacked is None else torch.ops.zhtune_cpu_ops.swiglu(stacked)


def _native_swiglu_backward(
    grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: torch.Tensor | None
) -> torch.Tensor:
    stacked = _stacked(gate, up)
    if stacked is None:
        return _swiglu_backward_stacked(grad, gate, up, act)
    return torch.ops.zhtune_cpu_ops.swiglu_backward(grad, stacked)


def _swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (LLaMA's MLP activation, the same two ops as its forward)."""
    return torch.nn.functional.silu(gate).mul_(up)


def _swiglu_keeping_silu(gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_swiglu`'s value and ``silu(gate)``, which its backward needs too (for a backward
    that computes the activation again instead of keeping it)."""
    act = torch.nn.functional.silu(gate)
    return act * up, act


def _swiglu_backward(
    grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of ``gate`` and ``up`` for ``grad`` of :func:`_swiglu`'s result: the ops
    autograd would run on the saved activation ``act = silu(gate)`` (computed again when None)."""
    act = torch.nn.functional.silu(gate) if act is None else act
    return torch.ops.aten.silu_backward(grad * up, gate), grad * act


def _cast_linear(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``x2 @ weight.T + bias`` for ``x2`` ``(n, in)`` in ``dtype``, the weight cast for this call
    only (autocast would keep the cast for backward: a bf16 copy of every trained weight alive
    from the forward to the backward)."""
    return torch.nn.functional.linear(x2, weight.to(dtype), None if bias is None else bias.to(dtype))


#: A weight gradient ``grad^T @ x`` of at least this many elements is computed from ``grad``
#: transposed by the native kernel (``csrc/cpu_ops.cpp``): oneDNN reads a transposed bf16 left
#: operand slowly. On SmolLM2's full fine-tuning (2,048 rows, this 2-core AMX CPU, in isolation):
#: the stacked gate/up gradient (3072 x 576) 4.9 -> 3.5 ms, the down projection's (576 x 1536)
#: 2.5 -> 1.8 ms; smaller ones lose (576 x 576: 0.9 -> 1.3 ms, the transpose costs more than it
#: saves).
TRANSPOSED_WEIGHT_GRAD = 3 << 18


def _weight_grad(grad2: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """``grad2^T @ x2``, ``(out, in)`` in their dtype, for ``grad2`` ``(n, out)`` and ``x2`` ``(n, in)``
    (see :data:`TRANSPOSED_WEIGHT_GRAD`)."""
    if grad2.shape[1] * x2.shape[1] >= TRANSPOSED_WEIGHT_GRAD and native_transposes(grad2):
        return torch.ops.zhtune_cpu_ops.transpose(grad2) @ x2
    return grad2.T @ x2


def _cast_linear_backward(
    grad2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, needs: tuple[bool, ...]
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The gradients of :func:`_cast_linear`'s ``x2`` (in ``grad2``'s dtype), ``weight`` and
    ``bias`` (in theirs) for ``grad2`` ``(n, out)``, each only where ``needs`` says; the weight is
    cast again here instead of kept from the forward."""
    grad_x = grad2 @ weight.to(grad2.dtype) if needs[0] else None
    grad_w = _weight_grad(grad2, x2).to(weight.dtype) if needs[1] else None
    grad_b = grad2.sum(0).to(bias.dtype) if bias is not None and needs[2] else None
    return grad_x, grad_w, grad_b


class CastLinear(torch.autograd.Function):
    """``x W^T + b`` under autocast for a trained ``W`` ``(out, in)`` wider than the compute dtype
    (full fine-tuning's fp32 weights under bf16): the values and gradients of autocast's linear,
    but only ``x`` (in the compute dtype) and the fp32 parameter itself are kept for backward, which
    casts ``W`` again (~0.25 GiB less at a SmolLM2 step's peak for one cast of the weights more)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        dtype = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            y = _cast_linear(x2, weight, bias, dtype)
        ctx.save_for_backward(x2, weight, bias)
        ctx.x_dtype = x.dtype
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        x2, weight, bias = ctx.saved_tensors
        with torch.autocast(grad.device.type, enabled=False):
            g = grad.reshape(-1, grad.shape[-1]).to(x2.dtype)
            grad_x, grad_w, grad_b = _cast_linear_backward(g, x2, weight, bias, ctx.needs_input_grad)
        if grad_x is not None:
            grad_x = grad_x.view(*grad.shape[:-1], x2.shape[-1]).to(ctx.x_dtype)
        return grad_x, grad_w, grad_b


class SwiGLU(torch.autograd.Function):
    """``silu(gate) * up`` for ``gate`` and ``up`` ``(..., inter)``, keeping only the two inputs
    for backward (autograd would also keep ``silu(gate)``: one more ``(tokens, inter)`` tensor a
    layer, 6 MiB for a SmolLM2 layer of 2,048 tokens); backward computes ``silu(gate)`` again."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return _swiglu(gate, up)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        return _swiglu_backward(grad, gate, up)


class SwiGLUDown(torch.autograd.Function):
    """``(silu(gate) * up) W^T + b``: LLaMA's MLP after its gate and up projections, for a
    ``down_proj`` that :class:`CastLinear` would run. Keeps ``gate``, ``up`` and the parameter for
    backward, which computes the activation again: neither ``silu(gate)`` nor the product (the
    down projection's input) is kept, two ``(tokens, inter)`` tensors a layer."""

    @staticmethod
    def forward(
        ctx: Any, gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        dtype = compute_dtype(gate)
        with torch.autocast(gate.device.type, enabled=False):
            h = _swiglu(gate.to(dtype), up.to(dtype))
            y = _cast_linear(h.reshape(-1, h.shape[-1]), weight, bias, dtype)
        ctx.save_for_backward(gate, up, weight, bias)
        ctx.dtype = dtype
        return y.view(*gate.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        gate, up, weight, bias = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0] or ctx.needs_input_grad[1], *ctx.needs_input_grad[2:])
        with torch.autocast(grad.device.type, enabled=False):
            g2, u2 = gate.reshape(-1, gate.shape[-1]).to(ctx.dtype), up.reshape(-1, up.shape[-1]).to(ctx.dtype)
            h, act = _swiglu_keeping_silu(g2, u2)
            grad2 = grad.reshape(-1, grad.shape[-1]).to(ctx.dtype)
            grad_h, grad_w, grad_b = _cast_linear_backward(grad2, h, weight, bias, needs)
            del h
            grad_gate = grad_up = None
            if grad_h is not None:
                grad_gate, grad_up = _swiglu_backward(grad_h, g2, u2, act)
                grad_gate, grad_up = grad_gate.view(gate.shape).to(gate.dtype), grad_up.view(up.shape).to(up.dtype)
        return grad_gate, grad_up, grad_w, grad_b


def _gate_up(
    x2: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, biases: tuple[torch.Tensor, torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``x2 @ [gate; up]^T (+ biases)`` as one matmul for ``x2`` ``(n, hidden)``, the weights
    ``(inter, hidden)`` cast to ``x2``'s dtype for this call only; returns ``(n, 2 inter)``, the
    stacked weight ``(2 inter, hidden)`` and the stacked bias ``(2 inter,)`` (or None), the one
    linear layer :func:`_cast_linear_backward` then differentiates."""
    weight = torch.empty(2 * gate.shape[0], gate.shape[1], dtype=x2.dtype, device=x2.device)
    weight[: gate.shape[0]].copy_(gate)
    weight[gate.shape[0] :].copy_(up)
    bias = None if biases is None else torch.cat(biases).to(x2.dtype)
    return torch.nn.functional.linear(x2, weight, bias), weight, bias


def _swiglu_backward_stacked(
    grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: torch.Tensor | None
) -> torch.Tensor:
    """:func:`_swiglu_backward`'s two gradients side by side, ``(n, 2 inter)``, for the stacked
    matmuls of :class:`RecomputedMLP` and :class:`StackedSwiGLU`: written into one buffer eagerly,
    concatenated when compiling (Inductor writes its fused kernel's results there; it cannot trace
    ``out=`` into a slice). ``act``: ``silu(gate)``, or None to compute it again."""
    if torch.compiler.is_compiling():
        return torch.cat(_swiglu_backward(grad, gate, up, act), dim=1)
    inter = gate.shape[1]
    act = torch.nn.functional.silu(gate) if act is None else act
    stacked = torch.empty(gate.shape[0], 2 * inter, dtype=grad.dtype, device=grad.device)
    torch.mul(grad, act, out=stacked[:, inter:])
    torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=stacked[:, :inter])
    return stacked


class MlpKernels(NamedTuple):
    """The elementwise work of :class:`RecomputedMLP`, eager (:data:`_EAGER_MLP`) or through
    ``torch.compile`` (:func:`_compiled_mlp`)."""

    swiglu: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    """``(gate, up) -> silu(gate) * up``."""
    swiglu_keeping_silu: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
    """``(gate, up) -> (silu(gate) * up, silu(gate) or None)``: ``silu(gate)`` when the backward
    kernel reads it (eager), None when it computes it again inside its own loop (compiled)."""
    swiglu_backward: Callable[..., torch.Tensor]
    """``(grad, gate, up, silu(gate) or None) -> (n, 2 inter)``: :func:`_swiglu_backward_stacked`."""


_EAGER_MLP = MlpKernels(_swiglu, _swiglu_keeping_silu, _swiglu_backward_stacked)
_NATIVE_MLP = MlpKernels(_native_swiglu, lambda gate, up: (_native_swiglu(gate, up), None), _native_swiglu_backward)
"""The native kernels (bf16 on a CPU: ``swiglu``, ``swiglu_backward`` of the stacked product the
two halves are views of; :func:`_stacked`), the eager ones for anything else."""


class RecomputedMLP(torch.autograd.Function):
    """LLaMA's whole MLP, ``down(silu(x Wg^T + bg) * (x Wu^T + bu)) + bd``, for trained plain
    linear layers (full fine-tuning): keeps only its input ``x`` ``(..., hidden)`` (the norm's
    output, in the compute dtype) and the parameters; backward computes the gate and up
    projections again. That is two ``(tokens, inter)`` tensors a layer fewer than
    :class:`SwiGLUDown` keeps (0.35 GiB at a SmolLM2 step of 4 x 512 tokens) for one more
    ``(tokens, hidden) x (hidden, 2 inter)`` matmul a layer. The gate and up projections run as one
    matmul over their stacked weights, forward and backward (their input gradients summed in fp32
    by that matmul instead of two bf16 results added). Biases: all three or none. ``kernels``:
    :class:`MlpKernels`, the activation and its gradients eager or compiled."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        gate: torch.Tensor,
        up: torch.Tensor,
        down: torch.Tensor,
        gate_bias: torch.Tensor | None,
        up_bias: torch.Tensor | None,
        down_bias: torch.Tensor | None,
        kernels: MlpKernels,
    ) -> torch.Tensor:
        dtype = compute_dtype(x)
        biases = None if gate_bias is None else (gate_bias, up_bias)
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            gate_up, _, _ = _gate_up(x2, gate, up, biases)
            h = kernels.swiglu(gate_up[:, : gate.shape[0]], gate_up[:, gate.shape[0] :])
            del gate_up
            y = _cast_linear(h, down, down_bias, dtype)
        ctx.save_for_backward(x2, gate, up, down, gate_bias, up_bias, down_bias)
        ctx.x_dtype, ctx.kernels = x.dtype, kernels
        return y.view(*x.shape[:-1], down.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        x2, gate, up, down, gate_bias, up_bias, down_bias = ctx.saved_tensors
        inter, needs, kernels = gate.shape[0], ctx.needs_input_grad, ctx.kernels
        with torch.autocast(grad.device.type, enabled=False):
            biases = None if gate_bias is None else (gate_bias, up_bias)
            gate_up, weight, bias = _gate_up(x2, gate, up, biases)
            g, u = gate_up[:, :inter], gate_up[:, inter:]
            h, act = kernels.swiglu_keeping_silu(g, u)
            grad2 = grad.reshape(-1, grad.shape[-1]).to(x2.dtype)
            grad_h, grad_down, grad_down_bias = _cast_linear_backward(
                grad2, h, down, down_bias, (True, needs[3], needs[6])
            )
            del h
            grad_gate_up = kernels.swiglu_backward(grad_h, g, u, act)
            del gate_up, g, u, act, grad_h
            stacked_needs = (needs[0], needs[1] or needs[2], needs[4] or needs[5])
            grad_x, grad_w, grad_b = _cast_linear_backward(grad_gate_up, x2, weight, bias, stacked_needs)
        if grad_x is not None:
            grad_x = grad_x.view(*grad.shape[:-1], x2.shape[-1]).to(ctx.x_dtype)
        return (
            grad_x,
            grad_w[:inter].to(gate.dtype) if needs[1] else None,
            grad_w[inter:].to(up.dtype) if needs[2] else None,
            grad_down,
            None if grad_b is None else grad_b[:inter].to(gate_bias.dtype),
            None if grad_b is None else grad_b[inter:].to(up_bias.dtype),
            grad_down_bias,
            None,
        )


class StackedSwiGLU(torch.autograd.Function):
    """``silu(gate) * up`` for ``gate_up`` ``(..., 2 inter)``, LoRA's gate and up projections side
    by side (:func:`zhtune.train.lora.stacked_lora`); ``(..., inter)``. Keeps only ``gate_up``
    (what :class:`SwiGLU` keeps of the two) and hands back its gradient as one ``(..., 2 inter)``
    tensor, the layout :class:`zhtune.train.lora.StackedLora` reads, instead of two that autograd
    would concatenate. ``kernels``: :class:`MlpKernels`, eager, compiled or native
    (:data:`_NATIVE_MLP`, which reads the two halves as the one stacked tensor they are)."""

    @staticmethod
    def forward(ctx: Any, gate_up: torch.Tensor, kernels: MlpKernels) -> torch.Tensor:
        inter = gate_up.shape[-1] // 2
        g2 = gate_up.reshape(-1, 2 * inter)
        h = kernels.swiglu(g2[:, :inter], g2[:, inter:])
        ctx.save_for_backward(gate_up)
        ctx.kernels = kernels
        return h.view(*gate_up.shape[:-1], inter)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        (gate_up,) = ctx.saved_tensors
        inter = gate_up.shape[-1] // 2
        g2 = gate_up.reshape(-1, 2 * inter)
        grad2 = grad.reshape(-1, inter).to(g2.dtype)
        stacked = ctx.kernels.swiglu_backward(grad2, g2[:, :inter], g2[:, inter:], None)
        return stacked.view(gate_up.shape), None


def narrow_rms_norm(
    x2: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LLaMA's RMSNorm of a wide ``x2`` ``(n, h)`` (full fine-tuning's fp32 residual stream) whose
    result goes to linear layers in the narrower ``out_dtype``: ``(y, xhat, rstd)``, ``y`` the
    module's value cast to ``out_dtype``, ``xhat`` the normalised input in ``out_dtype`` and
    ``rstd`` ``(n, 1)`` fp32, what :func:`narrow_rms_norm_backward` needs."""
    xf = x2.float()
    rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    normed = (xf * rstd).to(x2.dtype)
    return (weight * normed).to(out_dtype), normed.to(out_dtype), rstd


def narrow_rms_norm_backward(
    grad: torch.Tensor, xhat: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor, x_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of :func:`narrow_rms_norm`'s ``x2`` (in ``x_dtype``) and ``weight`` for
    ``grad`` ``(n, h)``: the closed form of :class:`RMSNorm`'s backward, from the narrow ``xhat``."""
    g = grad.to(torch.promote_types(weight.dtype, x_dtype))
    xh = xhat.float()
    grad_weight = (g * xh.to(x_dtype)).sum(0).to(weight.dtype)
    gn = (g * weight).float()
    dot = (gn * xh).mean(-1, keepdim=True)
    return ((gn - xh * dot) * rstd).to(x_dtype), grad_weight


class NarrowRMSNorm(torch.autograd.Function):
    """LLaMA's RMSNorm of a wide input handing its linear layers a narrower dtype (full
    fine-tuning's fp32 residual stream under bf16 autocast; see :func:`_norm_out_dtype`). Keeps
    the normalised input in that narrow dtype and the fp32 reciprocal RMS for backward, not the
    fp32 input: half the bytes (137 MiB at a SmolLM2 step of 4 x 512 tokens), for gradients
    computed from a bf16-rounded ``x * rstd`` (the linear layers above see it so rounded too).
    ``kernels``: :func:`narrow_rms_norm` and its backward, eager or through ``torch.compile``."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype, kernels: Any
    ) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        y, xhat, rstd = kernels[0](x2, weight, eps, out_dtype)
        ctx.save_for_backward(xhat, rstd, weight)
        ctx.x_dtype, ctx.kernels = x.dtype, kernels
        return y.view(x.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        xhat, rstd, weight = ctx.saved_tensors
        grad_x, grad_weight = ctx.kernels[1](grad.reshape(xhat.shape), xhat, rstd, weight, ctx.x_dtype)
        return grad_x.view(grad.shape), grad_weight, None, None, None


_EAGER_NARROW = (narrow_rms_norm, narrow_rms_norm_backward)
_NATIVE_NARROW = (_native_narrow, _native_narrow_backward)


def _narrower_autocast(dtype: torch.dtype, device_type: str) -> torch.dtype | None:
    """Autocast's dtype on ``device_type`` when autocast is on there and narrower than ``dtype``
    (bf16 against full fine-tuning's fp32), else None."""
    if not torch.is_autocast_enabled(device_type):
        return None
    narrow = torch.get_autocast_dtype(device_type)
    return narrow if dtype.itemsize > narrow.itemsize else None


def _norm_out_dtype(module: Any, x: torch.Tensor) -> torch.dtype | None:
    """The dtype a norm feeding linear layers hands them: autocast's when it is on and the norm's
    own result would be wider (a trained fp32 norm on the fp32 residual of full fine-tuning), else
    None (the module's own dtype). Every consumer casts it so anyway; cast once here, q, k and v
    (or gate and up) share one bf16 copy instead of autocast saving one each for backward. Only
    for the norms marked ``_zhtune_feeds_linears`` (the hidden-size ones, not Qwen3's per-head
    q/k norms, whose output goes through the rotary embedding first)."""
    if not getattr(module, "_zhtune_feeds_linears", False):
        return None
    return _narrower_autocast(torch.promote_types(module.weight.dtype, x.dtype), x.device.type)


def _rmsnorm_forward(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    out_dtype = _norm_out_dtype(self, hidden_states)
    if out_dtype is not None and torch.is_grad_enabled():
        return NarrowRMSNorm.apply(hidden_states, self.weight, self.variance_epsilon, out_dtype, _EAGER_NARROW)
    return RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon, out_dtype)


def llama_rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """LLaMA's RMSNorm as plain ops (what :class:`RMSNorm` computes), for ``torch.compile``;
    ``out_dtype``: the result cast so (see :func:`_norm_out_dtype`)."""
    xf = x.float()
    y = weight * (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y if out_dtype is None else y.to(out_dtype)


_compiled_norm: Any = None
_compiled_narrow: Any = None


def _dynamic_rows(*tensors: torch.Tensor) -> None:
    """Mark the first dimension (tokens) of ``tensors`` dynamic for ``torch.compile``: one graph
    whatever the number of tokens, the hidden size a constant of the kernel."""
    for t in tensors:
        torch._dynamo.maybe_mark_dynamic(t, 0)


_compiled_mlp_kernels: MlpKernels | None = None


def _rows(fn: Callable[..., Any], *rows: int) -> Callable[..., Any]:
    """``fn`` through ``torch.compile``, the first dimension of its arguments at ``rows`` marked
    dynamic (:func:`_dynamic_rows`) on each call."""
    compiled = torch.compile(fn)

    def call(*args: Any) -> Any:
        _dynamic_rows(*(args[i] for i in rows))
        return compiled(*args)

    return call


def _compiled_mlp() -> MlpKernels:
    """:class:`MlpKernels` through ``torch.compile`` (one graph each, for any number of tokens):
    the activation and its gradients as one loop each (1.1 and 1.5 ms a SmolLM2 layer of 2,048
    tokens, against 3.2 and 3.8 ms eager), ``silu(gate)`` computed again in the backward's loop
    instead of kept; computed in fp32 and rounded once (eager rounds ``silu(gate)`` to bf16 first)."""
    global _compiled_mlp_kernels
    if _compiled_mlp_kernels is None:
        swiglu = _rows(_swiglu, 0, 1)
        _compiled_mlp_kernels = MlpKernels(
            swiglu, lambda gate, up: (swiglu(gate, up), None), _rows(_swiglu_backward_stacked, 0, 1, 2)
        )
    return _compiled_mlp_kernels


def _rmsnorm_compiled_forward(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    """:func:`llama_rms_norm` through ``torch.compile``, one graph for any number of tokens: the
    input is flattened to ``(tokens, hidden)`` and its first dimension marked dynamic, so the
    hidden size stays a constant of the kernel and a new batch shape compiles nothing. A norm
    handing a narrower dtype on (:func:`_norm_out_dtype`) runs :class:`NarrowRMSNorm` with its
    forward and backward compiled so instead (two graphs: Dynamo would choose what to keep)."""
    global _compiled_norm, _compiled_narrow
    out_dtype = _norm_out_dtype(self, hidden_states)
    if out_dtype is not None and torch.is_grad_enabled():
        if _compiled_narrow is None:
            _compiled_narrow = (_rows(narrow_rms_norm, 0), _rows(narrow_rms_norm_backward, 0, 1, 2))
        return NarrowRMSNorm.apply(hidden_states, self.weight, self.variance_epsilon, out_dtype, _compiled_narrow)
    if _compiled_norm is None:
        _compiled_norm = torch.compile(llama_rms_norm)
    x = hidden_states.reshape(-1, hidden_states.shape[-1])
    _dynamic_rows(x)
    return _compiled_norm(x, self.weight, self.variance_epsilon, out_dtype).view(*hidden_states.shape[:-1], -1)


def _casts(weight: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether :class:`CastLinear` runs a linear layer with ``weight`` on ``x``: gradients on,
    autocast on, and ``weight`` trained and wider than autocast's dtype."""
    return (
        weight.requires_grad and torch.is_grad_enabled()
        and _narrower_autocast(weight.dtype, x.device.type) is not None
    )  # fmt: skip


def _linear_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    if _casts(self.weight, x):
        return CastLinear.apply(x, self.weight, self.bias)
    return torch.nn.functional.linear(x, self.weight, self.bias)


def is_llama_mlp(module: Any) -> bool:
    """Whether ``module``'s forward is LLaMA's MLP (``down(silu(gate(x)) * up(x))``) with SiLU."""
    from transformers.activations import SiLUActivation
    from transformers.models.llama.modeling_llama import LlamaMLP

    act = getattr(module, "act_fn", None)
    return isinstance(act, SiLUActivation | torch.nn.SiLU) and _same_code(type(module).forward, LlamaMLP.forward)


def _recomputes(mlp: Any) -> bool:
    """Whether :class:`RecomputedMLP` runs ``mlp`` now: marked so by :func:`fuse_for_training`,
    gradients on, its three projections plain trained linear layers (full fine-tuning) with
    biases on all or none."""
    projections = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    return (
        getattr(mlp, "_zhtune_recompute", False) and torch.is_grad_enabled()
        and all(type(p) is torch.nn.Linear and p.weight.requires_grad for p in projections)
        and len({p.bias is None for p in projections}) == 1
    )  # fmt: skip


def _mlp_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    kernels = _NATIVE_MLP if self._zhtune_native else _compiled_mlp() if self._zhtune_compiled else _EAGER_MLP
    if _recomputes(self):
        gate, up, down = self.gate_proj, self.up_proj, self.down_proj
        return RecomputedMLP.apply(x, gate.weight, up.weight, down.weight, gate.bias, up.bias, down.bias, kernels)
    down = self.down_proj
    gate_up = stacked_lora(x, [self.gate_proj, self.up_proj])
    if gate_up is not None:
        return down(StackedSwiGLU.apply(gate_up, kernels))
    gate, up = self.gate_proj(x), self.up_proj(x)
    if type(down) is torch.nn.Linear and _casts(down.weight, gate):
        return SwiGLUDown.apply(gate, up, down.weight, down.bias)
    return down(SwiGLU.apply(gate, up))


def _llama_layer_norms(module: Any) -> list[Any]:
    """The norms of a decoder layer whose forward is LLaMA's (``input_layernorm`` into attention's
    projections, ``post_attention_layernorm`` into the MLP): norms whose output only linear layers
    read. [] for any other module (a sandwich norm's output goes into the residual)."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    if not _same_code(type(module).forward, LlamaDecoderLayer.forward):
        return []
    return [module.input_layernorm, module.post_attention_layernorm]


def _norm_readers(module: Any) -> list[list[Any]]:
    """The layers that read each of :func:`_llama_layer_norms`'s norms: attention's q, k and v;
    the MLP's gate and up (None where a module has none: a LLaMA-code layer around another MLP)."""
    attn, mlp = getattr(module, "self_attn", None), getattr(module, "mlp", None)
    return [
        [getattr(attn, name, None) for name in ("q_proj", "k_proj", "v_proj")],
        [getattr(mlp, name, None) for name in ("gate_proj", "up_proj")],
    ]


def fuse_for_training(
    model: Any, compiled: bool = False, recompute_mlp: bool = True, native_kernels: bool = False
) -> dict[str, int]:
    """Swap the fused kernels into ``model`` in place (parameters and names untouched); returns how
    many modules of each kind: ``lora`` (:class:`zhtune.train.lora.LoraLinear`; see
    :func:`zhtune.train.lora.lora_plain` for when a layer still runs peft's forward), ``rmsnorm``
    (:class:`RMSNorm`, or with ``compiled`` :func:`llama_rms_norm` through ``torch.compile``),
    ``mlp`` (LLaMA's MLP through :class:`SwiGLU`, or :class:`StackedSwiGLU` after one stacked
    product when gate and up are LoRA layers, or :class:`SwiGLUDown` when its down projection is a
    trained wide weight under autocast, or with ``recompute_mlp`` :class:`RecomputedMLP` when all
    three projections are trained; the elementwise kernels of the last two through
    ``torch.compile`` with ``compiled``; the caller turns
    ``recompute_mlp`` off under gradient checkpointing, which computes the whole block
    again) and ``linear`` (trained plain ``nn.Linear`` layers: through :class:`CastLinear` under
    autocast with wider weights, else their own computation). ``native_kernels``
    (:func:`zhtune.train.native.elementwise`): the norms (``native_rmsnorm``, not counted in ``rmsnorm``) run
    :class:`NativeRMSNorm` (bf16) or :class:`NarrowRMSNorm` with the native kernels (fp32 handing
    bf16 on), the MLPs' activation (stacked or recomputed) the native kernels, compiled or
    not (the decoder layers' residual stream: :func:`zhtune.train.residual.swap_decoder_layers`)."""
    from peft.tuners.lora import layer as lora_layer

    norm_forward = _rmsnorm_compiled_forward if compiled else _rmsnorm_forward
    counts = {"lora": 0, "rmsnorm": 0, "native_rmsnorm": 0, "mlp": 0, "linear": 0}
    for module in model.modules():
        norms = _llama_layer_norms(module)
        for norm, readers in zip(norms, _norm_readers(module) if norms else []):
            norm._zhtune_feeds_linears = True
            norm._zhtune_widen = stacked_rank(readers)
        if type(module) is lora_layer.Linear and not module.fan_in_fan_out:
            if type(module.base_layer) is torch.nn.Linear:
                module.forward = types.MethodType(lora_forward, module)
                counts["lora"] += 1
        elif is_llama_rmsnorm(module):
            module.forward = types.MethodType(_rmsnorm_native_forward if native_kernels else norm_forward, module)
            counts["native_rmsnorm" if native_kernels else "rmsnorm"] += 1
        elif is_llama_mlp(module):
            module.forward = types.MethodType(_mlp_forward, module)
            module._zhtune_recompute, module._zhtune_compiled = recompute_mlp, compiled
            module._zhtune_native = native_kernels
            counts["mlp"] += 1
        elif type(module) is torch.nn.Linear and module.weight.requires_grad:
            module.forward = types.MethodType(_linear_forward, module)
            counts["linear"] += 1
    return counts
