"""zhtune.models.device: ``--device`` resolved against what the machine has, and the dtype that
``auto`` picks there (fp32 on a CPU, so a CPU-only machine behaves as before)."""

from __future__ import annotations

import os

import pytest
import torch

from zhtune.errors import ZhtuneError
from zhtune.models.device import DTYPES, resolve_device, resolve_dtype


@pytest.fixture
def cpu_only(monkeypatch):
    """This machine as a CPU-only one, whatever it really has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    if getattr(torch.backends, "mps", None) is not None:
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def test_auto_is_the_best_device_present():
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    expected = "cuda:0" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    assert resolve_device("auto") == resolve_device() == expected


def test_auto_on_a_cpu_only_machine_is_the_cpu(cpu_only):
    assert resolve_device("auto") == "cpu"
    assert resolve_device("cpu") == "cpu"


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_without_a_gpu_is_refused_naming_the_device(cpu_only, name):
    with pytest.raises(ZhtuneError, match=f"--device {name}: this machine has no CUDA device"):
        resolve_device(name)


def test_mps_without_apple_silicon_is_refused(cpu_only):
    with pytest.raises(ZhtuneError, match="--device mps: this machine has no MPS device"):
        resolve_device("mps")


@pytest.mark.parametrize("name", ["bogus", "gpu", "cpu:1", "cuda:x", "CUDA", ""])
def test_unknown_devices_are_refused_with_the_choices(name):
    with pytest.raises(ZhtuneError, match="expected auto, cpu, cuda, cuda:N or mps"):
        resolve_device(name)


def test_a_cuda_index_beyond_the_gpus_present_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda") == "cuda:0" and resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(ZhtuneError, match=r"--device cuda:2: this machine has 2 CUDA device\(s\)"):
        resolve_device("cuda:2")


def test_auto_dtype_is_fp32_on_a_cpu_and_bf16_on_a_gpu_that_has_it(monkeypatch):
    assert resolve_dtype("auto", "cpu") == "fp32"
    assert resolve_dtype("auto", "mps") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_dtype("auto", "cuda:0") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_dtype("auto", "cuda:0") == "fp16"


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != "auto"])
@pytest.mark.parametrize("device", ["cpu", "cuda:0", "mps"])
def test_an_explicit_dtype_is_kept(dtype, device):
    assert resolve_dtype(dtype, device) == dtype


def test_an_unknown_dtype_is_refused():
    with pytest.raises(ZhtuneError, match="--dtype 'float32': expected one of auto, fp32, bf16, fp16"):
        resolve_dtype("float32", "cpu")


def test_grouped_query_attention_in_kernel_equals_repeated_heads(monkeypatch):
    """On a CPU transformers passes grouped-query attention to SDPA as it is, with a packed mask
    too; the model gives the logits and gradients of copying each key/value head per query head."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from zhtune.models.device import grouped_query_attention_in_kernel

    monkeypatch.delenv("TRANSFORMERS_SDPA_FORCE_GQA", raising=False)
    grouped_query_attention_in_kernel("cuda")
    assert "TRANSFORMERS_SDPA_FORCE_GQA" not in os.environ
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, attn_implementation="sdpa",
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    ids = torch.randint(5, model.config.vocab_size, (2, 24))
    positions = torch.cat([torch.arange(10), torch.arange(14)]).repeat(2, 1)

    def run():
        model.zero_grad()
        out = model(input_ids=ids, labels=ids, position_ids=positions)
        out.loss.backward()
        return out.logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    want = run()
    grouped_query_attention_in_kernel("cpu")
    assert os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] == "1"
    got = run()
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
