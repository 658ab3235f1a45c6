"""LoRA layers on one input as one product (zhtune.train.lora): q, k and v; gate and up."""

from __future__ import annotations

import pytest
import torch

from tests.train.test_fused import tiny_lora_model
from tests.train.test_rope import _loss_and_grads
from zhtune.train import fused, lora, rope


def _layers(bias: bool, outs=(48, 16, 16), dropout: float = 0.0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    body = torch.nn.ModuleDict({f"p{i}": torch.nn.Linear(32, o, bias=bias) for i, o in enumerate(outs)})
    model = get_peft_model(
        torch.nn.Sequential(body), LoraConfig(r=4, lora_alpha=8, target_modules=["p0", "p1", "p2"], lora_dropout=dropout)
    )
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    fused.fuse_for_training(model)
    return [model.base_model.model[0][f"p{i}"] for i in range(len(outs))]


def _outputs_and_grads(layers, x, run):
    for m in layers:
        for p in m.parameters():
            p.grad = None
    x = x.detach().clone().requires_grad_(True)
    ys = run(x)
    g = torch.Generator().manual_seed(3)
    torch.autograd.backward(ys, [torch.randn(y.shape, generator=g).to(y.dtype) for y in ys])
    grads = {(i, n): p.grad.clone() for i, m in enumerate(layers) for n, p in m.named_parameters() if p.grad is not None}
    return [y.detach() for y in ys], x.grad.clone(), grads


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_one_stacked_product_gives_the_three_layers_values_and_gradients(bias, autocast):
    layers = _layers(bias)
    layers[2].scaling["default"] = 0.5  # (each layer's own scaling)
    x = torch.randn(3, 5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        want = _outputs_and_grads(layers, x, lambda x: [m(x) for m in layers])
        got = _outputs_and_grads(layers, x, lambda x: lora.stacked_projections(x, layers))
    tol = 1e-2 if autocast else 1e-5
    for a, b in [*zip(got[0], want[0]), (got[1], want[1])]:
        assert a.dtype == b.dtype and a.shape == b.shape
        assert (a.float() - b.float()).abs().max() <= tol * b.float().abs().max()
    assert got[2].keys() == want[2].keys() and len(want[2]) == 6  # A and B of each, nothing frozen
    for key, b in want[2].items():
        assert got[2][key].dtype == b.dtype
        assert (got[2][key] - b).abs().max() <= tol * b.abs().max(), key


def _stacked_step(layers, x):
    """One stacked forward and backward with the layers' per-layer outputs as the reference."""
    got = _outputs_and_grads(layers, x, lambda x: lora.stacked_projections(x, layers))
    want = _outputs_and_grads(layers, x, lambda x: [m(x) for m in layers])
    for a, b in [*zip(got[0], want[0]), (got[1], want[1]), *((got[2][k], want[2][k]) for k in want[2])]:
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_the_frozen_weights_are_stacked_once_and_again_only_when_they_change():
    """The stack of frozen weights is kept between steps (only B's columns are written again),
    built anew when a frozen weight changes in place, and no longer kept once the weights keep
    changing (a second rebuild); every step's values and gradients are the separate layers'
    either way."""
    layers = _layers(False)
    x = torch.randn(4, 32)
    _stacked_step(layers, x)
    stack = vars(layers[0])["_zhtune_weight_stack"]
    first = stack._stack
    # [W | B | 0]: 32 inputs and 3 ranks of 4, padded to a width of 64 (backward multiplies by all of it)
    assert first.shape[1] == lora.STACK_ALIGN * 2 and not first[:, 32 + 12 :].any()
    with torch.no_grad():
        for m in layers:  # an optimizer step on the adapters
            m.lora_B["default"].weight.add_(0.1)
    _stacked_step(layers, x)
    assert stack._stack is first  # the same tensor: B's columns rewritten, W not copied again
    with torch.no_grad():
        layers[1].base_layer.weight.mul_(2.0)  # a frozen weight changed in place
    _stacked_step(layers, x)
    assert stack._stack is not first
    second = stack._stack
    with torch.no_grad():
        layers[0].base_layer.weight.add_(1.0)  # changed again: weights that keep changing (FSDP's gathers)
    _stacked_step(layers, x)
    assert stack.rebuilds == 2 and stack._stack is None  # no longer kept: stacked afresh at every call
    layers[2].base_layer.weight = torch.nn.Parameter(torch.randn(16, 32), requires_grad=False)  # replaced
    _stacked_step(layers, x)
    assert stack._stack is None and second is not None


def test_two_forward_passes_before_one_backward_keep_their_own_gradients():
    """Two forward passes (a preference loss's chosen and rejected halves) before one backward:
    the second rewrites the stack's B columns in place, which must neither trip autograd's check
    of saved tensors nor change the first pass's gradients."""
    layers = _layers(False)
    x1, x2 = torch.randn(4, 32), torch.randn(4, 32)

    def run(x):
        return [*lora.stacked_projections(x1, layers), *lora.stacked_projections(x, layers)]

    got = _outputs_and_grads(layers, x2, run)
    want = _outputs_and_grads(layers, x2, lambda x: [*(m(x1) for m in layers), *(m(x) for m in layers)])
    for a, b in [*zip(got[0], want[0]), (got[1], want[1]), *((got[2][k], want[2][k]) for k in want[2])]:
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_anything_the_fused_layer_would_not_run_goes_one_layer_at_a_time():
    layers = _layers(False, dropout=0.1)  # dropout: peft's own forward
    assert lora.stacked_projections(torch.randn(2, 32), layers) is None
    layers = _layers(False)
    with torch.no_grad():
        assert lora.stacked_projections(torch.randn(2, 32), layers) is None
    layers[1].base_layer.bias = torch.nn.Parameter(torch.zeros(16))  # biases on some only
    assert lora.stacked_projections(torch.randn(2, 32), layers) is None


@pytest.mark.parametrize("compiled", [False, True])
def test_a_lora_llama_with_stacked_projections_gives_the_same_loss_and_gradients(compiled, tiny_tokenizer, monkeypatch):
    """Fused, with the swapped attention: q/k/v and gate/up each one stacked product a layer, and
    the loss and gradients of peft's own layers; the rotation compiled only when asked."""
    model = tiny_lora_model("llama", tiny_tokenizer, std=0.1)
    torch.manual_seed(1)
    ids = torch.randint(5, model.config.vocab_size, (2, 30))

    want_loss, want = _loss_and_grads(model, ids)
    fused.fuse_for_training(model)
    assert rope.swap_attention(model, compiled=compiled) == model.config.num_hidden_layers
    calls, rotations = [], []
    apply, rotate = lora.StackedLora.apply, rope.Rotary.apply
    monkeypatch.setattr(lora.StackedLora, "apply", lambda *a: calls.append(a[1]) or apply(*a))
    monkeypatch.setattr(rope.Rotary, "apply", lambda *a: rotations.append(1) or rotate(*a))
    got_loss, got = _loss_and_grads(model, ids)
    assert calls == [3, 2] * model.config.num_hidden_layers
    assert len(rotations) == (2 * model.config.num_hidden_layers if compiled else 0)
    assert got_loss == pytest.approx(want_loss, rel=1e-3)
    assert got.keys() == want.keys()
    for name, grad in want.items():
        assert (got[name] - grad).abs().max() <= 3e-2 * grad.abs().max(), name


@pytest.mark.parametrize("compiled", [False, True])
def test_the_stacked_activation_gives_swiglu_and_its_gradient_as_one_tensor(compiled):
    """StackedSwiGLU on ``[gate | up]`` equals silu(gate) * up; its gradient is the two gradients
    side by side (bf16, eager and compiled kernels), and the incoming gradient is left as it was."""
    torch.manual_seed(0)
    gate_up = torch.randn(3, 7, 2 * 24, dtype=torch.bfloat16)
    grad = torch.randn(3, 7, 24, dtype=torch.bfloat16)
    ref = gate_up.float().requires_grad_(True)
    want = torch.nn.functional.silu(ref[..., :24]) * ref[..., 24:]
    want.backward(grad.float())
    kernels = fused._compiled_mlp() if compiled else fused._EAGER_MLP
    x = gate_up.clone().requires_grad_(True)
    kept = grad.clone()
    got = fused.StackedSwiGLU.apply(x, kernels)
    got.backward(kept)
    assert got.shape == (3, 7, 24) and got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() <= 1e-2 * want.abs().max()
    assert x.grad.shape == x.shape and x.grad.dtype == torch.bfloat16
    assert (x.grad.float() - ref.grad).abs().max() <= 2e-2 * ref.grad.abs().max()
    assert torch.equal(kept, grad)


def test_the_stacked_rank_a_norm_widens_its_output_by():
    """The extra columns a norm writes for the stacked product after it: the summed rank of peft
    LoRA layers' active adapters, 0 where any layer is not one (or missing)."""
    from peft import LoraConfig, get_peft_model

    from zhtune.train.lora import stacked_rank

    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4), torch.nn.Linear(8, 4))
    model = get_peft_model(net, LoraConfig(r=3, target_modules=["0", "1"]))
    layers = [model.base_model.model[i] for i in range(3)]
    assert stacked_rank(layers[:2]) == 6
    assert stacked_rank(layers) == 0 and stacked_rank([layers[0], None]) == 0


