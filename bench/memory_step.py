"""Where a zhtune training step's memory goes, on the real model (CPU).

    python bench/memory_step.py [--method full] [--steps 6] [--records 200] [KEY=VALUE ...]

The zhtune job of ``bench/train_real.py`` (SmolLM2-135M-Instruct in bf16, the first ``--records``
records of alpaca_zh_demo.json, packing, bf16, batch 4, cutoff 512; ``--method full``: lr 1e-5,
``lora``: r8 on every linear layer), set up and batched as ``zhtune train`` does, then ``--steps`` optimizer
steps. Prints:

* per step: its seconds, the process's peak RSS and glibc's in-use bytes (``mallinfo2``: every
  arena, mapped blocks included), both sampled every 5 ms by a thread (the sampling slows the
  steps a little), and both at the step's end;
* the bytes of the parameters, of their gradients once all exist, and of the optimizer's state;
* what the forward pass keeps for backward, on the last step: every distinct tensor autograd
  saves (``torch.autograd.graph.saved_tensors_hooks``), parameters left out, each storage once,
  grouped by the kind of module whose forward saved it (the innermost one), dtype and shape.

Peak RSS minus the in-use peak is what the process holds besides live tensors: the libraries,
Python's own memory, and the heap that glibc keeps free around live blocks.
"""

from __future__ import annotations

import argparse
import ctypes
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from train_real import LR, Bench, bf16_copy, zhtune_settings  # noqa: E402

GIB = 2**30
Key = tuple[str, str, tuple[int, ...]]


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2


def in_use() -> float:
    """GiB that glibc has handed out and not had back (heap blocks and mapped ones, every arena)."""
    info = _libc.mallinfo2()
    return (info.uordblks + info.hblkhd) / GIB


def rss() -> float:
    """This process's resident GiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / GIB


class Sampler:
    """Peak RSS and in-use GiB since :meth:`reset`, sampled every ``interval`` seconds."""

    def __init__(self, interval: float = 0.005) -> None:
        self.peak = (0.0, 0.0)
        self.interval = interval
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            self.peak = (max(self.peak[0], rss()), max(self.peak[1], in_use()))
            time.sleep(self.interval)

    def reset(self) -> None:
        self.peak = (0.0, 0.0)


def saved_by_module(model: Any, run: Any) -> dict[Key, list[int]]:
    """What autograd keeps for backward while ``run()`` runs: (module kind, dtype, shape) ->
    [tensors, bytes], each storage once, parameters left out."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    stack = ["(no module)"]
    handles = []
    for name, module in model.named_modules():
        kind = type(module).__name__
        if type(module) is torch.nn.Linear:
            kind += " " + name.rsplit(".", 1)[-1]
        handles.append(module.register_forward_pre_hook(lambda m, a, k=kind: stack.append(k)))
        handles.append(module.register_forward_hook(lambda m, a, o: None if stack.pop() else None))
    seen: dict[int, tuple[Key, int]] = {}

    def pack(t: Any) -> Any:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            seen[ptr] = ((stack[-1], str(t.dtype).removeprefix("torch."), tuple(t.shape)), t.untyped_storage().nbytes())
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run()
    finally:
        for handle in handles:
            handle.remove()
    total: dict[Key, list[int]] = {}
    for key, nbytes in seen.values():
        entry = total.setdefault(key, [0, 0])
        entry[0] += 1
        entry[1] += nbytes
    return total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="full", choices=sorted(LR))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--records", type=int, default=200)
    parser.add_argument("--data", default=str(HERE.parent.parent / "shared/data/llamafactory/alpaca_zh_demo.json"))
    parser.add_argument("settings", nargs="*", help="zhtune key=value settings on top of the benchmark's")
    args = parser.parse_args(argv)

    import torch

    from tests.real_model import smollm2_dir
    from zhtune.config import load_config
    from zhtune.train.config import TrainConfig
    from zhtune.train.loop import batch_stream, optimizer_step
    from zhtune.train.setup import setup

    work = Path(tempfile.mkdtemp(prefix="zhtune-memory-"))
    try:
        model_dir = bf16_copy(smollm2_dir(), work / "SmolLM2-135M-Instruct-bf16")
        bench = Bench(model_dir, Path(args.data), Path(), args.records, 4, 512, work, "")
        s = setup(load_config(TrainConfig, None, zhtune_settings(bench, args.method, work / "run") + args.settings))
        model = s.accelerator.unwrap_model(s.model)
        print(f"after set-up: RSS {rss():.2f} GiB, in use {in_use():.2f} GiB\n")
        stream = batch_stream(s, 0, 0)  # the loop's batches (rows padded as it pads them)
        sampler = Sampler()
        saved: dict[Key, list[int]] = {}
        print("| step | s | peak RSS GiB | peak in use GiB | end RSS GiB | end in use GiB |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: |")
        for step in range(args.steps):
            group = [next(stream)[2] for _ in range(s.cfg.grad_accum)]
            sampler.reset()
            start = time.perf_counter()
            if step == args.steps - 1:
                saved = saved_by_module(model, lambda g=group, i=step: optimizer_step(s, g, i))
            else:
                optimizer_step(s, group, step)
            seconds = time.perf_counter() - start
            peak_rss, peak_use = sampler.peak
            print(f"| {step} | {seconds:.2f} | {peak_rss:.2f} | {peak_use:.2f} | {rss():.2f} | {in_use():.2f} |")
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        state = sum(
            t.numel() * t.element_size()
            for st in s.optimizer.state.values()
            for t in st.values()
            if isinstance(t, torch.Tensor)
        )
        print(f"\nparameters {params / GIB:.2f} GiB, their gradients once all exist {grads / GIB:.2f} GiB, "
              f"optimizer state {state / GIB:.2f} GiB")  # fmt: skip
        print(f"\nkept for backward (the last step): {sum(b for _, b in saved.values()) / GIB:.2f} GiB\n")
        print("| module | dtype | shape | tensors | MiB |")
        print("| --- | --- | --- | ---: | ---: |")
        for (kind, dtype, shape), (n, nbytes) in sorted(saved.items(), key=lambda kv: -kv[1][1])[:20]:
            print(f"| {kind} | {dtype} | {shape} | {n} | {nbytes / 2**20:.1f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
