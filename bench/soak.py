"""Soak: ``zhtune serve`` on the real model under many streaming clients for minutes, with faults.

    python bench/soak.py [--model DIR] [--clients 64] [--duration 180] [--max-tokens 48]
        [--extra "--max-batch-size 32"] [--workdir /tmp/zhtune-soak]

Starts ``zhtune serve MODEL`` as a subprocess (default model: SmolLM2-135M-Instruct from
``tests/real_model.py``, fetched and converted once) and runs ``--clients`` clients at it for
``--duration`` seconds, each sending its next request as soon as the last one ended:

* streaming clients send sampled chat requests (``stream: true``, a seed each) and read them to
  ``data: [DONE]``; about a third of them (every third client) leave each stream after its first
  few chunks instead, closing the connection mid-reply;
* one client in eight sends garbage: bodies that are not JSON, are cut short, hold invalid UTF-8
  or a lone surrogate, are nested 100,000 deep, have wrong types or the wrong content type, and
  now and then bytes that are not HTTP at all; every one should be refused with a 4xx (400 for
  the connection that is not HTTP);
* one client repeats the poison request (``"temperature": 1, "top_p": 1e-300``: top-p underflows
  to 0 in float32), streamed;
* one client holds slow connections, four at a time: a request head sent half, or a body that
  stops after its first bytes; the server should end each after ``--header-timeout`` (10 s).

Before the load and after it, one greedy request (temperature 0) is sent alone: the two replies
must be the same. The table gives requests served, errors by status, p50/p99 latency and time to
first token of the complete streams, tokens generated (``/metrics``), the server's resident
memory at start and end (and its peak), and the faults survived: each kind of fault sent and
what the server did, whether it still answers ``/health``, whether the final greedy reply equals
the first, and how many errors its log holds. The clients run on the same machine as the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tests.serving import free_port, stop, wait_ready  # noqa: E402

QUESTIONS = [
    "Write 305 in Chinese numerals.",
    "What is the capital of France?",
    "用一句话介绍长城。",
    "List three primary colours.",
    "把 1002 写成中文数字。",
    "Translate 'good morning' into Chinese.",
    "What is 17 times 3?",
    "给我讲一个很短的笑话。",
]
POISON = {"temperature": 1, "top_p": 1e-300}
GREEDY_CHECK = "Count from one to ten in English words."

GARBAGE = [  # (content type, body): each must be refused with a 4xx
    ("application/json", b""),
    ("application/json", b"{"),
    ("application/json", b'{"model": "default", "messages": [{"role": "user", "content": "hi"'),
    ("application/json", b"not json at all"),
    ("application/json", b'{"model": "default", "messages": [{"role": "user", "content": "\xff\xfe"}]}'),
    ("application/json", b'{"model": "default", "messages": [{"role": "user", "content": "\\ud800"}]}'),
    ("application/json", b'{"model": "default", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    ("application/json", b'{"model": "default", "messages": "hi", "max_tokens": "many"}'),
    ("application/json", b'{"model": "default", "messages": [{"role": "robot", "content": 5}]}'),
    ("application/json", b'{"model": "default", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'),
    ("application/json", b'{"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e309}'),
    ("application/json", b'{"model": "default", "messages": [{"role": "user", "content": "hi"}], "n": -1}'),
    ("application/json", b"[1, 2, 3]"),
    ("text/plain", b'{"model": "default", "messages": [{"role": "user", "content": "hi"}]}'),
    ("application/x-www-form-urlencoded", b"model=default&messages=hi"),
]  # fmt: skip
NOT_HTTP = [b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b"GARBAGE / NONSENSE\r\n\r\n", b"\x00" * 64 + b"\r\n\r\n"]


@dataclass
class Tally:
    """What the clients saw."""

    served: Counter[str] = field(default_factory=Counter)
    """Complete streams (ending in ``[DONE]`` with no error chunk), by client kind."""
    errors: Counter[str] = field(default_factory=Counter)
    """Answers other than a complete stream to a well-formed request, by status (or transport error)."""
    left: int = 0
    """Streams the client left mid-reply."""
    garbage: Counter[str] = field(default_factory=Counter)
    """Answers to garbage, by status."""
    slow: dict[str, list[float]] = field(default_factory=lambda: {"half head": [], "stalled body": []})
    """Seconds each slow connection was held before the server ended it, by kind."""
    slow_held: int = 0
    """Slow connections the server had not ended after 60 s (the client gave up)."""
    latency: list[float] = field(default_factory=list)
    first_token: list[float] = field(default_factory=list)


def chat(question: str, max_tokens: int, **sampling: float) -> dict:
    messages = [{"role": "user", "content": question}]
    return {"model": "default", "messages": messages, "max_tokens": max_tokens, "stream": True, **sampling}


def text_of(line: str) -> str:
    """The reply text in one streamed chat chunk (``data: {...}``)."""
    choices = json.loads(line.removeprefix("data: "))["choices"]
    return "".join(c.get("delta", {}).get("content") or "" for c in choices)


async def stream_once(client: httpx.AsyncClient, url: str, body: dict, tally: Tally, kind: str,
                      leave_after: int | None = None) -> None:  # fmt: skip
    """Send one streamed chat request and read it: to ``[DONE]``, or for ``leave_after`` chunks
    of text and then close the connection."""
    started, first, chunks = time.perf_counter(), None, 0
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                tally.errors[str(r.status_code)] += 1
                if r.status_code in (429, 503):
                    await asyncio.sleep(float(r.headers.get("retry-after", 1)))
                return
            async for line in r.aiter_lines():
                if line.startswith('data: {"error"'):
                    tally.errors["error chunk"] += 1
                    return
                if line.startswith("data: {") and text_of(line):
                    chunks += 1
                    first = first or time.perf_counter()
                    if leave_after is not None and chunks >= leave_after:
                        tally.left += 1
                        return  # leaving the block closes the connection mid-stream
                if line == "data: [DONE]":
                    tally.served[kind] += 1
                    if kind == "stream":
                        tally.latency.append(time.perf_counter() - started)
                        tally.first_token.append((first or time.perf_counter()) - started)
                    return
            tally.errors["stream cut short"] += 1
    except httpx.HTTPError as err:
        tally.errors[f"transport: {type(err).__name__}"] += 1


async def streamer(client: httpx.AsyncClient, url: str, tally: Tally, rng: random.Random, deadline: float,
                   max_tokens: int, leaves: bool) -> None:  # fmt: skip
    while time.monotonic() < deadline:
        body = chat(rng.choice(QUESTIONS), max_tokens, temperature=0.8, seed=rng.randrange(2**31))
        await stream_once(client, url, body, tally, "stream", rng.randint(1, 4) if leaves else None)


async def poisoner(client: httpx.AsyncClient, url: str, tally: Tally, deadline: float, max_tokens: int) -> None:
    while time.monotonic() < deadline:
        await stream_once(client, url, chat(QUESTIONS[0], max_tokens, **POISON), tally, "poison")


async def raw_exchange(url: str, data: bytes, timeout: float) -> tuple[bytes, float]:
    """Open a connection, send ``data``, read until the server closes it (or ``timeout``):
    (what it answered, seconds until it closed; ``timeout`` if it never did)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    started, answer = time.perf_counter(), bytearray()

    async def read_to_end() -> None:
        while chunk := await reader.read(4096):
            answer.extend(chunk)

    try:
        writer.write(data)
        await writer.drain()
        await asyncio.wait_for(read_to_end(), timeout)
        return bytes(answer), time.perf_counter() - started
    except ConnectionError:
        return bytes(answer), time.perf_counter() - started
    except asyncio.TimeoutError:
        return bytes(answer), timeout
    finally:
        writer.close()


