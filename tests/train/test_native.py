"""zhtune's C++ kernels (:mod:`zhtune.train.native`): built once per machine and loaded from the
cache after; off with ``ZHTUNE_NATIVE=0``; a failed build warns and leaves the plain path. The
attention kernels on shapes the blocks of 64 must get right: odd lengths, rows past 512 tokens,
documents that start inside a block, grouped heads, one query attending one key."""

from __future__ import annotations

import subprocess
from pathlib import Path

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


def test_the_cache_key_follows_the_shared_header(monkeypatch, tmp_path):
    before = native.library("cpu_ops")
    for source in native.SOURCES.iterdir():
        (tmp_path / source.name).write_text(source.read_text())
    (tmp_path / "vnni.h").write_text((native.SOURCES / "vnni.h").read_text() + "\n// changed\n")
    monkeypatch.setattr(native, "SOURCES", tmp_path)
    assert native.library("cpu_ops") != before


@needs_native
@pytest.mark.parametrize(
    ("heads", "kv_heads", "d", "rows", "sharp"),
    [
        (6, 2, 64, [[1, 63, 64, 73], [201]], 1.0),  # odd length: a tail block of 9 queries
        (9, 3, 64, [[301, 200, 199], [700], [1] * 700], 1.0),  # past 512 tokens; 700 one-token samples
        (4, 4, 16, [[70, 58], [128]], 1.0),  # a head dim of 16 (the tiny test models')
        (9, 3, 64, [[301, 211]], 24.0),  # scaled scores of std ~18: a row spans >100, exponentials underflow
    ],
    ids=["odd-201", "long-700", "head-dim-16", "sharp-softmax"],
)
def test_native_attention_on_the_shapes_blocks_must_get_right(heads, kv_heads, d, rows, sharp):
    """Output and gradients against an fp32 SDPA reference: errors like bf16 SDPA's own."""
    from zhtune.train import attention as attn

    assert NATIVE
    torch.manual_seed(0)
    t = sum(rows[0])
    mask = packed_mask(rows)
    q = (torch.randn(len(rows), heads, t, d) * sharp).bfloat16()
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


needs_ops = pytest.mark.skipif(
    not native.load("cpu_ops"), reason="zhtune's native elementwise kernels need a CPU with AVX-512 bf16 and g++"
)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


@needs_ops
def test_rms_norm_kernels_against_fp32_autograd():
    """Values as LLaMA's module rounds them; gradients of x and the weight within bf16 rounding
    of fp32 autograd's; a width that is not a multiple of 16 (tail lanes)."""
    from zhtune.train.fused import llama_rms_norm

    torch.manual_seed(0)
    x = (torch.randn(70, 72) * 3).bfloat16()
    w = (torch.rand(72) + 0.5).bfloat16()
    y, rstd = torch.ops.zhtune_cpu_ops.rms_norm(x, w, 1e-6)
    assert _rel(y, llama_rms_norm(x, w, 1e-6)) < 4e-3
    xr, wr = x.float().requires_grad_(), w.float().requires_grad_()
    g = torch.randn(70, 72)
    (wr * (xr * torch.rsqrt(xr.square().mean(-1, keepdim=True) + 1e-6))).backward(g)
    dx, dw = torch.ops.zhtune_cpu_ops.rms_norm_backward(g.bfloat16(), x, rstd, w, True)
    assert _rel(dx, xr.grad) < 1e-2 and _rel(dw, wr.grad) < 1e-2
    # the gradient as the first columns of a wider buffer (StackedLora's input gradient), read in
    # place, and with columns not contiguous (copied): the same values bit for bit
    wide = torch.zeros(7, 10, 96, dtype=torch.bfloat16)
    wide[..., :72] = g.bfloat16().view(7, 10, 72)
    strided = torch.zeros(72, 70, dtype=torch.bfloat16)
    strided.copy_(g.bfloat16().T)
    for other in (wide[..., :72], strided.T):
        got = torch.ops.zhtune_cpu_ops.rms_norm_backward(other, x.view(7, 10, 72), rstd, w, True)
        assert torch.equal(got[0].view(70, 72), dx) and torch.equal(got[1], dw)


