"""The fused LoRA and RMSNorm kernels give the values and gradients of peft's and the model's own
modules, fall back where they do not apply, and training with them follows the same curve."""

from __future__ import annotations

import pytest
import torch

from tests.train.test_loss import assert_same_curve_either_way
from zhtune.models.tiny import TINY_CONFIG_KEYS, build_tiny_model
from zhtune.train import fused, lora


def _grads(module, x, *extra):
    """Output and the gradients of x, and of the trained parameters, for a fixed upstream grad."""
    for p in module.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    g = torch.Generator().manual_seed(3)
    y.backward(torch.randn(y.shape, generator=g).to(y.dtype))
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return y.detach(), x.grad.clone(), grads


def _lora_layer(bias: bool, **config):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(24, 16, bias=bias))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["0"], **config))
    layer = model.base_model.model[0]
    torch.nn.init.normal_(layer.lora_B["default"].weight)  # B starts at zero: make it count
    return model, layer


@pytest.mark.parametrize("bias", [False, True])
def test_lora_linear_equals_peft_in_fp32_and_under_bf16_autocast(bias):
    model, layer = _lora_layer(bias)
    x = torch.randn(2, 5, 24)
    want = _grads(layer, x)
    assert fused.fuse_for_training(model) == {"lora": 1, "rmsnorm": 0, "native_rmsnorm": 0, "mlp": 0, "linear": 2}  # (+ A and B)
    got = _grads(layer, x)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
    assert got[2].keys() == want[2].keys() == {"lora_A.default.weight", "lora_B.default.weight"}
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], rtol=1e-5, atol=1e-6)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _grads(layer, x)
        del layer.forward  # peft's own forward
        want = _grads(layer, x)
    assert got[0].dtype == want[0].dtype == torch.bfloat16
    assert (got[0].float() - want[0].float()).abs().max() <= 0.02 * want[0].float().abs().max()
    assert got[1].dtype == want[1].dtype == torch.float32  # x was fp32: so is its gradient
    for name in want[2]:
        assert got[2][name].dtype == torch.float32  # the adapter's (fp32) gradient
        assert (got[2][name] - want[2][name]).abs().max() <= 0.02 * want[2][name].abs().max(), name


