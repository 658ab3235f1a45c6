"""zhtune's C++ kernels (:mod:`zhtune.train.native`): built once per machine and loaded from the
cache after; off with ``ZHTUNE_NATIVE=0``; a failed build warns and leaves the plain path. The
attention kernels on shapes the blocks of 64 must get right: odd lengths, rows past 512 tokens,
documents that start inside a block, grouped heads, one query attending one key."""

from __future__ import annotations

import subprocess

import pytest
import torch

from tests.train.test_attention import NATIVE, _errors, _grads, _sdpa, needs_native, packed_mask
from zhtune.train import native


@pytest.fixture
def fresh(monkeypatch):
    """A process that has loaded nothing yet."""
    monkeypatch.setattr(native, "_loaded", {})


def test_off_with_the_environment_variable(fresh, monkeypatch):
    monkeypatch.setenv("ZHTUNE_NATIVE", "0")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("built while turned off"))
    assert native.load("cpu_attention") is False


def test_a_failed_build_warns_once_and_caches_nothing(fresh, monkeypatch, tmp_path):
    monkeypatch.setattr(native, "cpu_flags", lambda: set(native.FLAGS["cpu_attention"][2]))
    monkeypatch.setattr(native, "cache_root", lambda: tmp_path)
    monkeypatch.setenv("CXX", "false")  # a compiler that always fails
    with pytest.warns(UserWarning, match="cpu_attention kernels are not available.*plain PyTorch path"):
        assert native.load("cpu_attention") is False
    assert native.load("cpu_attention") is False  # (decided once per process: no second warning)
    assert not list(tmp_path.rglob("*.so"))


@needs_native
def test_built_once_then_loaded_from_the_cache(fresh, monkeypatch):
    """The library this machine built is found by its key; loading it again compiles nothing."""
    assert native.library("cpu_attention").is_file()  # (built when this module was collected)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("built again"))
    assert native.load("cpu_attention") is True


def test_the_cache_key_follows_the_source(monkeypatch, tmp_path):
    before = native.library("cpu_attention")
    source = tmp_path / "cpu_attention.cpp"
    source.write_text((native.SOURCES / "cpu_attention.cpp").read_text() + "\n// changed\n")
    monkeypatch.setattr(native, "SOURCES", tmp_path)
    assert native.library("cpu_attention") != before


@needs_native
@pytest.mark.parametrize(
    ("heads", "kv_heads", "d", "rows"),
    [
        (6, 2, 64, [[1, 63, 64, 73], [201]]),  # odd length: a tail block of 9 queries
        (9, 3, 64, [[301, 200, 199], [700], [1] * 700]),  # past 512 tokens; 700 one-token samples
        (4, 4, 16, [[70, 58], [128]]),  # a head dim of 16 (the tiny test models')
    ],
    ids=["odd-201", "long-700", "head-dim-16"],
)
def test_native_attention_on_the_shapes_blocks_must_get_right(heads, kv_heads, d, rows):
    """Output and gradients against an fp32 SDPA reference: errors like bf16 SDPA's own."""
    from zhtune.train import attention as attn

    assert NATIVE
    torch.manual_seed(0)
    t = sum(rows[0])
    mask = packed_mask(rows)
    q = torch.randn(len(rows), heads, t, d, dtype=torch.bfloat16)
    k, v = (torch.randn(len(rows), kv_heads, t, d, dtype=torch.bfloat16) for _ in range(2))
    g = torch.randn(len(rows), t, heads, d)
    ref = _grads(_sdpa(mask), q.float(), k.float(), v.float(), g)
    sdpa = _errors(_grads(_sdpa(mask), q, k, v, g), ref)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attn, "_native", True)
        mp.setattr(attn, "_last", [None, None])
        got = _grads(lambda q, k, v: attn.attention(type("M", (), {"is_causal": True})(), q, k, v, mask)[0], q, k, v, g)
    ours = _errors(got, ref)
    assert all(e <= max(1.5 * s, 2e-3) and e < 1e-2 for e, s in zip(ours, sdpa)), (ours, sdpa)
