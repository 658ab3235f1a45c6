"""LLaMA's attention forward for training: q, k and v as one LoRA product, and the rotary position
embedding as one compiled loop each way.

transformers rotates queries and keys with four elementwise ops each (``q * cos``, the
``rotate_half`` concatenation, ``* sin``, the sum) and as many again backward. In full
fine-tuning the projections give bf16 under autocast while the cos/sin tables are fp32 (made in
the fp32 hidden states' dtype), so all of it runs in fp32 and the attention casts the result back
to bf16: 7.7 ms a SmolLM2 layer of 4 x 512 tokens, forward and backward (4.4 ms with LoRA's bf16
tables). :class:`Rotary` computes the same function in fp32 inside one ``torch.compile`` loop
each way and hands on bf16 directly: 2.8 ms.

:func:`swap_attention` swaps :func:`_attention_forward` into the attention modules whose forward
is LLaMA's, token for token, and whose family rotates as LLaMA does (:func:`is_llama_attention`),
whenever the fused kernels are on and the decoder blocks are not compiled whole (those fuse the
rotation with the rest of the block themselves). The swapped forward is LLaMA's with two changes:

* its q, k and v projections run as one LoRA product when all three are LoRA layers that
  :class:`zhtune.train.lora.LoraLinear` runs (:func:`zhtune.train.lora.stacked_lora`);
* the rotation goes through :class:`NativeRotary` with zhtune's native kernels (bf16 on a CPU
  with AVX-512 bf16), else under ``compile: kernels`` through :class:`Rotary`, where
  :func:`_applies`; after a stacked product, :class:`NativeQKVRotary` takes q, k and v from it
  and rotates q and k with the native kernels, and its backward writes their gradients into one
  tensor (no concatenation).

Everything else (a key/value cache, no gradient, fp32 training, eager runs' rotation) goes
through transformers' own code.
"""

from __future__ import annotations

import sys
import types
from typing import Any

import torch

