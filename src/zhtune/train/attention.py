"""Attention for training on a CPU, bf16: zhtune's native kernels, else SDPA's forward and a
backward pass of batched bf16 matmuls compiled by Inductor.

On a CPU with AMX, :class:`CpuAttention` runs the C++ kernels of ``csrc/cpu_attention.cpp``
(built once per machine by :mod:`zhtune.train.native`): forward and backward over each block of
32 queries' own key range (the query heads of a key/value head stacked), so a packed row's
documents cost what they cost apart (see that file). Elsewhere, when the run compiles, it runs
what follows; the mask handling, the cases handed to transformers' SDPA and the autocast casts
are the same for both.

PyTorch's CPU flash-attention backward is about a third of a SmolLM2 LoRA step (23-25 ms per
layer for 4 packed rows of 512 bf16 tokens, against 4-5 ms forward). It works one (row, head)
pair at a time, through small GEMMs of a 64-query block against each 512-key block that
accumulate in fp32, and with 512 keys it never skips what the causal mask empties (the whole row
is one key block). :class:`CpuAttention` keeps SDPA's forward (whose log-sum-exp the backward
needs) and computes the backward differently:

* in tiles of :data:`TILE` queries against the keys up to the tile's end: the causal upper part
  of the score matrix is never computed (62.5% of it is, at 512 tokens);
* each tile's five products (scores, ``dO V^T``, ``dV``, ``dQ``, ``dK``) as batched bf16 matmuls
  over every row and key/value head at once; the query heads sharing a key/value head are rows of
  the same product (grouped-query attention without copying keys and values);
* the softmax recomputed from the log-sum-exp inside the score matmul: ``[q, -lse_hi, -lse_lo] .
  [k, 1, 1]`` is ``q.k - lse / scale`` accumulated in fp32 and rounded once (two bf16 columns
  carry ``lse`` to fp32 precision), likewise ``dP - delta``;
* the mask, the exponential and the ``P * (dP - delta)`` product in one loop that ``torch.compile``
  generates, the mask computed from each query's key interval ``[start, end]`` instead of read.
  A causal mask, the block-diagonal mask of packed rows (a query's sample start to itself) and a
  padding mask are such intervals; :func:`mask_intervals` checks that the mask is one, exactly.

On SmolLM2's shapes the backward takes 11-18 ms against SDPA's 23-25 ms, and a real SmolLM2 LoRA
step 2.72 -> 2.26 s, with errors against an fp32 reference like SDPA's own in bf16 (dq's 1.1-1.4x
SDPA's, dk's and dv's smaller; tested). It is compiled with ``emulate_precision_casts``: Inductor
otherwise keeps a fused kernel's bf16 intermediates in fp32, and the ``lse`` split into two bf16
columns came out as one.

:func:`attention` is registered with transformers as an attention function
(:func:`use_cpu_attention`). It hands every other case to transformers' SDPA function unchanged:
no gradient (evaluation, generation), another device or dtype, dropout, a key/value cache, a mask
that is not per-query intervals. Under bf16 autocast, fp32 queries and keys (full fine-tuning: see
:func:`_autocast_bf16`) are cast to bf16 first, as autocast casts them for SDPA. The backward is
compiled for each shape it meets, in whole tiles (:func:`tiled_backward` pads a row of 200 tokens
to 256), for up to :data:`MAX_SHAPES` shapes: one for packed rows padded to ``cutoff_len``, a few
for unpacked rows (SmolLM2's heads, 2,048 tokens in causal rows of 128, 200 or 256: a backward
of 8-13 ms a layer against SDPA's 20-30 ms, ``bench/attention_cpu.py``; a step gains at any length).
"""

from __future__ import annotations

from typing import Any

import torch

from zhtune.train import native

NAME = "zhtune_cpu"
"""The attention implementation's name in transformers' registry (``config._attn_implementation``)."""

TILE = 128
"""Queries per backward tile: 4 tiles of a 512-token row compute 62.5% of its score matrix; 64
computes less but in matmuls too small to be faster (measured on SmolLM2's shapes)."""

MAX_SHAPES = 8
"""Shapes ``(batch of one, heads, kv heads, tiles, head dim)`` the backward is compiled for in
one process (each costs ~5-8 s of Inductor from an empty cache; from a warm one Dynamo still
traces it); a batch of another shape after these runs SDPA's own backward. Rows padded to
``cutoff_len`` (packing) make one shape, unpadded rows of up to ``cutoff_len`` tokens at most
``cutoff_len / TILE`` (Dynamo's own recompile limit is 8)."""