def test_lora_falls_back_to_peft_where_the_fused_layer_does_not_apply():
    """Dropout, DoRA, disabled or merged adapters: peft's forward runs (same result as without
    fusing), so fusing is never wrong."""
    x = torch.randn(3, 24)
    for config in ({"lora_dropout": 0.1}, {"use_dora": True}):
        model, layer = _lora_layer(False, **config)
        assert lora.lora_plain(layer) is None
    model, layer = _lora_layer(False)
    fused.fuse_for_training(model)
    assert lora.lora_plain(layer) == "default"
    base = layer.base_layer(x)
    with model.disable_adapter():
        torch.testing.assert_close(layer(x), base)
    fused_out = layer(x)
    layer.merge()
    assert lora.lora_plain(layer) is None
    torch.testing.assert_close(layer(x), fused_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("trained", [True, False])
def test_rmsnorm_equals_llamas(dtype, trained):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(32, eps=1e-5)
    torch.nn.init.normal_(norm.weight)
    if not trained:
        norm.weight.requires_grad_(False)
        norm.weight.data = norm.weight.data.to(dtype)  # frozen bf16, as zhtune's bf16 LoRA keeps it
    x = (3 * torch.randn(4, 7, 32)).to(dtype)
    want = _grads(norm, x)
    assert fused.is_llama_rmsnorm(norm)
    norm.forward = fused._rmsnorm_forward.__get__(norm)
    got = _grads(norm, x)
    assert got[0].dtype == want[0].dtype and got[1].dtype == want[1].dtype
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(got[0], want[0], **tol)
    torch.testing.assert_close(got[1], want[1], **tol)
    assert got[2].keys() == want[2].keys() == ({"weight"} if trained else set())
    if trained:
        torch.testing.assert_close(got[2]["weight"], want[2]["weight"], **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_compiled_rmsnorm_equals_the_eager_one_with_one_graph_for_every_length(dtype):
    """``compile: kernels``: the norm through torch.compile gives the eager kernel's values and
    gradients, and a new number of tokens compiles nothing more."""
    import torch._dynamo
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(32, eps=1e-5)
    torch.nn.init.normal_(norm.weight)
    x = (3 * torch.randn(4, 7, 32)).to(dtype)
    norm.forward = fused._rmsnorm_forward.__get__(norm)
    want = _grads(norm, x)
    norm.forward = fused._rmsnorm_compiled_forward.__get__(norm)
    got = _grads(norm, x)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for a, b in ((got[0], want[0]), (got[1], want[1]), (got[2]["weight"], want[2]["weight"])):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tol)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for shape in ((2, 5, 32), (1, 33, 32)):
            y, dx, _ = _grads(norm, torch.randn(shape).to(dtype))
            assert y.shape == dx.shape == shape


@pytest.mark.parametrize("compiled", [False, True])
def test_a_wide_norm_feeding_linear_layers_keeps_its_normalised_input_narrow(compiled):
    """Full fine-tuning's fp32 norm in front of the projections, under bf16 autocast: the
    module's own value cast to bf16, gradients within bf16 rounding of its own, and for backward
    only the normalised input in bf16 and the fp32 reciprocal RMS are kept (not the fp32 input);
    compiled, one graph each way for every number of tokens."""
    import torch._dynamo
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(64, eps=1e-5)
    torch.nn.init.normal_(norm.weight)
    x = 3 * torch.randn(4, 7, 64)
    want = _grads(norm, x)  # (its own forward, fp32: the reference the linear layers round)
    norm._zhtune_feeds_linears = True
    norm.forward = (fused._rmsnorm_compiled_forward if compiled else fused._rmsnorm_forward).__get__(norm)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _grads(norm, x)
        kept = _saved_bytes(norm, x)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == got[2]["weight"].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0].bfloat16(), rtol=0, atol=0)
    for a, b in ((got[1], want[1]), (got[2]["weight"], want[2]["weight"])):
        assert (a - b).abs().max() <= 1e-2 * b.abs().max()
    assert kept == 28 * 64 * 2 + 28 * 4  # xhat bf16, rstd fp32
    if compiled:
        with torch._dynamo.config.patch(error_on_recompile=True), torch.autocast("cpu", dtype=torch.bfloat16):
            for shape in ((2, 5, 64), (1, 33, 64)):
                y, dx, _ = _grads(norm, torch.randn(shape))
                assert y.shape == dx.shape == shape


def test_only_llamas_rmsnorm_code_is_replaced(tiny_tokenizer):
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    assert fused.is_llama_rmsnorm(Qwen2RMSNorm(8))  # a copy of LLaMA's
    assert not fused.is_llama_rmsnorm(GemmaRMSNorm(8))  # (1 + weight)
    assert not fused.is_llama_rmsnorm(torch.nn.LayerNorm(8))


def tiny_lora_model(family, tokenizer, std):
    """A tiny ``family`` model with peft LoRA r4 on every linear layer, ``B`` drawn with ``std``
    (it starts at zero: the adapters then count)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_tiny_model(family, tokenizer), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=std)
    return model


@pytest.mark.parametrize("family", [f for f in TINY_CONFIG_KEYS if f in ("llama", "qwen2", "gemma")])
def test_a_fused_lora_model_gives_the_same_loss_and_gradients(family, tiny_tokenizer):
    model = tiny_lora_model(family, tiny_tokenizer, std=0.02)
    torch.manual_seed(1)
    ids = torch.randint(5, model.config.vocab_size, (2, 30))
    batch = {"input_ids": ids, "labels": ids, "position_ids": torch.cat([torch.arange(18), torch.arange(12)]).repeat(2, 1)}

    def loss_and_grads():
        model.zero_grad()
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    keys = set(model.state_dict())
    want, want_grads = loss_and_grads()
    counts = fused.fuse_for_training(model)
    n_lora = sum(1 for m in model.modules() if type(m).__name__ == "Linear" and hasattr(m, "lora_A"))
    assert counts["lora"] == n_lora > 0
    assert counts["rmsnorm"] == (0 if family == "gemma" else 2 * model.config.num_hidden_layers + 1)
    got, got_grads = loss_and_grads()
    assert set(model.state_dict()) == keys  # nothing renamed: saving is unaffected
    assert got == pytest.approx(want, rel=1e-6)
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_training_with_fused_kernels_follows_the_same_curve(tmp_path, tiny_model_dir, train_file):
    assert_same_curve_either_way("fused_kernels", tmp_path, tiny_model_dir, train_file)


def test_training_with_the_compiled_rmsnorm_follows_the_same_curve(tmp_path, tiny_model_dir, train_file):
    assert_same_curve_either_way("compile", tmp_path, tiny_model_dir, train_file, values=(False, "kernels"))


def _saved_bytes(module, x) -> int:
    """Bytes of the distinct tensors other than parameters that autograd keeps for backward when
    ``module(x)`` runs (under whatever autocast is on)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x.detach().requires_grad_(True))
    return sum(seen.values())


