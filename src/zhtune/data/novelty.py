"""Novelty filters for generated instructions: is a new one too close to one already kept?

Self-instruct keeps a generated instruction only if it is unlike every instruction kept so far
(seeds included). Two measures, one interface (:class:`NoveltyIndex`: ``add`` and ``check``):

* ``rouge`` (Alpaca): ROUGE-L F1 — ``2·LCS / (len(a) + len(b))`` over tokens — above 0.7 means a
  near copy. Exact, and fast for 100k kept instructions because the exact LCS is only computed
  for the few kept instructions that *could* pass the threshold: ``LCS <= overlap`` (the tokens
  two texts share, counted as multisets), so a kept instruction of ``n`` tokens needs
  ``2·overlap > t·(m + n)``. The overlap with every kept instruction at once is a sum over the
  query's tokens of numpy slices of an inverted index (as BM25 below); only the candidates that
  pass get a bit-parallel LCS (Python big integers: one addition per token).

* ``bm25`` (BELLE): the BM25 score of the kept instruction against the new one, divided by the
  score the new one would get against itself, so the threshold is a share (0 to ~1) whatever the
  corpus; scored for every kept instruction at once with numpy over an inverted index.

Tokens (:func:`tokenize`): every CJK ideograph is a token, every run of Latin letters or digits a
lowercased word; punctuation and spaces are dropped. So Chinese is compared by characters (as
BELLE's character-level ROUGE), English by words (as Alpaca's ``rouge_score``), mixed text by both.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from zhtune.errors import ZhtuneError

_TOKEN = re.compile(
    "[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]|[A-Za-z0-9\u00c0-\u024f]+"
)


def tokenize(text: str) -> list[str]:
    """Characters for Chinese, lowercased words for Latin script and numbers; no punctuation."""
    return _TOKEN.findall(text.lower())


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists (bit-parallel, Crochemore et
    al. 2001: one big-integer addition per token of ``b``, whatever the length of ``a``)."""
    if len(a) > len(b):
        a, b = b, a
    if not a:
        return 0
    masks: dict[str, int] = {}
    for i, token in enumerate(a):
        masks[token] = masks.get(token, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for token in b:
        u = v & masks.get(token, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def rouge_l(a: list[str], b: list[str]) -> float:
    """ROUGE-L F1 of two token lists (as ``rouge_score``'s ``rougeL`` fmeasure)."""
    if not a or not b:
        return 0.0
    return 2 * lcs_length(a, b) / (len(a) + len(b))


@dataclass(frozen=True)
class Match:
    """The kept instruction most similar to a checked one: its index, text and score."""

    index: int
    text: str
    score: float


class NoveltyIndex(Protocol):
    """What the generator needs: add kept instructions, check a new one against all of them."""

    threshold: float
    texts: list[str]

    def add(self, text: str) -> int: ...

    def check(self, text: str) -> Match | None: ...


class _Postings:
    """A growable pair of numpy arrays (document ids, term frequencies) for one token."""

    __slots__ = ("ids", "tfs", "size")

    def __init__(self) -> None:
        self.ids = np.empty(4, dtype=np.int32)
        self.tfs = np.empty(4, dtype=np.float32)
        self.size = 0

    def append(self, doc: int, tf: int) -> None:
        if self.size == len(self.ids):
            self.ids = np.resize(self.ids, 2 * self.size)
            self.tfs = np.resize(self.tfs, 2 * self.size)
        self.ids[self.size], self.tfs[self.size] = doc, tf
        self.size += 1

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return self.ids[: self.size], self.tfs[: self.size]


class _InvertedIndex:
    """Kept texts with their tokens, lengths and a token -> (ids, tfs) inverted index."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self._tokens: list[list[str]] = []
        self._lengths = np.empty(16, dtype=np.float32)
        self._total = 0
        self._postings: dict[str, _Postings] = {}

    def __len__(self) -> int:
        return len(self.texts)

    def add(self, text: str) -> int:
        """Keep ``text``; returns its index."""
        index = len(self.texts)
        tokens = tokenize(text)
        self.texts.append(text)
        self._tokens.append(tokens)
        if index == len(self._lengths):
            self._lengths = np.resize(self._lengths, 2 * index)
        self._lengths[index] = len(tokens)
        self._total += len(tokens)
        for token, tf in Counter(tokens).items():
            self._postings.setdefault(token, _Postings()).append(index, tf)
        return index


class RougeIndex(_InvertedIndex):
    """Kept instructions for exact ROUGE-L checks: numpy bounds first, LCS for the few left."""

    def __init__(self, threshold: float = 0.7) -> None:
        if not 0 < threshold <= 1:
            raise ZhtuneError(f"--novelty-threshold for rouge must be in (0, 1], got {threshold}")
        super().__init__()
        self.threshold = threshold

    def candidates(self, query: list[str]) -> np.ndarray:
        """Kept instructions whose token-count overlap with ``query`` lets ROUGE-L exceed the
        threshold (``LCS <= overlap``): ``2 * overlap > t * (m + n)``."""
        n = len(self.texts)
        overlap = np.zeros(n, dtype=np.float32)
        for token, qtf in Counter(query).items():
            p = self._postings.get(token)
            if p is not None:
                ids, tfs = p.arrays()
                overlap[ids] += np.minimum(tfs, qtf)
        return np.flatnonzero(2 * overlap > self.threshold * (len(query) + self._lengths[:n]))

    def check(self, text: str) -> Match | None:
        """The most similar kept instruction if its ROUGE-L F1 is above the threshold, else None."""
        query = tokenize(text)
        if not query or not self.texts:
            return None
        best: Match | None = None
        for i in self.candidates(query).tolist():
            kept = self._tokens[i]
            score = 2 * lcs_length(query, kept) / (len(query) + len(kept))
            if score > self.threshold and (best is None or score > best.score):
                best = Match(i, self.texts[i], score)
        return best


class BM25Index(_InvertedIndex):
    """Kept instructions for normalised BM25 checks (Okapi BM25, ``k1``/``b`` as usual)."""

    def __init__(self, threshold: float = 0.7, k1: float = 1.5, b: float = 0.75) -> None:
        if threshold <= 0:
            raise ZhtuneError(f"--novelty-threshold for bm25 must be > 0, got {threshold}")
        super().__init__()
        self.threshold, self.k1, self.b = threshold, k1, b

    def _idf(self, df: int) -> float:
        n = len(self.texts)
        return math.log((n - df + 0.5) / (df + 0.5) + 1)

    def scores(self, text: str) -> np.ndarray:
        """Normalised BM25 of every kept instruction against ``text`` (1.0: as similar as ``text``
        is to itself)."""
        counts = Counter(tokenize(text))
        n = len(self.texts)
        if not counts or n == 0:
            return np.zeros(n, dtype=np.float32)
        k1, b = self.k1, self.b
        avg = max(self._total / n, 1e-9)
        norm = k1 * (1 - b + b * self._lengths[:n] / avg)
        scores = np.zeros(n, dtype=np.float32)
        self_score = 0.0
        m = sum(counts.values())
        for token, qtf in counts.items():
            p = self._postings.get(token)
            idf = self._idf(p.size if p else 0)
            self_score += qtf * idf * qtf * (k1 + 1) / (qtf + k1 * (1 - b + b * m / avg))
            if p is None:
                continue
            ids, tfs = p.arrays()
            scores[ids] += qtf * idf * tfs * (k1 + 1) / (tfs + norm[ids])
        return scores / max(self_score, 1e-9)

    def check(self, text: str) -> Match | None:
        """The most similar kept instruction if its normalised score is above the threshold."""
        if not self.texts:
            return None
        scores = self.scores(text)
        i = int(np.argmax(scores))
        score = float(scores[i])
        return Match(i, self.texts[i], score) if score > self.threshold else None


@dataclass(frozen=True)
class NoveltyMethod:
    """One novelty measure: how to build its index, and its default threshold."""

    name: str
    build: Callable[[float], NoveltyIndex]
    threshold: float
    doc: str


#: The registry: ``--novelty NAME``.
NOVELTY: dict[str, NoveltyMethod] = {
    m.name: m
    for m in (
        NoveltyMethod("rouge", RougeIndex, 0.7, "ROUGE-L F1 above the threshold is a near copy (Alpaca)"),
        NoveltyMethod("bm25", BM25Index, 0.7, "BM25 share of the self-score above the threshold (BELLE)"),
    )
}


def build_novelty(name: str, threshold: float | None = None) -> NoveltyIndex:
    """An empty index of method ``name`` (``threshold`` None: the method's default)."""
    method = NOVELTY.get(name)
    if method is None:
        raise ZhtuneError(f"unknown --novelty {name!r}; choose one of {', '.join(NOVELTY)}")
    return method.build(method.threshold if threshold is None else threshold)


__all__ = [
    "NOVELTY",
    "BM25Index",
    "Match",
    "NoveltyIndex",
    "NoveltyMethod",
    "RougeIndex",
    "build_novelty",
    "lcs_length",
    "rouge_l",
    "tokenize",
]