async def garbler(client: httpx.AsyncClient, url: str, tally: Tally, rng: random.Random, deadline: float) -> None:
    while time.monotonic() < deadline:
        if rng.random() < 0.1:
            answer, _ = await raw_exchange(url, rng.choice(NOT_HTTP), 15)
            status = answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/1.1 ") else "no answer"
            tally.garbage[f"{status} (not HTTP)"] += 1
            continue
        content_type, body = rng.choice(GARBAGE)
        try:
            r = await client.post(f"{url}/v1/chat/completions", content=body, headers={"content-type": content_type})
            tally.garbage[str(r.status_code)] += 1
        except httpx.HTTPError as err:
            tally.garbage[f"transport: {type(err).__name__}"] += 1
        await asyncio.sleep(0.05)


async def slowpoke(url: str, tally: Tally, deadline: float) -> None:
    """Four slow connections at a time, each ended by the server or given up after 60 s (or at
    the deadline, uncounted)."""
    half_head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: appl"
    stalled_body = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    b'Content-Length: 1000\r\n\r\n{"model": "default", "mess')  # fmt: skip

    async def hold(kind: str, data: bytes) -> None:
        while (left := deadline - time.monotonic()) > 0:
            limit = min(60.0, left)
            _, held = await raw_exchange(url, data, limit)
            if held < limit:
                tally.slow[kind].append(held)
            elif limit == 60:
                tally.slow_held += 1

    kinds = [("half head", half_head), ("stalled body", stalled_body)]
    await asyncio.gather(*(hold(kind, data) for kind, data in kinds * 2))


async def load(url: str, clients: int, duration: float, max_tokens: int, seed: int) -> Tally:
    tally, deadline = Tally(), time.monotonic() + duration
    limits = httpx.Limits(max_connections=clients * 2, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(300, connect=30)) as client:
        tasks = []
        for i in range(clients):
            rng = random.Random(seed * 1000 + i)
            if i == 0:
                tasks.append(poisoner(client, url, tally, deadline, max_tokens))
            elif i == 1:
                tasks.append(slowpoke(url, tally, deadline))
            elif i % 8 == 2:
                tasks.append(garbler(client, url, tally, rng, deadline))
            else:
                tasks.append(streamer(client, url, tally, rng, deadline, max_tokens, leaves=i % 3 == 0))
        await asyncio.gather(*tasks)
    return tally


