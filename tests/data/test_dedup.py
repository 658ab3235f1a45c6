"""MinHash signatures, LSH bands and the streaming dedup index."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from zhtune.data.dedup import Deduper, MinHasher, exact_key, fingerprint, normalise, optimal_bands


def _text(seed: int, n: int = 400) -> str:
    rng = np.random.default_rng(seed)
    return "".join(chr(0x4E00 + int(c)) for c in rng.integers(0, 3000, n))


def test_normalise_ignores_case_space_and_punctuation_but_not_turns():
    a = normalise([{"content": "Hello,  World!"}, {"content": "你好。"}])
    assert a == normalise([{"content": "hello world"}, {"content": "你好"}])
    assert a != normalise([{"content": "hello world你好"}])
    assert exact_key(a) == exact_key(normalise([{"content": "HELLO WORLD"}, {"content": "你好！"}]))


def test_optimal_bands_use_the_permutations_and_put_the_s_curve_at_the_threshold():
    for threshold in (0.7, 0.85):
        b, r = optimal_bands(threshold, 64)
        assert b * r <= 64
        above, below = threshold + 0.1, threshold - 0.25
        assert 1 - (1 - above**r) ** b > 0.75
        assert 1 - (1 - below**r) ** b < 0.15


def test_signature_estimates_jaccard():
    hasher = MinHasher(num_perm=256, bands=16, rows=16)
    a = _text(0)
    b = a[:300] + _text(1, 100)  # shares most 5-grams with a
    sa, sb = set(hasher.shingle_hashes(a).tolist()), set(hasher.shingle_hashes(b).tolist())
    true = len(sa & sb) / len(sa | sb)
    est = float((hasher.signature(a) == hasher.signature(b)).mean())
    assert abs(est - true) < 0.08
    assert float((hasher.signature(a) == hasher.signature(_text(2))).mean()) < 0.05


def test_signatures_are_the_same_in_another_process():
    """Workers and the main process must agree: no per-process hash seeds."""
    code = (
        "from zhtune.data.dedup import MinHasher; h = MinHasher(); "
        "print(h.signature('秋风起落叶黄大雁南飞').tolist(), h.band_keys(h.signature('abc')))"
    )
    here = MinHasher()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert (
        out.strip()
        == f"{here.signature('秋风起落叶黄大雁南飞').tolist()} {here.band_keys(here.signature('abc'))}"
    )


def test_deduper_keeps_the_first_and_reports_clusters():
    hasher = MinHasher(64, *optimal_bands(0.85, 64))
    base = _text(3)
    texts = {"a": base, "b": base[:-1] + "龍", "c": _text(4), "d": base, "e": base + "龍"}
    d = Deduper(exact=True, threshold=0.85, hasher=hasher)
    verdicts = {rid: d.check(rid, fingerprint(t, hasher, True)) for rid, t in texts.items()}
    assert verdicts["a"] is None and verdicts["c"] is None
    assert verdicts["b"].step == "near-dup" and verdicts["b"].duplicate_of == "a"
    assert verdicts["d"].step == "exact-dup" and verdicts["d"].similarity == 1.0
    assert verdicts["e"].step == "near-dup"
    assert d.cluster_stats("near-dup") == (1, 3) and d.cluster_stats("exact-dup") == (1, 2)
    # exact only: no signatures kept
    exact_only = Deduper(exact=True, threshold=None, hasher=None)
    assert exact_only.check("x", fingerprint(base, None, True)) is None
    assert exact_only.check("y", fingerprint(base[:-1] + "龍", None, True)) is None
    assert exact_only.check("z", fingerprint(base, None, True)).duplicate_of == "x"


def test_int_table_is_a_dict_of_first_values():
    """The dedup indexes' compact table answers as ``dict.setdefault`` / ``dict.get`` would,
    through growth, colliding low bits and the key 0."""
    import random

    from zhtune.data.dedup import IntTable

    rng = random.Random(0)
    keys = [rng.getrandbits(64) for _ in range(5000)] + [0, 2**64 - 1] + [i << 52 for i in range(300)]
    table, reference = IntTable(capacity=8), {}
    for value, key in enumerate(keys + keys[:100]):  # later values for known keys are ignored
        table.setdefault(key, value)
        reference.setdefault(key, value)
    assert len(table) == len(reference)
    assert all(table.get(k) == v for k, v in reference.items())
    assert table.get(12345) is None and 4 * len(table) <= 3 * len(table._keys)