def _close(got, want, rel: float, rel_x: float | None = None) -> None:
    """Outputs and parameter gradients within ``rel`` of the largest value, input gradients
    within ``rel_x`` (default ``rel``)."""
    assert got[2].keys() == want[2].keys()
    pairs = [(got[0], want[0], rel), (got[1], want[1], rel_x or rel)]
    for a, b, r in pairs + [(got[2][k], want[2][k], rel) for k in want[2]]:
        assert a.dtype == b.dtype and a.shape == b.shape
        assert (a.float() - b.float()).abs().max() <= r * b.float().abs().max()


@pytest.mark.parametrize("bias", [False, True])
def test_a_trained_linear_under_autocast_keeps_its_input_but_no_cast_weight(bias):
    """Full fine-tuning's fp32 weights under bf16 autocast: autocast's values and gradients, and
    for backward only the bf16 input is kept (autocast also keeps a bf16 copy of the weight)."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 40, bias=bias)
    x = torch.randn(3, 5, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, want_bytes = _grads(layer, x), _saved_bytes(layer, x)
    assert fused.fuse_for_training(layer) == {"lora": 0, "rmsnorm": 0, "native_rmsnorm": 0, "mlp": 0, "linear": 1}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, got_bytes = _grads(layer, x), _saved_bytes(layer, x)
    _close(got, want, 1e-6)  # the same ops: the same numbers
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == got[2]["weight"].dtype == torch.float32
    assert (want_bytes, got_bytes) == (15 * 48 * 2 + 40 * 48 * 2, 15 * 48 * 2)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))  # no autocast


@pytest.mark.parametrize("case", ["frozen_down", "trained", "trained_kept"])
def test_llamas_mlp_keeps_only_what_its_backward_cannot_cheaply_compute_again(case):
    """The MLP's values and gradients as its own forward gives them, fp32 and under bf16
    autocast. Kept for backward: with all three projections trained (full fine-tuning) only the
    input, the gate and up projections computed again; with ``recompute_mlp`` off, the input and
    the gate and up outputs (``silu(gate)`` and the down projection's input computed again); with
    a frozen down projection the same, plus the bf16 copy autocast makes of its weight."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=80, hidden_act="silu", mlp_bias=True))
    mlp.down_proj.requires_grad_(case != "frozen_down")
    x = torch.randn(2, 7, 32)
    want32 = _grads(mlp, x)
    xb = x.bfloat16()  # what a norm in front hands it under autocast (see the full-model test)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, want_bytes = _grads(mlp, xb), _saved_bytes(mlp, xb)
    assert fused.is_llama_mlp(mlp)
    counts = fused.fuse_for_training(mlp, recompute_mlp=case != "trained_kept")
    assert counts == {"lora": 0, "rmsnorm": 0, "native_rmsnorm": 0, "mlp": 1, "linear": 2 + (case != "frozen_down")}
    _close(_grads(mlp, x), want32, 1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, got_bytes = _grads(mlp, xb), _saved_bytes(mlp, xb)
    # recomputed: the input's gradient is one matmul over the stacked gate and up weights (summed
    # in fp32) instead of two bf16 products added; everything else is the same numbers
    _close(got, want, 1e-6, rel_x=1e-2 if case == "trained" else None)
    x_bytes, gate_up_bytes = 14 * 32 * 2, 2 * 14 * 80 * 2  # bf16
    assert got_bytes == {
        "trained": x_bytes,
        "trained_kept": x_bytes + gate_up_bytes,
        "frozen_down": x_bytes + gate_up_bytes + 80 * 32 * 2,  # (the frozen fp32 weight's bf16 copy)
    }[case]
    assert want_bytes - got_bytes >= 14 * 80 * 2  # silu(gate) at least


def test_the_recomputed_mlp_without_biases_and_its_gradient_when_only_weights_need_one():
    """No biases; an input that needs no gradient (the first layer of a frozen embedding)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=80, hidden_act="silu"))
    x = torch.randn(3, 5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = mlp(x.bfloat16())
        want.float().square().sum().backward()
    want_grads = {n: p.grad.clone() for n, p in mlp.named_parameters()}
    mlp.zero_grad()
    fused.fuse_for_training(mlp)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = mlp(x.bfloat16())
        assert got.grad_fn.name() == "RecomputedMLPBackward"
        got.float().square().sum().backward()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for name, grad in want_grads.items():
        torch.testing.assert_close(dict(mlp.named_parameters())[name].grad, grad, rtol=0, atol=0)
    with torch.no_grad():
        assert mlp(x).grad_fn is None  # (evaluation: the module's own path)


@pytest.mark.parametrize("bias", [False, True])
def test_the_recomputed_mlp_compiled_equals_the_eager_one_with_one_graph_for_every_length(bias):
    """``compile: kernels`` in full fine-tuning: the activation and its gradients through
    torch.compile (computed in fp32, rounded once) give the eager kernels' values and gradients to
    bf16 rounding, keep only the input as well, and a new number of tokens compiles nothing more."""
    import torch._dynamo
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=80, hidden_act="silu", mlp_bias=bias))
    x = torch.randn(2, 7, 32).bfloat16()
    fused.fuse_for_training(mlp)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _grads(mlp, x)
    fused.fuse_for_training(mlp, compiled=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, kept = _grads(mlp, x), _saved_bytes(mlp, x)
        assert mlp(x).grad_fn.name() == "RecomputedMLPBackward"
    _close(got, want, 1e-2)
    assert any(not torch.equal(a, b) for a, b in zip(got[2].values(), want[2].values()))  # (compiled: fp32 inside)
    assert kept == 14 * 32 * 2
    with torch._dynamo.config.patch(error_on_recompile=True), torch.autocast("cpu", dtype=torch.bfloat16):
        for shape in ((3, 5, 32), (1, 33, 32)):
            y, dx, grads = _grads(mlp, torch.randn(shape).bfloat16())
            assert y.shape == dx.shape == shape and len(grads) == 3 * (1 + bias)


@pytest.mark.parametrize("family", ["llama", "qwen3", "glm4"])
def test_a_fused_full_model_under_bf16_autocast_gives_the_same_loss_and_gradients(family, tiny_tokenizer):
    """Full fine-tuning (fp32 weights, bf16 autocast): the same loss and gradients as the model's
    own modules, to bf16 rounding. The norms in front of attention and the MLP hand their
    consumers bf16 (the projections sum their input gradients in bf16 instead of fp32: the only
    change of numerics); Qwen3's per-head q/k norms and GLM-4's sandwich norms stay fp32."""
    model = build_tiny_model(family, tiny_tokenizer)
    torch.manual_seed(1)
    ids = torch.randint(5, model.config.vocab_size, (2, 30))

    def loss_and_grads():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        return float(loss), {n: p.grad.clone() for n, p in model.named_parameters()}

    want, want_grads = loss_and_grads()
    counts = fused.fuse_for_training(model)
    assert counts["mlp"] == (model.config.num_hidden_layers if family != "glm4" else 0)
    got, got_grads = loss_and_grads()
    assert got == pytest.approx(want, rel=1e-3)
    for name, grad in want_grads.items():
        assert (got_grads[name] - grad).abs().max() <= 0.03 * grad.abs().max(), name
    layer = model.model.layers[0]
    marked = [n for n, m in model.named_modules() if getattr(m, "_zhtune_feeds_linears", False)]
    if family == "glm4":
        assert marked == []
    else:
        assert len(marked) == 2 * model.config.num_hidden_layers
        assert all(n.endswith(("input_layernorm", "post_attention_layernorm")) for n in marked)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer.input_layernorm(torch.randn(1, 3, model.config.hidden_size)).dtype == torch.bfloat16
    if family == "qwen3":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer.self_attn.q_norm(torch.randn(1, 3, model.config.head_dim)).dtype == torch.float32
