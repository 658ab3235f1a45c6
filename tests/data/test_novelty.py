"""Novelty filters: exact LCS, ROUGE-L with prefiltering equal to brute force, normalised BM25."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from zhtune.data.novelty import BM25Index, RougeIndex, build_novelty, lcs_length, rouge_l, tokenize
from zhtune.errors import ZhtuneError


def lcs_dp(a: list[str], b: list[str]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def test_tokenize_chinese_by_character_english_by_word():
    assert tokenize("用 Python 写10个数！Hello, World") == [
        "用",
        "python",
        "写",
        "10",
        "个",
        "数",
        "hello",
        "world",
    ]


def test_bit_parallel_lcs_equals_dynamic_programming():
    rng = random.Random(0)
    for _ in range(500):
        a = [rng.choice("abcde") for _ in range(rng.randint(0, 80))]
        b = [rng.choice("abcde") for _ in range(rng.randint(0, 80))]
        assert lcs_length(a, b) == lcs_dp(a, b)
    # ROUGE-L F1 = 2 LCS / (m + n): "给出下面词语的同义词" vs "给出以下词语的同义词" share 9 of 10
    assert rouge_l(tokenize("给出下面词语的同义词"), tokenize("给出以下词语的同义词")) == pytest.approx(0.9)


def _near_copies(rng: random.Random, n: int) -> list[str]:
    """Instructions over a small alphabet, many of them edits of earlier ones (so many pairs sit
    near the threshold, which is where a wrong prefilter would show)."""
    alphabet = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面"
    texts: list[str] = []
    for _ in range(n):
        if texts and rng.random() < 0.6:
            base = list(rng.choice(texts))
            for _ in range(rng.randint(1, 6)):
                op, pos = rng.random(), rng.randrange(len(base) + 1)
                if op < 0.4 and base:
                    base.pop(min(pos, len(base) - 1))
                elif op < 0.7:
                    base.insert(pos, rng.choice(alphabet))
                elif base:
                    base[min(pos, len(base) - 1)] = rng.choice(alphabet)
            texts.append("".join(base) or "空")
        else:
            texts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(3, 30))))
    return texts


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.9])
def test_rouge_index_equals_brute_force(threshold):
    rng = random.Random(1)
    index = RougeIndex(threshold)
    kept: list[list[str]] = []
    for text in _near_copies(rng, 600):
        tokens = tokenize(text)
        brute = max((rouge_l(tokens, k) for k in kept), default=0.0)
        match = index.check(text)
        if brute > threshold:
            assert match is not None and match.score == pytest.approx(brute)
        else:
            assert match is None
            index.add(text)
            kept.append(tokens)
    assert 50 < len(index) < 600  # both branches were exercised


def bm25_reference(docs: list[str], query: str, k1: float = 1.5, b: float = 0.75) -> list[float]:
    """Okapi BM25 written out plainly, divided by the query's score against itself."""
    toks = [tokenize(d) for d in docs]
    q = Counter(tokenize(query))
    n, avg = len(toks), sum(map(len, toks)) / len(toks)
    df = Counter(t for d in toks for t in set(d))

    def score(doc: list[str]) -> float:
        tf = Counter(doc)
        total = 0.0
        for t, qtf in q.items():
            idf = math.log((n - df[t] + 0.5) / (df[t] + 0.5) + 1)
            total += qtf * idf * tf[t] * (k1 + 1) / (tf[t] + k1 * (1 - b + b * len(doc) / avg))
        return total

    self_score = score(tokenize(query))
    return [score(d) / self_score for d in toks]


def test_bm25_matches_reference_and_flags_near_copies():
    docs = [
        "给出下面词语的同义词",
        "Write a poem about the sea",
        "请以下面词语为主题写一首诗",
        "根据描述生成SQL语句",
    ]
    index = BM25Index(0.7)
    for d in docs:
        index.add(d)
    for query in ["给出以下词语的同义词", "write a short poem about the sea", "完全不同的东西"]:
        assert index.scores(query).tolist() == pytest.approx(bm25_reference(docs, query), rel=1e-5)
    assert index.check("给出以下词语的同义词").text == docs[0]
    assert index.check("Write a poem about the sea!").text == docs[1]
    assert index.check("解释一下量子力学的基本原理") is None


def test_registry_and_thresholds():
    assert isinstance(build_novelty("rouge"), RougeIndex) and build_novelty("rouge").threshold == 0.7
    assert build_novelty("bm25", 0.9).threshold == 0.9
    with pytest.raises(ZhtuneError, match="unknown --novelty 'lcs'"):
        build_novelty("lcs")
    with pytest.raises(ZhtuneError, match="must be in"):
        RougeIndex(1.5)
