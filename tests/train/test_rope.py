"""The compiled rotary embedding in LLaMA's attention (zhtune.train.rope)."""

from __future__ import annotations

import pytest
import torch

from zhtune.models.tiny import TINY_CONFIG_KEYS, build_tiny_model
from zhtune.train import rope


def _attention_modules(model):
    return [m for m in model.modules() if type(m).__name__.endswith("Attention")]


@pytest.mark.parametrize("family", list(TINY_CONFIG_KEYS))
def test_only_llamas_attention_with_llamas_rotation_is_swapped(family, tiny_tokenizer):
    model = build_tiny_model(family, tiny_tokenizer)
    swapped = rope.swap_attention(model, compiled=True)
    # Gemma's attention and rotation are LLaMA's code; Mistral and Qwen2 pass a sliding window,
    # Qwen3 normalises q/k, GLM-4 rotates interleaved pairs, the others are other architectures
    assert swapped == (len(_attention_modules(model)) if family in ("llama", "gemma") else 0)


def test_rotate_and_its_backward_are_transformers_rotation_rounded_once():
    """transformers' value in fp32 (its tables are fp32), cast to bf16; the gradient of that fp32
    function rounded once (autograd through transformers' ops on a bf16 input rounds each of its
    two paths to bf16 before adding them)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    torch.manual_seed(0)
    q = torch.randn(2, 3, 7, 8, dtype=torch.bfloat16)
    cos, sin = torch.randn(2, 7, 8), torch.randn(2, 7, 8)
    q32 = q.float().requires_grad_(True)
    want, _ = apply_rotary_pos_emb(q32, q32, cos, sin)
    grad = torch.randn(2, 3, 7, 8, dtype=torch.bfloat16)
    (want_grad,) = torch.autograd.grad(want, q32, grad.float())
    torch.testing.assert_close(rope.rotate(q, cos, sin), want.bfloat16(), rtol=0, atol=0)
    got_grad = rope.rotate_backward(grad, cos, sin)
    assert got_grad.dtype == torch.bfloat16
    torch.testing.assert_close(got_grad, want_grad.bfloat16(), rtol=0, atol=0)


def _loss_and_grads(model, ids):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16])
def test_a_model_with_the_compiled_rotation_gives_the_same_loss_and_gradients(weights, tiny_tokenizer):
    """fp32 weights under autocast (full fine-tuning: transformers rotates in fp32, attention casts
    to bf16) and bf16 weights (bf16 tables): the same loss and gradients to bf16 rounding, and
    another sequence length compiles nothing more."""
    import torch._dynamo

    model = build_tiny_model("llama", tiny_tokenizer).to(weights)
    torch.manual_seed(1)
    ids = torch.randint(5, model.config.vocab_size, (2, 30))
    want_loss, want = _loss_and_grads(model, ids)
    assert rope.swap_attention(model, compiled=True) == model.config.num_hidden_layers
    got_loss, got = _loss_and_grads(model, ids)
    assert got_loss == pytest.approx(want_loss, rel=1e-3)
    for name, grad in want.items():
        scale = grad.float().abs().max()
        assert (got[name].float() - grad.float()).abs().max() <= 3e-2 * scale, name
    with torch._dynamo.config.patch(error_on_recompile=True):
        loss, _ = _loss_and_grads(model, ids[:, :17])
    assert loss > 0
    with torch.no_grad():  # (generation and evaluation: transformers' own rotation)
        model(input_ids=ids)


def test_for_one_promised_shape_the_rotation_is_traced_static(tiny_tokenizer):
    """``fixed_shapes`` (the loop pads every batch to one shape): the same values, traced with
    static sizes, so another shape, which the loop never makes, compiles anew."""
    from torch._dynamo.utils import counters

    model = build_tiny_model("llama", tiny_tokenizer).to(torch.bfloat16)
    torch.manual_seed(1)
    ids = torch.randint(5, model.config.vocab_size, (2, 30))
    want_loss, _ = _loss_and_grads(model, ids)
    torch._dynamo.reset()
    assert rope.swap_attention(model, compiled=True, fixed_shapes=True) == model.config.num_hidden_layers
    got_loss, _ = _loss_and_grads(model, ids)
    assert got_loss == pytest.approx(want_loss, rel=1e-3)
    graphs = counters["stats"]["unique_graphs"]
    _loss_and_grads(model, ids)
    assert counters["stats"]["unique_graphs"] == graphs
    _loss_and_grads(model, ids[:, :17])
    assert counters["stats"]["unique_graphs"] > graphs