from zhtune.train.fused import _same_code
from zhtune.train.lora import split_by_layer, stacked_lora


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` for ``x`` ``(b, heads, t, d)`` and ``cos``, ``sin``
    ``(b, t, d)``, computed in fp32 and rounded once to bf16 (transformers' value, cast as the
    attention casts it)."""
    xf = x.float()
    half = x.shape[-1] // 2
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos[:, None].float() + rotated * sin[:, None].float()).to(torch.bfloat16)


def rotate_backward(grad: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The gradient of :func:`rotate`'s ``x`` for ``grad`` ``(b, heads, t, d)``, bf16: ``grad *
    cos`` plus the rotation's transpose of ``grad * sin``."""
    g = grad.float()
    half = g.shape[-1] // 2
    gs = g * sin[:, None].float()
    return (g * cos[:, None].float() + torch.cat((gs[..., half:], -gs[..., :half]), dim=-1)).to(torch.bfloat16)


_compiled: dict[bool, tuple[Any, Any]] = {}


def _kernels(fixed: bool) -> tuple[Any, Any]:
    """:func:`rotate` and :func:`rotate_backward` through ``torch.compile``, made once for each
    ``fixed``. With every size dynamic (``fixed`` False): one graph each for any batch shape
    (padding-free and unpacked batches change the rows and the tokens; marking those dimensions
    of a transposed view dynamic does not reach Dynamo, which traces the view's base), as fast as
    graphs of fixed sizes here (0.6 ms each way). ``fixed``: every batch has one shape (packed
    rows padded to ``cutoff_len``): traced with static sizes, 0.45 s less tracing in the first
    step (SmolLM2; a symbolic size costs Dynamo more); another shape would compile a second
    graph, its changed sizes dynamic."""
    if fixed not in _compiled:
        dynamic = None if fixed else True
        _compiled[fixed] = (torch.compile(rotate, dynamic=dynamic), torch.compile(rotate_backward, dynamic=dynamic))
    return _compiled[fixed]


class Rotary(torch.autograd.Function):
    """:func:`rotate` forward, :func:`rotate_backward` backward, both compiled (:func:`_kernels`
    for ``fixed``); keeps only the cos/sin tables (which need no gradient)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fixed: bool) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        ctx.fixed = fixed
        return _kernels(fixed)[0](x, cos, sin)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        cos, sin = ctx.saved_tensors
        return _kernels(ctx.fixed)[1](grad.contiguous(), cos, sin), None, None, None


class NativeRotary(torch.autograd.Function):
    """:func:`rotate` forward and :func:`rotate_backward` backward by the native kernels
    (``csrc/cpu_ops.cpp``: one pass each, fp32 inside, rounded once; bit-identical to
    :func:`rotate`); the result laid out as the projections are, ``(b, t, heads, d)``, viewed
    ``(b, heads, t, d)``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return torch.ops.zhtune_cpu_ops.rotary(x, cos, sin)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        cos, sin = ctx.saved_tensors
        return torch.ops.zhtune_cpu_ops.rotary_backward(grad, cos, sin), None, None


class NativeQKVRotary(torch.autograd.Function):
    """Queries, keys and values ``(b, heads, t, d)`` from the stacked q/k/v product ``y`` ``(b, t,
    (heads + 2 kv_heads) d)`` (:func:`zhtune.train.lora.stacked_lora`), queries and keys rotated as
    :class:`NativeRotary` rotates them, values a view of ``y``. Backward writes the rotation's
    gradients of the queries and keys and the values' gradient side by side into one tensor,
    ``y``'s gradient, where autograd would concatenate the three (for SmolLM2, a ``(2048, 960)``
    copy a layer, ~0.2 ms)."""

    @staticmethod
    def forward(
        ctx: Any, y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y4 = y.view(*y.shape[:-1], heads + 2 * kv_heads, -1)
        q, k, v = (y4[:, :, a:z].transpose(1, 2) for a, z in _columns(heads, kv_heads))
        ctx.save_for_backward(cos, sin)
        ctx.heads = heads, kv_heads
        return torch.ops.zhtune_cpu_ops.rotary(q, cos, sin), torch.ops.zhtune_cpu_ops.rotary(k, cos, sin), v

    @staticmethod
    def backward(ctx: Any, gq: torch.Tensor, gk: torch.Tensor, gv: torch.Tensor) -> tuple[Any, ...]:
        cos, sin = ctx.saved_tensors
        heads, kv_heads = ctx.heads
        b, _, t, d = gq.shape
        grad = torch.empty(b, t, heads + 2 * kv_heads, d, dtype=torch.bfloat16)
        (q, k, v) = (grad[:, :, a:z] for a, z in _columns(heads, kv_heads))
        torch.ops.zhtune_cpu_ops.rotary_backward_into(gq, cos, sin, q)
        torch.ops.zhtune_cpu_ops.rotary_backward_into(gk, cos, sin, k)
        v.copy_(gv.transpose(1, 2))
        return grad.view(b, t, -1), None, None, None, None


def _columns(heads: int, kv_heads: int) -> tuple[tuple[int, int], ...]:
    """The head ranges of q, k and v in the stacked q/k/v product."""
    return (0, heads), (heads, heads + kv_heads), (heads + kv_heads, heads + 2 * kv_heads)


def _applies(dtype: torch.dtype, head_dim: int, cos: torch.Tensor, past_key_values: Any) -> bool:
    """Whether :class:`Rotary` replaces transformers' rotation: training (gradients on, no
    cache), bf16 projections (bf16 weights or autocast: the attention computes in bf16 either
    way), and tables ``(b, t, head_dim)``."""
    return (
        torch.is_grad_enabled() and past_key_values is None and dtype == torch.bfloat16
        and cos.dim() == 3 and cos.shape[-1] == head_dim and head_dim % 2 == 0
    )  # fmt: skip


def _native(dtype: torch.dtype, head_dim: int, cos: torch.Tensor, past_key_values: Any) -> bool:
    """Whether the native rotation kernels take it (:func:`_applies`, a head dim of whole vectors)."""
    return _applies(dtype, head_dim, cos, past_key_values) and head_dim % 32 == 0


def _rotated(
    module: Any, query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, past_key_values: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """``query`` and ``key`` ``(b, heads, t, d)`` rotated: by the native kernels where ``module``
    runs them, else compiled where it is marked so, else by transformers' function."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    if module._zhtune_native and _native(query.dtype, query.shape[-1], cos, past_key_values):
        return NativeRotary.apply(query, cos, sin), NativeRotary.apply(key, cos, sin)
    if module._zhtune_compiled and _applies(query.dtype, query.shape[-1], cos, past_key_values):
        fixed = module._zhtune_fixed_shapes
        return Rotary.apply(query, cos, sin, fixed), Rotary.apply(key, cos, sin, fixed)
    return apply_rotary_pos_emb(query, key, cos, sin)


def _attention_forward(
    self: Any,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    attention_mask: torch.Tensor | None = None,
    past_key_values: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``LlamaAttention.forward`` with q, k and v as one stacked LoRA product where they can be
    (with the native kernels, through :class:`NativeQKVRotary`), and the rotation by the native
    kernels or compiled where it applies (:func:`_rotated`)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import eager_attention_forward

    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    layers = (self.q_proj, self.k_proj, self.v_proj)
    stacked = stacked_lora(hidden_states, list(layers))
    cos, sin = position_embeddings
    outs = [m.base_layer.weight.shape[0] for m in layers] if stacked is not None else []
    if (
        stacked is not None and stacked.dim() == 3 and outs[1] == outs[2] and self._zhtune_native
        and _native(stacked.dtype, self.head_dim, cos, past_key_values)
    ):  # fmt: skip
        query, key, value = NativeQKVRotary.apply(stacked, cos, sin, outs[0] // self.head_dim, outs[1] // self.head_dim)
    else:
        projected = split_by_layer(stacked, list(layers)) if stacked is not None else [m(hidden_states) for m in layers]
        query, key, value = (t.view(hidden_shape).transpose(1, 2) for t in projected)
        query, key = _rotated(self, query, key, cos, sin, past_key_values)
    if past_key_values is not None:
        key, value = past_key_values.update(key, value, self.layer_idx)
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
    out, weights = attention(
        self,
        query,
        key,
        value,
        attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling,
        **kwargs,
    )
    out = out.reshape(*input_shape, -1).contiguous()
    return self.o_proj(out), weights


def is_llama_attention(module: Any) -> bool:
    """Whether ``module``'s forward is LLaMA's attention token for token and its family's
    ``apply_rotary_pos_emb`` and ``rotate_half`` are LLaMA's (GLM's interleaved rotation, say,
    has the same names and a different function)."""
    from transformers.models.llama import modeling_llama as llama

    family = sys.modules.get(type(module).__module__)
    return (
        _same_code(type(module).forward, llama.LlamaAttention.forward)
        and all(_same_code(getattr(family, name, None), getattr(llama, name)) for name in ("apply_rotary_pos_emb", "rotate_half"))
    )  # fmt: skip


def swap_attention(model: Any, compiled: bool, fixed_shapes: bool = False, native_kernels: bool = False) -> int:
    """Swap :func:`_attention_forward` into ``model``'s LLaMA attention modules in place
    (parameters and names untouched), the rotation by the native kernels with ``native_kernels``
    (:func:`zhtune.train.native.elementwise`; :class:`NativeRotary`), else compiled when
    ``compiled``, for one batch shape when ``fixed_shapes`` (:func:`_kernels`); returns how many."""
    n = 0
    for module in model.modules():
        if is_llama_attention(module):
            module.forward = types.MethodType(_attention_forward, module)
            module._zhtune_compiled, module._zhtune_fixed_shapes = compiled, fixed_shapes
            module._zhtune_native = native_kernels
            n += 1
    return n