def greedy(url: str, max_tokens: int) -> str:
    body = {"model": "default", "messages": [{"role": "user", "content": GREEDY_CHECK}], "max_tokens": max_tokens,
            "temperature": 0}  # fmt: skip
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


def memory_mib(pid: int) -> dict[str, float]:
    """The process's resident memory now (VmRSS) and at its peak (VmHWM), MiB (Linux)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}


def metric(url: str, name: str) -> float:
    """One unlabelled sample of ``/metrics``."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return next(float(line.split()[1]) for line in text.splitlines() if line.startswith(f"{name} "))


def quantiles(values: list[float]) -> str:
    if len(values) < 2:
        return "n/a"
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return f"{cuts[49]:.2f} / {cuts[98]:.2f}"


def counts(counter: Counter[str]) -> str:
    return ", ".join(f"{k}: {v:,}" for k, v in sorted(counter.items())) or "none"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model or run directory (default: SmolLM2-135M-Instruct, tests/real_model.py)")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration", type=float, default=180, help="seconds of load")
    p.add_argument("--max-tokens", type=int, default=48, help="max_tokens of each request")
    p.add_argument("--extra", default="", help="more `zhtune serve` flags, e.g. '--max-batch-size 64'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="/tmp/zhtune-soak")
    a = p.parse_args()
    if a.clients < 3:
        p.error("--clients must be at least 3 (the poison and slow clients, and one streaming)")
    if a.model:
        model = Path(a.model)
    else:
        from tests.real_model import smollm2_dir

        model = smollm2_dir()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    port, log = free_port(), work / "serve.log"
    cmd = [sys.executable, "-m", "zhtune", "serve", str(model), "--port", str(port), *shlex.split(a.extra)]
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        if not wait_ready(f"{url}/health", proc, 600, poll=0.2):
            raise SystemExit(f"zhtune serve did not start:\n{log.read_text()[-3000:]}")
        ready = time.perf_counter() - started
        first = greedy(url, a.max_tokens)
        mem_start, tokens_start = memory_mib(proc.pid), metric(url, "zhtune_completion_tokens_total")
        print(f"soak: {a.clients} clients for {a.duration:g} s against {model.name} (ready after {ready:.1f} s)...",
              file=sys.stderr, flush=True)  # fmt: skip
        t0 = time.perf_counter()
        tally = asyncio.run(load(url, a.clients, a.duration, a.max_tokens, a.seed))
        wall = time.perf_counter() - t0
        mem_end = memory_mib(proc.pid)
        tokens = metric(url, "zhtune_completion_tokens_total") - tokens_start
        health = httpx.get(f"{url}/health", timeout=30)
        last = greedy(url, a.max_tokens)
    finally:
        stop(proc, 60)
    logged = len(re.findall(r"^\[err-[0-9a-f]+\]", log.read_text(errors="replace"), flags=re.MULTILINE))
    alive = health.status_code == 200 and health.json()["status"] == "ok"
    garbage_ok = all(k.startswith("4") for k in tally.garbage)
    rows = [
        ("model", f"{model.name} (`zhtune serve {' '.join(shlex.quote(x) for x in cmd[4:])}`)"),
        ("clients, duration", f"{a.clients}, {wall:.0f} s; max_tokens {a.max_tokens}"),
        ("requests served (complete streams)", f"{sum(tally.served.values()):,} ({counts(tally.served)})"),
        ("tokens generated", f"{tokens:,.0f} ({tokens / wall:,.0f}/s)"),
        ("errors by status (well-formed requests)", counts(tally.errors)),
        ("latency p50 / p99, s (complete streams)", quantiles(tally.latency)),
        ("time to first token p50 / p99, s", quantiles(tally.first_token)),
        ("server RSS start → end (peak), MiB",
         f"{mem_start['VmRSS']:,.0f} → {mem_end['VmRSS']:,.0f} ({mem_end['VmHWM']:,.0f})"),
        ("streams left mid-reply", f"{tally.left:,}"),
        ("garbage sent → answers", f"{sum(tally.garbage.values()):,} → {counts(tally.garbage)}"),
        ("poison requests (top_p 1e-300) served", f"{tally.served['poison']:,}"),
        ("slow connections ended by the server (median s)",
         "; ".join(f"{kind}: {len(held):,} ({statistics.median(held) if held else 0:.1f})"
                   for kind, held in tally.slow.items()) + f"; held past 60 s: {tally.slow_held}"),
        ("server still answers /health", "yes" if alive else f"no ({health.status_code})"),
        ("final greedy reply equals the first", "yes" if last == first else f"no: {first!r} vs {last!r}"),
        ("errors in the server log", f"{logged}"),
    ]  # fmt: skip
    survived = alive and last == first and garbage_ok and not tally.slow_held and not logged
    survived = survived and not any(k.startswith(("5", "transport", "error chunk")) for k in tally.errors)
    rows.append(("faults survived", "all" if survived else "NO (see above)"))
    print("\n| measure | value |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")
    print(f"\nserver log: {log}")
    if not survived:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
