"""Merge new Chinese tokens into a base tokenizer, appending only what it lacks.

Two kinds of base, one rule: every existing token keeps its id, special and added tokens
included; new tokens get ids after the largest one in use; only *Chinese words* are added.

* **SentencePiece-style** (LLaMA-1/2, Baichuan, ...: ``tokenizer.model`` and/or a
  ``tokenizer.json`` BPE with byte fallback over ``▁``-marked pieces). The new pieces are appended
  to the SentencePiece model proto (as Chinese-LLaMA's merge script does), scored below every
  existing piece, and to the ``tokenizer.json`` vocabulary with the merges transformers derives
  for a SentencePiece BPE model (every split of a piece into two known pieces, ordered by id).
* **Byte-level BPE** (Qwen, LLaMA-3, GPT-2, zhtune's tiny tokenizer: ``tokenizer.json`` with a
  ``ByteLevel`` pre-tokenizer). Each new word is spelled in the byte-level alphabet and given the
  merges that make it one token under the base's own merges: starting from how the tokenizer (as
  extended so far) splits the word, the parts are merged left to right, adding intermediate
  tokens where needed. A pre-tokenizer that isolates every Han character (zhtune's tiny
  tokenizer) is relaxed to keep runs of Han characters together, or no word could form.

A *Chinese word* (:func:`is_chinese_word`) is an optional leading space marker followed by CJK
characters only (ideographs, CJK punctuation, full-width forms). Every merge added therefore needs
CJK bytes in the text to apply, so text without CJK characters (English, code, other scripts)
tokenizes exactly as before; the tests check it.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache
from typing import Any

from zhtune.errors import ZhtuneError

CJK_RANGES = (
    (0x3000, 0x303F),  # CJK symbols and punctuation (、。「」)
    (0x3400, 0x4DBF),  # CJK Extension A
    (0x4E00, 0x9FFF),  # CJK Unified Ideographs
    (0xF900, 0xFAFF),  # CJK Compatibility Ideographs
    (0xFF00, 0xFFEF),  # half- and full-width forms (，：？！)
    (0x20000, 0x3134F),  # CJK Extensions B-G
)
"""Code points a new token may consist of."""
SPACE_OK = (0x3000, 0x9FFF)
"""A leading space is kept only before these: their UTF-8 lead bytes (E3-E9) start CJK characters
only, so even a byte-level intermediate token "space + lead byte" matches nothing else."""
SP_SPACE = "▁"
"""SentencePiece's word-boundary marker."""


def is_cjk(ch: str) -> bool:
    """True for a character in :data:`CJK_RANGES`."""
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in CJK_RANGES)


def is_chinese_word(text: str, space: str = " ") -> bool:
    """True if ``text`` is an optional leading ``space`` and then one or more CJK characters
    (a space only before U+3000-U+9FFF, see :data:`SPACE_OK`)."""
    body = text[len(space) :] if space and text.startswith(space) else text
    if not body or not all(is_cjk(c) for c in body):
        return False
    return body is text or SPACE_OK[0] <= ord(body[0]) <= SPACE_OK[1]


# --------------------------------------------------------------------------------------------
# Reading tokenizer.json
# --------------------------------------------------------------------------------------------
def _walk(node: Any) -> Iterable[dict[str, Any]]:
    """Every component dict of a (possibly nested ``Sequence``) normalizer/pre-tokenizer/decoder."""
    if isinstance(node, dict):
        yield node
        for key in ("pretokenizers", "normalizers", "decoders"):
            for child in node.get(key) or []:
                yield from _walk(child)


def tokenizer_kind(tok_json: dict[str, Any], has_sp_model: bool) -> str:
    """``"byte_level"`` or ``"sentencepiece"`` for a supported base, else a :class:`ZhtuneError`."""
    model = tok_json.get("model") or {}
    if model.get("type") != "BPE":
        raise ZhtuneError(
            f"the base tokenizer's model is {model.get('type')!r}; vocabulary expansion supports BPE "
            "tokenizers: byte-level (Qwen, LLaMA-3, GPT-2 style) or SentencePiece-style (LLaMA-1/2)"
        )
    parts = [*_walk(tok_json.get("pre_tokenizer")), *_walk(tok_json.get("decoder"))]
    if any(p.get("type") == "ByteLevel" for p in parts):
        return "byte_level"
    normalizers = list(_walk(tok_json.get("normalizer")))
    metaspace = any(p.get("type") == "Metaspace" for p in parts) or any(
        p.get("type") in ("Replace", "Prepend") and SP_SPACE in str(p.get("content", p.get("prepend")))
        for p in normalizers
    )
    if has_sp_model or model.get("byte_fallback") or metaspace:
        return "sentencepiece"
    raise ZhtuneError(
        "the base tokenizer is a BPE but neither byte-level nor SentencePiece-style "
        "(no ByteLevel pre-tokenizer, no ▁ word marker, no tokenizer.model); it is not supported"
    )