@needs_ops
@pytest.mark.parametrize("extra", [0, 24])
def test_the_residual_stream_through_the_norm_is_the_add_the_norm_and_autograds_sum(extra):
    """ResidualRMSNorm (a decoder layer's stream: h = x + delta, y = norm(h), h read again by the
    residual connection) against the add, NativeRMSNorm and autograd adding h's two gradients:
    values and gradients bit for bit, with and without the add, with a widened output."""
    from zhtune.train.fused import NativeRMSNorm
    from zhtune.train.residual import ResidualRMSNorm

    torch.manual_seed(0)
    w = (torch.rand(72) + 0.5).bfloat16()
    grads = [torch.randn(3, 5, 72).bfloat16() for _ in range(2)]

    def run(fused: bool, add: bool):
        x, d = ((torch.randn(3, 5, 72, generator=torch.Generator().manual_seed(i)) * 3).bfloat16().requires_grad_() for i in (1, 2))
        if fused:
            h, y = ResidualRMSNorm.apply(x, d if add else None, w, 1e-6, extra)
        else:
            h = x + d if add else x
            y = NativeRMSNorm.apply(h, w, 1e-6, extra)
        ((h * 2).float() * grads[0]).sum().add(((y + 1).float() * grads[1]).sum()).backward()  # h read again
        return h, y, x.grad, d.grad

    for add in (False, True):
        got, want = run(True, add), run(False, add)
        for a, b in zip(got, want):
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b))
        assert (got[1]._base is not None) == bool(extra)


@needs_ops
def test_cross_entropy_kernel_over_extreme_logits():
    """The loss kernel's exponential (``vec_math.h``: a polynomial and ``scalef``) over logits
    spread across +-100, a target 200 below the top (its probability underflows to 0) and a tail
    of 7 lanes: the loss to fp32 rounding of PyTorch's fp32 cross-entropy, every gradient
    ``softmax - one_hot`` within bf16 rounding, nothing infinite or NaN, padding zeroed. The
    kernel takes the logits transposed, ``(vocab, positions)``, and leaves each column's
    gradient times its sum of exponentials, with the sum's inverse returned."""
    torch.manual_seed(0)
    vocab = 1031
    logits = torch.randn(6, vocab) * 30
    logits[0, :] = torch.linspace(-100, 100, vocab)
    logits[1, 5] = 100.0
    logits = logits.bfloat16()
    targets = torch.tensor([0, 5, 17, 1030, 3, 3])
    ref = logits[:4].float().requires_grad_()
    want = torch.nn.functional.cross_entropy(ref, targets[:4], reduction="sum")
    want.backward()
    grad_t = logits.T.contiguous()
    loss, inv_sum = torch.ops.zhtune_cpu_ops.cross_entropy_columns_(grad_t, targets, 4)
    assert not inv_sum[4:].any()
    grad = grad_t.T.float() * inv_sum[:, None]
    assert torch.isfinite(grad).all() and loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert want.item() > 200  # (row 0's target is 200 below its top)
    assert (grad[:4] - ref.grad).abs().max().item() < 4e-3 and not grad[4:].any()


@needs_ops
def test_column_cross_entropy_against_fp64():
    """SmolLM2's vocabulary and a chunk of 70 positions (a tail of 6 lanes), 50 labelled: the
    transposed kernel's loss within 1e-7 of PyTorch's fp64 cross-entropy (its sums are fp64; the
    row-layout kernel it replaced, with fp32 lanes: 2e-7 here), each column left as ``s (softmax - one_hot)`` for its
    sum of exponentials ``s`` (``1/s`` returned), every value rounded once to bf16 (within half a
    bf16 step of fp64's, and a hair for the exponential): the target's ``s (p - 1)`` too, so
    a confident token's small gradient is not a difference of rounded numbers."""
    torch.manual_seed(0)
    logits = (torch.randn(70, 49152) * 4).bfloat16()
    logits[0, 7] = 26.0  # (a confident position: p close to 1 at its target)
    targets = torch.randint(0, 49152, (70,))
    targets[0] = 7
    ref = logits[:50].double().requires_grad_()
    want = torch.nn.functional.cross_entropy(ref, targets[:50], reduction="sum")
    want.backward()
    columns = logits.T.contiguous()
    got, inv_sum = torch.ops.zhtune_cpu_ops.cross_entropy_columns_(columns, targets, 50)
    assert got.item() == pytest.approx(want.item(), rel=1e-7)
    exact = ref.grad / inv_sum[:50, None].double()  # s (softmax - one_hot)
    scaled = columns.T.double()
    assert ((scaled[:50] - exact).abs() <= exact.abs() * 2.0**-8 * 1.01 + 1e-30).all() and not scaled[50:].any()
    assert -0.05 < ref.grad[0, 7] < 0 and not inv_sum[50:].any()
    with pytest.raises(RuntimeError, match="out of the vocabulary"):
        torch.ops.zhtune_cpu_ops.cross_entropy_columns_(columns, torch.full((70,), 49152), 1)


