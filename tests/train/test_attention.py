"""zhtune's CPU attention for training: the masks it takes are exactly per-query key intervals;
its values and gradients, from the native (C++) kernels or SDPA's forward and the compiled
backward, are SDPA's (errors against an fp32 reference no larger than SDPA's own in bf16), padded
to whole tiles or not; past its compile budget the compiled backward is SDPA's; it hands every
other case to transformers' SDPA unchanged; training uses it in bf16, packed or not (the native
kernels without compiling, the compiled backward when the run compiles), and follows SDPA's
curve."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from tests.train.test_packing import cfg
from zhtune.train import attention as attn
from zhtune.train.attention import attention, mask_intervals, use_cpu_attention
from zhtune.train.compile import has_cxx
from zhtune.train.sft import train

needs_cxx = pytest.mark.skipif(not has_cxx(), reason="torch.compile on a CPU needs a C++ compiler")
NATIVE = has_cxx() and attn.native_kernels()
needs_native = pytest.mark.skipif(not NATIVE, reason="zhtune's native attention kernels need a CPU with AMX and g++")


@pytest.fixture(params=["native", "compiled"])
def kernels(request, monkeypatch):
    """Each of the two kernels :class:`attn.CpuAttention` can run (as :func:`use_cpu_attention`
    picks them: ``_native``), the mask cache emptied."""
    if request.param == "native" and not NATIVE:
        pytest.skip("zhtune's native attention kernels need a CPU with AMX and g++")
    monkeypatch.setattr(attn, "_native", request.param == "native")
    monkeypatch.setattr(attn, "_last", [None, None])
    return request.param


@pytest.fixture(autouse=True)
def compile_budget(monkeypatch):
    """Each test starts with the whole compile budget (other tests in the process used some)."""
    monkeypatch.setattr(attn, "_shapes", set())


def packed_mask(rows: list[list[int]]) -> torch.Tensor:
    """The block-diagonal causal mask ``(len(rows), 1, t, t)`` of rows packing samples of the
    given lengths (each row's lengths sum to ``t``)."""
    t = sum(rows[0])
    mask = torch.zeros(len(rows), 1, t, t, dtype=torch.bool)
    for r, lengths in enumerate(rows):
        s = 0
        for n in lengths:
            mask[r, 0, s : s + n, s : s + n] = torch.ones(n, n, dtype=torch.bool).tril()
            s += n
    return mask


def test_packed_causal_and_padding_masks_are_intervals_and_others_are_not():
    mask = packed_mask([[3, 2], [5]])
    start, end = mask_intervals(mask, 5)
    assert start.tolist() == [[0, 0, 0, 3, 3], [0, 0, 0, 0, 0]]
    assert end.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]
    start, end = mask_intervals(None, 4)  # no mask: causal
    assert start.tolist() == [[0, 0, 0, 0]] and end.tolist() == [[0, 1, 2, 3]]
    padded = torch.ones(1, 1, 4, 4, dtype=torch.bool).tril()
    padded[..., 3] = False  # the last token is padding: no query sees it
    padded[0, 0, 3, :3] = True
    assert [t.tolist() for t in mask_intervals(padded, 4)] == [[[0, 0, 0, 0]], [[0, 1, 2, 2]]]
    gap = packed_mask([[4]])
    gap[0, 0, 3, 1] = False
    future = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    empty = packed_mask([[4]])
    empty[0, 0, 2] = False
    for bad in (gap, future, empty, packed_mask([[4]]).float(), packed_mask([[4]]).expand(1, 2, 4, 4)):
        assert mask_intervals(bad, 4) is None


class _Module:
    is_causal = True


def _grads(fn, q, k, v, g) -> list[torch.Tensor]:
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(g.to(out.dtype))
    return [out.float(), q.grad.float(), k.grad.float(), v.grad.float()]


def _sdpa(mask):
    return lambda q, k, v: F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True
    ).transpose(1, 2)


def _errors(got, ref) -> list[float]:
    return [((a - r).abs().max() / r.abs().max()).item() for a, r in zip(got, ref)]


