"""Where inference runs: one ``--device`` option and one dtype default for every command.

``auto`` picks the best device present: CUDA, then Apple's MPS, else the CPU. Weights default to
bfloat16 where the device computes in it natively (CUDA with bf16 support, MPS) and to float32 on
a CPU, where zhtune's inference has always run in float32. Training does not use this: accelerate
places the model there.
"""

from __future__ import annotations

from dataclasses import dataclass

from zhtune.errors import ZhtuneError
from zhtune.flags import flag

DEVICE_HELP = "where the model runs: auto (cuda if available, then mps, else cpu), cpu, cuda, cuda:N, mps"
DTYPE_HELP = "weights dtype: auto (bf16 on a GPU that supports it, else fp32), fp32, bf16, fp16"
DTYPES = ("auto", "fp32", "bf16", "fp16")



@dataclass
class RuntimeOptions:
    """Where an inference command runs its model, in what dtype, and whether the model's own code
    may run: one declaration for chat, predict, serve, webui, eval and export."""

    device: str = "auto"
    """Where the model runs: auto (cuda if available, then mps, else cpu), cpu, cuda, cuda:N, mps."""
    dtype: str = flag(default="auto", choices=DTYPES)
    """Weights dtype: auto (bf16 on a GPU that supports it, else fp32), fp32, bf16, fp16."""
    trust_remote_code: bool = False
    """Allow the model's own Python code (auto_map) to run; never switched on by a run's or export's metadata."""

def resolve_device(name: str = "auto") -> str:
    """The torch device string for ``name`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``),
    checked against what this machine has."""
    import torch

    mps = getattr(torch.backends, "mps", None)
    has_mps = bool(mps is not None and mps.is_available())
    if name == "auto":
        return "cuda:0" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    kind, _, index = name.partition(":")
    if kind == "cpu" and not index:
        return "cpu"
    if kind == "mps" and not index:
        if not has_mps:
            raise ZhtuneError("--device mps: this machine has no MPS device (Apple silicon with macOS 12.3+)")
        return "mps"
    if kind == "cuda" and (not index or index.isdigit()):
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        i = int(index or 0)
        if i >= n:
            have = f"{n} CUDA device(s)" if n else "no CUDA device (a CPU-only torch build or no GPU)"
            raise ZhtuneError(f"--device {name}: this machine has {have}")
        return f"cuda:{i}"
    raise ZhtuneError(f"--device {name!r}: expected auto, cpu, cuda, cuda:N or mps")


def resolve_dtype(dtype: str, device: str) -> str:
    """``dtype`` itself, or for ``auto`` bf16 on a device that computes in it natively, else fp32."""
    if dtype not in DTYPES:
        raise ZhtuneError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if device == "mps" else "fp32"


def grouped_query_attention_in_kernel(device_type: str) -> None:
    """On a CPU, have transformers hand grouped-query attention to SDPA as it is (``enable_gqa``)
    even with a mask (packed rows, padding): PyTorch's CPU kernels take it directly, where
    transformers would first copy each key/value head once per query head (it does that
    everywhere except on CUDA without a mask, where CUDA's kernels need it). For SmolLM2 (9
    query, 3 key/value heads) that is 5 ms of a 39 ms attention forward and backward per layer
    and 96 MB of saved activations per 2k-token step. Process-wide, through transformers' own
    switch (``TRANSFORMERS_SDPA_FORCE_GQA``); a value already set is kept."""
    if device_type == "cpu":
        import os

        os.environ.setdefault("TRANSFORMERS_SDPA_FORCE_GQA", "1")