@needs_ops
def test_swiglu_kernels_against_fp32_autograd():
    """``silu(gate) * up`` of stacked rows and both gradients side by side, each rounded once;
    an intermediate size of 40 (tail lanes)."""
    torch.manual_seed(0)
    gate_up = (torch.randn(3, 5, 80) * 2).bfloat16()
    h = torch.ops.zhtune_cpu_ops.swiglu(gate_up)
    gate, up = (t.float().requires_grad_() for t in gate_up.split(40, -1))
    ref = torch.nn.functional.silu(gate) * up
    g = torch.randn(3, 5, 40)
    ref.backward(g)
    assert h.shape == (3, 5, 40) and _rel(h, ref) < 4e-3
    stacked = torch.ops.zhtune_cpu_ops.swiglu_backward(g.bfloat16(), gate_up)
    assert _rel(stacked[..., :40], gate.grad) < 1e-2 and _rel(stacked[..., 40:], up.grad) < 1e-2


@needs_ops
@pytest.mark.parametrize("table_dtype", [torch.bfloat16, torch.float32], ids=["lora-bf16-tables", "full-fp32-tables"])
def test_rotary_kernels_are_the_reference_bit_for_bit(table_dtype):
    """On the transposed view transformers hands over, with LoRA's bf16 or full fine-tuning's
    fp32 tables: :func:`rotate` and :func:`rotate_backward`'s values exactly."""
    from zhtune.train.rope import rotate, rotate_backward

    torch.manual_seed(0)
    x = torch.randn(2, 7, 3, 64).bfloat16().transpose(1, 2)  # (b, heads, t, d) view of (b, t, heads, d)
    cos, sin = (torch.randn(2, 7, 64).to(table_dtype) for _ in range(2))
    got = torch.ops.zhtune_cpu_ops.rotary(x, cos, sin)
    assert got.shape == x.shape and torch.equal(got, rotate(x, cos, sin))
    g = torch.randn(2, 3, 7, 64).bfloat16()
    assert torch.equal(torch.ops.zhtune_cpu_ops.rotary_backward(g, cos, sin), rotate_backward(g, cos, sin))


@needs_ops
def test_qkv_from_the_stacked_product_rotate_and_hand_back_one_gradient():
    """NativeQKVRotary on a stacked q/k/v product (3 query heads, 1 key/value head): q and k the
    native rotation of the product's columns and v a view of them, bit for bit; the product's
    gradient written as one tensor equals autograd's concatenation of the three (split views,
    NativeRotary) bit for bit, through the grouped heads' wider and narrower column ranges."""
    from zhtune.train.rope import NativeQKVRotary, NativeRotary

    torch.manual_seed(0)
    b, t, d, heads, kv = 2, 7, 64, 3, 1
    cos, sin = (torch.randn(b, t, d).bfloat16() for _ in range(2))
    grads = [torch.randn(b, n, t, d).bfloat16() for n in (heads, kv, kv)]

    def run(fused: bool):
        y = torch.randn(b, t, (heads + 2 * kv) * d, generator=torch.Generator().manual_seed(1)).bfloat16().requires_grad_()
        if fused:
            outs = NativeQKVRotary.apply(y, cos, sin, heads, kv)
        else:
            q, k, v = (p.view(b, t, -1, d).transpose(1, 2) for p in y.split([heads * d, kv * d, kv * d], dim=-1))
            outs = NativeRotary.apply(q, cos, sin), NativeRotary.apply(k, cos, sin), v
        sum((o.float() * g.float()).sum() for o, g in zip(outs, grads)).backward()
        return outs, y.grad

    (fused, g_fused), (plain, g_plain) = run(True), run(False)
    for a, want in zip(fused, plain):
        assert a.shape == want.shape and torch.equal(a, want)
    assert fused[2]._base is not None  # v: a view of the product, not a copy
    assert torch.equal(g_fused, g_plain)