@needs_cxx
@pytest.mark.parametrize(
    ("heads", "kv_heads", "rows"),
    [(6, 2, [[90, 60, 50], [200]]), (4, 4, [[130, 70], [1, 199]]), (6, 3, None)],
    ids=["gqa-packed", "mha-packed", "gqa-causal"],
)
def test_values_and_gradients_are_sdpas(heads, kv_heads, rows, kernels):
    """200 tokens (compiled: tiles of 128 and 72; native: blocks of 64, the last of 8), bf16:
    output and gradients as close to an fp32 SDPA reference as bf16 SDPA's own (measured,
    compiled: dq's error 1.1-1.4x SDPA's, dk's and dv's 0.7-0.9x), within 1.5x of it and 1% at
    most."""
    torch.manual_seed(0)
    t, d = 200, 32
    mask = packed_mask(rows) if rows else None
    b = len(rows) if rows else 2
    q = torch.randn(b, heads, t, d, dtype=torch.bfloat16)
    k, v = (torch.randn(b, kv_heads, t, d, dtype=torch.bfloat16) for _ in range(2))
    g = torch.randn(b, t, heads, d)
    ref = _grads(_sdpa(mask), q.float(), k.float(), v.float(), g)
    sdpa = _errors(_grads(_sdpa(mask), q, k, v, g), ref)
    ours = _errors(_grads(lambda q, k, v: attention(_Module(), q, k, v, mask)[0], q, k, v, g), ref)
    assert all(e <= max(1.5 * s, 2e-3) and e < 1e-2 for e, s in zip(ours, sdpa)), (ours, sdpa)


def _backward_inputs(t: int, heads: int = 6, kv_heads: int = 2, d: int = 32) -> tuple:
    """What :class:`attn.CpuAttention` saves for its backward, for 2 packed rows of ``t`` tokens."""
    torch.manual_seed(0)
    q = torch.randn(2, heads, t, d, dtype=torch.bfloat16)
    k, v = (torch.randn(2, kv_heads, t, d, dtype=torch.bfloat16) for _ in range(2))
    mask = packed_mask([[t - 50, 50], [t]])
    start, end = mask_intervals(mask, t)
    additive = torch.zeros(mask.shape, dtype=torch.bfloat16).masked_fill_(~mask, float("-inf"))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=additive)
    return q, k, v, out, lse, torch.randn_like(out), start, end, d**-0.5, additive


@needs_cxx
def test_rows_are_padded_to_whole_tiles_without_changing_the_gradients(monkeypatch):
    """200 tokens run as 256 (one compiled shape for 129-256): the real rows' gradients are the
    unpadded computation's (padded queries add exact zeros; padded keys are never attended)."""
    *inputs, scale, _ = _backward_inputs(200)
    seen = []
    compiled = attn._compiled_backward()
    monkeypatch.setattr(attn, "_compiled_backward", lambda: lambda *a: seen.append(a[0].shape) or compiled(*a))
    got = attn.tiled_backward(*inputs, scale)
    want = attn.attention_backward(*inputs, scale)  # eager, unpadded: tiles of 128 and 72
    assert seen == [(2, 6, 256, 32)] and attn._shapes == {(False, 6, 2, 2, 32)}
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == torch.bfloat16
        assert ((g.float() - w.float()).abs().max() / w.float().abs().max()).item() < 4e-3


@needs_cxx
def test_one_compile_serves_every_batch_size_and_length_of_a_bucket(monkeypatch):
    """The batch is a dynamic dimension, the length padded to whole tiles: 2 rows of 200 tokens,
    then 3 rows of 140 (an epoch's last batch, shorter rows) are one shape, one graph."""
    from torch._dynamo.utils import counters

    # (a training run earlier in the process may have left the module switched to fixed batches)
    monkeypatch.setattr(attn, "_fixed_batch", False)
    torch._dynamo.reset()
    first = _backward_inputs(200)
    attn.tiled_backward(*first[:-1])
    graphs = counters["stats"]["unique_graphs"]
    q, k, v, out, lse, grad_out, start, end, scale, _ = (
        torch.cat([x, x[:1]]) if isinstance(x, torch.Tensor) and x.ndim > 1 else x for x in _backward_inputs(140)
    )
    got = attn.tiled_backward(q, k, v, out, lse, grad_out, start, end, scale)
    want = attn.attention_backward(q, k, v, out, lse, grad_out, start, end, scale)
    assert counters["stats"]["unique_graphs"] == graphs and attn._shapes == {(False, 6, 2, 2, 32)}
    for g, w in zip(got, want):
        assert g.shape[0] == 3 and ((g.float() - w.float()).abs().max() / w.float().abs().max()).item() < 4e-3


