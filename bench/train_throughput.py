"""Training throughput: zhtune vs TRL's SFTTrainer (padded and packed), same model, data, batch.

    python bench/train_throughput.py [--data ../shared/data/llamafactory/alpaca_zh_demo.json]
        [--models ref,30m] [--steps 30] [--repeats 3] [--workdir /tmp/zhtune-bench]

Builds locally (no download) a byte-level BPE tokenizer (~4k vocab) on the data and LLaMA models
from config: ``ref`` (hidden 256, intermediate 688, 4 layers, 4 heads, ~5M params with
embeddings) and ``30m`` (hidden 512, intermediate 1376, 8 layers, 8 heads). Each job is LoRA
(r 8, alpha 16, no dropout, all linear layers), batch 8, cutoff 512, run as its own process.
Systems: zhtune padded fp32, packed fp32, packed bf16 (autocast), packed bf16 with ``compile=true``;
TRL ``SFTTrainer`` padded and packed, fp32 (pick with ``--systems``). Reported per job (median over
repeats): non-pad tokens/s over the whole training loop, the same without its first 5 steps
(zhtune only: warm-up, and compiling with ``compile=true``), wall time of the whole command
(start-up included), the time outside the training loop, peak RSS, and MFU against this
machine's matmul peak for the dtype used (the fastest of 1024^2, 2048^2 and 3072^2 square matmuls),
measured in the same run (model FLOPs = 6 x params x tokens, the usual convention, which overstates
LoRA's work). Ratios are against TRL padded.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: zhtune logs every WINDOW steps: "steady" tok/s leaves out the first window (warm-up, compiling)
WINDOW = 5
MODELS = {
    "ref": dict(hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4),
    "30m": dict(hidden_size=512, intermediate_size=1376, num_layers=8, num_heads=8),
}


def matmul_peak_gflops(dtype: str = "fp32", seconds: float = 2.0, n: int = 1024) -> float:
    """Sustained matmul throughput of this machine (all threads) in ``dtype``, in GFLOP/s."""
    import torch

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    a, b = torch.randn(n, n, dtype=torch_dtype), torch.randn(n, n, dtype=torch_dtype)
    for _ in range(3):
        a @ b
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - t0) / 1e9


def peak_gflops_here(dtype: str, seconds: float = 1.5) -> float:
    """This process's matmul peak in ``dtype``: the best of three sizes, ``seconds`` each (AMX bf16
    runs ~1.3 TFLOP/s at 1024^2 but ~2.3-2.5 at 2048^2 and 3072^2, and less again at 4096^2:
    measured twice each on 2026-12-07; fp32: similar)."""
    return max(matmul_peak_gflops(dtype, seconds, n) for n in (1024, 2048, 3072))


def peak_gflops(dtype: str, seconds: float = 1.5) -> float:
    """This machine's matmul peak in ``dtype``: the higher of :func:`peak_gflops_here` in this
    process and in a child whose malloc uses transparent huge pages, as ``zhtune train`` runs
    (:func:`zhtune.allocator.use_huge_pages`; where they apply). Huge pages raise the measured
    peak too (2,891-3,154 -> 3,329-3,541 GFLOP/s at 2048^2 and 3072^2, twice each on 2026-12-07),
    and a roofline against the lower one would flatter a job that runs on them."""
    from zhtune.allocator import huge_pages_here

    here = peak_gflops_here(dtype, seconds)
    env = huge_pages_here()
    if env is None:
        return here
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); from train_throughput import peak_gflops_here; print(peak_gflops_here({dtype!r}, {seconds!r}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return max(here, float(done.stdout.split()[-1]))


def prepare(data: str, workdir: Path, models: list[str]) -> tuple[Path, dict[str, Path], dict[str, int]]:
    """Canonical data, a 4k byte-level BPE tokenizer, and the models, under ``workdir``."""
    from zhtune.data.convert import convert_files
    from zhtune.data.templates import get_template, prepare_tokenizer
    from zhtune.models.tiny import build_tiny_llama, train_tokenizer

    workdir.mkdir(parents=True, exist_ok=True)
    canonical = workdir / "train.jsonl"
    convert_files([data], str(canonical), progress=False, allow_rejects=True)
    records = [json.loads(line) for line in canonical.read_text(encoding="utf-8").splitlines()]
    tokenizer = train_tokenizer((m["content"] for r in records for m in r["messages"]), vocab_size=4000)
    prepare_tokenizer(tokenizer, get_template("chatml"))
    dirs, params = {}, {}
    for name in models:
        model = build_tiny_llama(tokenizer, max_positions=1024, **MODELS[name])
        dirs[name] = workdir / f"model-{name}"
        model.save_pretrained(dirs[name])
        tokenizer.save_pretrained(dirs[name])
        params[name] = sum(p.numel() for p in model.parameters())
    return canonical, dirs, params


def run_child(args: list[str], python: str = sys.executable, log: Path | None = None) -> dict:
    """Run ``PYTHON bench/_child.py ARGS`` and return its JSON line plus, seen from here, the wall
    time and ``tree_peak_rss_mb``: the peak of the summed RSS of its process tree (sampled every
    0.2 s with psutil, where installed; never below what the child measured of itself). ``log``:
    a file to keep the job's output in."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [python, str(HERE / "_child.py"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    peak = [0]
    sampler = threading.Thread(target=sample_tree_rss, args=(proc, peak), daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    sampler.join()
    if log is not None:
        log.write_text(
            f"$ {python} _child.py {' '.join(args)}\n{stdout}\n--- stderr ---\n{stderr}", encoding="utf-8"
        )
    if proc.returncode != 0:
        raise RuntimeError(f"job failed: {' '.join(args)}\n{stderr[-3000:]}")
    info = json.loads(stdout.strip().splitlines()[-1])
    info["wall_seconds"] = wall
    info["tree_peak_rss_mb"] = max(peak[0] / 2**20, info["peak_rss_mb"], info.get("peak_children_rss_mb", 0))
    return info


def sample_tree_rss(proc: subprocess.Popen, peak: list[int], every: float = 0.2) -> None:
    """Keep ``peak[0]`` at the largest summed RSS (bytes) of ``proc`` and its descendants until it exits."""
    try:
        import psutil
    except ImportError:
        return
    try:
        root = psutil.Process(proc.pid)
    except psutil.Error:
        return
    while proc.poll() is None:
        total = 0
        for p in [root, *root.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        peak[0] = max(peak[0], total)
        time.sleep(every)


def zhtune_log_seconds(out: Path) -> tuple[float, list[float], list[int]]:
    """From a zhtune run's ``trainer_log.jsonl``: the training loop's seconds (each logged window's
    tokens over its tokens/s, summed), and each window's seconds and input tokens."""
    rows = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    tokens = [b["tokens"] - a["tokens"] for a, b in zip([{"tokens": 0}, *rows], rows)]
    seconds = [n / r["tokens_per_s"] for n, r in zip(tokens, rows)]
    return sum(seconds), seconds, tokens


def zhtune_job(
    model: Path, data: Path, out: Path, steps: int, batch: int, max_len: int, extra: tuple[str, ...] = ()
) -> dict:
    args = [
        "zhtune", "train", f"model={model}", f"data={data}", f"output_dir={out}", "template=chatml",
        "method=lora", "lora_dropout=0", f"max_steps={steps}", f"batch_size={batch}",
        f"cutoff_len={max_len}", f"logging_steps={WINDOW}", "lr=2e-4", "overwrite=true", "--no-progress", *extra,
    ]  # fmt: skip
    info = run_child(args)
    info["train_seconds"], seconds, tokens = zhtune_log_seconds(out)
    info["tokens_per_s"] = sum(tokens) / sum(seconds)
    info["steady_tokens_per_s"] = sum(tokens[1:]) / sum(seconds[1:])  # without the first window
    return info


def trl_job(model: Path, data: Path, out: Path, steps: int, batch: int, max_len: int, packing: bool) -> dict:
    info = run_child(
        [
            "trl",
            str(model),
            str(data),
            str(steps),
            str(batch),
            str(max_len),
            "1" if packing else "0",
            str(out),
        ]
    )
    info["tokens_per_s"] = info["tokens"] / info["train_seconds"] if info.get("tokens") else float("nan")
    return info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(HERE.parent.parent / "shared/data/llamafactory/alpaca_zh_demo.json"))
    p.add_argument("--models", default="ref,30m")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", default="/tmp/zhtune-bench")
    p.add_argument("--systems", default="all", help="comma-separated keys of SYSTEMS, or all")
    a = p.parse_args()

    models = a.models.split(",")
    workdir = Path(a.workdir)
    data, dirs, params = prepare(a.data, workdir, models)
    peaks = {dtype: peak_gflops(dtype) for dtype in ("fp32", "bf16")}
    job_args = (data, a.steps, a.batch, a.max_len)
    every = {  # key: (label, dtype, job)
        "zhtune": ("zhtune (padded)", "fp32", lambda m, out: zhtune_job(m, data, out, a.steps, a.batch, a.max_len)),
        "zhtune-packed": (
            "zhtune (packed)", "fp32",
            lambda m, out: zhtune_job(m, data, out, a.steps, a.batch, a.max_len, ("packing=true",)),
        ),
        "zhtune-packed-bf16": (
            "zhtune (packed, bf16)", "bf16",
            lambda m, out: zhtune_job(
                m, data, out, a.steps, a.batch, a.max_len, ("packing=true", "precision=bf16")
            ),
        ),
        "zhtune-packed-bf16-compile": (
            "zhtune (packed, bf16, compile)", "bf16",
            lambda m, out: zhtune_job(
                m, data, out, a.steps, a.batch, a.max_len, ("packing=true", "precision=bf16", "compile=true")
            ),
        ),
        "trl": ("TRL SFTTrainer (padded)", "fp32", lambda m, out: trl_job(m, data, out, *job_args[1:], False)),
        "trl-packed": ("TRL SFTTrainer (packed)", "fp32", lambda m, out: trl_job(m, data, out, *job_args[1:], True)),
    }  # fmt: skip
    keys = list(every) if a.systems == "all" else a.systems.split(",")
    systems = {every[k][0]: every[k][2] for k in keys}
    dtypes = {every[k][0]: every[k][1] for k in keys}
    rows = []
    for name in models:
        results: dict[str, list[dict]] = {s: [] for s in systems}
        for rep in range(a.repeats):
            for key, (system, job) in zip(keys, systems.items()):
                out = workdir / f"run-{name}-{key}-{rep}"
                results[system].append(job(dirs[name], out))
                print(
                    f"  {name} {system} #{rep + 1}: {results[system][-1]['tokens_per_s']:,.0f} tok/s",
                    file=sys.stderr,
                )
        baseline = results.get("TRL SFTTrainer (padded)") or next(iter(results.values()))
        base = statistics.median(r["tokens_per_s"] for r in baseline)
        for system, runs in results.items():
            tps = statistics.median(r["tokens_per_s"] for r in runs)
            steady = statistics.median(r.get("steady_tokens_per_s", float("nan")) for r in runs)
            wall = statistics.median(r["wall_seconds"] for r in runs)
            train_s = statistics.median(r["train_seconds"] for r in runs)
            rss = statistics.median(r["peak_rss_mb"] for r in runs)
            mfu = tps * 6 * params[name] / (peaks[dtypes[system]] * 1e9)
            rows.append(
                (
                    name,
                    f"{params[name] / 1e6:.1f}M",
                    system,
                    tps,
                    steady,
                    tps / base,
                    wall,
                    wall - train_s,
                    rss,
                    mfu,
                )
            )

    print(f"\nmatmul peak measured in this run: fp32 {peaks['fp32']:,.0f} GFLOP/s, bf16 {peaks['bf16']:,.0f} GFLOP/s; "
          f"{a.steps} steps, batch {a.batch}, cutoff {a.max_len}, LoRA r8 all-linear no dropout, median of {a.repeats}\n")  # fmt: skip
    print(
        "| model | params | system | non-pad tok/s | steady tok/s | vs baseline | wall s | outside loop s "
        "| peak RSS MB | MFU |"
    )
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, n, system, tps, steady, ratio, wall, outside, rss, mfu in rows:
        steady_s = "-" if steady != steady else f"{steady:,.0f}"  # NaN: not measured (TRL)
        print(
            f"| {name} | {n} | {system} | {tps:,.0f} | {steady_s} | {ratio:.2f}x | {wall:.1f} | {outside:.1f} "
            f"| {rss:,.0f} | {mfu:.1%} |"
        )


if __name__ == "__main__":
    main()
