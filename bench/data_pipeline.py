"""Data pipeline throughput: zhtune data convert / clean / tokenize vs a plain Python loop.

    python bench/data_pipeline.py [--data ../shared/data/zh/alpaca_chinese_52k_v3.json]
        [--scale 10] [--step-scale 1] [--workdir /tmp/zhtune-bench-data] [--jobs all]

Builds in ``--workdir``: the input replicated ``--scale`` times as JSON Lines with unique ids
(the Alpaca-zh columns, read with ``--map zh_instruction=instruction ...`` as a user would) and a
4k byte-level BPE tokenizer trained on the data (``zhtune.models.tiny.train_tokenizer``, no
download). Then runs every job in its own process and reports records/s and peak RSS (the largest
of the job's process and its workers, ``ru_maxrss``):

- ``convert``: ``zhtune data convert`` of the replicated file;
- ``clean:none`` and ``clean:STEP``: ``zhtune data clean`` with no step (reading, validating and
  writing only) and with only that step on, on the canonical file of ``--step-scale`` copies
  (per-step rows are smaller to keep the run short);
- ``clean:all``: the default steps plus ``split`` (``--tokenizer``), on the canonical file of
  ``--scale`` copies;
- ``tokenize``: zhtune's training tokenization (``tokenize_records``, chatml template, labels on
  replies) of the canonical file, streamed in batches; and of what ``clean:all`` kept.

End to end, two figures: clean then tokenize all of the input (as if clean removed nothing: the
conservative one), and clean then tokenize what clean kept (what a user runs; the replicated
copies are exact duplicates, so it keeps about a tenth).

Each has a baseline run in the same invocation: a plain single-process loop doing the same work
(``json.loads`` per line, the same per-record functions, one tokenizer call per record, a set of
hashes for exact dedup and ``datasketch`` MinHash + MinHashLSH for near-dup). Prints a markdown
table with the ratio zhtune/baseline.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MAP = ["zh_instruction=instruction", "zh_input=input", "zh_output=output"]
PER_RECORD = [
    "html",
    "t2s",
    "trailing-user",
    "short",
    "errors",
    "self-ref",
    "incomplete",
    "zh-en",
    "lang",
    "split",
]
DEDUP = ["exact-dup", "near-dup"]
BATCH = 1000


# --------------------------------------------------------------------------- preparation


def build_input(data: str, workdir: Path, scale: int) -> Path:
    """``data`` (a JSON array) replicated ``scale`` times as JSON Lines, ids ``{copy}-{i}``."""
    path = workdir / f"input_x{scale}.jsonl"
    if path.exists():
        return path
    records = json.loads(Path(data).read_text(encoding="utf-8"))
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for copy in range(scale):
            for i, rec in enumerate(records):
                f.write(json.dumps({"id": f"{copy}-{i}", **rec}, ensure_ascii=False) + "\n")
    tmp.rename(path)
    return path


def build_tokenizer(canonical: Path, workdir: Path) -> Path:
    """A 4k byte-level BPE tokenizer trained on the first 20k canonical records (chatml markers)."""
    from zhtune.data.templates import get_template, prepare_tokenizer
    from zhtune.models.tiny import train_tokenizer

    out = workdir / "tokenizer"
    if (out / "tokenizer.json").exists():
        return out
    texts = []
    with open(canonical, encoding="utf-8") as f:
        for n, line in enumerate(f):
            if n == 20000:
                break
            texts += [m["content"] for m in json.loads(line)["messages"]]
    tokenizer = train_tokenizer(texts, vocab_size=4000)
    prepare_tokenizer(tokenizer, get_template("chatml"))
    tokenizer.save_pretrained(out)
    return out


def count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)


# --------------------------------------------------------------------------- jobs (in a child)


def _zhtune(argv: list[str]) -> None:
    from zhtune.cli import main

    code = main(argv)
    if code:
        raise SystemExit(code)


def _clean_flags(only: str | None) -> list[str]:
    """Flags that turn on exactly ``only`` (None: the defaults plus split; "none": no step)."""
    if only is None:
        return []
    from zhtune.data.clean import STEPS

    return [f"--{s.name}" if s.name == only else f"--no-{s.name}" for s in STEPS]


def _tokenize(inp: str, tokenizer_dir: str) -> dict:
    from zhtune.data.dataset import tokenize_records
    from zhtune.data.stats import load_tokenizer
    from zhtune.data.templates import get_template

    tokenizer, template = load_tokenizer(tokenizer_dir), get_template("chatml")
    tokens = 0
    with open(inp, encoding="utf-8") as f:
        batch = []
        for line in f:
            batch.append(json.loads(line))
            if len(batch) == BATCH:
                tokens += sum(
                    len(e["input_ids"]) for e in tokenize_records(batch, tokenizer, template, 2048).examples
                )
                batch = []
        if batch:
            tokens += sum(
                len(e["input_ids"]) for e in tokenize_records(batch, tokenizer, template, 2048).examples
            )
    return {"tokens": tokens}


class _Baseline:
    """The plain single-process loop: json.loads per line, the same per-record functions, one
    tokenizer call per record, a set of hashes, datasketch for near duplicates."""

    def __init__(self, steps: list[str], tokenizer_dir: str | None) -> None:
        from zhtune.data.clean import STEP_BY_NAME, CleanOptions, Worker

        self.options = CleanOptions(tokenizer=tokenizer_dir, workers=1)
        tokenizer = None
        if tokenizer_dir:
            from zhtune.data.stats import load_tokenizer

            tokenizer = load_tokenizer(tokenizer_dir)
        self.worker = Worker(self.options, [s for s in steps if s not in DEDUP], tokenizer)
        self.steps = [STEP_BY_NAME[s] for s in steps if s not in DEDUP]
        self.exact = "exact-dup" in steps
        self.near = "near-dup" in steps
        self.seen: set[bytes] = set()
        if self.near:
            from datasketch import MinHashLSH

            self.lsh = MinHashLSH(threshold=self.options.near_dup_threshold, num_perm=self.options.num_perm)

    def keep(self, record: dict, n: int) -> bool:
        import hashlib

        from zhtune.data.dedup import SHINGLE, normalise

        text = normalise(record["messages"])
        if self.exact:
            key = hashlib.blake2b(text.encode(), digest_size=8).digest()
            if key in self.seen:
                return False
            self.seen.add(key)
        if self.near:
            from datasketch import MinHash

            m = MinHash(num_perm=self.options.num_perm)
            m.update_batch([text[i : i + SHINGLE].encode() for i in range(max(1, len(text) - SHINGLE + 1))])
            if self.lsh.query(m):
                return False
            self.lsh.insert(str(n), m)
        return True

    def run(self, inp: str, out: str) -> None:
        with open(inp, encoding="utf-8") as f, open(out, "w", encoding="utf-8") as o:
            for n, line in enumerate(f):
                records = [json.loads(line)]
                for step in self.steps:
                    kept = []
                    for rec in records:
                        result = step.apply(rec, self.worker)
                        if not isinstance(result, str):
                            kept.extend(result)
                    records = kept
                for rec in records:
                    if (self.exact or self.near) and not self.keep(rec, n):
                        continue
                    o.write(json.dumps(rec, ensure_ascii=False) + "\n")


def _base_convert(inp: str, out: str) -> None:
    """json.loads, the Alpaca layout to messages, the language guess, json.dumps."""
    from zhtune.data.lang import guess_lang

    with open(inp, encoding="utf-8") as f, open(out, "w", encoding="utf-8") as o:
        for line in f:
            raw = json.loads(line)
            prompt = raw["zh_instruction"] + ("\n" + raw["zh_input"] if raw["zh_input"] else "")
            if not raw["zh_output"].strip():
                continue
            messages = [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": raw["zh_output"]},
            ]
            meta = {"source": Path(inp).name, "lang": guess_lang(prompt + "\n" + raw["zh_output"])}
            o.write(
                json.dumps({"id": raw["id"], "messages": messages, "meta": meta}, ensure_ascii=False) + "\n"
            )


def _base_tokenize(inp: str, tokenizer_dir: str) -> dict:
    from zhtune.data.stats import load_tokenizer
    from zhtune.data.templates import get_template, render_text

    tokenizer, template = load_tokenizer(tokenizer_dir), get_template("chatml")
    tokens = 0
    with open(inp, encoding="utf-8") as f:
        for line in f:
            tokens += len(
                tokenizer(render_text(template, json.loads(line)["messages"], tokenizer))["input_ids"]
            )
    return {"tokens": tokens}


def child(job: str, inp: str, out: str, tokenizer_dir: str) -> dict:
    """Run one job in this process; return its timing and peak RSS."""
    t0 = time.perf_counter()
    info: dict = {}
    kind, _, step = job.partition(":")
    if kind == "convert":
        _zhtune(["data", "convert", inp, "-o", out, *sum((["--map", m] for m in MAP), []), "--allow-rejects",
                 "--no-progress"])  # fmt: skip
    elif kind == "clean":
        extra = ["--tokenizer", tokenizer_dir] if step in ("all", "split") else []
        _zhtune(
            [
                "data",
                "clean",
                inp,
                "-o",
                out,
                "--no-progress",
                *extra,
                *_clean_flags(None if step == "all" else step),
            ]
        )
    elif kind == "tokenize":
        info = _tokenize(inp, tokenizer_dir)
    elif kind == "base-convert":
        _base_convert(inp, out)
    elif kind == "base-clean":
        from zhtune.data.clean import CleanOptions, resolve_steps

        steps = resolve_steps({}, CleanOptions(tokenizer=tokenizer_dir)) if step == "all" else [step]
        steps = [] if step == "none" else steps
        _Baseline(steps, tokenizer_dir if "split" in steps else None).run(inp, out)
    elif kind == "base-tokenize":
        info = _base_tokenize(inp, tokenizer_dir)
    else:
        raise SystemExit(f"unknown job {job}")
    info["seconds"] = time.perf_counter() - t0
    info["peak_rss_mb"] = max(_own_peak_kb(), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
    return info


def _own_peak_kb() -> int:
    """This process's peak RSS since exec (``VmHWM``; ``ru_maxrss`` of RUSAGE_SELF would carry
    the peak of the bench process that started it over the exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# --------------------------------------------------------------------------- driver