def _native_and_plain_runs(method: str, tmp_path, tiny_tokenizer, train_file, capsys, monkeypatch) -> tuple:
    """Losses of 6 bf16 steps of ``method`` on a tiny LLaMA with head dim 32 (the rotation
    kernel's smallest) with the native kernels, and without them (compile=auto then compiles the
    kernels), each run's banner checked for compiling: ``(native losses, plain losses)``."""
    from tests.train.test_packing import cfg, losses
    from zhtune.models.tiny import build_tiny_llama
    from zhtune.train.sft import train

    model_dir = tmp_path / "llama-d32"
    build_tiny_llama(tiny_tokenizer, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=40, seed=0).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    run = lambda name: losses(  # noqa: E731
        train(
            cfg(model_dir, train_file, tmp_path / name, method=method, packing=True, cutoff_len=128, batch_size=4,
                max_steps=6, logging_steps=1, lr=1e-3, precision="bf16"),
            progress=False,
        )
    )  # fmt: skip
    ours = run("native")
    banner = capsys.readouterr().out
    assert "compiling" not in banner and "attention: zhtune's CPU kernels" in banner
    assert "native kernels (C++, AVX-512 bf16): the loss, RMSNorm, SwiGLU, rotary embedding" in banner
    with monkeypatch.context() as off:
        off.setattr(native, "_loaded", {"cpu_ops": False, "cpu_attention": False})
        plain = run("plain")
    banner = capsys.readouterr().out
    assert "compiling" in banner and "native kernels" not in banner
    assert ours == pytest.approx(plain, rel=2e-2) and ours[-1] < ours[0]
    return ours, plain


@needs_ops
@needs_native
def test_lora_bf16_training_runs_native_kernels_without_compiling(tmp_path, tiny_tokenizer, train_file, capsys, monkeypatch):
    """LoRA in bf16 on a CPU with the native kernels: norms, the MLP's activation, the rotation,
    attention and the loss run natively, nothing is compiled (compile=auto's kernels mode has
    nothing left: no Dynamo), and the losses follow the same run without native kernels within
    bf16's noise."""
    from zhtune.train import fused, residual, rope

    calls: dict[str, int] = {}
    kinds = ((fused.NativeRMSNorm, "norm"), (residual.ResidualRMSNorm, "residual"), (rope.NativeRotary, "rotary"), (rope.NativeQKVRotary, "qkv"))
    for cls, name in kinds:
        apply = cls.apply
        monkeypatch.setattr(cls, "apply", lambda *a, apply=apply, name=name: calls.__setitem__(name, calls.get(name, 0) + 1) or apply(*a))
    stacked = fused._stacked

    def native_swiglu(gate, up):  # (counts the activations the native kernels run)
        found = stacked(gate, up)
        calls["swiglu"] = calls.get("swiglu", 0) + (found is not None)
        return found

    monkeypatch.setattr(fused, "_stacked", native_swiglu)
    from zhtune.train import lora

    widened = lora.widened

    def counted_widened(x2, extra):  # (counts the stacked inputs the norms wrote in place)
        found = widened(x2, extra)
        calls["widened"] = calls.get("widened", 0) + (found is not None)
        return found

    monkeypatch.setattr(lora, "widened", counted_widened)
    _native_and_plain_runs("lora", tmp_path, tiny_tokenizer, train_file, capsys, monkeypatch)
    # per step: 2 norms a layer with the residual stream (ResidualRMSNorm) + the final alone; q, k
    # and v from the stacked product a layer (q and k rotated in it, none apart); the activation
    # forward and backward a layer; both stacked products of a layer read their norm's widened
    # output (no copy)
    assert calls == {"norm": 6, "residual": 6 * 4, "qkv": 6 * 2, "swiglu": 6 * 2 * 2, "widened": 6 * 2 * 2}


