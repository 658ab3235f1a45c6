"""A/B of training steps on the real model: this working tree against a git revision, in-step.

    python bench/ab_steps.py --base REV [--method lora] [--steps 12] [--warmup 2] [--pairs 2]
                             [--records 200] [KEY=VALUE ...]

Each side is ``bench/train_real.py``'s zhtune job (SmolLM2-135M-Instruct, the first ``--records``
records of alpaca_zh_demo.json, packing, bf16, batch 4, cutoff 512; ``KEY=VALUE`` settings are
added to both): set up as ``zhtune train`` sets up, then ``--steps`` optimizer steps timed one by
one. The base revision is checked out into a temporary git worktree and imported from there; the
two sides run in processes alternated ``--pairs`` times (base first, then this tree, then the
other way round), so the machine's drift through a run falls on both. Printed: each process's
sum of the steps after ``--warmup``, the last step's loss and grad norm (a change of numerics
shows there), its minor page faults a step and its peak RSS, then the mean of each side and their
ratio. The native kernels each side builds are cached apart, so neither evicts the other's. Both
sides run with malloc on transparent huge pages where ``zhtune train`` uses them
(:func:`zhtune.allocator.use_huge_pages`).

Why this and not a micro-benchmark: on this 2-core CPU isolated timings mislead both ways (a
prepacked output-layer weight was 30% faster alone and nothing in the step; a widened LoRA
product looked like nothing alone and was 2% of the step), and the profiler slows some matmuls
(``bench/profile_step.py`` says so). Every speed change of issue 19's later sessions was kept or
dropped on this measure.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def child(src: str, cache: str, method: str, steps: int, records: int, settings: list[str]) -> None:
    """Run in a fresh process: import zhtune from ``src``, time ``steps`` steps, print one JSON line."""
    sys.path.insert(0, src)
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(ROOT))
    import resource
    import time

    from train_real import Bench, zhtune_settings

    from tests.real_model import smollm2_dir
    from zhtune.allocator import keep_freed_memory
    from zhtune.config import load_config
    from zhtune.train import native
    from zhtune.train.config import TrainConfig
    from zhtune.train.loop import batch_stream, optimizer_step
    from zhtune.train.setup import setup

    assert Path(native.__file__).is_relative_to(src), f"zhtune came from {native.__file__}, not {src}"
    native.cache_root = lambda: Path(cache)  # (each side's kernels cached apart)
    out = Path(tempfile.mkdtemp(prefix="zhtune-ab-")) / "run"
    data = ROOT.parent / "shared" / "data" / "llamafactory" / "alpaca_zh_demo.json"
    bench = Bench(smollm2_dir(), data, Path(), records, 4, 512, out.parent, "")
    s = setup(load_config(TrainConfig, None, zhtune_settings(bench, method, out) + settings))
    keep_freed_memory()
    stream = batch_stream(s, 0, 0)
    times, faults, result = [], [], None
    for i in range(steps):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        result = optimizer_step(s, [next(stream)[2]], i)
        times.append(time.perf_counter() - start)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    loss, _, _, grad_norm = result
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        json.dumps(
            {"times": times, "faults": faults, "loss": loss, "grad_norm": float(grad_norm), "peak_gib": peak}
        )
    )
    shutil.rmtree(out.parent, ignore_errors=True)


def side_environment() -> dict[str, str]:
    """Both sides' environment: malloc on transparent huge pages where ``zhtune train`` puts it
    there (:func:`zhtune.allocator.use_huge_pages`), so that the steps run as they run in
    training; the same for both, whatever each revision's own command does."""
    import os

    from zhtune.allocator import huge_pages_here

    return huge_pages_here() or dict(os.environ)


def run_side(src: Path, cache: Path, a: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", str(src), str(cache), "--method", a.method, "--steps", str(a.steps),
           "--records", str(a.records), *a.settings]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=side_environment())
    if done.returncode != 0:
        sys.exit(f"a side failed ({src}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", help="the git revision to compare this working tree against")
    p.add_argument("--method", default="lora", help="lora or full")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of each sum")
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--records", type=int, default=200)
    p.add_argument("--child", nargs=2, metavar=("SRC", "CACHE"), help=argparse.SUPPRESS)
    p.add_argument("settings", nargs="*", help="more key=value training settings for both sides")
    a = p.parse_args()
    if a.child:
        return child(a.child[0], a.child[1], a.method, a.steps, a.records, a.settings)
    if not a.base or a.steps <= a.warmup:
        p.error("--base is required, and --steps must exceed --warmup")
    base = subprocess.run(
        ["git", "rev-parse", "--short", a.base], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    work = Path(tempfile.mkdtemp(prefix="zhtune-ab-base-"))
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(work / "tree"), base],
        cwd=ROOT,
        capture_output=True,
        check=True,
    )
    sides = {
        f"base {base}": (work / "tree" / "src", work / "cache"),
        "this tree": (ROOT / "src", work / "cache-tree"),
    }
    rows: list[tuple[str, dict]] = []
    try:
        for pair in range(a.pairs):
            order = list(sides) if pair % 2 == 0 else list(reversed(sides))
            for name in order:
                rows.append((name, run_side(*sides[name], a)))
                r = rows[-1][1]
                print(f"  {name}: {sum(r['times'][a.warmup :]):.2f} s", file=sys.stderr, flush=True)
    finally:
        subprocess.run(
            ["git", "worktree", "remove", "--force", str(work / "tree")], cwd=ROOT, capture_output=True
        )
        shutil.rmtree(work, ignore_errors=True)
    timed = a.steps - a.warmup
    print(
        f"\n{a.method}, {a.steps} steps a process ({a.warmup} of warm-up left out), {a.pairs} pairs alternated; extra settings: {' '.join(a.settings) or 'none'}\n"
    )
    print(f"| process | side | {timed} steps s | last loss | last grad norm | faults / step | peak RSS GiB |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for i, (name, r) in enumerate(rows, 1):
        faults = sum(r["faults"][a.warmup :]) / timed
        print(
            f"| {i} | {name} | {sum(r['times'][a.warmup :]):.2f} | {r['loss']:.6f} | {r['grad_norm']:.4f} | {faults:,.0f} | {r['peak_gib']:.2f} |"
        )
    means = {name: sum(sum(r["times"][a.warmup :]) for n, r in rows if n == name) / a.pairs for name in sides}
    (b_name, b), (t_name, t) = means.items()
    print(
        f"\nmean: {b_name} {b:.2f} s, {t_name} {t:.2f} s: this tree {t / b:.3f}x the base's time ({(t / b - 1) * 100:+.1f}%)"
    )


if __name__ == "__main__":
    main()
