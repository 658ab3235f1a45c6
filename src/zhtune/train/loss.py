"""The training loss without the full logits: the output layer and the cross-entropy, fused.

A causal LM's own loss computes ``logits = lm_head(hidden)`` for every position, ``(batch, seq,
vocab)``, casts them to fp32 and takes a log-softmax, forward and backward: with a small model
that is most of a training step (on the 4M-parameter benchmark model with a 4k vocabulary, 45%
of a bf16 CPU step), and with a large vocabulary (Qwen's 152k) most of the memory.
:func:`fused_causal_lm_loss` takes the decoder's last hidden states, keeps only the positions
that carry a label (a prompt's positions carry none), and :class:`LinearCrossEntropy` computes
their logits a chunk of rows at a time, each chunk's loss and its gradients at once, so no
``(tokens, vocab)`` tensor outlives a chunk. The idea of Liger Kernel's fused linear
cross-entropy, in plain PyTorch. Same loss and gradients as the model's own (tested).
"""

from __future__ import annotations

from typing import Any

import torch

from zhtune.train import native

#: Logit elements per chunk (rows x vocab): 512k fp32 values, 2 MB, which stay in a CPU core's L2
#: cache from the matmul to the softmax and back (with 4M a bf16 CPU step of the 4M-parameter
#: benchmark model was 5-15% slower).
CHUNK_ELEMENTS = 1 << 19
#: ...but at least this many rows: each chunk reads the whole output layer's weight, which for a
#: large vocabulary (Qwen's 152k x 896 is 272 MB in bf16) must not be read per handful of rows.
#: (SmolLM2's 49k: LoRA and full fine-tuning steps ~1% faster at 256 rows than at 128.)
MIN_CHUNK_ROWS = 256
#: A trained output layer's weight gradient is one addition into its fp32 gradient per this many
#: chunks (their products summed in the compute dtype first): each addition reads and writes the
#: whole fp32 ``(vocab, h)`` gradient, 113 MB each way for SmolLM2, ~2/3 of a product's time.
WEIGHT_GRAD_CHUNKS = 2


