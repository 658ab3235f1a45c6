"""Where a zhtune training step's time goes, on the real model, grouped (torch.profiler, CPU).

    python bench/profile_step.py [--method lora] [--warmup 2] [--steps 3] [--records 200] [--timers] [KEY=VALUE ...]

The zhtune job of ``bench/train_real.py`` (SmolLM2-135M-Instruct, the first ``--records`` records
of alpaca_zh_demo.json, packing, bf16, batch 4, cutoff 512, LoRA r8 on every linear layer): set
up and batched as ``zhtune train`` does, ``--warmup`` steps run, then ``--steps`` steps under the profiler
(on a CPU with AMX zhtune's native kernels run attention, the loss, RMSNorm, SwiGLU and the
rotation, and nothing is compiled; elsewhere the default ``compile: auto`` compiles the kernels
for these 30 steps: RMSNorm and attention's backward; ``compile=false`` groups all-eager ops). Each op's self time is put in one group:

* forward: by the innermost module it runs in (forward hooks open a profiler range per module):
  LoRA's linear layers as zhtune's fused kernels run them (frozen matmul and A/B together, q/k/v
  and gate/up as one stacked product each; with
  ``fused_kernels=false``: the frozen linear layers, LoRA's ``base_layer``, and LoRA's A/B matmuls
  with their scaling and addition), the attention modules (SDPA's forward, zhtune's or SDPA's backward, RoPE, reshapes; their q/k/v/o projections are linear
  layers), trained plain linear layers (full fine-tuning: their weight casts and matmuls), RMSNorm,
  the MLP's SwiGLU elementwise ops (its projections are linear layers; full fine-tuning's
  recomputed MLP runs its three matmuls inside, so they count here), the LM
  head with zhtune's fused loss over the 49k vocabulary (logits, log-softmax and their gradient,
  computed in the forward pass), and what runs in no such module (embeddings, residual adds, masks);
* backward: each autograd node's ops go to the group of the forward op that made the node
  (matched by sequence number);
* the optimizer (gradient clipping, AdamW, schedule, zero_grad) and the data (the next batch);
* Python: time inside the ranges that no op accounts for (interpreter, hooks, autograd glue).

Prints the groups (ms per step, forward / backward, share of the profiled step) and the top ops.
The profiler's own overhead makes a profiled step slower than an unprofiled one (both printed).

Like ``zhtune train``, it runs with malloc on transparent huge pages where they apply
(:func:`zhtune.allocator.use_huge_pages`). ``--timers``: no profiler; a clock (``time.perf_counter``; CPU ops return when done) around the
forward and backward of each of zhtune's fused functions (:data:`TIMED`), summed over ``--steps``
unprofiled steps; the rest of the step (embeddings, residual adds, the autograd engine, Python,
the optimizer, the data) is what they leave. The profiler slows some products far more than
others inside a real step (the stacked gate/up forward: 4.6 ms profiled, 2.2 ms timed, 1.9 ms
alone), so its shares of matmuls mislead; the timers' do not.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from train_real import Bench, zhtune_settings  # noqa: E402

FUSED, BASE, LORA, LINEAR, ATTN, NORM, SWIGLU, HEAD, OTHER = (
    "LoRA linear layers, fused (frozen matmul + A/B; q/k/v and gate/up stacked)",
    "base linear matmuls (frozen)",
    "LoRA A/B matmuls (+ scale, add)",
    "trained linear layers (full fine-tuning: weight casts, matmuls)",
    "attention (SDPA's forward, zhtune's or SDPA's backward, RoPE, reshapes)",
    "RMSNorm",
    "MLP: SwiGLU elementwise (full fine-tuning's recomputed MLP: its matmuls too)",
    "LM head + loss over the 49k vocab",
    "other (embeddings, residual adds, casts)",
)
PYTHON, OPTIMIZER, DATA = (
    "Python / untracked",
    "optimizer (clip, AdamW, schedule, zero_grad)",
    "data (next batch)",
)
PREFIX = "zh:"
"""Profiler ranges opened here are named PREFIX + group (modules) or PREFIX + phase."""


def module_group(name: str, module: Any) -> str | None:
    """The group of the ops that run directly in ``module`` (None: it opens no range)."""
    cls = type(module).__name__
    if "forward" in vars(module) and hasattr(module, "base_layer"):
        return FUSED  # zhtune.train.lora.LoraLinear: the frozen matmul and A/B in one function
    if name.endswith("base_layer"):
        return BASE
    if hasattr(module, "base_layer") or ".lora_A." in f"{name}." or ".lora_B." in f"{name}.":
        return LORA  # peft's LoRA layer (scale, add) or its A / B
    if name.endswith("lm_head"):
        return HEAD
    if cls == "Linear":
        return LINEAR  # (a LoRA layer's base_layer, A and B are matched above)
    if cls.endswith("RMSNorm"):
        return NORM
    if cls.endswith("MLP"):
        return SWIGLU
    if cls.endswith("Attention"):
        return ATTN
    return None


def add_ranges(model: Any) -> None:
    """A profiler range around each grouped module's forward."""
    from torch.autograd.profiler import record_function

    stack: list[Any] = []

    def enter(label: str) -> Any:
        def hook(*_: Any) -> None:
            stack.append(record_function(label))
            stack[-1].__enter__()

        return hook

    def leave(*_: Any) -> None:
        stack.pop().__exit__(None, None, None)

    for name, module in model.named_modules():
        group = module_group(name, module)
        if group is not None:
            module.register_forward_pre_hook(enter(PREFIX + group))
            module.register_forward_hook(leave)