def _merge_pairs(model: dict[str, Any]) -> tuple[list[tuple[str, str]], bool]:
    """The merges as pairs, and whether the file spells them ``"a b"`` (older tokenizers)."""
    merges = model.get("merges") or []
    as_strings = bool(merges) and isinstance(merges[0], str)
    return [tuple(m.split(" ", 1)) if as_strings else tuple(m) for m in merges], as_strings


def _set_merges(model: dict[str, Any], pairs: list[tuple[str, str]], as_strings: bool) -> None:
    model["merges"] = [f"{a} {b}" if as_strings else [a, b] for a, b in pairs]


def next_free_id(tok_json: dict[str, Any]) -> int:
    """One past the largest id of the vocabulary and the added tokens."""
    ids = [*tok_json["model"]["vocab"].values(), *(t["id"] for t in tok_json.get("added_tokens") or [])]
    return max(ids, default=-1) + 1


def absorb_added_tokens(tok_json: dict[str, Any]) -> None:
    """Write the added tokens that lie outside the model's vocabulary (Qwen's ``<|im_start|>``, a
    LLaMA ``<pad>`` at 32000) into it at their ids. transformers rebuilds many tokenizer classes
    from the vocabulary and merges alone and then re-adds the special tokens at the end of the
    vocabulary: without this, they would land on the ids of the new tokens."""
    vocab: dict[str, int] = tok_json["model"]["vocab"]
    used = set(vocab.values())
    for token in tok_json.get("added_tokens") or []:
        if token["content"] not in vocab:
            if token["id"] in used:
                raise ZhtuneError(f"the base tokenizer gives id {token['id']} to two tokens")
            vocab[token["content"]] = token["id"]
            used.add(token["id"])


# --------------------------------------------------------------------------------------------
# SentencePiece-style bases
# --------------------------------------------------------------------------------------------
def extend_sentencepiece_json(tok_json: dict[str, Any], pieces: Iterable[str]) -> list[str]:
    """Append the Chinese words among ``pieces`` (``▁``-marked, in priority order) that the
    vocabulary lacks, with their merges; returns the pieces added, in id order.

    The merges are those transformers derives from a SentencePiece BPE model: for each new piece,
    every split into two pieces of the vocabulary, ordered after all existing merges by piece id.
    """
    absorb_added_tokens(tok_json)
    model = tok_json["model"]
    vocab: dict[str, int] = model["vocab"]
    taken = set(vocab) | {t["content"] for t in tok_json.get("added_tokens") or []}
    next_id = next_free_id(tok_json)
    added: list[str] = []
    for piece in pieces:
        if piece not in taken and is_chinese_word(piece, SP_SPACE):
            vocab[piece] = next_id
            taken.add(piece)
            added.append(piece)
            next_id += 1
    pairs, as_strings = _merge_pairs(model)
    new_merges = []
    for piece in added:
        splits = [(piece[:i], piece[i:]) for i in range(1, len(piece))]
        splits = [(a, b) for a, b in splits if a in vocab and b in vocab]
        new_merges.extend(sorted(splits, key=lambda ab: (vocab[ab[0]], vocab[ab[1]])))
    new_merges.sort(key=lambda ab: (vocab[ab[0] + ab[1]], len(ab[0]), len(ab[1])))
    _set_merges(model, pairs + new_merges, as_strings)
    return added


def check_sentencepiece_proto(proto: Any) -> None:
    """Raise unless ``proto`` is a BPE SentencePiece model (LLaMA-1/2 style)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    if proto.trainer_spec.model_type != pb.TrainerSpec.BPE:
        name = pb.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type).lower()
        raise ZhtuneError(
            f"the base tokenizer.model is a SentencePiece {name} model; only BPE SentencePiece bases "
            "(LLaMA-1/2 style) are supported"
        )


def extend_sentencepiece_proto(proto: Any, pieces: list[str], tok_json: dict[str, Any]) -> None:
    """Append ``pieces`` (the output of :func:`extend_sentencepiece_json`) to a SentencePiece
    ``ModelProto`` so that piece ids equal the ``tokenizer.json`` ids.

    Tokens that transformers added after the proto's pieces (a ``<pad>`` at 32000, chat markers)
    are first written into the proto at their ids (as control or user-defined pieces), so the new
    pieces land on the same ids in both files. New pieces are normal pieces scored below every
    existing one, in order: SentencePiece's BPE then applies all existing merges first, which is
    also the order of the ``tokenizer.json`` merges.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    check_sentencepiece_proto(proto)
    Piece = pb.ModelProto.SentencePiece
    by_id = {t["id"]: t for t in tok_json.get("added_tokens") or []}
    known = {p.piece for p in proto.pieces}
    first_new = tok_json["model"]["vocab"][pieces[0]] if pieces else next_free_id(tok_json)
    for i in range(len(proto.pieces), first_new):
        token = by_id.get(i)
        if token is None or token["content"] in known:
            proto.pieces.add(piece=f"<unused{i}>", score=0.0, type=Piece.UNUSED)
        else:
            kind = Piece.CONTROL if token.get("special") else Piece.USER_DEFINED
            proto.pieces.add(piece=token["content"], score=0.0, type=kind)
    lowest = min((p.score for p in proto.pieces if p.type == Piece.NORMAL), default=0.0)
    for rank, piece in enumerate(pieces, 1):
        proto.pieces.add(piece=piece, score=lowest - rank, type=Piece.NORMAL)
    proto.trainer_spec.vocab_size = len(proto.pieces)