def test_with_one_batch_size_promised_the_batch_is_traced_static(monkeypatch):
    """``use_cpu_attention(fixed_batch=True)`` (the loop pads every batch to one shape): the
    graph has a static batch, so another batch size, which the loop never makes, compiles anew."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    monkeypatch.setattr(attn, "_fixed_batch", True)
    first = _backward_inputs(200)
    attn.tiled_backward(*first[:-1])
    graphs = counters["stats"]["unique_graphs"]
    attn.tiled_backward(*first[:-1])
    assert counters["stats"]["unique_graphs"] == graphs
    q, k, v, out, lse, grad_out, start, end, scale, _ = (
        torch.cat([x, x[:1]]) if isinstance(x, torch.Tensor) and x.ndim > 1 else x for x in _backward_inputs(200)
    )
    got = attn.tiled_backward(q, k, v, out, lse, grad_out, start, end, scale)
    want = attn.attention_backward(q, k, v, out, lse, grad_out, start, end, scale)
    assert counters["stats"]["unique_graphs"] == graphs + 1
    for g, w in zip(got, want):
        assert g.shape[0] == 3 and ((g.float() - w.float()).abs().max() / w.float().abs().max()).item() < 4e-3


def test_a_shape_beyond_the_compile_budget_runs_sdpas_backward(monkeypatch):
    """Past MAX_SHAPES compiled shapes the backward is SDPA's own op, on the same saved tensors."""
    monkeypatch.setattr(attn, "_native", False)  # (the compiled path; an earlier run may have picked native)
    monkeypatch.setattr(attn, "_shapes", {(9, 9, 9, 9, 9)})
    monkeypatch.setattr(attn, "MAX_SHAPES", 1)
    monkeypatch.setattr(attn, "_compiled_backward", lambda: pytest.fail("compiled a shape past the budget"))
    q, k, v, out, lse, grad_out, start, end, scale, additive = _backward_inputs(100)
    assert attn.tiled_backward(q, k, v, out, lse, grad_out, start, end, scale) is None
    saved = (q, k, v, out.transpose(1, 2).contiguous(), lse, start, end, additive)  # (as the forward saves it)
    ctx = type("Ctx", (), {"saved_tensors": saved, "scale": scale})()
    got = attn.CpuAttention.backward(ctx, grad_out.transpose(1, 2))
    want = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out, q, k, v, out, lse, 0.0, False, attn_mask=additive, scale=scale
    )
    assert got[3:] == (None,) * 4 and all(torch.equal(g, w) for g, w in zip(got[:3], want))


@needs_cxx
def test_under_autocast_fp32_queries_and_keys_are_cast_as_for_sdpa(kernels):
    """Full fine-tuning under bf16 autocast: q and k fp32 (rotary embedding), v bf16. The kernels
    run on all three in bf16, as autocast runs SDPA: the compiled path's output is autocast
    SDPA's (the same forward kernel), the native one's within bf16 rounding of it."""
    torch.manual_seed(0)
    mask = packed_mask([[100, 28]])
    q, k = (torch.randn(1, h, 128, 32) for h in (4, 2))
    v = torch.randn(1, 2, 128, 32, dtype=torch.bfloat16)
    g = torch.randn(1, 128, 4, 32)
    calls = []
    apply = attn.CpuAttention.apply
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.MonkeyPatch.context() as mp:
        mp.setattr(attn.CpuAttention, "apply", lambda *a: calls.append(a[0].dtype) or apply(*a))
        ours = _grads(lambda q, k, v: attention(_Module(), q, k, v, mask)[0], q, k, v, g)
        sdpa = _grads(_sdpa(mask), q, k, v, g)
    assert calls == [torch.bfloat16]
    if kernels == "compiled":
        assert torch.equal(ours[0], sdpa[0])
    assert all(_errors([o], [s])[0] < 2e-2 for o, s in zip(ours, sdpa))


