"""GGUF files for llama.cpp and Ollama, made by llama.cpp's own tools.

zhtune writes no GGUF itself. A merged model directory goes through llama.cpp's converter
(``convert_hf_to_gguf.py``) to a float or ``q8_0`` file, and the other types are made from a
float file by llama.cpp's quantizer (``llama_model_quantize``, through llama-cpp-python, in a
child process). The converter comes from, in this order:

1. ``--llama-cpp DIR``, a llama.cpp checkout (its ``gguf-py`` is used with it);
2. ``$ZHTUNE_LLAMA_CPP``, the same;
3. the source distribution of llama-cpp-python on PyPI (the version installed, else
   :data:`LLAMA_CPP_PYTHON`), which ships llama.cpp's converter and ``gguf-py``: fetched once with
   pip and cached in ``$ZHTUNE_CACHE/llama.cpp/<version>/`` (only those files are kept).

The converter's refusals become :class:`ZhtuneError` naming what it refused: an architecture
it has no class for, or a tokenizer whose pre-tokenizer it does not know.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from zhtune.errors import ZhtuneError
from zhtune.models.gguf import cache_root

LLAMA_CPP_PYTHON = "0.3.36"
"""llama-cpp-python version whose sdist supplies the converter when none is installed."""
CONVERTER = "convert_hf_to_gguf.py"
KEPT = (CONVERTER, "conversion/", "gguf-py/")
"""What is kept of the sdist's ``vendor/llama.cpp/``: the converter, its model classes, gguf-py."""


@dataclass(frozen=True)
class GgufType:
    """One GGUF weight type and the llama.cpp tool that makes it."""

    name: str
    converter: str | None = None
    """The converter's ``--outtype`` when it writes this type itself."""
    ftype: str | None = None
    """The quantizer's ``LLAMA_FTYPE_MOSTLY_*`` suffix when it is made from a float file."""
    bits: float = 16.0
    """About how many bits one weight takes (for size estimates in messages)."""


_QUANTIZED = {
    "q4_0": 4.5, "q4_1": 5.0, "q5_0": 5.5, "q5_1": 6.0, "q2_k": 2.6, "q3_k_s": 3.4, "q3_k_m": 3.9,
    "q3_k_l": 4.3, "q4_k_s": 4.6, "q4_k_m": 4.9, "q5_k_s": 5.5, "q5_k_m": 5.7, "q6_k": 6.6,
    "iq4_nl": 4.5, "iq4_xs": 4.3,
}  # fmt: skip
GGUF_TYPES: dict[str, GgufType] = {
    "f32": GgufType("f32", converter="f32", bits=32),
    "f16": GgufType("f16", converter="f16"),
    "bf16": GgufType("bf16", converter="bf16"),
    "q8_0": GgufType("q8_0", converter="q8_0", bits=8.5),
    **{name: GgufType(name, ftype=name.upper(), bits=bits) for name, bits in _QUANTIZED.items()},
}
"""The types ``--gguf`` takes: the converter's own, then llama.cpp's quantizer types."""


def parse_types(spec: str) -> list[GgufType]:
    """``"f16,q4_k_m"`` -> the types, in order, each once; unknown names raise."""
    names = [s.strip().lower() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in GGUF_TYPES]
    if unknown or not names:
        raise ZhtuneError(
            f"--gguf: unknown type {', '.join(unknown) or repr(spec)}; known: {', '.join(GGUF_TYPES)}"
        )
    return [GGUF_TYPES[n] for n in dict.fromkeys(names)]


def intermediate(types: list[GgufType]) -> GgufType:
    """The float file the quantized types are made from: the first float type asked for, else f16."""
    return next((t for t in types if t.converter in ("f32", "f16", "bf16")), GGUF_TYPES["f16"])


# --------------------------------------------------------------------------------------------
# Where the converter comes from
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Converter:
    """llama.cpp's converter script and the directory of its ``gguf`` package."""

    script: Path
    gguf_py: Path | None
    origin: str
    """Where it came from, for messages: a checkout, or the sdist of a llama-cpp-python version."""


def find_converter(llama_cpp_dir: str = "", fetch: bool = True) -> Converter:
    """The converter of ``llama_cpp_dir`` (or ``$ZHTUNE_LLAMA_CPP``), else of the cached
    llama-cpp-python sdist (fetched with pip if ``fetch`` and missing)."""
    given = llama_cpp_dir or os.environ.get("ZHTUNE_LLAMA_CPP", "")
    if given:
        root = Path(given).expanduser()
        if not (root / CONVERTER).is_file():
            raise ZhtuneError(
                f"{root} has no {CONVERTER}: --llama-cpp (or ZHTUNE_LLAMA_CPP) must name a llama.cpp "
                "checkout (https://github.com/ggml-org/llama.cpp)"
            )
        gguf_py = root / "gguf-py"
        return Converter(root / CONVERTER, gguf_py if gguf_py.is_dir() else None, f"llama.cpp at {root}")
    version = installed_llama_cpp_python() or LLAMA_CPP_PYTHON
    root = cache_root() / "llama.cpp" / version
    if not (root / CONVERTER).is_file():
        if not fetch:
            raise ZhtuneError(f"llama.cpp's converter is not cached in {root}")
        fetch_converter(version, root)
    return Converter(root / CONVERTER, root / "gguf-py", f"llama-cpp-python {version}'s sdist")


