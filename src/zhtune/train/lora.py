"""zhtune's LoRA layers for training: one layer fused, and layers that read the same input as one.

* :class:`LoraLinear`: ``y = x W^T + b + s (x A^T) B^T`` as one matmul plus one ``addmm`` that
  adds the low-rank product into ``y`` with the scaling folded in; backward is only the matmuls
  the gradients need (``dx = g W + s (g B) A``, skipped when ``x`` needs none; ``dA = s (g B)^T x``;
  ``dB = s g^T (x A^T)``), again with the scaling folded into ``addmm``. Eager PyTorch runs peft's
  layer as six kernels forward (the frozen matmul, dropout, A, B, the scaling, the sum) and as
  many backward, each reading and writing full-size activations.
* :class:`StackedLora`: several :class:`LoraLinear` layers on one input (q, k and v of an
  attention module; gate and up of an MLP) as one LoRA layer whose frozen weight is theirs
  stacked, whose ``A`` is theirs stacked and whose ``B`` is block-diagonal (each block scaled by
  its layer's scaling), so the low-rank products of one layer never meet another's. Forward is one
  product of the input widened by its low-rank projection, ``[x, x A^T] [W, B]^T``, so the frozen
  and the low-rank parts add up inside the matmul instead of in a pass over the wide output; the
  input's gradient is one matmul instead of one a layer, added up by autograd. Backward reads the
  output gradient once for the frozen part of the input's gradient and the low-rank ``g B``
  (one product over the kept stack ``[W | B | 0]``) and splits the gradients of ``A`` and ``B``
  back out.

A layer runs here only when :func:`lora_plain` says it computes what peft's forward would
(adapters enabled and not merged, one active adapter, no dropout, no DoRA or other variant, no
LoRA bias, a frozen base layer); anything else goes through peft's own forward, so switching is
never wrong, only sometimes not faster. :func:`zhtune.train.fused.fuse_for_training` swaps
:func:`lora_forward` in.
"""

from __future__ import annotations

from typing import Any

import torch

from zhtune.train.loss import compute_dtype


