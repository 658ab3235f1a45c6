"""The fused output-layer + cross-entropy loss equals each family's own loss, values and
gradients, and training with it follows the same curve."""

from __future__ import annotations

import json

import pytest
import torch

from tests.train.test_sft import make_cfg
from zhtune.models.families import has_plain_head
from zhtune.models.tiny import TINY_CONFIG_KEYS, build_tiny_model
from zhtune.train import loss as fused
from zhtune.train.sft import train


def _batch(vocab: int, packed: bool) -> dict[str, torch.Tensor]:
    """3 rows of 40 tokens; prompts unlabelled, one row with unlabelled padding at its end, or
    (``packed``) rows of two samples told apart by their position ids."""
    torch.manual_seed(1)
    ids = torch.randint(5, vocab, (3, 40))
    labels = ids.clone()
    labels[:, :10] = -100
    labels[2, 30:] = -100
    if packed:
        positions = torch.cat([torch.arange(25), torch.arange(15)]).repeat(3, 1)
        labels[:, 25:30] = -100
        return {"input_ids": ids, "labels": labels, "position_ids": positions}
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def _loss_and_grads(model, compute) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    value = compute()
    value.backward()
    return float(value), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _check_equal(model, batch: dict[str, torch.Tensor]) -> None:
    n = int((batch["labels"][:, 1:] != -100).sum()) + 7  # the step's tokens: more than this batch's
    want, want_grads = _loss_and_grads(
        model, lambda: model(**batch, num_items_in_batch=n, use_cache=False).loss
    )
    layer = fused.output_layer(model)
    assert layer is not None
    got, got_grads = _loss_and_grads(model, lambda: fused.fused_causal_lm_loss(model, layer, batch, n))
    assert got == pytest.approx(want, rel=1e-6)
    assert got_grads.keys() == want_grads.keys()  # the (tied) output layer's weight included
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", [f for f in TINY_CONFIG_KEYS if has_plain_head(f)])
def test_fused_loss_equals_the_models_own_on_every_family(family, tiny_tokenizer):
    model = build_tiny_model(family, tiny_tokenizer)
    _check_equal(model, _batch(model.config.vocab_size, packed=False))
    if family != "bloom":  # (BLOOM cannot pack)
        _check_equal(model, _batch(model.config.vocab_size, packed=True))


