"""GPU check: train LoRA and full fine-tuning on a GPU, then chat, predict, serve, eval exam and
export there, each as a user runs the command, and print a table.

Written for the lent GPU machine: torch, transformers, peft and accelerate are installed, but no
datasets, gguf or bitsandbytes, no package index, and at most 64 MiB of files can be brought. So
the real model cannot go there: a small LLaMA-architecture model is built from a config with a
tokenizer trained on the bundled quickstart data, carrying SmolLM2's real chat template (so the
``template: auto`` -> tokenizer path is what runs), and zhtune runs from the source tree
(``PYTHONPATH=src``). The serving packages come as wheels fetched here beforehand::

    python bench/gpu_check.py --prepare-wheels          # here: bench/gpu_wheels/ (about 3 MB)
    python3 bench/gpu_check.py --device cuda            # there (carry bench/gpu_wheels)
    python bench/gpu_check.py --device cpu --steps 4    # the same check on a CPU

At most ~10 minutes on one GPU; about 3 minutes on 2 CPU cores with ``--steps 4``.
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

    def zhtune(self, name: str, args: list[str], stdin: str | None = None) -> str:
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "zhtune", *args], input=stdin, capture_output=True, text=True, env=self.env
        )
        seconds = time.perf_counter() - started
        (self.out / f"{name}.log").write_text(done.stdout + done.stderr, encoding="utf-8")
        if done.returncode != 0:
            self.rows.append((name, seconds, f"FAILED (exit {done.returncode}): {done.stderr.strip()[-300:]}"))
            raise SystemExit(self.table())
        return done.stdout

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
    check.zhtune("convert", ["data", "convert", str(ROOT / "src/zhtune/assets/quickstart/train.json"), "-o", str(data)])
    runs = {}
    for method in ("lora", "full"):
        run = out / f"run-{method}"
        t0 = time.perf_counter()
        log = check.zhtune(
            f"train {method}",
            ["train", f"model={base}", f"data=[{data}]", f"output_dir={run}", f"method={method}",
             f"max_steps={args.steps}", "batch_size=16", "lr=1e-3" if method == "lora" else "lr=3e-4",
             "cutoff_len=128", "precision=bf16", f"logging_steps={max(1, args.steps // 10)}", "overwrite=true",
             "--no-progress"],
        )  # fmt: skip
        rows = [json.loads(line) for line in (run / "trainer_log.jsonl").read_text().splitlines()]
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
    print("\n" + check.table())


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