class LoraLinear(torch.autograd.Function):
    """``x W^T + b + scale * (x A^T) B^T`` for ``x`` ``(..., in)``, frozen ``W`` ``(out, in)`` and
    ``b`` ``(out,)`` or None, trained ``A`` ``(r, in)`` and ``B`` ``(out, r)``; ``(..., out)`` in the
    compute dtype (autocast's, else ``x``'s), as peft's layer under autocast returns it."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        dtype = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            w, a, b = weight.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
            xa = x2 @ a.T  # (n, r)
            # (written into a tensor of the output's own shape: the view of a tensor made here
            # would be an output autograd guards against in-place changes, and Dynamo tracing a
            # Qwen3 layer, whose q/k norms take views of the projections, stopped on that guard:
            # `compile: true` failed for Qwen3 LoRA; tests/train/test_compile.py, marked slow)
            out = torch.empty(*x.shape[:-1], w.shape[0], dtype=dtype, device=x.device)
            y = out.view(-1, w.shape[0])
            torch.addmm(bias.to(dtype), x2, w.T, out=y) if bias is not None else torch.mm(x2, w.T, out=y)
            y.addmm_(xa, b.T, alpha=scale)
        ctx.save_for_backward(x2, xa, w, a, b)
        ctx.scale, ctx.x_dtype, ctx.a_dtype, ctx.b_dtype = scale, x.dtype, lora_a.dtype, lora_b.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        x2, xa, w, a, b = ctx.saved_tensors
        s = ctx.scale
        with torch.autocast(grad.device.type, enabled=False):
            g = grad.reshape(-1, grad.shape[-1]).to(w.dtype)
            gb = g @ b  # (n, r)
            grad_a = torch.mm(gb.T, x2).mul_(s).to(ctx.a_dtype)
            # (r, n) @ (n, out), transposed back: the skinny side leads (~2x faster in oneDNN at out = 576)
            grad_b = torch.mm(xa.T, g).mul_(s).T.to(ctx.b_dtype)
            grad_x = None
            if ctx.needs_input_grad[0]:  # (not for the first block's input: the embeddings are frozen)
                grad_x = g @ w
                grad_x = grad_x.addmm_(gb, a, alpha=s).view(*grad.shape[:-1], x2.shape[-1]).to(ctx.x_dtype)
        return grad_x, None, None, grad_a, grad_b, None


def lora_plain(module: Any) -> str | None:
    """The one active adapter of a peft LoRA ``Linear`` when :class:`LoraLinear` computes what
    its forward would, else None."""
    if module.disable_adapters or module.merged:
        return None
    active = [name for name in module.active_adapters if name in module.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    base = module.base_layer
    if (
        name in module.lora_variant
        or not isinstance(module.lora_dropout[name], torch.nn.Identity)
        or module.lora_B[name].bias is not None
        or base.weight.requires_grad
        or (base.bias is not None and base.bias.requires_grad)
    ):
        return None
    return name


def lora_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    name = None if args or kwargs else lora_plain(self)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    base = self.base_layer
    return LoraLinear.apply(
        x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
    )


STACK_ALIGN = 32
"""The kept stack's columns are padded with zeros to a multiple of this: the input gradient's
product ``g [W | B | 0]`` (``(n, sum out) @ (sum out, in + k r)``) runs as fast as ``g W`` alone
at 608 output columns but ~35% slower at 592 (oneDNN, AMX; SmolLM2's gate/up), and the forward
product through the padded stack's ``(sum out, in + k r)`` view costs what it did."""


def stack_weights(weights: tuple[torch.Tensor, ...], b: torch.Tensor) -> torch.Tensor:
    """``[W_1; ...; W_k | b | 0]`` ``(sum out_i, in + c`` rounded up to :data:`STACK_ALIGN`) in
    ``b``'s dtype for ``W_i`` ``(out_i, in)`` and ``b`` ``(sum out_i, c)``, a new tensor (zeros in
    the padding columns)."""
    width = weights[0].shape[1] + b.shape[1]
    out = b.new_zeros(b.shape[0], -(-width // STACK_ALIGN) * STACK_ALIGN)
    out[:, : weights[0].shape[1]] = torch.cat([w.to(b.dtype) for w in weights])
    out[:, weights[0].shape[1] : width] = b
    return out


class WeightStack:
    """Frozen weights ``W_1..W_k`` ``(out_i, in)`` stacked once, ``[W_1; ...; W_k | B | 0]``
    (:func:`stack_weights`), with a ``(sum out_i, c)`` block ``B`` that :meth:`get` writes into
    its columns ``in..in + c`` at every call.

    Restacking the frozen weights at every forward pass read all of them from memory and wrote a
    copy (for SmolLM2's q/k/v and gate/up, 139 MB a step: ~3% of a LoRA step). The stack is
    built again only when the weights are other tensors, or changed in place (their version), or
    of another dtype or device; a new stack is a new tensor, so a backward pass still holding
    the old one's frozen part is never affected. The per-step copies were alive at the step's
    peak anyway (each layer saved its stack for backward); kept for as long as the model lives,
    the peak RSS measured ~0.08 GiB more on SmolLM2 (2.28-2.29 -> 2.36-2.38 GiB,
    ``bench/ab_steps.py``), the heap laid out around them. Weights that keep changing (FSDP
    gathers each layer's weights again at every forward pass, freeing them after) would make a
    kept stack an unsharded copy that outlives the step: after :data:`MAX_REBUILDS` rebuilds the
    stack is no longer kept, and every call stacks afresh as before."""

    MAX_REBUILDS = 2

    def __init__(self) -> None:
        self._weights: tuple[torch.Tensor, ...] = ()  # (held, so their ids are never reused)
        self._key: tuple[Any, ...] = ()
        self._stack: torch.Tensor | None = None
        self.rebuilds = 0

    def get(self, weights: tuple[torch.Tensor, ...], b: torch.Tensor) -> torch.Tensor:
        """``[W_1; ...; W_k | b | 0]`` in ``b``'s dtype, for ``b`` ``(sum out_i, c)``."""
        if self.rebuilds < self.MAX_REBUILDS:
            key = (*((w.data_ptr(), w._version, w.dtype) for w in weights), b.dtype, b.device, b.shape[1])
            same = len(weights) == len(self._weights) and all(w is v for w, v in zip(weights, self._weights))
            if self._stack is not None and same and key == self._key:
                self._stack[:, weights[0].shape[1] : weights[0].shape[1] + b.shape[1]] = b
                return self._stack
            self.rebuilds += self._stack is not None
        fresh = stack_weights(weights, b)
        keep = self.rebuilds < self.MAX_REBUILDS  # (weights that keep changing: kept no more)
        self._weights, self._key, self._stack = (weights, key, fresh) if keep else ((), (), None)
        return fresh


def widened(x2: torch.Tensor, extra: int) -> torch.Tensor | None:
    """The ``(n, in + extra)`` tensor whose first ``in`` columns ``x2`` ``(n, in)`` is, when it
    is one (:class:`zhtune.train.fused.NativeRMSNorm` writes its output so for the stacked layers
    it feeds: their widened input ``[x, x A^T]`` then needs no copy, ~1% of a SmolLM2 LoRA step),
    else None."""
    base = x2._base
    width = x2.shape[1] + extra
    if base is None or extra <= 0 or base.shape[-1] != width or not base.is_contiguous():
        return None
    if x2.data_ptr() != base.data_ptr() or x2.stride() != (width, 1) or base.numel() != x2.shape[0] * width:
        return None
    return base.view(-1, width)


def stacked_rank(layers: list[Any]) -> int:
    """The summed rank of ``layers``' one active LoRA adapter each (the extra columns of
    :class:`StackedLora`'s widened input), or 0 where any is not a peft LoRA layer (or None). A
    wrong guess costs nothing but speed: :func:`widened` checks the width the product needs."""
    ranks = [
        m.r.get(next(iter(m.active_adapters), None), 0) if isinstance(getattr(m, "r", None), dict) else 0
        for m in layers
    ]
    return sum(ranks) if all(ranks) else 0


class StackedLora(torch.autograd.Function):
    """``x [W_1; ...; W_k]^T + [b] + (x [A_1; ...; A_k]^T) diag(s_i B_i)^T`` for ``x`` ``(n, in)``
    (computed as ``[x, x A^T] [W, diag(s_i B_i)]^T``);
    returns ``(n, sum out_i)`` in the compute dtype. ``weights``, ``biases``, ``lora_a``,
    ``lora_b``: tuples of the k layers' tensors; ``scales``: their scalings."""

    @staticmethod
    def forward(
        ctx: Any, x2: torch.Tensor, n: int, scales: tuple[float, ...], stack: WeightStack, *tensors: torch.Tensor
    ) -> torch.Tensor:
        weights, biases, lora_a, lora_b = (tensors[i * n : (i + 1) * n] for i in range(4))
        dtype = compute_dtype(x2)
        with torch.autocast(x2.device.type, enabled=False):
            x2 = x2.to(dtype)
            a = torch.cat([t.to(dtype) for t in lora_a])
            b = torch.block_diag(*[t.to(dtype) * s for t, s in zip(lora_b, scales)])
            # One product for the frozen and the low-rank parts: [x, x A^T] [W, B]^T, the input
            # widened by k r columns (reduction depth 576 -> 592..600 costs oneDNN nothing) in
            # place of adding (x A^T) B^T into the (n, sum out) output afterwards (a read and a
            # write of it: on SmolLM2's gate/up 3.1 -> 2.2 ms a layer).
            compiling = torch.compiler.is_compiling()
            wide = None if compiling else widened(x2, a.shape[0])
            if wide is None:
                xe = torch.cat([x2, x2 @ a.T], dim=1)  # (n, in + k r)
            else:  # (the norm before it wrote x2 into the first columns: no copy)
                wide[:, x2.shape[1] :] = x2 @ a.T
                xe = wide
            # (sum out, in + k r, padded). Traced by Dynamo (compiled decoder blocks), stacked
            # afresh and saved: a stack kept between calls is a side effect it cannot capture.
            # Eager, the kept stack, handed to backward as a plain attribute: the next forward
            # rewrites the B columns in place, which a saved tensor's version check would take
            # for a change of W (B itself changes only at the optimizer's step, after backward).
            we = stack_weights(weights, b) if compiling else stack.get(weights, b)
            y = xe @ we[:, : xe.shape[1]].T
            if biases[0] is not None:
                y += torch.cat([t.to(dtype) for t in biases])
        if compiling:
            ctx.save_for_backward(xe, a, b, we)
        else:
            ctx.save_for_backward(xe, a, b)
            ctx.we = we
        ctx.n, ctx.scales = n, scales
        ctx.a_dtypes, ctx.b_dtypes = [t.dtype for t in lora_a], [t.dtype for t in lora_b]
        ctx.rows = [t.shape[0] for t in lora_a], [t.shape[0] for t in weights]
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        xe, a, b, *saved = ctx.saved_tensors
        we = saved[0] if saved else ctx.we
        ranks, outs = ctx.rows
        width, rank = a.shape[1], a.shape[0]
        x2, xa = xe[:, :width], xe[:, width:]
        with torch.autocast(grad.device.type, enabled=False):
            g = grad.to(we.dtype)
            grad_x = None
            # [g W | g B | 0] in one product, one pass over g (for gate/up, (n, 3,072)): the
            # frozen part of the input's gradient and each layer's s_i g_i B_i, (n, k r); unless
            # another forward pass through the kept stack wrote other B columns since (another
            # adapter's, before this backward: then g W and g B apart, with this pass's B; a
            # stack traced by Dynamo is this pass's own)
            if ctx.needs_input_grad[0] and (saved or torch.equal(we[:, width : width + rank], b)):
                full = g @ we
                gb = full[:, width : width + rank]
                grad_x = full[:, :width].addmm_(gb, a)  # (a view: the norm before reads its rows in place)
            else:
                gb = g @ b
                if ctx.needs_input_grad[0]:
                    grad_x = (g @ we[:, :width]).addmm_(gb, a)
            grad_a = torch.mm(gb.T, x2).split(ranks)
            grad_b_all = torch.mm(xa.T, g)  # (k r, sum out); the diagonal blocks are the layers'
        grad_b, r0, o0 = [], 0, 0
        for r, o, s, dt in zip(ranks, outs, ctx.scales, ctx.b_dtypes):
            grad_b.append(grad_b_all[r0 : r0 + r, o0 : o0 + o].T.mul(s).to(dt))
            r0, o0 = r0 + r, o0 + o
        grad_a = [t.to(dt) for t, dt in zip(grad_a, ctx.a_dtypes)]
        n = ctx.n
        return grad_x, None, None, None, *([None] * (2 * n)), *grad_a, *grad_b


def stacked_lora(x: torch.Tensor, layers: list[Any]) -> torch.Tensor | None:
    """The outputs of peft LoRA ``layers`` on the same ``x`` ``(..., in)`` side by side through
    :class:`StackedLora`, ``(..., sum out_i)`` in the compute dtype; None (the caller runs them one
    by one) unless gradients are on, every layer is one :func:`lora_forward` runs as
    :class:`LoraLinear` (:func:`lora_plain`) and their base layers have biases on all or none."""
    if not torch.is_grad_enabled():
        return None
    names = [lora_plain(m) if getattr(vars(m).get("forward"), "__func__", None) is lora_forward else None for m in layers]
    if None in names or len({m.base_layer.bias is None for m in layers}) != 1:
        return None
    tensors = (
        [m.base_layer.weight for m in layers]
        + [m.base_layer.bias for m in layers]
        + [m.lora_A[name].weight for m, name in zip(layers, names)]
        + [m.lora_B[name].weight for m, name in zip(layers, names)]
    )
    scales = tuple(m.scaling[name] for m, name in zip(layers, names))
    stack = vars(layers[0]).setdefault("_zhtune_weight_stack", WeightStack())
    y = StackedLora.apply(x.reshape(-1, x.shape[-1]), len(layers), scales, stack, *tensors)
    return y.view(*x.shape[:-1], y.shape[-1])


def split_by_layer(y: torch.Tensor, layers: list[Any]) -> list[torch.Tensor]:
    """:func:`stacked_lora`'s result ``y`` split into each layer's ``(..., out_i)`` (views)."""
    return list(y.split([m.base_layer.weight.shape[0] for m in layers], dim=-1))


def stacked_projections(x: torch.Tensor, layers: list[Any]) -> list[torch.Tensor] | None:
    """:func:`stacked_lora`'s result split into each layer's ``(..., out_i)`` (views), or None."""
    y = stacked_lora(x, layers)
    return None if y is None else split_by_layer(y, layers)
