"""GPU check: train LoRA and full fine-tuning on a GPU, then chat, predict, serve, eval exam and
export there, then LoRA again with ``compile: true`` and full fine-tuning under each shipped FSDP
launcher config, each as a user runs the command, and print a table.

Written for the lent GPU machine: torch, transformers, peft and accelerate are installed, but no
datasets, gguf or bitsandbytes, no package index, and at most 64 MiB of files can be brought. So
the real model cannot go there: a small LLaMA-architecture model is built from a config with a
tokenizer trained on the bundled quickstart data, carrying SmolLM2's real chat template (so the
``template: auto`` -> tokenizer path is what runs), and zhtune runs from the source tree
(``PYTHONPATH=src``). The serving packages come as wheels fetched here beforehand::

    python bench/gpu_check.py --prepare-wheels          # here: bench/gpu_wheels/ (about 3 MB)
    python3 bench/gpu_check.py --device cuda            # there (carry bench/gpu_wheels)
    python bench/gpu_check.py --device cpu --steps 4    # the same check on a CPU

On a CPU the compiled run needs a C++ compiler (skipped without one), fsdp.yaml (FSDP1, GPUs
only) is skipped and fsdp2.yaml runs 2 processes (gloo); on a GPU each FSDP config runs 1 process
(NCCL takes one process per GPU). A failed compile or FSDP step is reported in its row and the
check goes on (exit status 1 at the end); a failure before them stops it.

At most ~10 minutes on one GPU; about 4 minutes on 2 CPU cores with ``--steps 4``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / "bench" / "gpu_wheels"
SERVE_PACKAGES = ["starlette==1.10.0", "uvicorn==0.54.0", "pydantic==2.14.3"]
SMOLLM2_TEMPLATE = ROOT / "tests" / "fixtures" / "chat_templates" / "smollm2.jinja"


def prepare_wheels() -> None:
    """Fetch the serving packages' wheels for the GPU machine's Python (3.12, x86_64)."""
    WHEELS.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--python-version", "3.12",
         "--platform", "manylinux2014_x86_64", "--implementation", "cp", "-d", str(WHEELS), *SERVE_PACKAGES],
        check=True,
    )  # fmt: skip
    print(f"{sum(f.stat().st_size for f in WHEELS.iterdir()) / 2**20:.1f} MiB of wheels in {WHEELS}")


def ensure_serving_packages() -> None:
    """Install the serving packages from bench/gpu_wheels when they are missing (no index there)."""
    try:
        import pydantic  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--find-links", str(WHEELS),
             *SERVE_PACKAGES],
            check=True,
        )  # fmt: skip


class Check:
    """Runs zhtune commands as subprocesses and collects one table row per step."""

    def __init__(self, out: Path, device: str) -> None:
        self.out, self.device, self.rows = out, device, []
        self.env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TOKENIZERS_PARALLELISM": "false"}

    def zhtune(
        self,
        name: str,
        args: list[str],
        stdin: str | None = None,
        launcher: tuple[str, ...] = ("-m", "zhtune"),
        env: dict[str, str] | None = None,
        fatal: bool = True,
    ) -> str | None:
        """Run ``python LAUNCHER ARGS``; its stdout. On failure a FAILED row, then the check stops
        (``fatal``) or this returns None."""
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, *launcher, *args], input=stdin, capture_output=True, text=True,
            env={**self.env, **(env or {})},
        )  # fmt: skip
        seconds = time.perf_counter() - started
        (self.out / f"{name}.log").write_text(done.stdout + done.stderr, encoding="utf-8")
        if done.returncode != 0:
            self.rows.append(
                (name, seconds, f"FAILED (exit {done.returncode}): {done.stderr.strip()[-300:]}")
            )
            if fatal:
                raise SystemExit(self.table())
            return None
        return done.stdout

    @property
    def failed(self) -> bool:
        return any("FAILED" in result for _, _, result in self.rows)

    def row(self, name: str, seconds: float, result: str) -> None:
        self.rows.append((name, seconds, result))
        print(f"{name}: {seconds:.1f} s, {result}", flush=True)

    def table(self) -> str:
        lines = [f"GPU check on {self.device}", "", "| step | s | result |", "| --- | ---: | --- |"]
        lines += [f"| {n} | {s:.1f} | {r} |" for n, s, r in self.rows]
        return "\n".join(lines)


def build_base(out: Path, hidden: int, layers: int) -> tuple[Path, int]:
    """A small random LLaMA with a tokenizer trained on the bundled data and SmolLM2's template."""
    sys.path.insert(0, str(ROOT / "src"))
    from zhtune.data.skills import bundled_dir
    from zhtune.models.tiny import build_tiny_llama, train_tokenizer

    records = json.loads((bundled_dir() / "train.json").read_text(encoding="utf-8"))
    texts = [r["instruction"] for r in records] + [r["output"] for r in records]
    tokenizer = train_tokenizer(texts, vocab_size=2000)
    tokenizer.add_special_tokens(
        {"extra_special_tokens": ["<|im_start|>", "<|im_end|>"]}, replace_extra_special_tokens=False
    )
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = SMOLLM2_TEMPLATE.read_text(encoding="utf-8")
    model = build_tiny_llama(
        tokenizer, hidden_size=hidden, num_layers=layers, num_heads=8, intermediate_size=hidden * 3, seed=0
    )
    base = out / "base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    return base, sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="device for inference commands (training: accelerate's)")
    ap.add_argument("--out", default="/tmp/zhtune-gpu-check", help="working directory")
    ap.add_argument("--steps", type=int, default=60, help="training steps per method")
    ap.add_argument("--hidden", type=int, default=512, help="width of the small model")
    ap.add_argument("--layers", type=int, default=8, help="decoder blocks of the small model")
    ap.add_argument("--prepare-wheels", action="store_true", help="fetch the serving wheels here, then stop")
    args = ap.parse_args()
    if args.prepare_wheels:
        prepare_wheels()
        return
    ensure_serving_packages()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    check, dev = Check(out, args.device), ["--device", args.device]
    import torch

    started = time.perf_counter()
    base, n_params = build_base(out, args.hidden, args.layers)
    check.row("build model", time.perf_counter() - started, f"{n_params / 1e6:.1f}M params; torch {torch.__version__}, "
              f"cuda {torch.cuda.is_available()} {torch.cuda.get_device_name(0) if torch.cuda.is_available() else ''}")  # fmt: skip

    data = out / "train.jsonl"
    check.zhtune(
        "convert", ["data", "convert", str(ROOT / "src/zhtune/assets/quickstart/train.json"), "-o", str(data)]
    )
    runs = {}
    for method in ("lora", "full"):
        run = out / f"run-{method}"
        t0 = time.perf_counter()
        log = check.zhtune(f"train {method}", train_args(base, data, run, method, args.steps))
        rows = log_rows(run)
        losses = [r["loss"] for r in rows if "loss" in r]
        placed = next((ln.split("device ")[-1] for ln in log.splitlines() if "device " in ln), "?")
        tps = rows[-1].get("tokens_per_s", 0)
        check.row(f"train {method}", time.perf_counter() - t0,
                  f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, {tps:,.0f} tok/s, device {placed.strip()}")  # fmt: skip
        runs[method] = run

    lora = runs["lora"]
    sys.path.insert(0, str(ROOT / "src"))
    from zhtune.models.loading import load_for_inference

    t0 = time.perf_counter()
    model, _, template = load_for_inference(lora, device=args.device)
    p = next(model.parameters())
    check.row("load run", time.perf_counter() - t0, f"on {p.device}, {p.dtype}, template {template}")
    del model

    t0 = time.perf_counter()
    reply = check.zhtune("chat", ["chat", str(lora), *dev, "--temperature", "0", "--max-new-tokens", "16"],
                         stdin="把 305 写成中文数字。\n/exit\n")  # fmt: skip
    check.row("chat", time.perf_counter() - t0, "reply: " + repr(reply.split("Assistant>")[-1].strip()[:60]))

    prompts = out / "prompts.jsonl"
    test = json.loads((ROOT / "src/zhtune/assets/quickstart/test.json").read_text(encoding="utf-8"))[:64]
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "messages": [{"role": "user", "content": r["instruction"]}]},
                                          ensure_ascii=False) + "\n" for i, r in enumerate(test)), encoding="utf-8")  # fmt: skip
    t0 = time.perf_counter()
    preds = out / "pred.jsonl"
    preds.unlink(missing_ok=True)
    check.zhtune("predict", ["predict", str(lora), str(prompts), "-o", str(preds), *dev, "--batch-size", "32",
                             "--max-new-tokens", "16", "--no-progress"])  # fmt: skip
    n = len(preds.read_text().splitlines())
    check.row("predict", time.perf_counter() - t0, f"{n} rows")

    t0 = time.perf_counter()
    served = serve_once(check, lora, dev, out)
    check.row("serve", time.perf_counter() - t0, served)

    t0 = time.perf_counter()
    log = check.zhtune("eval exam", ["eval", "exam", str(lora), "--data", str(ROOT / "tests/fixtures/exam/ceval"),
                                     "--split", "val", "--shots", "2", "-o", str(out / "exam"), *dev, "--no-progress"])  # fmt: skip
    score = json.loads((out / "exam" / "exam.json").read_text())["overall"]
    check.row("eval exam", time.perf_counter() - t0, f"accuracy {score:.2f} (4 questions)")

    t0 = time.perf_counter()
    check.zhtune("export", ["export", str(lora), "-o", str(out / "export"), "--merge", "--overwrite", *dev])
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(out / "export")
    check.row("export", time.perf_counter() - t0, f"merged model loads: {type(exported).__name__}")

    train_compiled(check, base, data, out, args.steps, runs["lora"])
    train_fsdp(check, base, data, out, args.steps, runs["full"])
    print("\n" + check.table())
    if check.failed:
        raise SystemExit(1)


