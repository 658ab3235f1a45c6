"""GGUF files as models: dequantized once through transformers' GGUF support, then cached.

Many users hold their models as GGUF files (llama.cpp, Ollama). Anywhere zhtune takes a model
(``model:`` in a training config, the RUN / model argument of chat, predict, serve, eval,
export, webui), a ``.gguf`` file works: transformers reads its weights (dequantized), its
tokenizer and its chat template (``gguf`` is needed: ``pip install 'zhtune[gguf]'``). The result
is written once as a plain Hugging Face directory under the cache, so a run made from the file
reloads in a second rather than dequantizing again:

``$ZHTUNE_CACHE/gguf/<file stem>-<key>/`` (``ZHTUNE_CACHE`` defaults to ``~/.cache/zhtune``),
where ``key`` hashes the file's absolute path, size and modification time, so a changed file is
converted again. Weights are stored in float32 for files up to 1 GiB (the dequantized values
exactly) and in bfloat16 above (half the disk for 7B-class models).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

from zhtune.errors import ZhtuneError

MANIFEST = "zhtune_gguf.json"
"""Written last into a cached conversion: the GGUF it came from, its size, dtype and parameters."""
FP32_UP_TO = 1 << 30
"""GGUF files up to this many bytes are stored in float32, larger ones in bfloat16."""


def is_gguf(path: str | Path) -> bool:
    """True if ``path`` names a GGUF file (by suffix; it need not exist)."""
    return str(path).lower().endswith(".gguf")


def cache_root() -> Path:
    """zhtune's cache directory: ``$ZHTUNE_CACHE``, else ``~/.cache/zhtune``."""
    return Path(os.environ.get("ZHTUNE_CACHE") or Path.home() / ".cache" / "zhtune")


def cache_dir_for(path: str | Path) -> Path:
    """Where the conversion of the GGUF file ``path`` is (or will be) cached."""
    p = Path(path).resolve()
    st = p.stat()
    key = hashlib.sha256(f"{p}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / "gguf" / f"{p.stem}-{key}"


def gguf_model_dir(path: str | Path) -> Path:
    """A Hugging Face directory (config, weights, tokenizer with chat template) holding the model
    of the GGUF file ``path``, converted on first use and cached (see the module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise ZhtuneError(f"GGUF file not found: {p}")
    dest = cache_dir_for(p)
    if (dest / MANIFEST).is_file():
        return dest
    print(f"zhtune: dequantizing {p.name} once into {dest} ...", file=sys.stderr, flush=True)
    tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        manifest = _convert(p, tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if dest.exists():  # a conversion without its manifest was interrupted
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum(f.stat().st_size for f in dest.iterdir() if f.is_file())
    print(f"zhtune: cached {p.name} as {dest} ({size / 2**20:,.0f} MiB, {manifest['dtype']})", file=sys.stderr)
    return dest


def _convert(path: Path, out: Path) -> dict[str, object]:
    """Dequantize ``path`` with transformers and save a plain model directory in ``out``."""
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise ZhtuneError(
            f"{path}: reading GGUF files needs the 'gguf' package: pip install 'zhtune[gguf]'"
        ) from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.float32 if path.stat().st_size <= FP32_UP_TO else torch.bfloat16
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    except (ValueError, KeyError, NotImplementedError, OSError) as err:
        raise ZhtuneError(f"{path}: transformers cannot read this GGUF file: {err}") from None
    # The loaded model still says it came from GGUF (its config's quantization_config); rebuild
    # it from a clean config so the saved directory is an ordinary one.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(loaded.state_dict(), assign=True, strict=False)
    model.tie_weights()
    missing = [n for n, t in model.state_dict().items() if t.is_meta]
    if missing:
        raise ZhtuneError(f"{path}: the GGUF file has no weights for {', '.join(missing[:5])}")
    out.mkdir(parents=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return {
        "gguf": str(path.resolve()),
        "gguf_bytes": path.stat().st_size,
        "model_type": config.model_type,
        "dtype": str(dtype).removeprefix("torch."),
        "parameters": sum(t.numel() for t in model.parameters()),
        "chat_template": bool(tokenizer.chat_template),
    }