def _pad_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` ``(rows, h)`` with ``n`` zero rows appended.

    Every chunk has the same number of rows, the last one padded so: oneDNN (bf16 matmuls on a
    CPU) keeps a compiled primitive, with its own reordered copy of the weight, for every matmul
    shape it meets, and a last chunk of a new length every step (the labelled tokens vary) grew
    the process by about 28 MB a step on SmolLM2 (2.6 -> 3.4 GiB over 30 steps; flat at 2.7 with
    one shape), for at most one chunk of wasted rows a step."""
    return torch.cat([t, t.new_zeros(n, t.shape[1])]) if n else t


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer runs in here: autocast's when it is on, else the input's."""
    device = t.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else t.dtype


def native_transposes(t: torch.Tensor) -> bool:
    """Whether zhtune's bf16 transpose kernel (``transpose`` in ``csrc/cpu_ops.cpp``) takes the
    2-D ``t``: bf16 on a CPU where the kernels are loaded, contiguous rows, rows a multiple of 32
    and columns of 16."""
    return (
        t.stride(1) == 1 and t.shape[0] % 32 == 0 and t.shape[1] % 16 == 0
        and native.elementwise(t.device.type, t.dtype == torch.bfloat16)
    )  # fmt: skip


def transposed(weight: torch.Tensor) -> torch.Tensor:
    """``weight.T`` ``(h, vocab)`` contiguous, for ``weight`` ``(vocab, h)``: by zhtune's bf16
    transpose kernel where it applies (SmolLM2's 49k x 576: ~19 against ~41 ms strided)."""
    return torch.ops.zhtune_cpu_ops.transpose(weight) if native_transposes(weight) else weight.T.contiguous()


class KeptTranspose:
    """A frozen output layer's weight transposed and cast once, ``(h, vocab)`` in the compute
    dtype, kept while the weight is the same unchanged tensor (its identity, version and dtype):
    made afresh at every step it cost as much as it saves (~19 ms for SmolLM2). Only for bf16 on
    a CPU with zhtune's kernels, where oneDNN's ``W^T G`` from a transposed view is ~50% slower
    (13.0 against 8.7 ms a 256-row chunk); elsewhere (fp32: 6%; GPUs) None, and
    :class:`LinearCrossEntropy` uses the view, so no copy is held. A trained weight changes at
    every step: None, and the loss transposes the copy it casts."""

    def __init__(self) -> None:
        self._key: tuple[Any, ...] = ()
        self._weight: torch.Tensor | None = None  # (held, so its id is never reused)
        self._value: torch.Tensor | None = None

    def get(self, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        if weight.requires_grad or not native.elementwise(weight.device.type, dtype == torch.bfloat16):
            return None
        key = (weight.data_ptr(), weight._version, weight.dtype, dtype)
        if self._value is None or self._weight is not weight or key != self._key:
            self._weight, self._key, self._value = weight, key, transposed(weight.to(dtype))
        return self._value


def _add_weight_grad(total: torch.Tensor | None, grads: torch.Tensor, hs: torch.Tensor, rows: int = 4096) -> torch.Tensor:
    """``total + sum_i grads[i] @ hs[i]`` in fp32, in place (``total`` None: a new fp32 zero
    tensor first), for chunks' logit gradients ``grads`` ``(k, vocab, n)`` and hidden rows ``hs``
    ``(k, n, h)`` in the compute dtype: ``rows`` vocabulary rows at a time, the chunks' products
    summed in the compute dtype and added once. Whole, the product ``(vocab, h)`` (57 MB in bf16
    for SmolLM2's output layer) and the fp32 copy the addition converts it into (113 MB) would
    both exist at the step's peak of memory; a block at a time, they are ``rows`` rows."""
    if total is None:
        total = torch.zeros(grads.shape[1], hs.shape[2], dtype=torch.float32, device=hs.device)
    for start in range(0, grads.shape[1], rows):
        part = grads[0, start : start + rows] @ hs[0]
        for g, h in zip(grads[1:], hs[1:]):
            part.addmm_(g[start : start + rows], h)
        total[start : start + rows] += part
    return total


def _chunk_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """The gradient ``softmax - one_hot`` (fp32, ``(vocab, rows)``, a transposed view) of a
    chunk's logits ``(vocab, rows)``, whose first ``len(targets)`` columns are labelled (the rest
    padding: zero gradient); their loss is added to ``loss`` in place. (log_softmax is one
    vectorised kernel; logsumexp and a subtraction take 3x longer; its dtype argument reads the
    bf16 logits as fp32 without a copy: 4.4 against 6.1 ms a 128 x 49k chunk.)"""
    n = len(targets)
    logp = torch.log_softmax(logits.T, dim=-1, dtype=torch.float32)  # (rows, vocab)
    loss -= logp[:n].gather(1, targets[:, None]).sum()
    grad = logp.exp_()  # the softmax, in place
    grad[torch.arange(n, device=targets.device), targets] -= 1.0
    grad[n:] = 0.0  # the padding rows
    return grad.T


def _scale_rows(t: torch.Tensor, scale: torch.Tensor | None, n: int) -> torch.Tensor:
    """``t`` ``(n, h)`` with row ``i`` times ``scale[i]`` (fp32; None: ``t`` as it is)."""
    return t if scale is None else t * scale[:n, None]


class LinearCrossEntropy(torch.autograd.Function):
    """``sum(cross_entropy(hidden @ weight.T, targets))`` (a scalar), chunk by chunk.

    ``hidden`` is ``(n, h)``, ``weight`` ``(vocab, h)``, ``targets`` ``(n,)`` (every row counts);
    ``weight_t``: ``weight.T`` contiguous in the compute dtype (:class:`KeptTranspose`), or None
    to make it here (bf16 with zhtune's kernels; elsewhere the transposed view serves).

    The forward pass computes each chunk's logits transposed, ``(vocab, rows) = W h^T``, in the
    compute dtype: the product with the wide weight as its left operand, which oneDNN reads as it
    lies (as ``h W^T`` it repacked the weight at every chunk: SmolLM2's 256 x 49k logits 5.2
    against 10.1 ms, the hidden gradient ``W^T G`` 7.0 against 8.2 ms). Then their log-softmax
    and loss in fp32 and the gradient ``softmax - one_hot`` straight away (bf16 on a CPU: the
    native kernel leaves it times each position's sum of exponentials, and the products are
    scaled back), turned into the gradients of ``hidden`` (and of ``weight`` when it is
    trained); backward scales them by the loss's gradient.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        weight_t: torch.Tensor | None = None,
    ) -> torch.Tensor:
        dtype = compute_dtype(hidden)
        w = weight.to(dtype)
        vocab = weight.shape[0]
        rows = max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // vocab)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = None
        trained = ctx.needs_input_grad[1]
        group = WEIGHT_GRAD_CHUNKS if trained else 1  # chunks whose logit gradients the weight's gradient takes at once
        grads = torch.empty(group, vocab, rows, dtype=dtype, device=hidden.device)
        hs = torch.empty(group, rows, weight.shape[1], dtype=dtype, device=hidden.device) if trained else None
        fused_ce = native.elementwise(hidden.device.type, dtype == torch.bfloat16)
        wt = weight_t if weight_t is not None else transposed(w) if fused_ce else w.T
        with torch.autocast(hidden.device.type, enabled=False):
            for i, start in enumerate(range(0, hidden.shape[0], rows)):
                t = targets[start : start + rows]
                n = len(t)
                h = _pad_rows(hidden[start : start + rows].to(dtype), rows - n)
                at = i % group
                logits = torch.mm(w, h.T, out=grads[at])  # (vocab, rows)
                if fused_ce:  # the loss, and the gradient times each column's sum in place of the bf16 logits
                    chunk_loss, inv_sum = torch.ops.zhtune_cpu_ops.cross_entropy_columns_(logits, t, n)
                    loss += chunk_loss
                    grad = logits  # (csrc/cpu_ops.cpp; its products are scaled by inv_sum: (rows,))
                else:
                    grad, inv_sum = grads[at].copy_(_chunk_cross_entropy(logits, t, loss)), None
                grad_hidden[start : start + n] = _scale_rows((wt @ grad)[:, :n].T, inv_sum, n)
                if trained:  # the weight's gradient once the group is full (or last)
                    hs[at] = _scale_rows(h, inv_sum, rows)
                    if at + 1 == group or start + rows >= hidden.shape[0]:
                        grad_weight = _add_weight_grad(grad_weight, grads[: at + 1], hs[: at + 1])
        if trained and grad_weight is None:  # (no labelled row)
            grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        ctx.save_for_backward(grad_hidden, grad_weight if grad_weight is not None else torch.empty(0))
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[Any, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_w = (grad_weight * grad_loss).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return grad_hidden * grad_loss.to(grad_hidden.dtype), grad_w, None, None


def output_layer(model: Any) -> Any:
    """The output layer of a (peft-wrapped) causal LM when it is a plain bias-free linear layer
    (its weight is all :class:`LinearCrossEntropy` needs), else None (a wrapped or adapted head:
    the model's own loss is used)."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    return head


def fused_causal_lm_loss(model: Any, head: Any, inputs: dict[str, Any], num_items: int) -> torch.Tensor:
    """The causal-LM loss of ``inputs`` (``input_ids``, ``labels``, and ``attention_mask`` or
    packed ``position_ids``): next-token cross-entropy summed over the labelled positions and
    divided by ``num_items`` (the labelled tokens of the whole optimizer step), as the model's
    own loss with ``num_items_in_batch`` computes it.

    ``model`` is called as it is (a DDP wrapper keeps its gradient synchronisation) for its last
    hidden states, with logits for no position; ``head`` is its :func:`output_layer`."""
    labels = inputs["labels"]
    features = {k: v for k, v in inputs.items() if k != "labels"}
    # no logits at all: an empty index of positions. (``logits_to_keep=1`` slices the last
    # position out of the hidden states, a non-contiguous (batch, 1, h) view, for which the
    # output layer's matmul copied its weight once per row: 113M elements a step for SmolLM2,
    # 8% of a LoRA step.)
    none = torch.empty(0, dtype=torch.long, device=labels.device)
    out = model(**features, output_hidden_states=True, logits_to_keep=none, use_cache=False)
    targets = labels[:, 1:]
    labelled = targets != -100
    hidden = out.hidden_states[-1][:, :-1][labelled]
    weight_t = vars(head).setdefault("_zhtune_transposed", KeptTranspose()).get(head.weight, compute_dtype(hidden))
    loss = LinearCrossEntropy.apply(hidden, head.weight, targets[labelled], weight_t)
    return loss / num_items


def frozen_to(model: Any, dtype: torch.dtype) -> None:
    """Cast ``model``'s frozen floating-point parameters to ``dtype`` in place, leaving the
    trained ones as they are: under bf16 autocast a frozen fp32 weight is cast again at every
    use (autocast caches casts of trained leaves only), and bf16 activations then flow between
    layers without casts. Frozen weights never change, so nothing is lost but their precision
    beyond bf16's, as with loading the base in bf16 (LLaMA-Factory's default for LoRA). Meant
    for training under autocast, which runs the adapters' matmuls in ``dtype`` anyway."""
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point():
            param.data = param.data.to(dtype)
    for module in model.modules():  # peft's layers would cast their (bf16) inputs to their fp32
        if hasattr(module, "cast_input_dtype_enabled"):  # weights, for autocast to cast back
            module.cast_input_dtype_enabled = False