def scoped(label: str, fn: Any) -> Any:
    """``fn`` inside a profiler range ``PREFIX + label``."""
    from torch.autograd.profiler import record_function

    def run(*args: Any, **kwargs: Any) -> Any:
        with record_function(PREFIX + label):
            return fn(*args, **kwargs)

    return run


def instrument(s: Any) -> None:
    """Ranges around the modules, the fused loss, the backward pass and the optimizer's calls."""
    from zhtune.train import lora, loss

    add_ranges(s.accelerator.unwrap_model(s.model))
    forward = loss.LinearCrossEntropy.forward
    loss.LinearCrossEntropy.forward = staticmethod(scoped(HEAD, forward))
    # stacked LoRA products (q/k/v, gate/up) run inside the attention and MLP modules' ranges: a
    # range around the call itself, so that their backward nodes (matched to the op that made
    # them) count as LoRA layers too
    lora.StackedLora.apply = scoped(FUSED, lora.StackedLora.apply)
    s.accelerator.backward = scoped("backward", s.accelerator.backward)
    s.accelerator.clip_grad_norm_ = scoped("optimizer", s.accelerator.clip_grad_norm_)
    s.optimizer.step = scoped("optimizer", s.optimizer.step)
    s.optimizer.zero_grad = scoped("optimizer", s.optimizer.zero_grad)
    s.scheduler.step = scoped("optimizer", s.scheduler.step)


def ancestors(e: Any) -> list[Any]:
    found = []
    while e.cpu_parent is not None:
        e = e.cpu_parent
        found.append(e)
    return found


def group_times(events: list[Any]) -> tuple[dict[tuple[str, str], float], dict[tuple[str, str], float]]:
    """Self time (µs) by (phase, group), and by (op name, group)."""
    ranges = {f"{PREFIX}{p}" for p in ("step", "backward", "optimizer", "data")}
    node_group: dict[int, str] = {}
    placed = []
    for e in sorted(events, key=lambda e: e.time_range.start):
        up = ancestors(e)
        names = [a.name for a in up]
        phase = next(
            (n.removeprefix(PREFIX) for n in names if n in ranges and n != f"{PREFIX}step"), "forward"
        )
        if e.name in ranges:  # time in the range itself, outside any op
            phase = e.name.removeprefix(PREFIX) if e.name != f"{PREFIX}step" else "forward"
            group = {"optimizer": OPTIMIZER, "data": DATA}.get(phase, PYTHON)
        elif phase in ("optimizer", "data"):
            group = OPTIMIZER if phase == "optimizer" else DATA
        elif phase == "forward":
            scopes = [n for n in [e.name, *names] if n.startswith(PREFIX) and n not in ranges]
            group = scopes[0].removeprefix(PREFIX) if scopes else OTHER
            if e.sequence_nr >= 0:  # ops before the one that makes the node may share its number
                node_group[e.sequence_nr] = group
        else:
            group = None  # backward: known once every forward op is
        placed.append((e, phase, group, up))
    by_group: dict[tuple[str, str], float] = defaultdict(float)
    by_op: dict[tuple[str, str], float] = defaultdict(float)
    for e, phase, group, up in placed:
        if group is None:
            node = next(
                (a for a in [e, *up] if a.name.startswith("autograd::engine::evaluate_function")), None
            )
            group = node_group.get(node.sequence_nr, OTHER) if node is not None else PYTHON
        by_group[phase, group] += e.self_cpu_time_total
        if not e.name.startswith(PREFIX):
            by_op[e.name, group] += e.self_cpu_time_total
    return by_group, by_op