_compiled: Any = None
_shapes: set[tuple[int, ...]] = set()
_native = False
"""Whether the native kernels run (:func:`use_cpu_attention`), else SDPA's forward and the compiled
backward."""
_fixed_batch = False
"""Whether every batch has one size (:func:`use_cpu_attention`'s ``fixed_batch``): the backward is
then traced with a static batch, else with a dynamic one, so that an epoch's last, smaller batch
of unpadded rows compiles nothing. A symbolic batch costs Dynamo more tracing: SmolLM2's first
LoRA step took 4.9 s with a static batch against 6.0 s with a dynamic one (warm cache, packed)."""


def _hi_lo(x: torch.Tensor) -> torch.Tensor:
    """``x`` (fp32, ``(...)``) as two bf16 values ``(..., 2)`` whose sum is ``x`` to ~16 bits."""
    hi = x.to(torch.bfloat16)
    return torch.stack([hi, (x - hi.float()).to(torch.bfloat16)], -1)


def mask_intervals(mask: torch.Tensor | None, length: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Each query's allowed keys as an interval: ``(start, end)``, each ``(batch, length)`` int32
    (or ``(1, length)`` for no mask: causal), such that query ``i`` attends exactly keys
    ``start[i] <= j <= end[i] <= i``. None when ``mask`` (``(batch, 1, q, k)`` bool, True where a
    query attends) is not of that form: another dtype or shape, a query with no key, a gap, a key
    after the query."""
    if mask is None:
        pos = torch.arange(length, dtype=torch.int32)
        return torch.zeros(1, length, dtype=torch.int32), pos[None]
    if mask.dtype != torch.bool or mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[2:] != (length, length):
        return None
    m = mask[:, 0]
    if not bool(m.any(-1).all()):
        return None
    start = m.int().argmax(-1).int()
    end = (length - 1 - m.flip(-1).int().argmax(-1)).int()
    keys = torch.arange(length, dtype=torch.int32, device=mask.device)
    rebuilt = (keys >= start[..., None]) & (keys <= end[..., None])
    return (start, end) if bool((end <= keys).all()) and torch.equal(rebuilt, m) else None


def attention_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    scale: float,
    tile: int = TILE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients ``(dq, dk, dv)`` of attention ``out = softmax(scale q k^T + mask) v``.

    ``q``, ``out``, ``grad_out``: ``(b, h, t, d)`` bf16; ``k``, ``v``: ``(b, kv, t, d)`` (``h`` a
    multiple of ``kv``; query head ``i`` uses key/value head ``i // (h // kv)``); ``lse``: the
    forward's log-sum-exp, ``(b, h, t)`` fp32; ``start``, ``end``: :func:`mask_intervals`. Plain
    ops, for ``torch.compile`` (see the module's docstring)."""
    b, h, t, d = q.shape
    kv = k.shape[1]
    g = h // kv
    rows = b * kv
    dtype = q.dtype
    delta = (grad_out.float() * out.float()).sum(-1)  # (b, h, t)
    q_aug = torch.cat([q, _hi_lo(-lse / scale)], -1).view(rows, g, t, d + 2)
    do_aug = torch.cat([grad_out.to(dtype), _hi_lo(-delta)], -1).view(rows, g, t, d + 2)
    ones = q.new_ones(b, kv, t, 2)
    k_aug = torch.cat([k, ones], -1).view(rows, t, d + 2)
    v_aug = torch.cat([v, ones], -1).view(rows, t, d + 2)
    k_flat = k.reshape(rows, t, d)
    start = start.expand(b, t).reshape(b, 1, 1, 1, t)
    end = end.expand(b, t).reshape(b, 1, 1, 1, t)
    keys = torch.arange(t, dtype=torch.int32, device=q.device)
    dq_tiles = []
    dk = q.new_zeros(rows, t, d, dtype=torch.float32)
    dv = q.new_zeros(rows, t, d, dtype=torch.float32)
    for a in range(0, t, tile):
        z = min(t, a + tile)  # the tile's queries a..z-1 attend keys 0..z-1 at most
        n = z - a
        q_t = q_aug[:, :, a:z].reshape(rows, g * n, d + 2)
        do_t = do_aug[:, :, a:z].reshape(rows, g * n, d + 2)
        # transposed scores (keys x queries): dV and dK are then plain products
        s_t = torch.bmm(k_aug[:, :z], q_t.transpose(1, 2)).view(b, kv, z, g, n)  # q.k - lse/scale
        dp_t = torch.bmm(v_aug[:, :z], do_t.transpose(1, 2)).view(b, kv, z, g, n)  # dO.v - delta
        key = keys[:z].view(1, 1, z, 1, 1)
        allowed = (key >= start[..., a:z]) & (key <= end[..., a:z])
        p = torch.where(allowed, (s_t.float() * scale).exp(), 0.0)
        ds = (p * dp_t.float() * scale).to(dtype).view(rows, z, g * n)  # scaled: dq rounds once
        p = p.to(dtype).view(rows, z, g * n)
        dv[:, :z] += torch.bmm(p, do_t[..., :d])
        dk[:, :z] += torch.bmm(ds, q_t[..., :d])
        dq_tiles.append(torch.bmm(ds.transpose(1, 2), k_flat[:, :z]).view(rows, g, n, d))
    dq = torch.cat(dq_tiles, 2).view(b, h, t, d)
    return dq, dk.to(dtype).view(b, kv, t, d), dv.to(dtype).view(b, kv, t, d)


def _compiled_backward() -> Any:
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(attention_backward, options={"emulate_precision_casts": True})
    return _compiled


def tiled_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """:func:`attention_backward` compiled, its inputs padded to whole tiles so that rows of any
    length make one shape per tile count; None when the shape would be a compile beyond
    :data:`MAX_SHAPES`. Padded queries attend key 0 with zero gradient in (``grad_out`` 0, so
    ``dP - delta`` is 0 and ``P dO`` is 0) and padded keys are after every real query's interval,
    so the real rows' gradients are exactly the unpadded ones."""
    b, h, t, d = q.shape
    pad = -t % TILE
    shape = (b == 1, h, k.shape[1], (t + pad) // TILE, d)
    if shape not in _shapes:
        if len(_shapes) >= MAX_SHAPES:
            return None
        _shapes.add(shape)
    if pad:
        q, k, v, out, grad_out = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v, out, grad_out))
        lse, start, end = (torch.nn.functional.pad(x, (0, pad)) for x in (lse, start, end))
    dynamic = b > 1 and not _fixed_batch
    for x in (q, k, v, out, grad_out, lse, start, end):  # the length static, the batch as above
        torch._dynamo.mark_static(x, 2 if x.ndim == 4 else -1)
        if x.shape[0] == b:  # (start and end are (1, t) for a causal mask)
            (torch._dynamo.mark_dynamic if dynamic else torch._dynamo.mark_static)(x, 0)
    grads = _compiled_backward()(q, k, v, out, lse, grad_out, start, end, scale)
    return tuple(x[:, :, :t] for x in grads) if pad else grads