def test_other_cases_are_transformers_sdpa_unchanged(monkeypatch):
    """No gradient, fp32, dropout, a key/value cache (fewer queries than keys), a mask that is not
    intervals: transformers' SDPA function, called with the same arguments."""
    from transformers.integrations import sdpa_attention

    calls = []
    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", lambda *a, **kw: calls.append(kw) or ("sdpa", None))
    monkeypatch.setattr(attn.CpuAttention, "apply", lambda *a: pytest.fail("zhtune's kernel ran"))
    q = torch.randn(1, 2, 8, 4, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 2, 8, 4, dtype=torch.bfloat16, requires_grad=True)
    mask = packed_mask([[5, 3]])
    gap = mask.clone()
    gap[0, 0, 7, 6] = False  # keys 5 and 7, not 6
    with torch.no_grad():
        assert attention(_Module(), q, k, k, mask)[0] == "sdpa"
    assert attention(_Module(), q.float(), k.float(), k.float(), mask)[0] == "sdpa"
    assert attention(_Module(), q, k, k, mask, dropout=0.1)[0] == "sdpa"
    assert attention(_Module(), q[:, :, -1:], k, k, None)[0] == "sdpa"
    assert attention(_Module(), q, k, k, gap, scaling=0.3)[0] == "sdpa"
    assert len(calls) == 5 and calls[2]["dropout"] == 0.1 and calls[4]["scaling"] == 0.3


def test_only_a_model_on_sdpa_is_switched(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config._attn_implementation == "sdpa" and use_cpu_attention(model)
    assert model.config._attn_implementation == attn.NAME
    eager = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    assert not use_cpu_attention(eager) and eager.config._attn_implementation == "eager"


@needs_cxx
@pytest.mark.parametrize("packing", [True, False], ids=["packed", "unpacked"])
def test_bf16_training_uses_it_and_follows_sdpas_curve(
    packing, kernels, tmp_path, tiny_model_dir, train_file, capsys, monkeypatch
):
    """bf16, packed rows or not: the native kernels run without compiling (compile=false), the
    compiled backward with compile=kernels (packed rows padded to cutoff_len; unpacked ones to
    whole tiles in the backward); the banner names the kernel and the losses follow SDPA's
    (transformers' attention, the native kernels off) within bf16's noise; the model's saved
    config keeps no trace of it."""

    def losses(name, **kw):
        run = train(
            cfg(tiny_model_dir, train_file, tmp_path / name, method="full", packing=packing, cutoff_len=128,
                batch_size=4, max_steps=6, logging_steps=1, lr=1e-3, precision="bf16", **kw),
            progress=False,
        )  # fmt: skip
        return run, [json.loads(line)["loss"] for line in (run / "trainer_log.jsonl").read_text().splitlines()]

    calls = []
    apply = attn.CpuAttention.apply
    monkeypatch.setattr(attn.CpuAttention, "apply", lambda *a: calls.append(1) or apply(*a))
    with monkeypatch.context() as sdpa_only:
        sdpa_only.setattr(attn, "native_kernels", lambda: False)
        _, eager = losses("eager", compile=False)
    assert "attention" not in capsys.readouterr().out and not calls
    if kernels == "compiled":
        monkeypatch.setattr(attn, "native_kernels", lambda: False)
    run, ours = losses(kernels, compile="kernels" if kernels == "compiled" else False)
    banner = capsys.readouterr().out
    assert ("attention's backward" in banner) == (kernels == "compiled")
    assert ("attention: zhtune's CPU kernels" in banner) == (kernels == "native")
    assert len(calls) == 6 * 2  # every layer of every step (full fine-tuning: q and k arrive in fp32)
    if kernels == "compiled":
        assert attn._shapes and all(shape[3] == 1 for shape in attn._shapes)  # compiled: one tile of 128
    assert len(ours) == 6 and ours == pytest.approx(eager, rel=2e-2)
    assert ours[-1] < ours[0]
    saved = json.loads((run / "model" / "config.json").read_text())
    assert attn.NAME not in json.dumps(saved)