TIMED = (
    ("lora", "StackedLora", "LoRA q/k/v and gate/up, stacked (frozen matmul + A/B)"),
    ("lora", "LoraLinear", "LoRA o and down (frozen matmul + A/B)"),
    ("attention", "CpuAttention", "attention kernels"),
    ("rope", "NativeRotary", "rotation (native)"),
    ("rope", "NativeQKVRotary", "q, k, v from the stacked product, rotated (native)"),
    ("fused", "NativeRMSNorm", "RMSNorm (native)"),
    ("residual", "ResidualRMSNorm", "RMSNorm with the residual add (native)"),
    ("fused", "NarrowRMSNorm", "RMSNorm, fp32 input (full fine-tuning)"),
    ("fused", "StackedSwiGLU", "SwiGLU of the stacked gate/up"),
    ("fused", "RecomputedMLP", "MLP recomputed in backward (full fine-tuning)"),
    ("fused", "CastLinear", "trained linear layers (full fine-tuning)"),
    ("loss", "LinearCrossEntropy", "LM head + loss over the 49k vocab"),
)
"""``(module of zhtune.train, autograd Function, label)``: what ``--timers`` times."""


def add_timers(totals: dict[tuple[str, str], float]) -> None:
    """Wrap the forward and backward of each of :data:`TIMED` so that its seconds add up in
    ``totals[label, phase]`` (none of them runs inside another)."""
    import importlib

    for module, name, label in TIMED:
        cls = getattr(importlib.import_module(f"zhtune.train.{module}"), name)
        for phase in ("forward", "backward"):
            setattr(cls, phase, staticmethod(_clocked(getattr(cls, phase), (label, phase), totals)))