@needs_ops
def test_narrow_rms_norm_kernels_are_the_eager_ones():
    """Full fine-tuning's norm of fp32 rows handing bf16 on: the eager kernels' values exactly
    (each result rounded once from the same fp32 product) and their gradients to fp32 rounding."""
    from zhtune.train.fused import narrow_rms_norm, narrow_rms_norm_backward

    torch.manual_seed(0)
    x, w = torch.randn(90, 72) * 2, torch.rand(72) + 0.5
    got = torch.ops.zhtune_cpu_ops.narrow_rms_norm(x, w, 1e-5)
    want = narrow_rms_norm(x, w, 1e-5, torch.bfloat16)
    assert all(torch.equal(g, r) for g, r in zip(got[:2], want[:2])) and _rel(got[2], want[2]) < 1e-6
    g = torch.randn(90, 72).bfloat16()
    dx, dw = torch.ops.zhtune_cpu_ops.narrow_rms_norm_backward(g, got[1], got[2], w, True)
    want_dx, want_dw = narrow_rms_norm_backward(g, want[1], want[2], w, torch.float32)
    assert dx.dtype == dw.dtype == torch.float32 and _rel(dx, want_dx) < 1e-5 and _rel(dw, want_dw) < 1e-5


@needs_ops
@needs_native
def test_full_fine_tuning_in_bf16_runs_native_kernels_without_compiling(
    tmp_path, tiny_tokenizer, train_file, capsys, monkeypatch
):
    """Full fine-tuning under bf16 autocast: the fp32 residual stream's norms run the native
    narrow kernels, the recomputed MLP's activation the native ones, nothing is compiled, and the
    curve follows the same run without native kernels (compiled) within bf16's noise."""
    from zhtune.train import fused

    narrow = []
    apply = fused.NarrowRMSNorm.apply
    monkeypatch.setattr(fused.NarrowRMSNorm, "apply", lambda *a: narrow.append(a[-1]) or apply(*a))
    _native_and_plain_runs("full", tmp_path, tiny_tokenizer, train_file, capsys, monkeypatch)
    native_calls = [k for k in narrow if k is fused._NATIVE_NARROW]
    assert len(native_calls) == 6 * 4  # the native run's: 2 a layer (the final norm feeds the head in fp32)


def test_a_new_build_replaces_older_ones_but_not_builds_in_progress(fresh, monkeypatch, tmp_path):
    """Building under a new key removes the library's older builds for this torch installation,
    not another environment's, not another process's temporary output, and nothing of other
    libraries."""
    monkeypatch.setattr(native, "cpu_flags", lambda: set(native.FLAGS["cpu_ops"][2]))
    monkeypatch.setattr(native, "cache_root", lambda: tmp_path)
    monkeypatch.setattr(torch.ops, "load_library", lambda path: None)
    built = native.library("cpu_ops")
    env = native._install(torch)
    names = (f"cpu_ops-{env}-0000.so", f"cpu_attention-{env}-0000.so", f"cpu_ops-{env}-1111.99.tmp.so", "cpu_ops-elsewhere-0000.so")
    old, other, in_progress, other_env = (tmp_path / "native" / n for n in names)
    old.parent.mkdir(parents=True)
    for f in (old, other, in_progress, other_env):
        f.write_bytes(b"")

    def compile_(cmd, **kw):  # (the compiler's output, without compiling)
        Path(cmd[cmd.index("-o") + 1]).write_bytes(b"so")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", compile_)
    assert native.load("cpu_ops") is True
    assert built.read_bytes() == b"so" and not old.exists()
    assert other.exists() and in_progress.exists() and other_env.exists()


@needs_ops
def test_the_transpose_kernel_is_the_transpose_and_takes_over_large_weight_gradients(monkeypatch):
    """``transpose`` equals ``x.T.contiguous()`` bit for bit (strided rows too) and rejects shapes
    its blocks do not cover; a full fine-tuning weight gradient at least
    ``TRANSPOSED_WEIGHT_GRAD`` large is computed through it (the same product), smaller ones
    and other dtypes as ``grad^T @ x``."""
    from zhtune.train import fused

    x = torch.randn(96, 80).to(torch.bfloat16)
    for t in (x, x[:, 16:64], x[32:]):
        assert torch.equal(torch.ops.zhtune_cpu_ops.transpose(t), t.T.contiguous())
    with pytest.raises(RuntimeError, match="multiple of 32"):
        torch.ops.zhtune_cpu_ops.transpose(x[:40])
    calls = []
    transpose = torch.ops.zhtune_cpu_ops.transpose
    monkeypatch.setattr(fused, "TRANSPOSED_WEIGHT_GRAD", 48 * 32)
    monkeypatch.setattr(fused.torch.ops.zhtune_cpu_ops, "transpose", lambda t: calls.append(t.shape) or transpose(t))
    g, h = torch.randn(64, 48).to(torch.bfloat16), torch.randn(64, 32).to(torch.bfloat16)
    want = (g.float().T @ h.float())
    got = fused._weight_grad(g, h)
    assert calls == [(64, 48)] and got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() <= 1e-2 * want.abs().max()
    assert torch.equal(got, g.T @ h)  # (oneDNN's product of the transposed copy: the same bits here)
    fused._weight_grad(g[:, :32], h[:, :16])  # smaller than the threshold
    fused._weight_grad(g.float(), h.float())  # fp32
    fused._weight_grad(g[:40], h[:40])  # rows the kernel does not take
    assert calls == [(64, 48)]


