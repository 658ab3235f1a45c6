"""Exam speed: the whole CMMLU test (11,582 questions, 67 subjects) on a small model on the CPU.

    python bench/exam_speed.py [--data ../shared/data/cmmlu] [--model ref] [--shots 0,5]
        [--batch-size 16] [--workdir /tmp/zhtune-bench-exam]

Builds the ``ref`` model of ``bench/train_throughput.py`` (hidden 256, 4 layers, 4k byte-level BPE
vocabulary trained on LLaMA-Factory's Chinese demo data; random weights, so accuracy is about
chance) unless ``--model`` names a model or run directory, then runs ``zhtune eval exam`` once per
shot count, each in its own process, from scratch. Prints questions/s, wall time (start-up
included) and the scoring time, and the mean prompt length in tokens.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cmmlu"))
    p.add_argument("--model", default="ref", help="'ref' (built here) or a model / run directory")
    p.add_argument("--shots", default="0,5")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workdir", default="/tmp/zhtune-bench-exam")
    p.add_argument("--extra", default="", help="more `zhtune eval exam` flags, e.g. '--dtype bf16'")
    args = p.parse_args()
    work = Path(args.workdir)
    model = args.model
    if model == "ref":
        model_dir = work / "model-ref"
        if not (model_dir / "config.json").is_file():
            sys.path.insert(0, str(HERE))
            from train_throughput import prepare

            demo = REPO.parent / "shared" / "data" / "llamafactory" / "alpaca_zh_demo.json"
            prepare(str(demo), work, ["ref"])
        model = str(model_dir)
    rows = []
    for shots in [int(s) for s in args.shots.split(",")]:
        out = work / f"exam-{shots}shot"
        cmd = [
            sys.executable, "-m", "zhtune", "eval", "exam", model, "--data", args.data, "--shots", str(shots),
            "-o", str(out), "--batch-size", str(args.batch_size), "--overwrite", "--no-progress",
            *args.extra.split(),
        ]  # fmt: skip
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        report = json.loads((out / "exam.json").read_text(encoding="utf-8"))
        rows.append((shots, report, wall))
    print("| shots | questions | subjects | scoring s | questions/s | wall s | overall | prompt |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for shots, r, wall in rows:
        print(
            f"| {shots} | {r['questions']:,} | {len(r['scores'])} | {r['seconds']:.1f} | {r['questions_per_s']:.1f} "
            f"| {wall:.1f} | {100 * r['overall']:.1f}% | {r['prompt']} |"
        )


if __name__ == "__main__":
    main()
