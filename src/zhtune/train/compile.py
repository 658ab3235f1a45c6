"""``compile``: what ``torch.compile`` compiles in a training run, and the decoder's blocks compiled.

Three modes (:func:`compile_mode` resolves the setting once, at set-up):

* ``kernels``: zhtune's fused RMSNorm (:mod:`zhtune.train.fused`), one small graph, LLaMA's
  rotary embedding (:mod:`zhtune.train.rope`) and full fine-tuning's MLP activation
  (:class:`zhtune.train.fused.RecomputedMLP`), and, on a CPU in bf16 without zhtune's native
  attention kernels (AMX), attention's backward (:mod:`zhtune.train.attention`). Eager, an
  RMSNorm is a chain of fp32 passes over the activations (~5 ms forward and backward for 2,048
  x 576 on two CPU cores); Inductor makes it one read and one write each way (~1.3 ms): a real
  SmolLM2 LoRA step is 3-9% faster. The attention backward makes it another ~17% faster
  (2.72 -> 2.26 s). Together ~2 s of compiling from Inductor's disk cache (~22 s with an empty
  cache, the first run on a machine: a first step of 25.2 s against 3.1 s eager).
* ``blocks`` (or ``true``): each decoder block, below (attention itself stays outside the compiled
  graph, as the kernels run it): another 2-9% a step, for ~5 s (cached) to ~17-20 s (empty
  cache) more than the kernels.
* ``auto`` (the default), on a CPU with a C++ compiler: ``blocks`` when the run is long enough to
  repay a first-time compilation (:func:`blocks_repay`), else ``kernels``; elsewhere (GPUs: not
  measured here; no compiler) nothing.
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

import hashlib
import json
import os
import platform
import shutil
from typing import Any, Literal

from zhtune.errors import ZhtuneError
from zhtune.models.gguf import cache_root

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


#: What ``auto`` assumes to decide whether compiling the blocks repays itself, from SmolLM2-135M
#: LoRA in bf16 on two CPU cores: the step does ``4 x params x tokens`` FLOPs at about this rate
#: (measured ~0.65e12 for the whole step) ...
CPU_STEP_FLOPS = 5e11
#: ... compiled blocks save this share of a step over compiled kernels (median steps: 11% in
#: one bench/train_real.py run and 5% in a 150-step run before the attention kernel; with it,
#: alternated runs on two days: 7% and 2% (2.50 / 2.32 s, 2.38 / 2.34 s), then 9% and 8%
#: (2.86 / 2.59 s, 2.66 / 2.45 s) and 7% from empty caches (2.84 / 2.63 s)) ...
BLOCKS_GAIN = 0.06
#: ... for this many seconds of compiling beyond the kernels' (SmolLM2 on two cores, empty
#: Inductor cache: first steps of 33 against 21 s, and of 49.3 against 32.7 s a day later with
#: the attention kernel; ~5 s more from a warm cache). Checked before the attention kernel (with
#: a 10% gain and 30 s): 150 SmolLM2 steps from an empty cache took 414.6 s with the blocks and
#: 417.5 s with the kernels, where the threshold was ~140 steps. Now it is ~150 steps.
BLOCKS_COMPILE_S = 20.0


def blocks_repay(n_params: int, tokens_per_step: int, steps: int) -> bool:
    """Whether compiling the decoder blocks should repay its compile time over ``steps`` steps of
    ``tokens_per_step`` tokens on a model of ``n_params`` (the estimate above: SmolLM2 at 4 x 512
    tokens needs ~150 steps, a 4M-parameter model several thousand)."""
    step_s = 4 * n_params * tokens_per_step / CPU_STEP_FLOPS
    return steps * step_s * BLOCKS_GAIN > BLOCKS_COMPILE_S


def trust_probed_vec_isa() -> bool:
    """Let Inductor skip its probe of the CPU's vector instruction sets where a run on this machine
    already found every set the CPU reports working; returns whether it skips it.

    Before its first C++ kernel a process's Inductor builds a test library for each vector
    instruction set that ``/proc/cpuinfo`` lists (AVX2, AVX-512, AMX...) and loads each in a fresh
    Python process: ~1.5 s of a SmolLM2 run's first step on two cores, every run. The first run
    here runs that same probe (``valid_vec_isa_list``, cached for the process) and, when every
    listed set passed, records it under zhtune's cache, keyed by torch's version, the C++
    compiler and the listed sets; then and in later runs Inductor is told the sets work
    (``cpp.vec_isa_ok``), which is what the probe would find. A set that failed keeps the probe
    on. x86 only (the probe is per architecture); any other torch layout: the probe as usual."""
    try:
        import torch
        from torch._inductor import config, cpu_vec_isa
        from torch._inductor.cpp_builder import get_cpp_compiler

        if config.cpp.vec_isa_ok is not None or platform.machine() not in ("x86_64", "AMD64"):
            return False
        cpu = cpu_vec_isa.x86_isa_checker()
        listed = [str(isa) for isa in cpu_vec_isa.supported_vec_isa_list if all(f in cpu for f in str(isa).split())]
        compiler = shutil.which(get_cpp_compiler()) or get_cpp_compiler()
        stamp = os.stat(compiler).st_mtime_ns if os.path.exists(compiler) else 0
    except (ImportError, AttributeError, RuntimeError, OSError):
        return False
    key = hashlib.sha256(json.dumps([torch.__version__, compiler, stamp, listed]).encode()).hexdigest()[:16]
    marker = cache_root() / "inductor" / f"vec-isa-{key}.json"
    if not marker.is_file():
        if [str(isa) for isa in cpu_vec_isa.valid_vec_isa_list()] != listed or not listed:
            return False
        try:  # (atomically: processes of one run may probe at once; an unwritable cache probes again)
            marker.parent.mkdir(parents=True, exist_ok=True)
            tmp = marker.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"torch": torch.__version__, "compiler": compiler, "sets": listed}))
            tmp.replace(marker)
        except OSError:
            pass
    config.cpp.vec_isa_ok = True
    return True


def compile_mode(setting: bool | str, device_type: str, fused_kernels: bool, long_run: bool = False) -> CompileMode:
    """The ``compile`` setting (``auto``, ``kernels``, ``blocks``, true or false) resolved for a
    run on ``device_type``; ``long_run``: :func:`blocks_repay` for this run. Raises where an
    explicit request cannot work (see the module's docstring for what each mode compiles and when
    ``auto`` compiles what)."""
    if setting is False:
        return "off"
    if setting == "auto":
        if device_type != "cpu" or not has_cxx():
            return "off"
        return "blocks" if long_run else "kernels" if fused_kernels else "off"
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


def compile_blocks(model: Any, dynamic_rows: bool = False) -> int:
    """Compile the ``forward`` of each decoder block of ``model`` in place; returns how many.
    ``dynamic_rows``: batches vary in their number of rows (``padding_free``), which is then
    marked dynamic from the first call (:func:`_rows_dynamic`).

    Parameters and state-dict names are unchanged, so saving and loading are unaffected. Only
    ``forward`` is compiled, not the module call: forward hooks stay outside the compiled code
    (transformers records hidden states with a hook that reads a ``ContextVar``, which Dynamo
    cannot trace; compiling the call would break the graph at every block)."""
    import torch

    blocks = decoder_blocks(model)
    for block in blocks:
        compiled = torch.compile(block.forward)
        block.forward = _rows_dynamic(compiled) if dynamic_rows else compiled
    return len(blocks)


def _rows_dynamic(compiled: Any) -> Any:
    """``compiled`` called with the row dimension of its inputs marked dynamic: every tensor
    argument (nested in tuples too, as the rotary embedding's ``(cos, sin)``) whose first
    dimension is the hidden states' row count (the first argument, or ``hidden_states=``).
    ``padding_free`` batches vary in rows as well as length; left to Dynamo, each varying
    dimension costs a recompilation of every block before it turns dynamic (~15-25 s for
    SmolLM2's)."""
    import torch

    def mark(value: Any, rows: int) -> None:
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == rows:
            torch._dynamo.maybe_mark_dynamic(value, 0)
        elif isinstance(value, tuple | list):
            for v in value:
                mark(v, rows)

    def forward(*args: Any, **kwargs: Any) -> Any:
        hidden_states = args[0] if args else kwargs.get("hidden_states")
        if isinstance(hidden_states, torch.Tensor) and hidden_states.dim():
            for value in (*args, *kwargs.values()):
                mark(value, hidden_states.shape[0])
        return compiled(*args, **kwargs)

    return forward
