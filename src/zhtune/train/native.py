"""zhtune's C++ kernels (``csrc/``), built on first use on this machine and cached.

Two libraries: ``csrc/cpu_attention.cpp``, attention's forward and backward for bf16 training on
a CPU with AMX (see :mod:`zhtune.train.attention`), and ``csrc/cpu_ops.cpp``, the elementwise
kernels of bf16 training (AVX-512 with bf16): the loss's cross-entropy (:mod:`zhtune.train.loss`),
RMSNorm, SwiGLU and a transpose (:mod:`zhtune.train.fused`), the rotary embedding
(:mod:`zhtune.train.rope`); both include ``csrc/vnni.h`` and ``csrc/vec_math.h``.
Each is built with the C++ compiler (``$CXX``, else g++), against the installed torch's headers
and libraries (~7 s on two cores), into
``<cache>/native/<name>-<environment>-<key>.so``, the key covering the source (and the headers), torch's version, the compiler
and the flags: later processes load it at once. The build is written atomically (processes of one
run may build at once) and replaces the older builds of the same torch installation (each
environment keeps its own). Where it cannot be built or loaded (no compiler, another CPU, another
torch) :func:`load` says why once and returns False, and the callers keep their plain-PyTorch
path; ``ZHTUNE_NATIVE=0`` turns it off.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

from zhtune.models.gguf import cache_root

SOURCES = Path(__file__).parent / "csrc"

_AVX512_BF16 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma"]
_AVX512_DEFINES = ["-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"]  # (ATen's Vectorized<float> as AVX-512)

FLAGS = {
    "cpu_attention": (_AVX512_BF16, _AVX512_DEFINES, ("avx512f", "avx512bw", "avx512_bf16", "amx_bf16", "amx_tile")),
    "cpu_ops": (_AVX512_BF16, _AVX512_DEFINES, ("avx512f", "avx512bw", "avx512_bf16")),
}
"""Per library: the compiler's instruction-set flags, its defines, and the CPU flags
(``/proc/cpuinfo``) it needs; without them the library is not built."""

_loaded: dict[str, bool] = {}


def cpu_flags() -> set[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _command(name: str, source: Path, target: Path) -> list[str]:
    import torch
    from torch.utils import cpp_extension

    isa, defines, _ = FLAGS[name]
    lib = Path(torch.__file__).parent / "lib"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    return [
        _compiler(), "-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-fno-strict-aliasing", "-w", *isa, *defines,
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *includes, str(source), "-o", str(target),
        f"-L{lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}",
    ]  # fmt: skip


def _compiler() -> str:
    return os.environ.get("CXX") or next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), "g++")


def library(name: str) -> Path:
    """Where the built library ``name`` is cached on this machine (built or not)."""
    import torch

    source = SOURCES / f"{name}.cpp"
    compiler = shutil.which(_compiler()) or _compiler()
    stamp = os.stat(compiler).st_mtime_ns if os.path.exists(compiler) else 0
    command = _command(name, Path("source.cpp"), Path("target.so"))
    headers = [h.read_text() for h in sorted(SOURCES.glob("*.h"))]  # (what the sources include)
    key = hashlib.sha256(json.dumps([source.read_text(), headers, torch.__version__, compiler, stamp, command]).encode()).hexdigest()[:16]
    return cache_root() / "native" / f"{name}-{_install(torch)}-{key}.so"


def _install(torch: object) -> str:
    """A short name for the torch installation (its directory): each environment keeps its own
    build, and a new build replaces only that environment's older ones."""
    return hashlib.sha256(str(Path(torch.__file__).parent.resolve()).encode()).hexdigest()[:8]


def elementwise(device_type: str, bf16: bool) -> bool:
    """Whether the elementwise kernels (``csrc/cpu_ops.cpp``) serve bf16 work on ``device_type``:
    bf16 on a CPU where they are built and loaded (the loss per call, the norms, activation and
    rotation per run)."""
    return device_type == "cpu" and bf16 and load("cpu_ops")


def load(name: str) -> bool:
    """Build (once per machine) and load the library ``name``, registering its ops under
    ``torch.ops.zhtune_<name>``; False, with a warning the first time, where it cannot be had."""
    if name in _loaded:
        return _loaded[name]
    _loaded[name] = False
    if os.environ.get("ZHTUNE_NATIVE", "1") == "0":
        return False
    needed = FLAGS[name][2]
    if platform.machine() not in ("x86_64", "AMD64") or not set(needed) <= cpu_flags():
        return False  # (another CPU: nothing to say, the plain path is the right one there)
    import torch

    target = library(name)
    try:
        if not target.is_file():
            print(f"building zhtune's {name} kernels for this machine (once, ~10 s) ...", file=sys.stderr, flush=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(f".{os.getpid()}.tmp.so")
            done = subprocess.run(_command(name, SOURCES / f"{name}.cpp", tmp), capture_output=True, text=True)
            if done.returncode != 0:
                raise OSError(f"{_compiler()} failed: {done.stderr.strip()[-2000:]}")
            tmp.replace(target)
            for stale in target.parent.glob(f"{name}-{_install(torch)}-*.so"):  # this environment's older builds
                if stale != target and ".tmp" not in stale.name:  # (not another process's build in progress)
                    stale.unlink(missing_ok=True)
        torch.ops.load_library(str(target))
    except (OSError, RuntimeError) as e:
        warnings.warn(f"zhtune's {name} kernels are not available ({e}); using the plain PyTorch path", stacklevel=2)
        return False
    _loaded[name] = True
    return True