def _clocked(fn: Any, key: tuple[str, str], totals: dict[tuple[str, str], float]) -> Any:
    """``fn`` adding its seconds to ``totals[key]``."""

    def run(*args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            totals[key] += time.perf_counter() - t0

    return run


def print_timers(totals: dict[tuple[str, str], float], steps: int, step_s: float) -> None:
    """The ``--timers`` table: each function's ms a step, forward / backward, and the rest."""
    print("| function | forward ms | backward ms | total ms / step | % of step |\n| --- | ---: | ---: | ---: | ---: |")
    inside = 0.0
    for _, _, label in TIMED:
        fwd, bwd = (1e3 * totals[label, ph] / steps for ph in ("forward", "backward"))
        inside += fwd + bwd
        if fwd + bwd:
            print(f"| {label} | {fwd:,.1f} | {bwd:,.1f} | {fwd + bwd:,.1f} | {(fwd + bwd) / (1e3 * step_s):.1%} |")
    rest = 1e3 * step_s - inside
    print(f"| the rest (embeddings, residual adds, autograd engine, Python, optimizer, data) | | | {rest:,.1f} | {rest / (1e3 * step_s):.1%} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(HERE.parent.parent / "shared/data/llamafactory/alpaca_zh_demo.json"))
    p.add_argument("--records", type=int, default=200)
    p.add_argument("--method", default="lora", help="lora or full")
    p.add_argument("--warmup", type=int, default=2, help="steps before profiling")
    p.add_argument("--steps", type=int, default=3, help="profiled steps")
    p.add_argument("--top", type=int, default=12, help="top ops listed")
    p.add_argument("--timers", action="store_true", help="clocks around zhtune's fused functions, no profiler")
    p.add_argument("settings", nargs="*", help="more key=value training settings (fused_kernels=false, ...)")
    a = p.parse_args()

    from zhtune.allocator import use_huge_pages

    use_huge_pages()  # (as `zhtune train` does: this script runs again, malloc on huge pages)
    import torch
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    from tests.real_model import smollm2_dir
    from zhtune.allocator import keep_freed_memory
    from zhtune.config import load_config
    from zhtune.train.config import TrainConfig
    from zhtune.train.loop import batch_stream, optimizer_step
    from zhtune.train.setup import setup

    out = Path(tempfile.mkdtemp(prefix="zhtune-profile-")) / "run"
    b = Bench(smollm2_dir(), Path(a.data), Path(), a.records, 4, 512, out.parent, "")
    s = setup(load_config(TrainConfig, None, zhtune_settings(b, a.method, out) + a.settings))
    cfg = s.cfg
    if s.accelerator.device.type == "cpu":
        keep_freed_memory()  # as the training loop does
    stream = batch_stream(s, 0, 0)  # the loop's batches (rows padded as it pads them)
    if a.timers:
        totals: dict[tuple[str, str], float] = defaultdict(float)
        add_timers(totals)
        for i in range(a.warmup + a.steps):
            if i == a.warmup:
                totals.clear()
                t0 = time.perf_counter()
            optimizer_step(s, [next(stream)[2] for _ in range(cfg.grad_accum)], i)
        step_s = (time.perf_counter() - t0) / a.steps
        shutil.rmtree(out.parent, ignore_errors=True)
        print(
            f"\n{cfg.method} step on SmolLM2-135M-Instruct, batch {cfg.batch_size} x {cfg.cutoff_len} packed, "
            f"{cfg.precision}, {torch.get_num_threads()} threads: {1e3 * step_s:,.0f} ms (mean of {a.steps} "
            f"steps after {a.warmup}; clocks, no profiler)\n"
        )
        print_timers(totals, a.steps, step_s)
        return
    instrument(s)

    def step(i: int) -> None:
        with record_function(PREFIX + "step"):
            with record_function(PREFIX + "data"):
                group = [next(stream)[2] for _ in range(cfg.grad_accum)]
            optimizer_step(s, group, i)

    times = []
    for i in range(a.warmup):
        t0 = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for i in range(a.steps):
            step(a.warmup + i)
        profiled = (time.perf_counter() - t0) / a.steps
    shutil.rmtree(out.parent, ignore_errors=True)  # the run directory setup() made
    by_group, by_op = group_times(list(prof.events()))
    total = sum(by_group.values()) / a.steps / 1e3
    print(
        f"\n{cfg.method} step on SmolLM2-135M-Instruct, batch {cfg.batch_size} x {cfg.cutoff_len} packed, "
        f"{cfg.precision}, {torch.get_num_threads()} threads: unprofiled {1e3 * min(times or [0]):,.0f} ms "
        f"(best of {a.warmup} warm-up steps), profiled {1e3 * profiled:,.0f} ms ({a.steps} steps; "
        f"{total:,.0f} ms of it in the groups below)\n"
    )
    print("| group | forward ms | backward ms | total ms / step | % of step |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for group in (FUSED, BASE, LORA, LINEAR, ATTN, NORM, SWIGLU, HEAD, OTHER, PYTHON, OPTIMIZER, DATA):
        ms = {ph: v / a.steps / 1e3 for (ph, g), v in by_group.items() if g == group}
        if not ms and group in (FUSED, BASE, LORA, LINEAR):
            continue  # (fused_kernels on: no separate base / A-B groups; off: no fused one)
        both = sum(ms.values())
        fwd, bwd = ms.get("forward", 0.0), ms.get("backward", 0.0)
        print(f"| {group} | {fwd:,.1f} | {bwd:,.1f} | {both:,.1f} | {both / total:.1%} |")
    print("\n| top ops (self time) | group | ms / step |\n| --- | --- | ---: |")
    for (name, group), v in sorted(by_op.items(), key=lambda kv: -kv[1])[: a.top]:
        print(f"| {name} | {group} | {v / a.steps / 1e3:,.1f} |")


if __name__ == "__main__":
    main()