def installed_llama_cpp_python() -> str | None:
    """The installed llama-cpp-python version, or None."""
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        return None


def fetch_converter(version: str, root: Path) -> None:
    """Download llama-cpp-python ``version``'s sdist with pip and keep its converter in ``root``."""
    print(
        f"fetching llama.cpp's converter: the llama-cpp-python {version} sdist (pip download)",
        file=sys.stderr,
    )
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"llama-cpp-python=={version}", "-d", tmp]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if done.returncode != 0 or not archives:
            raise ZhtuneError(
                f"could not download llama-cpp-python {version}'s source (for llama.cpp's converter): "
                f"{(done.stderr or done.stdout).strip()[-500:]}\nOr pass --llama-cpp DIR (a llama.cpp checkout)"
            )
        staged = Path(tmp) / "converter"
        extract_converter(archives[0], staged)
        shutil.rmtree(root, ignore_errors=True)
        staged.rename(root)


def extract_converter(archive: Path, into: Path) -> None:
    """The converter files (:data:`KEPT`) of a llama-cpp-python sdist, into ``into``."""
    with tarfile.open(archive) as tar:
        members = []
        for m in tar.getmembers():
            _, _, rel = m.name.partition("/vendor/llama.cpp/")
            if rel and (m.isfile() or m.isdir()) and any(rel == k or rel.startswith(k) for k in KEPT):
                m.name = rel
                members.append(m)
        if not any(m.name == CONVERTER for m in members):
            raise ZhtuneError(f"{archive.name} has no vendor/llama.cpp/{CONVERTER}")
        tar.extractall(into, members=members, filter="data")


# --------------------------------------------------------------------------------------------
# Converting and quantizing
# --------------------------------------------------------------------------------------------
def convert(converter: Converter, model_dir: Path, out: Path, outtype: str) -> None:
    """Run llama.cpp's converter on ``model_dir`` (a Hugging Face directory) into ``out``."""
    env = dict(os.environ)
    if converter.gguf_py is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(converter.gguf_py), env.get("PYTHONPATH")]))
    cmd = [sys.executable, str(converter.script), str(model_dir), "--outfile", str(out), "--outtype", outtype]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode == 0 and out.is_file():
        return
    raise ZhtuneError(converter_error(done.stdout + done.stderr, converter))


def converter_error(log: str, converter: Converter) -> str:
    """What to tell the user when the converter failed, from its log."""
    for line in log.splitlines():
        if " is not supported" in line and "Model " in line:
            arch = line.split("Model ", 1)[1].split(" is not supported")[0]
            return (
                f"llama.cpp's converter ({converter.origin}) cannot convert the {arch} architecture to "
                "GGUF; a newer llama.cpp may: pass --llama-cpp DIR (a recent checkout)"
            )
    if "pre-tokenizer was not recognized" in log:
        return (
            f"llama.cpp's converter ({converter.origin}) does not know this tokenizer's pre-tokenizer "
            "(it recognizes the tokenizers of published models by a hash); a newer llama.cpp may: pass "
            "--llama-cpp DIR"
        )
    tail = "\n".join(log.strip().splitlines()[-15:])
    return f"llama.cpp's converter ({converter.origin}) failed:\n{tail}"


def quantize(source: Path, out: Path, gguf_type: GgufType, threads: int = 0) -> None:
    """Make ``out`` from the float GGUF ``source`` with llama.cpp's quantizer (a child process:
    llama.cpp aborts the process on an error)."""
    from zhtune.infer.llamacpp import require_llama_cpp

    require_llama_cpp("--gguf " + gguf_type.name)
    cmd = [sys.executable, "-m", "zhtune.infer.llamacpp", "quantize", str(source), str(out),
           str(gguf_type.ftype), str(threads)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not out.is_file():
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise ZhtuneError(f"llama.cpp's quantizer failed making {gguf_type.name} from {source.name}:\n{tail}")


def write_gguf(
    model_dir: Path, out_dir: Path, stem: str, types: list[GgufType], converter: Converter
) -> list[Path]:
    """Every type of ``types`` as ``out_dir/<stem>-<type>.gguf`` from the Hugging Face directory
    ``model_dir``; quantized types come from one float file (:func:`intermediate`), kept only
    if asked for. Returns the files, in the order asked."""
    files = {t.name: out_dir / f"{stem}-{t.name}.gguf" for t in types}
    base = intermediate(types)
    base_file = files.get(base.name) or out_dir / f".{stem}-{base.name}.tmp.gguf"
    try:
        for t in types:
            if t.converter is not None:
                print(f"  GGUF {t.name}: llama.cpp's converter", file=sys.stderr, flush=True)
                convert(converter, model_dir, files[t.name], t.converter)
        for t in types:
            if t.ftype is not None:
                if not base_file.is_file():
                    convert(converter, model_dir, base_file, str(base.converter))
                print(
                    f"  GGUF {t.name}: llama.cpp's quantizer, from {base.name}", file=sys.stderr, flush=True
                )
                quantize(base_file, files[t.name], t)
    finally:
        if base.name not in files:
            base_file.unlink(missing_ok=True)
    return [files[t.name] for t in types]