def test_small_chunks_and_bf16_autocast(tiny_tokenizer, monkeypatch):
    """Many chunks give the same loss and gradients as one (the trained output layer's weight
    gradient taken over groups of WEIGHT_GRAD_CHUNKS chunks, the last group short); under bf16
    autocast the loss stays within bf16's rounding of the model's own."""
    model = build_tiny_model("llama", tiny_tokenizer)
    batch = _batch(model.config.vocab_size, packed=False)
    layer = fused.output_layer(model)
    whole, whole_grads = _loss_and_grads(model, lambda: fused.fused_causal_lm_loss(model, layer, batch, 50))
    monkeypatch.setattr(fused, "CHUNK_ELEMENTS", 7 * model.config.vocab_size)  # 7 rows a chunk
    monkeypatch.setattr(fused, "MIN_CHUNK_ROWS", 1)
    monkeypatch.setattr(fused, "WEIGHT_GRAD_CHUNKS", 5)
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    assert -(-labelled // 7) % 5  # groups of 5 chunks, and a short one
    chunked, chunked_grads = _loss_and_grads(model, lambda: fused.fused_causal_lm_loss(model, layer, batch, 50))
    assert chunked == pytest.approx(whole, rel=1e-6)
    for name, grad in whole_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, want_grads = _loss_and_grads(
            model, lambda: model(**batch, num_items_in_batch=50, use_cache=False).loss
        )
        got, got_grads = _loss_and_grads(model, lambda: fused.fused_causal_lm_loss(model, layer, batch, 50))
    assert got == pytest.approx(want, rel=1e-3)
    for name, grad in want_grads.items():
        assert (got_grads[name] - grad).abs().max() <= 0.02 * grad.abs().max(), name


@pytest.mark.skipif(not fused.native.load("cpu_ops"), reason="zhtune's native kernels need a CPU with AVX-512 bf16 and g++")
def test_the_transposed_weight_is_kept_while_the_weight_is_unchanged():
    """bf16 on a CPU with the native kernels: a frozen weight's transpose is made once and kept;
    an in-place change or another tensor makes it again; a trained weight's is not kept (the
    loss makes it per call), nor any in fp32 (the loss reads the transposed view)."""
    weight = torch.randn(64, 48).bfloat16()
    kept = fused.KeptTranspose()
    first = kept.get(weight, torch.bfloat16)
    assert torch.equal(first, weight.T) and first.is_contiguous() and kept.get(weight, torch.bfloat16) is first
    weight.mul_(2)  # (its version moves)
    again = kept.get(weight, torch.bfloat16)
    assert again is not first and torch.equal(again, weight.T)
    other = weight.clone()
    assert torch.equal(kept.get(other, torch.bfloat16), other.T)
    assert kept.get(torch.randn(64, 48, requires_grad=True).bfloat16(), torch.bfloat16) is None
    assert kept.get(torch.randn(64, 48), torch.float32) is None


def test_output_layer_is_none_for_an_adapted_head(tiny_tokenizer):
    """A LoRA on the output layer (or any wrapper) leaves the model's own loss in charge."""
    from peft import LoraConfig, get_peft_model

    model = build_tiny_model("llama", tiny_tokenizer)
    plain = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert fused.output_layer(plain) is not None
    head = get_peft_model(
        build_tiny_model("llama", tiny_tokenizer), LoraConfig(r=2, target_modules=["lm_head"])
    )
    assert fused.output_layer(head) is None
    assert not has_plain_head("gemma2") and not has_plain_head("some-remote-code-model")


def _log(run) -> list[dict]:
    return [json.loads(line) for line in (run / "trainer_log.jsonl").read_text().splitlines()]


def assert_same_curve_either_way(key: str, tmp_path, model_dir, train_file, values=(False, True)) -> None:
    """Six packed LoRA steps with setting ``key`` at each of ``values`` (off, on) follow the same
    loss and grad-norm curve (1e-4)."""
    common = dict(method="lora", max_steps=6, logging_steps=1, lr=1e-2, packing=True)
    runs = {
        f: train(make_cfg(model_dir, train_file, tmp_path / str(f), **{key: f}, **common), progress=False)
        for f in values
    }
    off, on = ([v for r in _log(runs[f]) for v in (r["loss"], r["grad_norm"])] for f in values)
    assert len(off) == 12 and on == pytest.approx(off, rel=1e-4)


def test_training_with_the_fused_loss_follows_the_same_curve(tmp_path, tiny_model_dir, train_file):
    assert_same_curve_either_way("fused_loss", tmp_path, tiny_model_dir, train_file)


def test_bf16_keeps_the_frozen_base_in_bf16_and_the_adapter_in_fp32(tmp_path, tiny_model_dir, train_file):
    """bf16 LoRA: frozen weights in bf16, trained ones (and the saved adapter) fp32, and a loss
    curve within bf16's noise of fp32's."""
    from safetensors.torch import load_file

    common = dict(method="lora", max_steps=8, logging_steps=1, lr=1e-2)
    runs = {
        p: train(make_cfg(tiny_model_dir, train_file, tmp_path / p, precision=p, **common), progress=False)
        for p in ("fp32", "bf16")
    }
    fp32, bf16 = ([r["loss"] for r in _log(runs[p])] for p in ("fp32", "bf16"))
    assert bf16 == pytest.approx(fp32, rel=2e-2)
    adapter = load_file(runs["bf16"] / "adapter" / "adapter_model.safetensors")
    assert adapter and all(v.dtype == torch.float32 for v in adapter.values())

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=2, target_modules=["q_proj"])
    )
    fused.frozen_to(model, torch.bfloat16)
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), name


@pytest.mark.skipif(
    not fused.native.load("cpu_ops"), reason="zhtune's native loss kernel needs a CPU with AVX-512 bf16 and g++"
)
@pytest.mark.parametrize("train_weight", [False, True], ids=["frozen-head", "trained-head"])
def test_native_cross_entropy_equals_the_pytorch_chunks_in_bf16(train_weight, monkeypatch):
    """bf16 on a CPU: the loss and gradient kernel (``csrc/cpu_ops.cpp``) in place of the bf16
    logits gives the PyTorch chunks' loss to fp32 rounding and gradients as close to fp64's, over
    300 rows = 3 chunks of 128, the last padded, a vocabulary that is not a multiple of 16 (tail
    lanes)."""
    torch.manual_seed(0)
    vocab, width = 4099, 32
    hidden = (torch.randn(300, width) * 2).bfloat16().requires_grad_(True)
    weight = torch.randn(vocab, width).bfloat16().requires_grad_(train_weight)
    targets = torch.randint(0, vocab, (300,))
    monkeypatch.setattr(fused, "CHUNK_ELEMENTS", 128 * vocab)

    def run():
        hidden.grad = weight.grad = None
        value = fused.LinearCrossEntropy.apply(hidden, weight, targets)
        value.backward()
        return value.item(), hidden.grad.clone(), weight.grad.clone() if train_weight else None

    got = run()
    with monkeypatch.context() as plain:
        plain.setattr(fused.native, "load", lambda name: False)
        want = run()
    assert got[0] == pytest.approx(want[0], rel=1e-6)
    # Against fp64 (the same bf16 inputs): the kernel's gradients (scaled by 1/sum after the
    # products, the one-hot inside them) are as close as the PyTorch chunks' (bf16 logits both).
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_(train_weight)
    torch.nn.functional.cross_entropy(h64 @ w64.T, targets, reduction="sum").backward()
    for g, w, exact in zip(got[1:], want[1:], (h64.grad, w64.grad)):
        if w is not None:
            error = [((t.double() - exact).abs().max() / exact.abs().max()).item() for t in (g, w)]
            assert error[0] <= 1.2 * error[1] and error[0] < 0.05