class CpuAttention(torch.autograd.Function):
    """``softmax(scale q k^T + mask) v`` for ``q`` ``(b, h, t, d)`` and ``k``, ``v`` ``(b, kv,
    t, d)`` bf16 on a CPU, as ``(b, t, h, d)`` (the layout transformers reshapes to ``(b, t, h
    d)``); ``start``, ``end``: the mask as :func:`mask_intervals` gives it; ``mask``: the same as
    SDPA's CPU kernel takes it (additive, ``(b, 1, t, t)``, or None for causal), unused by the
    native kernels. Forward and backward are zhtune's C++ kernels where :func:`native_kernels`,
    else SDPA's forward and :func:`tiled_backward`."""

    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        start: torch.Tensor,
        end: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        if _native:
            out, lse = torch.ops.zhtune_cpu_attention.forward(q, k, v, start, end, scale)
        else:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, 0.0, mask is None, attn_mask=mask, scale=scale
            )
            out = out.transpose(1, 2).contiguous()
        ctx.save_for_backward(q, k, v, out, lse, start, end, mask)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        q, k, v, out, lse, start, end, mask = ctx.saved_tensors
        if _native:
            grads = torch.ops.zhtune_cpu_attention.backward(grad_out, q, k, v, out, lse, start, end, ctx.scale)
            return *grads, None, None, None, None
        grad_out, out = grad_out.transpose(1, 2).contiguous(), out.transpose(1, 2)
        grads = tiled_backward(q, k, v, out, lse, grad_out, start, end, ctx.scale)
        if grads is None:  # a shape beyond the compile budget: SDPA's own backward
            grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                grad_out, q, k, v, out, lse, 0.0, mask is None, attn_mask=mask, scale=ctx.scale
            )
        return *grads, None, None, None, None


