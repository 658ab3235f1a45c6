"""``zhtune eval gen RUN --data FILE``: BLEU-4, ROUGE-1/2/L and exact match of generated answers.

Top to bottom:

1. **Generate** with ``zhtune predict``'s code (:func:`zhtune.infer.predict.predict`: any input
   format, batched greedy decoding with the KV cache, rejects with file and line). Each record's
   last assistant turn is the reference, the conversation before it the prompt. Predictions are
   appended to ``OUT/gen_predictions.jsonl`` batch by batch, so an interrupted run resumes where it
   stopped; ``OUT/gen_settings.json`` records the settings, and a re-run with other settings is
   refused rather than mixed in.
2. **Score** every prediction that has a reference, as LLaMA-Factory's ``predict`` stage does
   (``ComputeSimilarity`` and ``scripts/eval_bleu_rouge.py``), so the numbers are comparable:

   * BLEU-4 on **characters** (``list(text)``) with NLTK's ``sentence_bleu`` and smoothing method 3
     (NIST geometric sequence smoothing), reimplemented in :func:`bleu4`;
   * ROUGE-1/2/L F1 on **jieba words** as ``rouge-chinese`` computes them (:func:`rouge`): ROUGE-N
     over the *sets* of distinct n-grams, ROUGE-L from the longest common subsequence of all words;
     0 when either side has no words;
   * exact match of the stripped strings;

   each ×100 and averaged over records (LLaMA-Factory rounds each record's score to 4 decimals).
3. **Write** ``OUT/gen.json``: ``{"metric": "gen", "overall", "scores", "counts", ...}``, the keys
   every zhtune eval report has (``overall`` and ``scores`` are ROUGE-L as a fraction, per
   ``meta.category``), plus ``metrics`` (the five averages ×100, as LLaMA-Factory prints them) and
   ``by_category``; ``OUT/gen_scores.jsonl`` (each record's scores) and ``OUT/gen.md`` (a table).
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zhtune.data.readers import expand_inputs
from zhtune.errors import ZhtuneError
from zhtune.flags import flag
from zhtune.infer.generate import GenerationOptions
from zhtune.infer.predict import predict
from zhtune.models.device import RuntimeOptions, resolve_device, resolve_dtype

#: Report keys, in table order.
METRIC_NAMES = ("bleu-4", "rouge-1", "rouge-2", "rouge-l", "exact_match")
#: The score ``overall`` and ``scores`` carry (as a fraction).
OVERALL = "rouge-l"


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------
def _ngrams(tokens: list[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu4(hypothesis: list[str], reference: list[str]) -> float:
    """Sentence BLEU-4 (uniform weights, one reference) with NLTK's smoothing method 3, in [0, 1].

    Modified n-gram precisions p_n = clipped matches / max(1, hypothesis n-grams); a p_n with no
    match becomes 1 / (2^k · denominator) for the k-th such n (NIST smoothing); no unigram match
    at all gives 0. Brevity penalty exp(1 - r/c) when the hypothesis is shorter.
    """
    if not hypothesis or not reference:
        return 0.0
    log_sum, k = 0.0, 0
    for n in range(1, 5):
        hyp, ref = _ngrams(hypothesis, n), _ngrams(reference, n)
        matches = sum(min(c, ref[g]) for g, c in hyp.items())
        denominator = max(1, sum(hyp.values()))
        if matches == 0:
            if n == 1:
                return 0.0
            k += 1
            p = 1 / (2**k * denominator)
        else:
            p = matches / denominator
        log_sum += 0.25 * math.log(p)
    c, r = len(hypothesis), len(reference)
    penalty = 1.0 if c > r else math.exp(1 - r / c)
    return penalty * math.exp(log_sum)


def _f1(overlap: int, hyp_count: int, ref_count: int) -> float:
    p = overlap / hyp_count if hyp_count else 0.0
    r = overlap / ref_count if ref_count else 0.0
    return 2.0 * p * r / (p + r + 1e-8)  # rouge-chinese's formula (the epsilon included)


_SENTENCE_ENDS = (  # rouge-chinese's Rouge.cut_sent, applied to the space-joined words
    (re.compile("([。！？?])([^”’])"), r"\1\n\2"),
    (re.compile(r"(\.{6})([^”’])"), r"\1\n\2"),
    (re.compile("(…{2})([^”’])"), r"\1\n\2"),
    (re.compile("([。！？?][”’])([^，。！？?])"), r"\1\n\2"),
)


def rouge_words(tokens: list[str]) -> list[str]:
    """The words ``rouge-chinese`` scores for ``" ".join(tokens)``: the text is cut into sentences
    (after 。！？ and at newlines), each sentence's whitespace runs become single spaces, and the
    sentences' words are concatenated. A sentence of whitespace only (a blank line) leaves one
    empty word, a quirk kept for parity with the library."""
    text = " ".join(tokens)
    for pattern, repl in _SENTENCE_ENDS:
        text = pattern.sub(repl, text)
    out: list[str] = []
    for sentence in text.rstrip().split("\n"):
        if sentence:
            out += " ".join(sentence.split()).split(" ")
    return out


def rouge(hypothesis: list[str], reference: list[str]) -> dict[str, float]:
    """ROUGE-1, -2 and -L F1 (in [0, 1]) of two word lists, as ``rouge-chinese`` computes them.

    The words are those of :func:`rouge_words`. ROUGE-N compares the *sets* of distinct n-grams;
    ROUGE-L uses the LCS over all words with P = LCS / len(hyp), R = LCS / len(ref). A side with
    no non-blank word gives 0 (as LLaMA-Factory does).
    """
    from zhtune.data.novelty import lcs_length  # imports numpy: not at start-up (zhtune --help)

    if not any(w.strip() for w in hypothesis) or not any(w.strip() for w in reference):
        return {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    hyp, ref = rouge_words(hypothesis), rouge_words(reference)
    scores = {}
    for n in (1, 2):
        h, r = set(_ngrams(hyp, n)), set(_ngrams(ref, n))
        scores[f"rouge-{n}"] = _f1(len(h & r), len(h), len(r))
    scores["rouge-l"] = _f1(lcs_length(hyp, ref), len(hyp), len(ref))
    return scores


def words(text: str) -> list[str]:
    """jieba's word segmentation (the dictionary is loaded once, quietly)."""
    import logging

    try:
        import jieba
    except ImportError:
        raise ZhtuneError(
            "zhtune eval gen needs jieba for the ROUGE words: pip install -c constraints.txt -e '.[metrics]'"
        ) from None
    jieba.setLogLevel(logging.CRITICAL)
    return list(jieba.cut(text))


