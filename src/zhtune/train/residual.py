"""A LLaMA-code decoder layer's residual stream through its norms, for bf16 LoRA with zhtune's
native kernels: :class:`ResidualRMSNorm` and the layer forward that runs it
(:func:`swap_decoder_layers`).

The layer reads its stream twice, through a norm and through the residual connection: the add
before the MLP's norm and the norm run as one pass, and the norms' backward adds the gradient
the residual connection hands the stream inside its kernel, where autograd added the two
gradients in a pass of its own (reading and writing the ``(n, h)`` gradient again, twice a layer).
"""

from __future__ import annotations

import types
from typing import Any

import torch

from zhtune.train.fused import _llama_layer_norms, _rmsnorm_native_forward, _widen, native_bf16_norm


class ResidualRMSNorm(torch.autograd.Function):
    """``(h, y)`` for bf16 ``x`` ``(..., h)``: the residual stream ``h = x + delta`` (``h`` is
    ``x`` when ``delta`` is None) and :class:`zhtune.train.fused.NativeRMSNorm`'s ``y`` of it
    (``extra`` as there), in one pass of the native kernels (``add_rms_norm``). Backward takes
    ``h``'s gradient from the residual connection and adds it inside the norm's backward kernel.
    Values and gradients bit-identical to the add, the norm and autograd's sum
    (:func:`_decoder_forward` runs it)."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float, extra: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if delta is None:
            h = x
            y, rstd = torch.ops.zhtune_cpu_ops.rms_norm(x, weight, eps, extra)
        else:
            h, y, rstd = torch.ops.zhtune_cpu_ops.add_rms_norm(x, delta, weight, eps, extra)
        ctx.save_for_backward(h, rstd, weight)
        ctx.added = delta is not None
        return h, y[..., : x.shape[-1]] if extra else y

    @staticmethod
    def backward(ctx: Any, grad_h: torch.Tensor | None, grad_y: torch.Tensor) -> tuple[Any, ...]:
        h, rstd, weight = ctx.saved_tensors
        trained = ctx.needs_input_grad[2]
        dx, dw = torch.ops.zhtune_cpu_ops.rms_norm_backward(grad_y, h, rstd, weight, trained, grad_h)
        return dx, dx if ctx.added else None, dw if trained else None, None, None


def _residual_norms(layer: Any, x: torch.Tensor) -> bool:
    """Whether :func:`_decoder_forward` fuses ``layer``'s residual adds into its norms for ``x``:
    both norms run :class:`zhtune.train.fused.NativeRMSNorm` (native kernels, bf16 input and
    weights, gradients on: LoRA's frozen bf16 model), and the layer is not checkpointed (transformers checkpoints the
    class's ``forward``, which the layer's own then runs)."""
    checkpointed = getattr(layer, "gradient_checkpointing", False) and layer.training
    return torch.is_grad_enabled() and not checkpointed and all(
        getattr(vars(norm).get("forward"), "__func__", None) is _rmsnorm_native_forward and native_bf16_norm(norm, x)
        for norm in (layer.input_layernorm, layer.post_attention_layernorm)
    )


def _decoder_forward(
    self: Any,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    past_key_values: Any = None,
    use_cache: bool | None = False,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """``LlamaDecoderLayer.forward`` with the residual stream through :class:`ResidualRMSNorm`
    where :func:`_residual_norms` says so (the add before the MLP's norm in one pass with it;
    the stream's two gradients added inside the norms' backward); otherwise the layer's own."""
    if not _residual_norms(self, hidden_states):
        return type(self).forward(
            self, hidden_states, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, use_cache=use_cache, position_embeddings=position_embeddings, **kwargs,
        )  # fmt: skip
    first, second = self.input_layernorm, self.post_attention_layernorm
    residual, hidden = ResidualRMSNorm.apply(hidden_states, None, first.weight, first.variance_epsilon, _widen(first))
    hidden, _ = self.self_attn(
        hidden_states=hidden, attention_mask=attention_mask, position_ids=position_ids, past_key_values=past_key_values,
        use_cache=use_cache, position_embeddings=position_embeddings, **kwargs,
    )  # fmt: skip
    residual, hidden = ResidualRMSNorm.apply(residual, hidden, second.weight, second.variance_epsilon, _widen(second))
    return residual + self.mlp(hidden)


def swap_decoder_layers(model: Any) -> int:
    """Swap :func:`_decoder_forward` into ``model``'s LLaMA-code decoder layers in place
    (parameters and names untouched; it runs the layer's own forward wherever
    :func:`_residual_norms` says no); returns how many."""
    n = 0
    for module in model.modules():
        if _llama_layer_norms(module):
            module.forward = types.MethodType(_decoder_forward, module)
            n += 1
    return n