_last: list[Any] = [None, None]
"""The last mask :func:`_prepared` read and what it made of it: each layer of one forward pass
gets the same mask tensor. The mask itself is kept, so a new mask can never reuse its ``id``."""


def _prepared(mask: torch.Tensor | None, length: int) -> tuple[torch.Tensor, torch.Tensor, Any] | None:
    """``(start, end, additive)`` for a mask that :func:`mask_intervals` accepts, else None; made
    once per forward pass. ``additive``: the mask as SDPA's CPU kernel takes it, 0 where attended
    and -inf elsewhere, bf16 (None for no mask: causal)."""
    if mask is None:
        return (*mask_intervals(None, length), None)
    if _last[0] is not mask:
        found = mask_intervals(mask, length)
        if found is not None and _native:  # (the native kernels read the intervals only)
            found = (*found, None)
        elif found is not None:
            additive = torch.zeros(mask.shape, dtype=torch.bfloat16, device=mask.device)
            found = (*found, additive.masked_fill_(~mask, float("-inf")))
        _last[0], _last[1] = mask, found
    return _last[1]


@torch.compiler.disable  # compiled decoder blocks call it as it is (its backward is compiled on its own)
def attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function (the signature of ``sdpa_attention_forward``): query
    ``(b, h, q, d)``, key and value ``(b, kv, k, d)``; returns ``((b, q, h, d), None)``.
    :class:`CpuAttention` where it applies (see the module's docstring), else transformers' SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    t = query.shape[2]
    dtypes = {x.dtype for x in (query, key, value)}
    bf16 = dtypes == {torch.bfloat16} or (_autocast_bf16(query) and dtypes <= {torch.float32, torch.bfloat16})
    plain = (
        query.device.type == "cpu"
        and bf16
        and query.requires_grad
        and torch.is_grad_enabled()
        and not dropout
        and key.shape[2] == t
        and query.shape[1] % key.shape[1] == 0
        and query.shape[-1] == key.shape[-1] == value.shape[-1]
        and (not _native or query.shape[-1] % 16 == 0)
        and all(kwargs.get(name) is None for name in ("softcap", "s_aux", "sinks", "position_bias", "cache"))
        and kwargs.get("is_causal", getattr(module, "is_causal", True)) is not False
    )
    prepared = _prepared(attention_mask, t) if plain else None
    if prepared is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    start, end, mask = prepared
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    q, k, v = (x.to(torch.bfloat16) for x in (query, key, value))  # (no copy when already bf16)
    return CpuAttention.apply(q, k, v, mask, start, end, scale), None


def _autocast_bf16(t: torch.Tensor) -> bool:
    """Whether bf16 autocast is on for ``t``'s device. Under autocast a full fine-tuning run's
    queries and keys arrive in fp32 and its values in bf16 (the projections give bf16, but the
    rotary embedding's cos/sin, made in the fp32 hidden states' dtype, promote q and k back);
    autocast casts all three to bf16 for SDPA, and the kernel does the same."""
    device = t.device.type
    return torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.bfloat16


def native_kernels() -> bool:
    """Whether zhtune's C++ attention kernels (``csrc/cpu_attention.cpp``) run on this machine:
    a CPU with AMX, the library built (once per machine, :mod:`zhtune.train.native`) and loaded.
    ``ZHTUNE_NATIVE=0`` turns them off."""
    return native.load("cpu_attention") and bool(torch.ops.zhtune_cpu_attention.available())


def use_cpu_attention(model: Any, fixed_batch: bool = False, compiled: bool = True) -> str:
    """Switch ``model`` (a transformers model, or peft's wrapper of one) from SDPA to
    :func:`attention`, registering it with transformers first; returns which kernels it runs:
    ``native`` (:func:`native_kernels`), ``compiled`` (SDPA's forward, the backward compiled by
    Inductor; only where ``compiled``, the run compiling), or ``""`` (nothing changed: the model
    does not run SDPA, or neither applies). ``fixed_batch``: every batch will have one size (the
    loop pads packed rows and an epoch's last batch to one shape), so a compiled backward is traced
    static."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(hf.config, "_attn_implementation", None) != "sdpa":
        return ""
    kind = "native" if native_kernels() else "compiled" if compiled else ""
    if not kind:
        return ""
    global _fixed_batch, _native
    _fixed_batch, _native = fixed_batch, kind == "native"
    _last[0] = _last[1] = None
    AttentionInterface.register(NAME, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    hf.set_attn_implementation(NAME)
    return kind
