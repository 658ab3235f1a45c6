"""One way to spread per-chunk work over processes: forked workers, results in input order."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")

#: Chunks in flight per worker (bounds memory: the input is never read further ahead).
WINDOW_PER_WORKER = 4
_FN: Callable[[Any], Any] | None = None


def _call(item: Any) -> Any:
    assert _FN is not None
    return _FN(item)


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """``fn`` of every item, in input order: in this process (``workers <= 1``), or in
    ``workers`` forked processes with at most ``workers * WINDOW_PER_WORKER`` items in flight.

    The workers are forked, so ``fn`` (a bound method, a closure) and what it holds (a loaded
    tokenizer) reach them without pickling; items and results are pickled. Not re-entrant: one
    parallel map at a time per process.
    """
    global _FN
    if workers <= 1:
        yield from map(fn, items)
        return
    import multiprocessing

    _FN = fn
    with _tokenizers_single_threaded(), multiprocessing.get_context("fork").Pool(workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.apply_async(_call, (item,)))
            if len(pending) >= workers * WINDOW_PER_WORKER:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


@contextmanager
def _tokenizers_single_threaded() -> Iterator[None]:
    """Hugging Face tokenizers run one thread per worker while the workers live (processes are
    the parallelism; forked Rust thread pools would otherwise print a warning and be turned off)."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before
