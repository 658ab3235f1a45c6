"""Exact and near-duplicate detection for ``zhtune data clean``, streaming, keeping the first.

Two halves, so the expensive one runs in worker processes:

- :func:`fingerprint` (per record, in a worker): the normalised text's 64-bit hash (exact
  duplicates) and its MinHash signature over character shingles with the LSH band keys (near
  duplicates). MinHash is vectorised with numpy: shingle hashes by a rolling polynomial, the
  ``num_perm`` permutations as multiply-shift hashes of 64-bit words, so a record costs tens of
  microseconds, not the milliseconds of a per-shingle Python loop (datasketch's ``MinHash``).
- :class:`Deduper` (one, in the main process, records in input order): a dict of exact hashes,
  ``bands`` dicts of band keys for the LSH index, and the kept records' signatures (16 bits per
  permutation) to check each LSH candidate's estimated Jaccard similarity against the threshold.
  Memory grows with the number of *kept* records: the indexes are :class:`IntTable` s of ordinals
  into the kept ids (12 bytes a slot, at most 3/4 full: 16-32 bytes an entry per table), plus
  ``2 * num_perm`` bytes of signature per kept record.

Normalisation (both): Unicode NFKC, lower case, whitespace and punctuation removed, messages
joined with a separator, so "Hello,  World!" and "hello world" are the same text.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Characters per shingle: 5 characters is a short phrase in Chinese and about a word in English.
SHINGLE = 5
#: Permutations of the MinHash signature.
NUM_PERM = 64
#: Rows of kept signatures per storage block.
_BLOCK = 1 << 14
#: Shingle windows per block of :meth:`MinHasher.signatures` (its ``num_perm x`` uint64
#: working array stays a few MB).
_WINDOWS = 1 << 13
_NOT_WORD = re.compile(r"[\W_]+")
_SEP = "\x00"
_MASK64 = (1 << 64) - 1


def normalise(messages: list[dict[str, str]]) -> str:
    """The text duplicates are judged on: every turn NFKC-normalised, lower-cased, without
    whitespace and punctuation, joined by a separator (so turn boundaries still count)."""
    return _SEP.join(_NOT_WORD.sub("", unicodedata.normalize("NFKC", m["content"]).lower()) for m in messages)


def exact_key(text: str) -> int:
    """A 64-bit hash of ``text`` (blake2b): equal texts, equal keys, in every process."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def optimal_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """``(bands, rows)`` with ``bands * rows <= num_perm`` minimising the false-positive area
    below ``threshold`` plus the false-negative area above it of the LSH S-curve
    ``1 - (1 - s**rows)**bands`` (datasketch's choice, with equal weights)."""
    s = np.linspace(0.0, 1.0, 1001)
    best, best_err = (1, num_perm), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            p = 1.0 - (1.0 - s**r) ** b
            err = np.trapezoid(np.where(s < threshold, p, 0.0), s) + np.trapezoid(
                np.where(s >= threshold, 1.0 - p, 0.0), s
            )
            if err < best_err:
                best, best_err = (b, r), err
    return best


@dataclass(frozen=True)
class MinHasher:
    """MinHash signatures and LSH band keys, the same in every process for the same ``seed``."""

    num_perm: int = NUM_PERM
    bands: int = 8
    rows: int = 8
    shingle: int = SHINGLE
    seed: int = 1
    _a: Any = field(init=False, repr=False, compare=False)
    _b: Any = field(init=False, repr=False, compare=False)
    _band_mul: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        words = rng.integers(0, 1 << 63, size=(3, self.num_perm), dtype=np.uint64) * np.uint64(2)
        object.__setattr__(self, "_a", (words[0] | np.uint64(1))[:, None])  # odd multipliers
        object.__setattr__(self, "_b", words[1][:, None])
        object.__setattr__(self, "_band_mul", (words[2][: self.rows] | np.uint64(1)))

    def _window_hashes(self, codes: np.ndarray, k: int) -> np.ndarray:
        """64-bit hashes of every ``k``-code window of ``codes`` (``uint64``, one per start),
        a polynomial over the code points mixed by splitmix64's finaliser so nearby windows
        spread over all 64 bits."""
        n = codes.size - k + 1
        h = np.zeros(n, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for j in range(k):
                h = h * np.uint64(1_000_003) + codes[j : j + n]
            h ^= h >> np.uint64(30)
            h *= np.uint64(0xBF58476D1CE4E5B9)
            h ^= h >> np.uint64(27)
            h *= np.uint64(0x94D049BB133111EB)
            h ^= h >> np.uint64(31)
        return h

    def shingle_hashes(self, text: str) -> np.ndarray:
        """The distinct 64-bit hashes of the ``shingle``-character windows of ``text`` (the
        whole text as one window when shorter)."""
        codes = _code_points(text)
        if codes.size == 0:
            codes = np.zeros(1, dtype=np.uint64)
        return np.unique(self._window_hashes(codes, min(self.shingle, codes.size)))

    def signature(self, text: str) -> np.ndarray:
        """The MinHash signature of ``text``: for each permutation ``(a*x + b) mod 2**64``, the
        top 32 bits of its minimum over the shingle hashes (``uint32``, ``num_perm`` values)."""
        return self.signatures([text])[0]

    def signatures(self, texts: list[str]) -> np.ndarray:
        """:meth:`signature` of every text, ``(len(texts), num_perm)`` ``uint32``, computed for
        all of them together: one rolling hash over the concatenated code points (windows that
        cross a text boundary dropped), then the permutations and a segmented minimum
        (``np.minimum.reduceat``) over blocks of about :data:`_WINDOWS` windows. Costs a
        few numpy calls per block instead of about thirty per text, so short texts (chat
        records of a few hundred characters) hash several times faster than one by one."""
        out = np.empty((len(texts), self.num_perm), dtype=np.uint32)
        lens = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
        long = np.flatnonzero(lens >= self.shingle)
        for i in np.flatnonzero(lens < self.shingle):  # the whole (short) text is one shingle
            out[i] = self._minhash(self.shingle_hashes(texts[i]), [0])[:, 0]
        if long.size == 0:
            return out
        k = self.shingle
        codes = _code_points("".join(texts[i] for i in long))
        ends = np.cumsum(lens[long])
        h = self._window_hashes(codes, k)
        crossing = (
            ends[:, None] - k + np.arange(1, k)[None, :]
        ).ravel()  # starts whose window leaves its text
        keep = np.ones(h.size, dtype=bool)
        keep[crossing[crossing < h.size]] = False
        h = h[keep]
        starts = np.concatenate(([0], np.cumsum(lens[long] - k + 1)[:-1]))
        first = 0
        while first < long.size:
            last = max(first + 1, int(np.searchsorted(starts, starts[first] + _WINDOWS)))
            lo, hi = starts[first], (starts[last] if last < long.size else h.size)
            out[long[first:last]] = self._minhash(h[lo:hi], starts[first:last] - lo).T
            first = last
        return out

    def _minhash(self, hashes: np.ndarray, starts: Any) -> np.ndarray:
        """``(num_perm, len(starts))`` ``uint32``: per segment of ``hashes`` beginning at each of
        ``starts``, the top 32 bits of every permutation's minimum."""
        with np.errstate(over="ignore"):
            perm = self._a * hashes[None, :] + self._b
        return (np.minimum.reduceat(perm, starts, axis=1) >> np.uint64(32)).astype(np.uint32)

    def band_keys(self, sig: np.ndarray) -> list[int]:
        """One 64-bit key per band: the band's ``rows`` values combined by odd multipliers."""
        return self.band_keys_many(sig[None, :])[0]

    def band_keys_many(self, sigs: np.ndarray) -> list[list[int]]:
        """:meth:`band_keys` of every row of ``sigs`` (``(n, num_perm)``)."""
        rows = sigs[:, : self.bands * self.rows].astype(np.uint64).reshape(len(sigs), self.bands, self.rows)
        with np.errstate(over="ignore"):
            keys = (rows * self._band_mul[None, None, :]).sum(axis=2, dtype=np.uint64)
        return keys.tolist()


def _code_points(text: str) -> np.ndarray:
    """The code points of ``text`` as ``uint64`` (lone surrogates, which JSON can carry, kept)."""
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.uint64)


@dataclass(frozen=True)
class Fingerprint:
    """What the main process needs to judge one record: its exact key, and for near-duplicate
    detection its band keys and its signature truncated to 16 bits per permutation."""

    exact: int | None = None
    bands: list[int] | None = None
    sig16: bytes | None = None


def fingerprint(text: str, hasher: MinHasher | None, exact: bool) -> Fingerprint:
    """The :class:`Fingerprint` of one :func:`normalise` d text (``hasher`` None: no
    near-duplicate part; ``exact`` False: no exact key)."""
    return fingerprints([text], hasher, exact)[0]


def fingerprints(
    texts: list[str],
    hasher: MinHasher | None,
    exact: bool,
    skip_minhash: Collection[int] = (),
    keys: list[int] | None = None,
) -> list[Fingerprint]:
    """:func:`fingerprint` of every text, the MinHash signatures computed together
    (:meth:`MinHasher.signatures`). Texts whose position is in ``skip_minhash`` get only their
    exact key (a caller that knows them for exact duplicates saves the signature); ``keys`` are
    their :func:`exact_key` s when the caller has them already."""
    if keys is None or not exact:
        keys = [exact_key(t) if exact else None for t in texts]
    if hasher is None:
        return [Fingerprint(key) for key in keys]
    todo = [i for i in range(len(texts)) if i not in skip_minhash]
    sigs = hasher.signatures([texts[i] for i in todo])
    bands = hasher.band_keys_many(sigs)
    sig16 = (sigs >> np.uint32(16)).astype(np.uint16)
    out = [Fingerprint(key) for key in keys]
    for row, i in enumerate(todo):
        out[i] = Fingerprint(keys[i], bands[row], sig16[row].tobytes())
    return out


@dataclass
class Verdict:
    """A duplicate's judgement: which step found it, the id it duplicates, the similarity."""

    step: str
    duplicate_of: str
    similarity: float


class IntTable:
    """A map of 64-bit keys to ordinals in two numpy arrays (open addressing, linear probing,
    at most 3/4 full): 16-32 bytes an entry, where a Python ``dict[int, int]`` takes about 100
    (two int objects and a slot). Keys are hashes already, so their low bits pick the slot."""

    def __init__(self, capacity: int = 1 << 12) -> None:
        self._set_arrays(np.zeros(capacity, dtype=np.uint64), np.zeros(capacity, dtype=np.int32))
        self.size = 0

    def _set_arrays(self, keys: np.ndarray, values: np.ndarray) -> None:
        self._keys, self._values = keys, values  # keys: 0 marks an empty slot (key 0 is stored as 1)
        # one element at a time through memoryviews: Python ints, not numpy scalars (3x faster)
        self._k, self._v = memoryview(keys), memoryview(values)
        self._mask = len(keys) - 1

    def _slot(self, key: int) -> int:
        """The slot holding ``key``, or the empty slot where it would go."""
        keys, mask = self._k, self._mask
        i = key & mask
        while True:
            k = keys[i]
            if k == key or k == 0:
                return i
            i = (i + 1) & mask

    def get(self, key: int) -> int | None:
        """The ordinal stored for ``key``, or None."""
        i = self._slot(key or 1)
        return self._v[i] if self._k[i] else None

    def setdefault(self, key: int, value: int) -> None:
        """Store ``value`` for ``key`` unless it has one (the first kept record wins)."""
        key = key or 1
        i = self._slot(key)
        if self._k[i]:
            return
        self._k[i], self._v[i] = key, value
        self.size += 1
        if 4 * self.size > 3 * len(self._keys):
            self._grow()

    def _grow(self) -> None:
        """Twice the slots, every entry placed again (vectorised by probing rounds)."""
        used = self._keys != 0
        keys, values = self._keys[used], self._values[used]
        self._set_arrays(
            np.zeros(2 * len(self._keys), dtype=np.uint64), np.zeros(2 * len(self._keys), dtype=np.int32)
        )
        slots = keys & np.uint64(self._mask)
        while len(keys):  # each round places the first key aimed at each free slot
            slots = slots.astype(np.int64)
            free = self._keys[slots] == 0
            first = np.zeros(len(keys), dtype=bool)
            _, at = np.unique(slots, return_index=True)
            first[at] = True
            place = free & first
            self._keys[slots[place]], self._values[slots[place]] = keys[place], values[place]
            keys, values, slots = keys[~place], values[~place], (slots[~place] + 1) & self._mask

    def __len__(self) -> int:
        return self.size


class Deduper:
    """Streaming dedup index: :meth:`check` each record in order; the first of a group is kept.

    ``threshold`` None turns near-duplicate detection off; ``exact`` False turns exact off.
    ``clusters[step]`` counts, per kept record that has duplicates found by ``step``
    (``exact-dup`` or ``near-dup``), how many. Indexes are :class:`IntTable` s of ordinals into
    the kept records' ids (and 16-bit signatures, in blocks).
    """

    def __init__(self, exact: bool = True, threshold: float | None = 0.85, hasher: MinHasher | None = None):
        self.exact = exact
        self.threshold = threshold
        self.hasher = hasher
        self._exact = IntTable()
        self._near_keys: dict[int, Verdict] = {}
        self._bands: list[IntTable] = [IntTable() for _ in range(hasher.bands)] if hasher else []
        self._ids: list[str] = []
        self._blocks: list[np.ndarray] = []
        self.clusters: dict[str, Counter[str]] = {"exact-dup": Counter(), "near-dup": Counter()}

    def _sig(self, ordinal: int) -> np.ndarray:
        return self._blocks[ordinal // _BLOCK][ordinal % _BLOCK]

    def _keep(self, rid: str, sig16: np.ndarray | None) -> int:
        """Add a kept record (and its signature, for near-duplicate checks); its ordinal."""
        ordinal = len(self._ids)
        if self.hasher is not None and ordinal % _BLOCK == 0:
            self._blocks.append(np.zeros((_BLOCK, self.hasher.num_perm), dtype=np.uint16))
        if sig16 is not None:
            self._blocks[-1][ordinal % _BLOCK] = sig16
        self._ids.append(rid)
        return ordinal

    def check(self, rid: str, fp: Fingerprint) -> Verdict | None:
        """None if the record is kept (and indexed), else the :class:`Verdict` against the
        earlier record it duplicates. A near duplicate's exact key is remembered with its verdict,
        so a later copy of it gets the same verdict without a signature: workers rely on that to
        skip the MinHash of texts they have seen."""
        exact = self.exact and fp.exact is not None
        if exact:
            kept = self._exact.get(fp.exact)
            if kept is not None:
                self.clusters["exact-dup"][self._ids[kept]] += 1
                return Verdict("exact-dup", self._ids[kept], 1.0)
            near = self._near_keys.get(fp.exact)
            if near is not None:
                self.clusters["near-dup"][near.duplicate_of] += 1
                return near
        near_check = self.threshold is not None and fp.bands is not None and fp.sig16 is not None
        verdict = self._near(fp) if near_check else None
        if verdict is not None:
            self.clusters["near-dup"][verdict.duplicate_of] += 1
            if exact:
                self._near_keys[fp.exact] = verdict
            return verdict
        if not (exact or near_check):
            return None
        ordinal = self._keep(rid, np.frombuffer(fp.sig16, dtype=np.uint16) if near_check else None)
        if near_check:
            for table, key in zip(self._bands, fp.bands):
                table.setdefault(key, ordinal)
        if exact:
            self._exact.setdefault(fp.exact, ordinal)
        return None

    def remember(self, verdict: Verdict, exact: int | None) -> None:
        """Take in a duplicate judged earlier (by an interrupted run being resumed): it counts in
        its cluster and, for a near duplicate, its exact key ``exact`` gets the verdict, as in
        :meth:`check`."""
        self.clusters[verdict.step][verdict.duplicate_of] += 1
        if verdict.step == "near-dup" and self.exact and exact is not None:
            self._near_keys.setdefault(exact, verdict)

    def _near(self, fp: Fingerprint) -> Verdict | None:
        """The near-duplicate verdict against the indexed kept records, if any."""
        sig = np.frombuffer(fp.sig16, dtype=np.uint16)
        candidates = {c for table, key in zip(self._bands, fp.bands) if (c := table.get(key)) is not None}
        if not candidates:
            return None
        cands = sorted(candidates)
        sims = (np.stack([self._sig(c) for c in cands]) == sig[None, :]).mean(axis=1)
        best = int(np.argmax(sims))
        if sims[best] < self.threshold:
            return None
        return Verdict("near-dup", self._ids[cands[best]], round(float(sims[best]), 3))

    def cluster_stats(self, step: str) -> tuple[int, int]:
        """``(clusters, largest)`` for ``step``: kept records with at least one duplicate, and the
        size of the largest group (the kept record plus its duplicates; 0 when there are none)."""
        counts = self.clusters[step]
        return len(counts), (max(counts.values()) + 1 if counts else 0)
