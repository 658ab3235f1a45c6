"""``compile``: what ``torch.compile`` compiles in a training run, and the decoder's blocks compiled.

Three modes (:func:`compile_mode` resolves the setting once, at set-up):

* ``kernels``: only zhtune's fused RMSNorm (:mod:`zhtune.train.fused`), one small graph. Eager,
  an RMSNorm is a chain of fp32 passes over the activations (~5 ms forward and backward for 2,048
  x 576 on two CPU cores); Inductor makes it one read and one write each way (~1.3 ms): a real
  SmolLM2 LoRA step is ~11% faster, for ~2 s of compiling (from Inductor's disk cache; ~6 s the
  first time). ``auto``, the default, means this on a CPU with a C++ compiler and the fused
  kernels on; elsewhere (GPUs: not measured here) nothing is compiled.
* ``blocks`` (or ``true``): each decoder block, below.
* ``false``: nothing.

The blocks:

A decoder is N copies of one block, so compiling the block (regional compilation, as torchtune and
🤗 Accelerate do it) costs one compilation whatever N is, where compiling the whole model would
trace all N. Inductor fuses what runs between the matmuls (norms, rotary embeddings, SwiGLU, the
adapters' scaling and sums, residual additions) into a few generated kernels: on the 4M-parameter
benchmark model, LoRA in bf16 on a CPU, a step is 15-27% faster (33% on the 30M one). Compiling
takes 15-30 s on two CPU cores the first time and 4-5 s once the compiled code is cached (Inductor
keeps it on disk across runs), so it pays off after a few hundred steps, not in a 30-step trial.

On a CPU Inductor generates C++ and needs a C++ compiler; :func:`check_compile` says so at
configuration time. Code Dynamo cannot trace is not an error: the graph breaks there and that
piece runs eagerly (transformers' output-recording hooks break each block once, after attention).
"""

from __future__ import annotations

import shutil
from typing import Any, Literal

from zhtune.errors import ZhtuneError

CompileMode = Literal["off", "kernels", "blocks"]


def has_cxx() -> bool:
    """Whether a C++ compiler is on ``PATH`` (Inductor's CPU code is C++)."""
    return any(shutil.which(cc) for cc in ("c++", "g++", "clang++"))


def check_compile(device_type: str) -> None:
    """Refuse compiling where it cannot work: a CPU without a C++ compiler."""
    if device_type == "cpu" and not has_cxx():
        raise ZhtuneError(
            "config key 'compile': torch.compile on a CPU generates C++ and needs a C++ compiler "
            "(install g++, e.g. apt install g++), or set compile=false"
        )


def compile_mode(setting: bool | str, device_type: str, fused_kernels: bool) -> CompileMode:
    """The ``compile`` setting (``auto``, ``kernels``, ``blocks``, true or false) resolved for a
    run on ``device_type``; raises where an explicit request cannot work (see the module's
    docstring for what each mode compiles and when ``auto`` compiles)."""
    if setting is False:
        return "off"
    if setting == "auto":
        return "kernels" if device_type == "cpu" and fused_kernels and has_cxx() else "off"
    check_compile(device_type)
    if setting == "kernels" and not fused_kernels:
        raise ZhtuneError("config key 'compile': kernels compiles zhtune's fused kernels; fused_kernels is false")
    return "kernels" if setting == "kernels" else "blocks"


def decoder_blocks(model: Any) -> list[Any]:
    """The repeated blocks of ``model`` (a transformers model, peft-wrapped or not): the children
    of the module list holding the most parameters whose children are all of one class (the
    decoder layers, whatever the family calls them: ``model.layers``, ``transformer.h``...)."""
    import torch

    best: list[Any] = []
    best_params = 0
    for module in model.modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) == 0:
            continue
        children = list(module)
        if len({type(c) for c in children}) != 1:
            continue
        n_params = sum(p.numel() for p in module.parameters())
        if n_params > best_params:
            best, best_params = children, n_params
    return best


def compile_blocks(model: Any) -> int:
    """Compile the ``forward`` of each decoder block of ``model`` in place; returns how many.

    Parameters and state-dict names are unchanged, so saving and loading are unaffected. Only
    ``forward`` is compiled, not the module call: forward hooks stay outside the compiled code
    (transformers records hidden states with a hook that reads a ``ContextVar``, which Dynamo
    cannot trace; compiling the call would break the graph at every block)."""
    import torch

    blocks = decoder_blocks(model)
    for block in blocks:
        block.forward = torch.compile(block.forward)
    return len(blocks)