def train_args(base: Path, data: Path, run: Path, method: str, steps: int, batch_size: int = 16) -> list[str]:
    """``zhtune train`` arguments of every training step here (bf16, one global batch of 16)."""
    return ["train", f"model={base}", f"data=[{data}]", f"output_dir={run}", f"method={method}",
            f"max_steps={steps}", f"batch_size={batch_size}", "lr=1e-3" if method == "lora" else "lr=3e-4",
            "cutoff_len=128", "precision=bf16", f"logging_steps={max(1, steps // 10)}", "overwrite=true",
            "--no-progress"]  # fmt: skip


def log_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "trainer_log.jsonl").read_text().splitlines()]


def step_seconds(rows: list[dict]) -> float:
    """Seconds per optimizer step over the second half of the logged rows (start-up, compiling and
    the first steps left out)."""
    first, last = rows[max(0, len(rows) // 2 - 1)], rows[-1]
    if last["step"] == first["step"]:
        return last["elapsed_s"] / last["step"]
    return (last["elapsed_s"] - first["elapsed_s"]) / (last["step"] - first["step"])


def against(rows: list[dict], reference: list[dict], name: str) -> str:
    """First -> last loss of ``rows`` beside the reference run's, and their largest difference."""
    diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(rows, reference))
    return (
        f"loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f} ({name} {reference[0]['loss']:.3f} -> "
        f"{reference[-1]['loss']:.3f}, max diff {diff:.4f} over {len(rows)} rows)"
    )


def train_compiled(check: Check, base: Path, data: Path, out: Path, steps: int, eager: Path) -> None:
    """LoRA again with ``compile: true``: its losses against the eager run's, and the step time."""
    import shutil

    import torch

    name = "train lora compile"
    if not torch.cuda.is_available() and not any(shutil.which(cc) for cc in ("c++", "g++", "clang++")):
        check.row(name, 0.0, "skipped: Inductor on a CPU needs a C++ compiler")
        return
    run = out / "run-lora-compile"
    t0 = time.perf_counter()
    log = check.zhtune(name, [*train_args(base, data, run, "lora", steps), "compile=true"], fatal=False)
    if log is None:
        return
    blocks = next(
        (ln.split("compiling ")[1].split(" ")[0] for ln in log.splitlines() if "compiling " in ln), "no"
    )
    rows, reference = log_rows(run), log_rows(eager)
    check.row(name, time.perf_counter() - t0,
              f"{blocks} blocks compiled; {against(rows, reference, 'eager')}; step {1000 * step_seconds(rows):.1f} ms "
              f"vs eager {1000 * step_seconds(reference):.1f} ms; first row at {rows[0]['elapsed_s']:.0f} s "
              f"vs eager {reference[0]['elapsed_s']:.0f} s")  # fmt: skip


def train_fsdp(check: Check, base: Path, data: Path, out: Path, steps: int, full: Path) -> None:
    """Full fine-tuning under each shipped FSDP config, launched as users launch it (``accelerate
    launch --config_file``), the global batch of ``train full``: its losses against that run's,
    and model/ loads with the same tensors."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    gpu = torch.cuda.is_available()
    nproc = 1 if gpu else 2
    env = {} if gpu else {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    for config in ("fsdp", "fsdp2"):
        name = f"train {config}"
        if config == "fsdp" and not gpu:
            check.row(name, 0.0, "skipped: FSDP1 runs on GPUs only")
            continue
        run = out / f"run-{config}"
        launcher = ("-m", "accelerate.commands.launch", "--config_file",
                    str(ROOT / "src/zhtune/configs/accelerate" / f"{config}.yaml"), "--num_processes", str(nproc), "-m", "zhtune")  # fmt: skip
        t0 = time.perf_counter()
        args = train_args(base, data, run, "full", steps, batch_size=16 // nproc)
        log = check.zhtune(name, args, launcher=launcher, env=env, fatal=False)
        if log is None:
            continue
        engine = next((ln.rsplit(", ", 1)[-1] for ln in log.splitlines() if " proc), " in ln), "?")
        try:
            model, info = AutoModelForCausalLM.from_pretrained(run / "model", output_loading_info=True)
            names = [set(load_file(r / "model" / "model.safetensors")) for r in (run, full)]
            loads = (
                f"model/ loads ({type(model).__name__}, missing {info['missing_keys'] or 'none'}, unexpected "
                f"{info['unexpected_keys'] or 'none'}), tensors "
                + (
                    "as train full's"
                    if names[0] == names[1]
                    else f"differ from train full's: {names[0] ^ names[1]}"
                )
            )
        except Exception as err:  # reported in the table, the check goes on
            loads = f"FAILED to load model/: {type(err).__name__}: {err}"[:300]
        expected = "FSDP2" if config == "fsdp2" else "FSDP1"
        ran = engine if engine == expected else f"FAILED: ran as {engine}, not {expected}"
        check.row(name, time.perf_counter() - t0,
                  f"{ran} x {nproc} proc; {against(log_rows(run), log_rows(full), 'train full')}; {loads}")  # fmt: skip


def serve_once(check: Check, run: Path, dev: list[str], out: Path) -> str:
    """Start ``zhtune serve``, send one chat completion, stop it; the reply and its latency."""
    sys.path.insert(0, str(ROOT))
    from tests.serving import free_port, stop, wait_ready

    port = free_port()
    log = (out / "serve.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "zhtune", "serve", str(run), *dev, "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=check.env)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        if not wait_ready(f"{url}/health", proc, 180, poll=0.3):
            return f"FAILED to start: {(out / 'serve.log').read_text()[-300:]}"
        t0 = time.perf_counter()
        r = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
            "model": "default", "messages": [{"role": "user", "content": "What number is 三百零五?"}],
            "max_tokens": 16, "temperature": 0})  # fmt: skip
        r.raise_for_status()
        text = r.json()["choices"][0]["message"]["content"]
        return f"200 in {time.perf_counter() - t0:.2f} s: {text!r}"
    finally:
        stop(proc, 30)


if __name__ == "__main__":
    main()
