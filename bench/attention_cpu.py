"""What attention costs a training step on this CPU, and what does not make it cheaper.

    python bench/attention_cpu.py [--tokens 2048] [--heads 9] [--kv-heads 3] [--head-dim 64] [--repeats 5]

SmolLM2-135M's attention shapes (9 query heads, 3 key/value heads, head dim 64), bf16, the
tokens of one ``bench/train_real.py`` step (4 rows of 512) cut into rows of 512, 256, 200 and 128:
forward and backward of ``F.scaled_dot_product_attention`` (PyTorch's CPU flash kernel) with a
causal mask, with the block-diagonal mask of packed rows (documents of 300/212, 150/362, 512 and
100/200/212 tokens at 512), with grouped-query attention given to the kernel (``enable_gqa``)
against key/value heads copied per query head (what transformers does without
``TRANSFORMERS_SDPA_FORCE_GQA``), the plain math (``softmax(q k^T) v`` in bf16 with autograd),
and zhtune's training attention (:mod:`zhtune.train.attention`: SDPA's forward, a tiled bf16
backward compiled by Inductor, the first repeat compiling it; and, on a CPU with AMX, its native
C++ kernels), packed and as unpacked rows of 256, 200 (padded to 256 in the compiled backward)
and 128 against SDPA with ``enable_gqa``.
FlexAttention, which would skip the masked blocks of packed rows, is tried too: on a CPU it has no
backward (PyTorch says so), which the table reports. Best of ``--repeats`` (the first is a warm-up);
prints ms per layer and per 30-layer step.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

DOCS_512 = [[300, 212], [150, 362], [512], [100, 200, 212]]


def packed_mask(rows: int, length: int) -> torch.Tensor:
    """``(rows, 1, length, length)`` bool: causal within each document of :data:`DOCS_512`."""
    mask = torch.zeros(rows, 1, length, length, dtype=torch.bool)
    for r in range(rows):
        start = 0
        for n in DOCS_512[r % len(DOCS_512)]:
            mask[r, 0, start : start + n, start : start + n] = torch.ones(n, n, dtype=torch.bool).tril()
            start += n
    return mask


def timed(fn: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Best forward and backward seconds of ``fn(q, k, v)``."""
    grad = torch.randn_like(q)
    forward, backward = [], []
    for _ in range(repeats):
        qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        t0 = time.perf_counter()
        out = fn(qq, kk, vv)
        t1 = time.perf_counter()
        out.backward(grad)
        forward.append(t1 - t0)
        backward.append(time.perf_counter() - t1)
    return min(forward[1:]), min(backward[1:])


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d) + causal) v``, bf16, autograd's backward."""
    n, length = q.shape[-1], q.shape[-2]
    bias = torch.full((length, length), float("-inf"), dtype=q.dtype).triu_(1)
    return torch.softmax(q @ k.transpose(-1, -2) * n**-0.5 + bias, dim=-1) @ v


class _Causal:
    is_causal = True


def zhtune_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, native: bool = False
) -> torch.Tensor:
    """:func:`zhtune.train.attention.attention` as transformers calls it, ``(b, h, t, d)`` out;
    ``native``: its C++ kernels, else SDPA's forward and the compiled backward."""
    from zhtune.train import attention as attn

    if attn._native != native:
        attn._native, attn._last[:] = native, [None, None]
    return attn.attention(_Causal(), q, k, v, mask)[0].transpose(1, 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    from zhtune.train.attention import native_kernels

    torch.manual_seed(0)
    group = a.heads // a.kv_heads

    def inputs(length: int, kv_heads: int) -> tuple[torch.Tensor, ...]:
        rows = a.tokens // length
        shape = (rows, a.heads, length, a.head_dim)
        q = torch.randn(shape, dtype=torch.bfloat16)
        k, v = (torch.randn(rows, kv_heads, length, a.head_dim, dtype=torch.bfloat16) for _ in range(2))
        return q, k, v

    def repeated(fn: Callable) -> Callable:
        return lambda q, k, v: fn(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1))

    mask = packed_mask(a.tokens // 512, 512)
    cases: list[tuple[str, int, int, Callable]] = [
        ("SDPA, causal, rows of 512", 512, a.heads, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
        ("SDPA, causal, rows of 256", 256, a.heads, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
        ("SDPA, causal, rows of 128", 128, a.heads, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
        ("SDPA, packed mask, k/v copied per head", 512, a.kv_heads, repeated(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))),
        ("SDPA, packed mask, enable_gqa", 512, a.kv_heads, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)),
        ("math (bf16, autograd), causal, rows of 512", 512, a.heads, math_attention),
        ("zhtune (train/attention.py), packed mask", 512, a.kv_heads, lambda q, k, v: zhtune_attention(q, k, v, mask)),
    ]  # fmt: skip
    native = native_kernels()
    if native:
        cases.append(("zhtune native kernels (csrc/cpu_attention.cpp), packed mask", 512, a.kv_heads, lambda q, k, v: zhtune_attention(q, k, v, mask, True)))  # fmt: skip
    for length in (256, 200, 128):  # unpacked rows: the backward pads 200 to 256
        cases += [
            (f"SDPA, causal, rows of {length}, enable_gqa", length, a.kv_heads, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)),
            (f"zhtune (train/attention.py), causal, rows of {length}", length, a.kv_heads, lambda q, k, v: zhtune_attention(q, k, v, None)),
        ]  # fmt: skip
        if native:
            cases.append((f"zhtune native kernels, causal, rows of {length}", length, a.kv_heads, lambda q, k, v: zhtune_attention(q, k, v, None, True)))  # fmt: skip
    print(
        f"\nattention forward + backward, {a.tokens} tokens, {a.heads} heads ({a.kv_heads} key/value), "
        f"head dim {a.head_dim}, bf16, {torch.get_num_threads()} threads\n"
    )
    print("| attention | forward ms | backward ms | ms per layer | ms per 30-layer step |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, length, kv_heads, fn in cases:
        f, b = timed(fn, *inputs(length, kv_heads), a.repeats)
        print(f"| {name} | {1e3 * f:.1f} | {1e3 * b:.1f} | {1e3 * (f + b):.1f} | {30e3 * (f + b):,.0f} |")
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        docs = torch.zeros(mask.shape[0], 512, dtype=torch.long)
        for r in range(mask.shape[0]):
            docs[r] = torch.repeat_interleave(
                torch.arange(len(DOCS_512[r % 4])), torch.tensor(DOCS_512[r % 4])
            )
        block = create_block_mask(
            lambda b, h, i, j: (i >= j) & (docs[b, i] == docs[b, j]), mask.shape[0], None, 512, 512, device="cpu"
        )
        flex = torch.compile(flex_attention)
        f, b = timed(lambda q, k, v: flex(q, k, v, block_mask=block, enable_gqa=True), *inputs(512, a.kv_heads), a.repeats)
        print(f"| FlexAttention, packed block mask | {1e3 * f:.1f} | {1e3 * b:.1f} | {1e3 * (f + b):.1f} | {30e3 * (f + b):,.0f} |")
    except Exception as e:  # noqa: BLE001 - the reason is the finding
        print(f"| FlexAttention, packed block mask | failed: {type(e).__name__}: {str(e).splitlines()[0][:110]} | | | |")


if __name__ == "__main__":
    main()
