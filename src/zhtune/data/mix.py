"""``zhtune data mix A.jsonl:0.7 B.jsonl:0.3 -o OUT.jsonl``: a weighted, stable mixture of datasets.

Top to bottom:

1. **Parse** the sources ``SOURCE:WEIGHT`` (a file, directory, glob or registered dataset name;
   the weight defaults to 1). Weights are shares of the output and are normalised to sum to 1.
2. **Pass 1** streams every source through the converter (any format ``zhtune data convert``
   reads; rejects go to ``OUT.rejects.jsonl``) and keeps, per valid record, only a 64-bit rank:
   ``blake2b(seed, source, record id)``. Memory is 8 bytes per record.
3. **Quotas**: ``--total N`` records split by weight (largest remainders, so they sum to N);
   without it, the largest N that needs no source more than once. A source too small for its
   quota is an error naming it, unless ``--allow-repeat``: then every record is taken
   ``quota // available`` times and the best-ranked ``quota % available`` once more.
4. **Selection**: each source contributes its ``quota`` best-ranked records. Ranks depend only on
   (seed, source, id), never on a shared random stream, so the same seed gives the same output,
   and adding records to one source leaves what is picked from the others unchanged (with a
   fixed ``--total``).
5. **Pass 2** streams the sources again and writes the picked records, in source order and file
   order within a source (the trainer shuffles), each with ``meta.mix_source``; a repeated
   record's copies get ids ``{id}-r2``, ``{id}-r3``, ... The output is written atomically.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zhtune.data.convert import (
    RejectWriter,
    atomic_open,
    default_rejects_path,
    dump_line,
    rejects_exit_status,
)
from zhtune.data.inputs import InputOptions
from zhtune.data.readers import expand_inputs
from zhtune.data.registry import iter_sources, resolve_sources
from zhtune.errors import ZhtuneError
from zhtune.flags import flag


@dataclass
class MixOptions:
    """Options of ``zhtune data mix`` (besides the sources and the output)."""

    total: int = 0
    """Records in the output (0: the most possible without repeating any source's records)."""
    seed: int = 0
    """Seed of the per-record ranking: the same seed picks the same records."""
    allow_repeat: bool = False
    """Let a source smaller than its share repeat records (sampling with replacement) instead of failing."""
    registry: str = ""
    """Dataset registry YAML to look source names up in first (then ./datasets.yaml, the shipped one)."""
    reading: InputOptions = flag(default_factory=InputOptions, skip=("map",))
    """--format (of every source file; registered names bring their own), --rejects,
    --allow-rejects (rejected records are never mixed in) and --progress."""


@dataclass
class SourceSpec:
    """One ``SOURCE:WEIGHT`` argument."""

    name: str
    """The source as written: a path, glob or registered name (also ``meta.mix_source``)."""
    weight: float


@dataclass
class SourceStats:
    """What one source had and gave."""

    name: str
    weight: float
    """The normalised weight (share asked for)."""
    available: int = 0
    """Valid records read."""
    rejected: int = 0
    quota: int = 0
    """Records taken (counting repeats)."""


def parse_source(spec: str) -> SourceSpec:
    """``"a.jsonl:0.7"`` -> ``SourceSpec("a.jsonl", 0.7)``; ``"a.jsonl"`` has weight 1.

    The weight is after the last colon, and only if that part is a number (so ``C:\\data.json``
    or ``a:b.jsonl`` stay paths).
    """
    name, sep, tail = spec.rpartition(":")
    if sep and name:
        try:
            weight = float(tail)
        except ValueError:
            return SourceSpec(spec, 1.0)
        if not math.isfinite(weight) or weight <= 0:
            raise ZhtuneError(f"source {spec!r}: the weight must be a number > 0, got {tail!r}")
        return SourceSpec(name, weight)
    return SourceSpec(spec, 1.0)


def rank(seed: int, source: str, record_id: str) -> int:
    """A record's 64-bit rank: the lower, the earlier it is picked. Depends on nothing else."""
    digest = hashlib.blake2b(f"{seed}\0{source}\0{record_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def split_total(total: int, weights: list[float]) -> list[int]:
    """``total`` split in proportion to ``weights`` (largest remainders; ties to the earlier source)."""
    exact = [total * w / sum(weights) for w in weights]
    quotas = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - quotas[i]), i))
    for i in by_remainder[: total - sum(quotas)]:
        quotas[i] += 1
    return quotas


def largest_total(available: list[int], weights: list[float]) -> int:
    """The largest output size whose quotas (:func:`split_total`) fit every source without repeats."""
    shares = [w / sum(weights) for w in weights]
    total = min(math.floor(a / s + 1e-9) for a, s in zip(available, shares))
    while total > 0 and any(q > a for q, a in zip(split_total(total, weights), available)):
        total -= 1
    return total


