"""``zhtune vocab resize``: grow a model's embeddings and LM head to an extended tokenizer.

Each new row starts as the mean of the rows of the token's pieces under the *old* tokenizer
(``中国`` -> mean of ``中`` and ``国``, or of the byte tokens of a character the old vocabulary
lacked), in the input embeddings and, when it is not tied to them, in the LM head. So a new token
starts out meaning roughly what its pieces meant, not noise: on text made of old tokens the model
computes exactly the same logits for the old vocabulary, and the new columns add little to the
softmax (each new logit is the mean of some old logits). Rows are padded to a multiple of 64
(faster matmuls); padding rows, which no token uses, are the mean of all old rows.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zhtune.errors import ZhtuneError
from zhtune.models.loading import load_tokenizer, quiet_transformers, resolve_source

PAD_MULTIPLE = 64


@dataclass
class ResizeReport:
    old_rows: int
    new_rows: int
    tokens: int
    """Ids the new tokenizer uses (largest id + 1)."""
    initialised: int
    """Rows set from their old-tokenizer pieces."""
    mean_pieces: float
    """Average number of old pieces per initialised row."""
    tied: bool


def check_extension(old_tok: Any, new_tok: Any) -> list[int]:
    """The ids of tokens that ``new_tok`` has and ``old_tok`` lacks; raises unless every old token
    keeps its id in ``new_tok``."""
    old, new = old_tok.get_vocab(), new_tok.get_vocab()
    moved = [(t, i, new.get(t)) for t, i in old.items() if new.get(t) != i]
    if moved:
        examples = ", ".join(f"{t!r}: {i} -> {j}" for t, i, j in moved[:3])
        raise ZhtuneError(
            f"the new tokenizer is not an extension of the model's: {len(moved)} of its {len(old):,} tokens "
            f"have another id or are missing ({examples}); make it with `zhtune vocab extend`"
        )
    return sorted(i for t, i in new.items() if t not in old)


def old_pieces(token: str, token_id: int, old_tok: Any, new_tok: Any) -> list[int]:
    """Ids of ``token`` (a token of ``new_tok``) split by the old tokenizer's model: the raw
    piece string goes through the old BPE (byte-level symbols, or ``▁`` pieces with byte fallback);
    an added token's text is encoded as text."""
    added = new_tok.added_tokens_decoder.get(token_id)
    if added is not None:
        return old_tok.encode(added.content, add_special_tokens=False)
    return [t.id for t in old_tok.backend_tokenizer.model.tokenize(token)]


def init_rows(model: Any, old_tok: Any, new_tok: Any, new_ids: list[int], old_rows: int) -> tuple[int, float]:
    """Set each row in ``new_ids`` (and padding rows) of the already resized embeddings (and an
    untied head) from the old rows; returns (rows set from pieces, mean pieces per row)."""
    import torch

    inv = {i: t for t, i in new_tok.get_vocab().items()}
    old_ids = sorted(i for i in old_tok.get_vocab().values() if i < old_rows)
    skip = {old_tok.unk_token_id} - {None}
    matrices = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not matrices[0]:
        matrices.append(head.weight)
    bias = getattr(head, "bias", None) if head is not None else None
    if bias is not None:
        matrices.append(bias)  # a 1-D row per token: the same rule applies
    means = [w[old_ids].float().mean(0) for w in matrices]
    n_set, n_pieces = 0, 0
    with torch.no_grad():
        pieces = {
            i: [p for p in old_pieces(inv[i], i, old_tok, new_tok) if p < old_rows and p not in skip]
            for i in new_ids
        }
        for w, mean in zip(matrices, means):
            source = w[:old_rows].float().clone()
            for row in range(old_rows, w.shape[0]):
                w[row] = mean.to(w.dtype)
            for i, ids in pieces.items():
                w[i] = (source[ids].mean(0) if ids else mean).to(w.dtype)
        n_set = sum(1 for ids in pieces.values() if ids)
        n_pieces = sum(len(ids) for ids in pieces.values())
    return n_set, n_pieces / max(n_set, 1)


def resize_model(model: Any, old_tok: Any, new_tok: Any, multiple: int = PAD_MULTIPLE) -> ResizeReport:
    """Resize ``model`` in place for ``new_tok`` (an extension of ``old_tok``) with mean-of-pieces
    initialisation; rows = largest new id + 1 padded to ``multiple`` (never fewer than before)."""
    new_ids = check_extension(old_tok, new_tok)
    emb = model.get_input_embeddings()
    old_rows = emb.weight.shape[0]
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    n_tokens = max(new_tok.get_vocab().values()) + 1
    new_rows = max(old_rows, math.ceil(n_tokens / multiple) * multiple)
    # tokens the model had no trained row for (beyond its rows) are initialised too
    new_ids = sorted(set(new_ids) | {i for i in new_tok.get_vocab().values() if i >= old_rows})
    if not new_ids:
        raise ZhtuneError("the new tokenizer has no token the model's tokenizer lacks; nothing to resize")
    model.resize_token_embeddings(new_rows, mean_resizing=False)
    n_set, mean_pieces = init_rows(model, old_tok, new_tok, new_ids, old_rows)
    return ResizeReport(old_rows, new_rows, n_tokens, n_set, mean_pieces, tied)


def resize_command(model_dir: str, tokenizer_dir: str, output: str, overwrite: bool = False) -> int:
    """``zhtune vocab resize MODEL_DIR NEW_TOKENIZER_DIR -o OUT``."""
    from transformers import AutoModelForCausalLM


    src = resolve_source(model_dir)
    if src.adapter:
        raise ZhtuneError(
            f"{model_dir} is an adapter run; merge it first (zhtune export --merge) and resize that"
        )
    if not Path(tokenizer_dir).is_dir():
        raise ZhtuneError(f"new tokenizer directory not found: {tokenizer_dir}")
    out = Path(output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ZhtuneError(
            f"output {out} exists and is not an empty directory; choose another or pass --overwrite"
        )
    old_tok = load_tokenizer(src.tokenizer, src.trust_remote_code)
    new_tok = load_tokenizer(tokenizer_dir)
    quiet_transformers()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            src.weights, dtype="auto", trust_remote_code=src.trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise ZhtuneError(f"cannot load a causal LM from {src.weights}: {err}") from None
    report = resize_model(model, old_tok, new_tok)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    new_tok.save_pretrained(str(out))
    if (Path(tokenizer_dir) / "tokenizer.model").is_file():
        shutil.copyfile(Path(tokenizer_dir) / "tokenizer.model", out / "tokenizer.model")
    print(
        f"zhtune vocab resize: {src.weights} -> {out}\n"
        f"  embeddings {report.old_rows:,} -> {report.new_rows:,} rows ({report.tokens:,} token ids, padded to "
        f"a multiple of {PAD_MULTIPLE}), {'tied' if report.tied else 'untied'} LM head\n"
        f"  {report.initialised:,} new rows initialised as the mean of their old-tokenizer pieces "
        f"({report.mean_pieces:.1f} pieces on average); padding rows = mean of all old rows\n"
        f"  next: zhtune train model={out} stage=pt method=embeddings data=[...] (or method=lora "
        "modules_to_save=[embed_tokens,lm_head])"
    )
    return 0