@needs_ops
def test_a_norm_writes_the_stacked_lora_input_in_place():
    """``NativeRMSNorm`` with extra columns gives the same output, as the first columns of a wider
    tensor; ``StackedLora`` fills the rest with ``x A^T`` instead of copying its input, with the
    same outputs and gradients (input, A and B) as from the narrow output."""
    from zhtune.train import fused, lora

    torch.manual_seed(0)
    x = torch.randn(2, 20, 64).bfloat16()
    weight = (torch.rand(64) + 0.5).bfloat16()
    outs, ranks = (64, 32, 32), (8, 8, 8)
    frozen = [torch.randn(o, 64).bfloat16() for o in outs]

    def run(extra: int):
        xi = x.clone().requires_grad_()
        a = [torch.randn(r, 64, generator=torch.Generator().manual_seed(r + i)).requires_grad_() for i, r in enumerate(ranks)]
        b = [torch.randn(o, r, generator=torch.Generator().manual_seed(o + i)).requires_grad_() for i, (o, r) in enumerate(zip(outs, ranks))]
        y = fused.NativeRMSNorm.apply(xi, weight, 1e-6, extra)
        in_place = lora.widened(y.reshape(-1, 64), sum(ranks)) is not None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = lora.StackedLora.apply(y.reshape(-1, 64), 3, (2.0, 2.0, 2.0), lora.WeightStack(), *frozen, None, None, None, *a, *b)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).bfloat16())
        return y, in_place, out, [xi.grad, *(t.grad for t in a + b)]

    wide, narrow = run(sum(ranks)), run(0)
    assert wide[1] and not narrow[1]
    assert torch.equal(wide[0], narrow[0]) and wide[0]._base.shape == (2, 20, 64 + sum(ranks))
    assert torch.equal(wide[2], narrow[2])
    for got, want in zip(wide[3], narrow[3]):
        assert torch.equal(got, want)


@needs_ops
@needs_native
def test_gradient_checkpointing_with_the_norms_writing_the_stacked_input(tmp_path, tiny_tokenizer, train_file, monkeypatch):
    """bf16 LoRA with the native kernels and gradient checkpointing (each block's forward run
    again in backward: the norms allocate and StackedLora fills a new widened input each time):
    the same losses as without checkpointing, the stacked products reading their norms' output
    in place in both runs."""
    from tests.train.test_packing import cfg, losses
    from zhtune.models.tiny import build_tiny_llama
    from zhtune.train import lora
    from zhtune.train.sft import train

    in_place, widened = [], lora.widened
    monkeypatch.setattr(lora, "widened", lambda x2, extra: in_place.append(widened(x2, extra) is not None) or widened(x2, extra))

    model_dir = tmp_path / "llama-d32"
    build_tiny_llama(tiny_tokenizer, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=40, seed=0).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    runs = {
        flag: losses(
            train(
                cfg(model_dir, train_file, tmp_path / str(flag), method="lora", packing=True, cutoff_len=128, batch_size=4,
                    max_steps=4, logging_steps=1, lr=1e-3, precision="bf16", gradient_checkpointing=flag),
                progress=False,
            )
        )
        for flag in (False, True)
    }  # fmt: skip
    assert runs[True] == pytest.approx(runs[False], rel=1e-3) and len(runs[True]) == 4
    # 4 steps x 2 layers x 2 stacked products, and the checkpointed run's forward again in backward
    assert in_place.count(True) == 4 * 2 * 2 + 4 * 2 * 2 * 2 and all(in_place)