def run_job(job: str, inp: Path, out: Path, tokenizer_dir: Path) -> dict:
    """Run ``job`` as its own process; its JSON line, plus the wall time seen from here."""
    t0 = time.perf_counter()
    cmd = [sys.executable, __file__, "--child", job, str(inp), str(out), str(tokenizer_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"job {job} failed:\n{proc.stderr[-3000:]}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    info["wall_seconds"] = time.perf_counter() - t0
    info["log"] = proc.stderr
    return info


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(*sys.argv[2:6])))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(HERE.parent.parent / "shared/data/zh/alpaca_chinese_52k_v3.json"))
    p.add_argument(
        "--scale", type=int, default=10, help="copies of the data for convert, clean:all, tokenize"
    )
    p.add_argument("--step-scale", type=int, default=1, help="copies of the data for the per-step rows")
    p.add_argument("--workdir", default="/tmp/zhtune-bench-data")
    p.add_argument("--jobs", default="all", help="all, or comma-separated: convert,steps,clean,tokenize")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args()
    wanted = {"convert", "steps", "clean", "tokenize"} if args.jobs == "all" else set(args.jobs.split(","))

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, int, dict, dict]] = []

    def measure(name: str, job: str, inp: Path, n: int, out: Path, tok: Path) -> dict:
        z = run_job(job, inp, out, tok)
        b = run_job(f"base-{job}", inp, out.with_suffix(".base.jsonl"), tok)
        rows.append((name, n, z, b))
        print(f"{name}: {n / z['seconds']:,.0f} rec/s ({z['peak_rss_mb']:.0f} MB) vs baseline "
              f"{n / b['seconds']:,.0f} rec/s ({b['peak_rss_mb']:.0f} MB)", file=sys.stderr, flush=True)  # fmt: skip
        return z

    big_in = build_input(args.data, work, args.scale)
    big_n = count_lines(big_in)
    big = work / f"canonical_x{args.scale}.jsonl"
    small = work / f"canonical_x{args.step_scale}.jsonl"
    tok = work / "tokenizer"
    if "convert" in wanted or not big.exists():
        run = measure(f"convert (x{args.scale})", "convert", big_in, big_n, big, tok)
        if "convert" not in wanted:
            rows.pop()
        del run
    tok = build_tokenizer(big, work)
    if "steps" in wanted:
        if not small.exists():
            small_in = build_input(args.data, work, args.step_scale)
            run_job("convert", small_in, small, tok)
        small_n = count_lines(small)
        measure(
            f"clean: no step, read + write (x{args.step_scale})",
            "clean:none",
            small,
            small_n,
            work / "step.jsonl",
            tok,
        )
        for step in PER_RECORD + DEDUP:
            measure(
                f"clean: {step} only (x{args.step_scale})",
                f"clean:{step}",
                small,
                small_n,
                work / "step.jsonl",
                tok,
            )
    big_canonical_n = count_lines(big)
    if "clean" in wanted:
        z = measure(f"clean: all default steps + split (x{args.scale})", "clean:all", big, big_canonical_n,
                    work / "clean_all.jsonl", tok)  # fmt: skip
        rows[-1][2]["summary"] = z["log"][z["log"].find("| step |") :]
    if "tokenize" in wanted:
        measure(f"tokenize (x{args.scale})", "tokenize", big, big_canonical_n, work / "tok.jsonl", tok)
    if "clean" in wanted and "tokenize" in wanted:
        kept = work / "clean_all.jsonl"
        measure("tokenize what clean kept", "tokenize", kept, count_lines(kept), work / "tok.jsonl", tok)

    print(
        "\n| job | records | zhtune rec/s | baseline rec/s | speed-up | zhtune peak RSS | baseline peak RSS |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, n, z, b in rows:
        zr, br = n / z["seconds"], n / b["seconds"]
        print(f"| {name} | {n:,} | {zr:,.0f} | {br:,.0f} | {zr / br:.2f}x | {z['peak_rss_mb']:,.0f} MB | "
              f"{b['peak_rss_mb']:,.0f} MB |")  # fmt: skip
    timed = {name.split(" (")[0]: (n, z, b) for name, n, z, b in rows}
    if "clean: all default steps + split" in timed and "tokenize" in timed:
        n, zc, bc = timed["clean: all default steps + split"]
        print()
        for what, tokenize in (
            ("tokenize all of the input", "tokenize"),
            ("tokenize what clean kept", "tokenize what clean kept"),
        ):
            _, zt, bt = timed[tokenize]
            zr, br = n / (zc["seconds"] + zt["seconds"]), n / (bc["seconds"] + bt["seconds"])
            print(f"clean (all steps) then {what}, {n:,} input records: zhtune {zr:,.0f} rec/s, "
                  f"baseline {br:,.0f} rec/s ({zr / br:.2f}x)")  # fmt: skip
    for name, _, z, _ in rows:
        if "summary" in z:
            print(f"\n{name}, the clean summary:\n\n{z['summary'].strip()}")
    if args.json:
        Path(args.json).write_text(
            json.dumps([{"job": name, "records": n, "zhtune": {k: v for k, v in z.items() if k != "log"},
                         "baseline": {k: v for k, v in b.items() if k != "log"}} for name, n, z, b in rows], indent=2)
        )  # fmt: skip


if __name__ == "__main__":
    main()