def pick_counts(ranks: Any, quota: int) -> Any:
    """How many times each record (by position) is taken: the ``quota`` lowest ranks, repeating
    every record ``quota // n`` times first when ``quota > n``."""
    import numpy as np

    n = len(ranks)
    counts = np.full(n, quota // n if n else 0, dtype=np.int64)
    rest = quota - int(counts.sum())
    if rest:
        order = np.argsort(ranks, kind="stable")
        counts[order[:rest]] += 1
    return counts


def _sources(specs: list[SourceSpec], opts: MixOptions) -> list[Any]:

    return resolve_sources([s.name for s in specs], opts.registry or None, opts.reading.format)


def format_table(stats: list[SourceStats], total: int) -> str:
    """The summary: per source, records available, taken, the share asked for and obtained."""
    width = max(len("source"), *(len(s.name) for s in stats))
    lines = [f"  {'source':<{width}}  {'available':>10} {'taken':>10} {'weight':>7} {'share':>7}"]
    for s in stats:
        share = s.quota / total if total else 0.0
        repeat = f"  ({s.quota / s.available:.2f}x, repeated)" if s.quota > s.available else ""
        lines.append(
            f"  {s.name:<{width}}  {s.available:>10,} {s.quota:>10,} {s.weight:>7.1%} {share:>7.1%}{repeat}"
        )
    lines.append(f"  {'total':<{width}}  {sum(s.available for s in stats):>10,} {total:>10,}")
    return "\n".join(lines)


def mix(specs: list[str], output: str, opts: MixOptions) -> int:
    """``zhtune data mix``: write the mixture of ``specs`` to ``output``; returns the exit status
    (1 if records were rejected and not ``opts.reading.allow_rejects``)."""
    import numpy as np
    from tqdm import tqdm


    if not specs:
        raise ZhtuneError(
            "give at least one source, e.g. zhtune data mix a.jsonl:0.7 b.jsonl:0.3 -o mix.jsonl"
        )
    if opts.total < 0:
        raise ZhtuneError(f"--total must be >= 0, got {opts.total}")
    parsed = [parse_source(s) for s in specs]
    names = [p.name for p in parsed]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ZhtuneError(f"source {dup!r} is given twice; give it once with the summed weight")
    sources = _sources(parsed, opts)
    for src in sources:
        if any(os.path.abspath(p) == os.path.abspath(output) for p in expand_inputs(src.paths)):
            raise ZhtuneError(f"output {output} is also an input; choose another output path")
    weight_sum = sum(p.weight for p in parsed)
    stats = [SourceStats(p.name, p.weight / weight_sum) for p in parsed]
    bar_args: dict[str, Any] = {
        "unit": " rec",
        "file": sys.stderr,
        "disable": not opts.reading.progress,
        "mininterval": 0.5,
    }

    # -- pass 1: ranks ---------------------------------------------------------------------------
    rejects = opts.reading.rejects_path()
    rejects_path = rejects or default_rejects_path(output)
    all_ranks = []
    with RejectWriter(rejects_path) as rejected, tqdm(desc="mix: read", **bar_args) as bar:
        for src, st in zip(sources, stats):
            ranks = array("Q")  # 8 bytes per record
            for o in _outcomes(src):
                bar.update()
                if o.record is None:
                    rejected.write(o)
                    st.rejected += 1
                else:
                    ranks.append(rank(opts.seed, src.label, str(o.record["id"])))
            st.available = len(ranks)
            all_ranks.append(np.frombuffer(ranks, dtype=np.uint64) if ranks else np.zeros(0, np.uint64))
    if rejected.count == 0 and rejects is None:
        Path(rejects_path).unlink(missing_ok=True)
    empty = [s.name for s in stats if s.available == 0]
    if empty:
        raise ZhtuneError(f"source {empty[0]!r} has no usable records (see {rejects_path})")

    # -- quotas ----------------------------------------------------------------------------------
    available = [s.available for s in stats]
    weights = [s.weight for s in stats]
    total = opts.total or largest_total(available, weights)
    for st, q in zip(stats, split_total(total, weights)):
        st.quota = q
    short = [s for s in stats if s.quota > s.available]
    if short and not opts.allow_repeat:
        s = short[0]
        raise ZhtuneError(
            f"source {s.name!r} has {s.available:,} records but its share ({s.weight:.1%}) of --total "
            f"{total:,} is {s.quota:,}. Lower --total (the most without repeats is "
            f"{largest_total(available, weights):,}), or pass --allow-repeat to sample it with replacement."
        )

    # -- pass 2: write ---------------------------------------------------------------------------
    with atomic_open(output) as out, tqdm(desc="mix: write", total=sum(available), **bar_args) as bar:
        for src, st, ranks in zip(sources, stats, all_ranks):
            counts = pick_counts(ranks, st.quota)
            position = 0
            for o in _outcomes(src):
                if o.record is None:
                    continue
                bar.update()
                for k in range(int(counts[position])):
                    record = dict(o.record)
                    if k:
                        record["id"] = f"{record['id']}-r{k + 1}"
                    record["meta"] = {**record.get("meta", {}), "mix_source": src.label}
                    out.write(dump_line(record))
                position += 1
            if position != st.available:
                raise ZhtuneError(
                    f"source {src.label!r} changed while mixing ({st.available} then {position} records)"
                )
    print(f"wrote {total:,} records to {output} (seed {opts.seed})", file=sys.stderr)
    print(format_table(stats, total), file=sys.stderr)
    if rejected.count:
        print(f"rejected {rejected.count:,} input record(s) -> {rejects_path}", file=sys.stderr)
    return rejects_exit_status(rejected.count, opts.reading.allow_rejects)


def _outcomes(src: Any) -> Any:

    return iter_sources([src])
