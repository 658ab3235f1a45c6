"""Serving throughput: concurrent requests to ``zhtune serve`` (dynamic batching) vs the same
requests one at a time, and predict-style batched generation vs batch size 1.

    python bench/serve_throughput.py [--models ref] [--requests 32] [--max-tokens 64]
        [--data ../shared/data/llamafactory/alpaca_zh_demo.json] [--workdir /tmp/zhtune-bench-serve]

Builds the same local models as ``bench/train_throughput.py`` (no download; ``ref`` is hidden 256,
4 layers, ~4M parameters; ``30m`` is hidden 512, 8 layers). The prompts are the first
``--requests`` instructions of the data, sent as chat requests with the official ``openai``
client, greedy (temperature 0) and a fixed ``max_tokens``, so both modes generate the same
tokens:

* ``serve, concurrent``: all requests at once (``asyncio.gather``), batched by the server;
* ``serve, one at a time``: each request sent after the previous reply arrived (the naive
  baseline: what a client loop gets from a server without batching);
* ``predict, batch N`` / ``predict, batch 1``: :func:`zhtune.infer.generate.generate_replies`
  (what ``zhtune predict`` runs) in this process, after the server has stopped.

Throughput is generated tokens (as counted in ``usage``, a final stop token included) per second
of wall time seen by the client (median of ``--repeats`` runs; batches: mean per run). The client
runs on the same machine as the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from train_throughput import prepare  # noqa: E402

from tests.serving import free_port, stop, wait_ready  # noqa: E402


def start_server(model_dir: Path, batch_size: int, wait_ms: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "zhtune", "serve", str(model_dir), "--port", str(port)]
    cmd += ["--max-batch-size", str(batch_size), "--batch-wait-ms", str(wait_ms)]
    log = model_dir.parent / f"serve-{model_dir.name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    if wait_ready(f"{url}/health", proc, 120):
        return proc, url
    proc.kill()
    raise RuntimeError(f"zhtune serve did not start:\n{log.read_text()[-3000:]}")


async def send(
    url: str, questions: list[str], max_tokens: int, concurrent: bool, repeats: int
) -> tuple[int, float]:
    """Send every question, ``repeats`` times; returns (completion tokens, median wall seconds)."""
    import openai

    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600) as client:

        async def ask(q: str) -> int:
            messages = [{"role": "user", "content": q}]
            reply = await client.chat.completions.create(
                model="default", messages=messages, temperature=0, max_tokens=max_tokens
            )
            return reply.usage.completion_tokens

        await ask(questions[0])  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            if concurrent:
                tokens = sum(await asyncio.gather(*(ask(q) for q in questions)))
            else:
                tokens = 0
                for q in questions:
                    tokens += await ask(q)
            times.append(time.perf_counter() - start)
        return tokens, statistics.median(times)


def predict_style(
    model_dir: Path, questions: list[str], max_tokens: int, batch: int, repeats: int
) -> tuple[int, float]:
    """``generate_replies`` over the questions, ``batch`` at a time, longest first (as predict does)."""
    from zhtune.infer.generate import GenerationOptions, Prompter, generate_replies
    from zhtune.models.loading import load_for_inference

    model, tokenizer, template = load_for_inference(model_dir)
    prompter = Prompter(tokenizer, template)
    prompts = [prompter.prompt_ids([{"role": "user", "content": q}]) for q in questions]
    prompts.sort(key=len, reverse=True)
    options = GenerationOptions(max_new_tokens=max_tokens, temperature=0)
    generate_replies(model, tokenizer, prompts[:1], options, prompter.stop_ids)  # warm-up
    times = []
    for _ in range(repeats):
        tokens, start = 0, time.perf_counter()
        for i in range(0, len(prompts), batch):
            replies = generate_replies(model, tokenizer, prompts[i : i + batch], options, prompter.stop_ids)
            tokens += sum(len(r.token_ids) + r.stopped for r in replies)
        times.append(time.perf_counter() - start)
    return tokens, statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(HERE.parent.parent / "shared/data/llamafactory/alpaca_zh_demo.json"))
    p.add_argument("--models", default="ref")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--batch-wait-ms", type=float, default=10.0)
    p.add_argument("--repeats", type=int, default=3, help="median of this many runs of each system")
    p.add_argument("--workdir", default="/tmp/zhtune-bench-serve")
    a = p.parse_args()

    import httpx

    models = a.models.split(",")
    data, dirs, params = prepare(a.data, Path(a.workdir), models)
    records = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()]
    questions = [r["messages"][0]["content"] for r in records if r["messages"][0]["role"] == "user"]
    questions = questions[: a.requests]
    n = len(questions)

    rows = []
    for name in models:
        proc, url = start_server(dirs[name], n, a.batch_wait_ms)
        try:
            before = httpx.get(f"{url}/health").json()["batching"]
            conc = asyncio.run(send(url, questions, a.max_tokens, True, a.repeats))
            mid = httpx.get(f"{url}/health").json()["batching"]
            seq = asyncio.run(send(url, questions, a.max_tokens, False, a.repeats))
            after = httpx.get(f"{url}/health").json()["batching"]
        finally:
            stop(proc, 30)
        batches = (mid["batches"] - before["batches"] - 1) / a.repeats  # per run, less the warm-up
        seq_batches = (after["batches"] - mid["batches"] - 1) / a.repeats
        pred_n = predict_style(dirs[name], questions, a.max_tokens, n, a.repeats)
        pred_1 = predict_style(dirs[name], questions, a.max_tokens, 1, a.repeats)
        label = f"{name} ({params[name] / 1e6:.1f}M)"
        for system, (tokens, seconds), nb, base in [
            (f"serve, {n} concurrent", conc, batches, seq),
            ("serve, one at a time", seq, seq_batches, seq),
            (f"predict, batch {n}", pred_n, 1, pred_1),
            ("predict, batch 1", pred_1, n, pred_1),
        ]:
            rate = tokens / seconds
            rows.append((label, system, nb, tokens, seconds, rate, rate / (base[0] / base[1])))

    print(f"\n{n} chat requests, greedy, max_tokens {a.max_tokens}:\n")
    print("| model | system | batches | tokens | wall s | tokens/s | vs one at a time |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for label, system, nb, tokens, seconds, rate, ratio in rows:
        print(f"| {label} | {system} | {nb:.3g} | {tokens:,} | {seconds:.2f} | {rate:,.0f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