# --------------------------------------------------------------------------------------------
# Byte-level BPE bases
# --------------------------------------------------------------------------------------------
@cache
def _byte_alphabet() -> tuple[dict[int, str], dict[str, int]]:
    """GPT-2's byte <-> printable-character table used by every byte-level BPE."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    to_char = {b: chr(c) for b, c in zip(keep, chars)}
    return to_char, {c: b for b, c in to_char.items()}


def to_byte_level(text: str) -> str:
    """``text`` in the byte-level alphabet (``" 中"`` -> ``"Ġä¸Ń"``)."""
    to_char = _byte_alphabet()[0]
    return "".join(to_char[b] for b in text.encode("utf-8"))


def from_byte_level(token: str) -> str | None:
    """The text of a byte-level token, or None if its bytes are not whole UTF-8 characters."""
    to_byte = _byte_alphabet()[1]
    try:
        return bytes(to_byte[c] for c in token).decode("utf-8")
    except (KeyError, UnicodeDecodeError):
        return None


def bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges (``pair -> rank``, lower first) to one pre-token's symbols."""
    symbols = list(symbols)
    while len(symbols) > 1:
        rank, i = min((ranks.get(pair, 1 << 62), i) for i, pair in enumerate(zip(symbols, symbols[1:])))
        if rank == 1 << 62:
            break
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


HAN_ISOLATED = {r"\p{Han}", r"[\p{Han}]", r"\p{Script=Han}", r"[\u4e00-\u9fff]", "[\u4e00-\u9fff]"}
"""Split patterns that cut text into single Han characters."""


def join_han_runs(tok_json: dict[str, Any]) -> bool:
    """Let runs of Han characters stay one pre-token where the pre-tokenizer isolated each one;
    True if it changed. Text without Han characters pre-tokenizes as before."""
    changed = False
    for part in _walk(tok_json.get("pre_tokenizer")):
        pattern = part.get("pattern") or {}
        if part.get("type") == "Split" and pattern.get("Regex") in HAN_ISOLATED:
            pattern["Regex"] = f"(?:{pattern['Regex']})+"
            changed = True
    return changed


def extend_byte_level(tok_json: dict[str, Any], words: Iterable[str]) -> list[str]:
    """Make each Chinese word of ``words`` (texts, in priority order) a single token of the
    byte-level BPE ``tok_json``; returns the tokens added (words and the intermediate tokens
    their merges need), in id order. Words that already are one token are skipped."""
    absorb_added_tokens(tok_json)
    model = tok_json["model"]
    vocab: dict[str, int] = model["vocab"]
    pairs, as_strings = _merge_pairs(model)
    ranks = {pair: i for i, pair in enumerate(pairs)}
    added_contents = {t["content"] for t in tok_json.get("added_tokens") or []}
    next_id = next_free_id(tok_json)
    added: list[str] = []
    for word in words:
        if not is_chinese_word(word):
            continue
        spelled = to_byte_level(word)
        if any(c not in vocab for c in spelled):
            continue  # a base without the full byte alphabet
        parts = bpe(list(spelled), ranks)
        current = parts[0]
        for part in parts[1:]:
            pair, current = (current, part), current + part
            if pair not in ranks:
                ranks[pair] = len(pairs)
                pairs.append(pair)
            if current not in vocab:
                if current in added_contents:
                    raise ZhtuneError(f"cannot add {word!r}: {current!r} is an added token of the base")
                vocab[current] = next_id
                next_id += 1
                added.append(current)
    _set_merges(model, pairs, as_strings)
    return added


def byte_level_words(trained_json: dict[str, Any]) -> list[str]:
    """The Chinese words a byte-level BPE trained on a corpus learned, in merge order."""
    pairs, _ = _merge_pairs(trained_json["model"])
    words = (from_byte_level(a + b) for a, b in pairs)
    return [w for w in words if w is not None and is_chinese_word(w)]


def sentencepiece_words(proto: Any) -> list[str]:
    """The Chinese words among the normal pieces of a SentencePiece model proto, in id order
    (its priority order)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    normal = pb.ModelProto.SentencePiece.NORMAL
    return [p.piece for p in proto.pieces if p.type == normal and is_chinese_word(p.piece, SP_SPACE)]