def score_pair(prediction: str, reference: str) -> dict[str, float]:
    """Every metric ×100 for one prediction, rounded to 4 decimals as LLaMA-Factory does."""
    scores = rouge(words(prediction), words(reference))
    scores["bleu-4"] = bleu4(list(prediction), list(reference))
    scores["exact_match"] = float(prediction.strip() == reference.strip())
    return {k: round(scores[k] * 100, 4) for k in METRIC_NAMES}


def aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean scores overall and per category from ``[{"category", "scores"}]`` rows."""
    by_cat: dict[str, list[dict[str, float]]] = defaultdict(list)
    for row in rows:
        by_cat[row["category"]].append(row["scores"])

    def mean(group: list[dict[str, float]]) -> dict[str, float]:
        return {m: round(sum(s[m] for s in group) / len(group), 4) for m in METRIC_NAMES}

    overall = mean([r["scores"] for r in rows]) if rows else dict.fromkeys(METRIC_NAMES, 0.0)
    by_category = {c: mean(v) for c, v in sorted(by_cat.items())}
    return {
        "metric": "gen",
        "overall": overall[OVERALL] / 100,
        "scores": {c: m[OVERALL] / 100 for c, m in by_category.items()},
        "counts": {c: len(v) for c, v in sorted(by_cat.items())},
        "overall_metric": OVERALL,
        "metrics": overall,
        "by_category": by_category,
    }


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------
@dataclass
class GenEvalOptions:
    """Options of ``zhtune eval gen`` (besides RUN and --data)."""

    output_dir: str = ""
    """Where gen.json, gen.md and the predictions go (empty: RUN/eval)."""
    batch_size: int = 8
    """Prompts per generation batch."""
    max_new_tokens: int = 512
    """Most tokens generated per answer."""
    template: str = ""
    """Chat template (empty: the run's own)."""
    runtime: RuntimeOptions = flag(default_factory=RuntimeOptions)
    """Device, dtype and whether the model's own code may run (--device, --dtype, --trust-remote-code)."""
    format: str = "auto"
    """Input format: auto, alpaca, belle, sharegpt, openai (see `zhtune data convert`)."""
    allow_rejects: bool = False
    """Exit 0 even if some records were rejected (they are not scored)."""
    progress: bool = True
    """Show a progress bar."""


def _settings(
    run: str, data: list[str], opts: GenEvalOptions, mapping: dict[str, str], dtype: str
) -> dict[str, Any]:
    """What decides the predictions (``dtype`` resolved, so auto on a CPU resumes an fp32 run);
    a resumed run must match them."""
    import os

    return {
        "run": os.path.abspath(run),
        "data": [os.path.abspath(p) for p in data],
        "max_new_tokens": opts.max_new_tokens,
        "template": opts.template,
        "dtype": dtype,
        "format": opts.format,
        "map": mapping,
        "decoding": "greedy",
    }


def _check_settings(path: Path, predictions: Path, settings: dict[str, Any]) -> None:
    if predictions.exists() and predictions.stat().st_size and path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        changed = [k for k in settings if old.get(k) != settings[k]]
        if changed:
            detail = "; ".join(f"{k}: {old.get(k)!r} -> {settings[k]!r}" for k in changed)
            raise ZhtuneError(
                f"{predictions} holds predictions made with other settings ({detail}); delete it to start "
                "over, or write elsewhere with --output-dir"
            )
    path.write_text(json.dumps(settings, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def format_report(result: dict[str, Any]) -> str:
    """A markdown table: one row per category and the overall means (×100)."""
    head = ["category", "n", *METRIC_NAMES]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for cat, scores in result["by_category"].items():
        lines.append(
            f"| {cat} | {result['counts'][cat]:,} | "
            + " | ".join(f"{scores[m]:.2f}" for m in METRIC_NAMES)
            + " |"
        )
    n = sum(result["counts"].values())
    lines.append(
        f"| **all** | {n:,} | " + " | ".join(f"{result['metrics'][m]:.2f}" for m in METRIC_NAMES) + " |"
    )
    return "\n".join(lines)


def eval_gen(
    run: str,
    data: list[str],
    opts: GenEvalOptions,
    mapping: dict[str, str] | None = None,
) -> tuple[dict[str, Any], int]:
    """Generate (resumably) and score; returns the report and the exit status of generation."""

    if not data:
        raise ZhtuneError("give the test data with --data FILE")
    device = resolve_device(opts.runtime.device)
    dtype = resolve_dtype(opts.runtime.dtype, device)
    out = Path(opts.output_dir or Path(run) / "eval")
    out.mkdir(parents=True, exist_ok=True)
    paths = expand_inputs(data)
    predictions = out / "gen_predictions.jsonl"
    settings = _settings(run, paths, opts, mapping or {}, dtype)
    _check_settings(out / "gen_settings.json", predictions, settings)
    status = predict(
        run,
        paths,
        str(predictions),
        GenerationOptions(max_new_tokens=opts.max_new_tokens, temperature=0.0),
        batch_size=opts.batch_size,
        template=opts.template or None,
        dtype=dtype,
        device=device,
        trust_remote_code=opts.runtime.trust_remote_code,
        fmt=opts.format,
        mapping=mapping,
        rejects=str(out / "gen_predictions.rejects.jsonl"),
        allow_rejects=opts.allow_rejects,
        progress=opts.progress,
    )
    rows, missing = [], 0
    for line in predictions.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if row.get("reference") is None:
            missing += 1
            continue
        category = str((row.get("meta") or {}).get("category", "all"))
        rows.append(
            {"id": row["id"], "category": category, "scores": score_pair(row["prediction"], row["reference"])}
        )
    if not rows:
        raise ZhtuneError(f"no record of {', '.join(paths)} has a reference answer to score against")
    result = aggregate(rows)
    result.update(n_scored=len(rows), n_without_reference=missing, settings=settings)
    with (out / "gen_scores.jsonl").open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(
                json.dumps(
                    {"id": row["id"], "category": row["category"], **row["scores"]}, ensure_ascii=False
                )
                + "\n"
            )
    (out / "gen.json").write_text(json.dumps(result, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    table = format_report(result)
    (out / "gen.md").write_text(
        f"# Generation metrics: {run}\n\n{len(rows):,} answers scored"
        + (f" ({missing:,} records without a reference skipped)" if missing else "")
        + f"; BLEU-4 on characters, ROUGE on jieba words, ×100.\n\n{table}\n",
        encoding="utf-8",
    )
    print(table)
    print(f"wrote {out / 'gen.json'}, {out / 'gen.md'}, {out / 'gen_scores.jsonl'}", file=sys.stderr)
    return result, status


def gen_command(
    run: str, data: list[str], opts: GenEvalOptions, mapping: dict[str, str] | None = None
) -> int:
    """The body of ``zhtune eval gen``; returns the exit status."""
    _, status = eval_gen(run, data, opts, mapping)
    return status
