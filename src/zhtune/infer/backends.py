"""Which engine generates for ``serve`` and ``predict``: zhtune's own (``native``: batched
PyTorch decoding of the run as loaded by transformers) or ``llamacpp`` (llama.cpp on a GGUF file
of the run, :mod:`zhtune.infer.llamacpp`).

With ``llamacpp`` the GGUF file is ``--gguf FILE``, or a GGUF type (``f16`` by default, or
``q8_0``, ``q4_k_m``, ...) that names: the file of that type in an export directory made with
``zhtune export --gguf``; else the run exported on the fly by ``zhtune export`` and cached in
``RUN/gguf/`` (for a plain model directory, in ``$ZHTUNE_CACHE/gguf-export/``), made again when
the weights are newer than the cached file.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zhtune.errors import ZhtuneError
from zhtune.infer.export import ExportOptions, export
from zhtune.infer.gguf_export import GGUF_TYPES, parse_types
from zhtune.infer.llamacpp import LlamaCppModel, require_llama_cpp
from zhtune.models.gguf import cache_root
from zhtune.models.loading import load_tokenizer_and_template
from zhtune.rundir import RunDir

ENGINES = ("native", "llamacpp")
"""``--engine`` values."""
DEFAULT_GGUF = "f16"


@dataclass
class EngineOptions:
    """Which engine generates (``serve``, ``predict``)."""

    engine: str = "native"
    """native (zhtune's batched PyTorch decoding) or llamacpp (llama.cpp on the run's GGUF file; needs the llamacpp extra)."""
    gguf: str = ""
    """With --engine llamacpp: a .gguf file, or a GGUF type to export the run to on the fly and cache in RUN/gguf/ (f16 when empty; q8_0, q4_k_m, ...)."""
    threads: int = 0
    """With --engine llamacpp: CPU threads (0: one per core this process may use)."""
    context: int = 0
    """With --engine llamacpp: KV cache tokens per sequence, allocated up front (0: serve 2048 or the model's context if shorter; predict the longest prompt plus --max-new-tokens)."""
    llama_cpp: str = ""
    """With --engine llamacpp: a llama.cpp checkout whose converter makes the GGUF file (default: llama-cpp-python's)."""

    def check(self) -> None:
        """Refuse an unknown engine, llama.cpp flags without it, or a missing llama-cpp-python."""
        if self.engine not in ENGINES:
            raise ZhtuneError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.engine == "native" and (self.gguf or self.threads or self.context or self.llama_cpp):
            raise ZhtuneError("--gguf, --threads, --context and --llama-cpp are for --engine llamacpp")
        for name in ("threads", "context"):
            if getattr(self, name) < 0:
                raise ZhtuneError(f"--{name} must be 0 or more, got {getattr(self, name)}")
        if self.engine == "llamacpp":
            require_llama_cpp("--engine llamacpp")
            if self.gguf and not self.gguf.lower().endswith(".gguf"):
                parse_types(self.gguf)


def cached_gguf(run: Path, gguf_type: str) -> tuple[Path, float]:
    """Where the on-the-fly export of ``run`` to ``gguf_type`` is cached, and the time its
    source last changed (a cached file older than that is made again)."""
    run_dir = RunDir(run)
    if run_dir.is_run:
        return run_dir.gguf_file(gguf_type), run_dir.weights_mtime()
    key = hashlib.sha256(str(run.resolve()).encode()).hexdigest()[:12]
    source = (
        max((f.stat().st_mtime for f in run.iterdir() if f.is_file()), default=0.0) if run.is_dir() else 0.0
    )
    return cache_root() / "gguf-export" / f"{run.resolve().name}-{key}-{gguf_type}.gguf", source


def resolve_gguf(run: str, spec: str = "", llama_cpp: str = "") -> Path:
    """The GGUF file llama.cpp runs for ``run`` (see the module doc)."""
    if spec.lower().endswith(".gguf"):
        if not Path(spec).is_file():
            raise ZhtuneError(f"--gguf {spec}: file not found")
        return Path(spec)
    if run.lower().endswith(".gguf") and Path(run).is_file() and not spec:
        return Path(run)
    gguf_type = parse_types(spec or DEFAULT_GGUF)[0].name
    path = Path(run)
    if RunDir(path).is_export:
        files = (RunDir(path).export_manifest().get("gguf") or {}).get("files") or []
        found = [f["file"] for f in files if f["type"] == gguf_type]
        if found:
            return path / found[0]
    target, source_mtime = cached_gguf(path, gguf_type)
    if target.is_file() and target.stat().st_mtime >= source_mtime:
        return target
    print(f"zhtune: exporting {run} to GGUF {gguf_type} for llama.cpp (cached in {target})", file=sys.stderr)
    work = target.parent / f".{target.stem}.tmp"
    shutil.rmtree(work, ignore_errors=True)
    try:
        out = export(run, str(work), ExportOptions(gguf=gguf_type, overwrite=True, llama_cpp=llama_cpp))
        made = out / f"{out.name}-{gguf_type}.gguf"
        made.replace(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def open_llamacpp(
    run: str, opts: EngineOptions, max_sequences: int, trust_remote_code: bool = False
) -> tuple[LlamaCppModel, Any, str]:
    """``(llama.cpp model, tokenizer, template name)`` for ``run``: the tokenizer and template are
    the run's (prompts are laid out and tokenized by zhtune), the weights the GGUF file's."""
    tokenizer, template = load_tokenizer_and_template(run, trust_remote_code)
    return llamacpp_model(run, opts, max_sequences, tokenizer), tokenizer, template


def llamacpp_model(
    run: str, opts: EngineOptions, max_sequences: int, tokenizer: Any, context: int = 0
) -> LlamaCppModel:
    """The run's GGUF file (:func:`resolve_gguf`) in llama.cpp, room for ``max_sequences`` sequences of
    ``opts.context`` tokens (else ``context``, else the default), checked against the tokenizer."""
    path = resolve_gguf(run, opts.gguf, opts.llama_cpp)
    model = LlamaCppModel(
        path, max_sequences=max_sequences, context=opts.context or context, threads=opts.threads
    )
    if model.vocab_size < len(tokenizer):
        model.close()
        raise ZhtuneError(
            f"{path} has {model.vocab_size} tokens but {run}'s tokenizer {len(tokenizer)}: not this run's GGUF"
        )
    return model


__all__ = [
    "DEFAULT_GGUF",
    "ENGINES",
    "GGUF_TYPES",
    "EngineOptions",
    "llamacpp_model",
    "open_llamacpp",
    "resolve_gguf",
]