def test_another_adapter_through_the_kept_stack_before_backward_keeps_each_passs_gradients():
    """Two forward passes through one kept stack with different ``B`` (two adapters of the same
    layers, say) before one backward: the second overwrites the stack's ``B`` columns, and the
    first pass's backward must still use its own ``B`` (the one product over the stack is taken
    only while it holds them): every gradient equals that of two separate stacks."""
    torch.manual_seed(0)
    outs, ranks = (48, 16, 16), (4, 4, 4)
    ws = [torch.randn(o, 32) for o in outs]

    def run(shared: bool):
        x = torch.randn(6, 32, generator=torch.Generator().manual_seed(1)).requires_grad_()
        params = []
        for seed in (2, 3):
            gen = torch.Generator().manual_seed(seed)
            a = [torch.randn(r, 32, generator=gen).requires_grad_() for r in ranks]
            b = [torch.randn(o, r, generator=gen).requires_grad_() for o, r in zip(outs, ranks)]
            params.append((a, b))
        stacks = [lora.WeightStack()] * 2 if shared else [lora.WeightStack(), lora.WeightStack()]
        ys = [
            lora.StackedLora.apply(x, 3, (2.0,) * 3, stack, *ws, None, None, None, *a, *b)
            for stack, (a, b) in zip(stacks, params)
        ]
        (ys[0] * 1.5 + ys[1]).sum().backward()
        return [x.grad, *(t.grad for a, b in params for t in a + b)]

    for got, want in zip(run(True), run(False)):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
