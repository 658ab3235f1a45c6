"""Novelty checks per second for ``zhtune data generate`` at 10k and 100k kept instructions.

    flock /tmp/zhtune-cpu.lock python bench/novelty.py [--sizes 10000,100000] [--queries 300]

Kept instructions: the real Chinese instructions at hand (LLaMA-Factory's 1,000-record Alpaca-zh
demo, BELLE's seed tasks and eval set), then made-up ones up to the size wanted, each spliced from
clauses of three random real ones (so character frequencies and lengths stay those of real
instructions). Queries: half unseen spliced instructions, half near copies of kept ones (one or two
characters changed) — the two outcomes a generator meets.

Rows: ``rouge`` (:class:`zhtune.data.novelty.RougeIndex`, exact: prefix filtering, bounds, then a
bit-parallel LCS), ``bm25`` (:class:`~zhtune.data.novelty.BM25Index`, numpy over an inverted index),
and the naive baseline as Alpaca's script computes it: ROUGE-L by dynamic programming against every
kept instruction (timed on a 2,000-instruction sample and scaled linearly; it is O(kept)).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path

from zhtune.data.novelty import BM25Index, RougeIndex, rouge_l, tokenize

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def real_instructions() -> list[str]:
    texts = [
        r["instruction"] for r in json.loads((SHARED / "llamafactory" / "alpaca_zh_demo.json").read_text())
    ]
    for name in ("zh_seed_tasks.json", "eval_set.json"):
        for line in (SHARED / "belle" / name).read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                texts.append(row.get("instruction") or row.get("question") or "")
    return [t.strip()[:200] for t in texts if len(t.strip()) >= 4]


def spliced(rng: random.Random, clauses: list[str]) -> str:
    return "，".join(rng.choice(clauses) for _ in range(rng.randint(1, 3)))


def lcs_dp(a: list[str], b: list[str]) -> int:
    """ROUGE-L's LCS as ``rouge_score`` computes it: the full table."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def naive_check(query: list[str], kept: list[list[str]], threshold: float) -> bool:
    return any(2 * lcs_dp(query, k) / (len(query) + len(k)) > threshold for k in kept if k and query)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    real = real_instructions()
    clauses = [c for t in real for c in re.split(r"[，。？！,.?!\n]", t) if len(c) >= 4]
    sizes = [int(s) for s in args.sizes.split(",")]
    pool = list(real)
    while len(pool) < max(sizes) + args.queries:
        pool.append(spliced(rng, clauses))
    print(f"{len(real):,} real instructions, {len(clauses):,} clauses; mean length "
          f"{sum(map(len, pool)) / len(pool):.1f} characters")  # fmt: skip
    print("| kept | method | checks/s | ms/check | near copies found | build s |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for size in sizes:
        kept = pool[:size]
        fresh = [spliced(rng, clauses) for _ in range(args.queries // 2)]
        copies = []
        for text in rng.sample(kept, args.queries - len(fresh)):
            chars = list(text)
            for _ in range(rng.randint(1, 2)):
                chars[rng.randrange(len(chars))] = "的"
            copies.append("".join(chars))
        queries = fresh + copies
        for name, cls in (("rouge", RougeIndex), ("bm25", BM25Index)):
            start = time.perf_counter()
            index = cls(0.7)
            for text in kept:
                index.add(text)
            build = time.perf_counter() - start
            start = time.perf_counter()
            found = sum(index.check(q) is not None for q in queries)
            seconds = time.perf_counter() - start
            print(f"| {size:,} | {name} | {len(queries) / seconds:,.0f} | {1000 * seconds / len(queries):.2f} | "
                  f"{found}/{len(queries)} | {build:.1f} |")  # fmt: skip
        sample = [tokenize(t) for t in kept[:2000]]
        start = time.perf_counter()
        for q in queries[:20]:
            naive_check(tokenize(q), sample, 0.7)
        per_check = (time.perf_counter() - start) / 20 * (size / len(sample))
        print(f"| {size:,} | naive all-pairs DP (scaled from 2,000) | {1 / per_check:,.2f} | "
              f"{1000 * per_check:,.0f} | - | - |")  # fmt: skip
    assert rouge_l(["a"], ["a"]) == 1.0


if __name__ == "__main__":
    main()
