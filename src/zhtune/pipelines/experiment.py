"""``zhtune experiment GRID.yaml``: a grid of train + eval runs -> one comparison table and charts.

A grid file names a base train config, the train keys to vary and how to score each run::

    base: ../quickstart_lora.yaml     # a train YAML (path relative to this file) or an inline mapping
    overrides: {max_steps: 200}       # train keys applied to every run
    axes:                             # every combination of values is one run
      method: [full, lora]
      data: {belle: [belle.jsonl], alpaca: [alpaca.json]}   # a mapping gives values a label
    eval: {data: [test.jsonl], metric: exact_match, max_new_tokens: 32}
    output_dir: runs/exp

Top to bottom: the grid config -> the runs (one validated :class:`TrainConfig` each, checked
before anything trains) -> train each one (finished runs are skipped on a re-run, interrupted
ones resume from their newest checkpoint) -> score each one (cached in ``RUN/eval/``) -> the
report: ``results.md``, ``results.json``, ``loss_curves.png`` and ``metric.png`` in ``output_dir``.
Each run is an ordinary run directory under ``output_dir/runs/<name>/``.
"""

from __future__ import annotations

import dataclasses
import difflib
import gc
import hashlib
import itertools
import json
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zhtune import rundir
from zhtune.config import build_config, coerce_value, merge_layers, parse_overrides, read_yaml, to_dict
from zhtune.data.convert import load_conversations
from zhtune.errors import ZhtuneError
from zhtune.eval.exact_match import exact_match
from zhtune.eval.exam import ExamOptions, run_exam
from zhtune.eval.gen import aggregate, score_pair
from zhtune.eval.judge import JudgeOptions, default_judge, judge
from zhtune.eval.report import fmt_value, markdown_table, plot_bars
from zhtune.llm.options import EndpointOptions
from zhtune.models.device import RuntimeOptions
from zhtune.models.loading import load_for_inference
from zhtune.plots import plot_loss_curves
from zhtune.rundir import RunDir, write_text_atomic
from zhtune.train.config import TrainConfig
from zhtune.train.lf_keys import COMBINED_KEYS, LF_KEYS
from zhtune.train.sft import train

MANAGED_KEYS = ("output_dir", "resume", "overwrite")
"""Train keys the experiment sets for each run itself."""
REQUEST_FILE = "experiment_run.json"
"""Written into each run directory: the train settings the grid asked for (to spot stale runs)."""


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------
@dataclass
class EvalConfig:
    """How every run of an experiment is scored."""

    data: list[str]
    """Test files in any supported format; each record's last assistant turn is the reference and meta.category its category (metric exam: one exam folder or file, as `zhtune eval exam --data`)."""
    metric: str = "exact_match"
    """Metric: exact_match (greedy answer equals the reference after stripping whitespace), gen (ROUGE-L F on jieba words, as `zhtune eval gen`; BLEU-4, ROUGE-1/2 and exact match kept beside it) exam (multiple-choice accuracy, as `zhtune eval exam`; columns are the exam's categories) or judge (an LLM judge, as `zhtune eval judge`: BELLE-eval's per-class scores; needs judge.base_url and judge.model)."""
    max_new_tokens: int = 32
    """Most tokens generated per answer."""
    batch_size: int = 32
    """Prompts generated together."""
    max_per_category: int = 0
    """Score only the first N records of each category (0: all)."""
    shots: int = 5
    """exam: solved dev examples before each question (0-5)."""
    judge: EndpointOptions | None = None
    """judge: the judge endpoint, the fields of `zhtune eval judge`'s --judge-* flags (base_url, model, concurrency, max_tokens, timeout, ...; empty base_url/model: $OPENAI_BASE_URL/$OPENAI_MODEL). The API key comes only from $OPENAI_API_KEY, never from the grid file."""
    judge_protocol: str = "belle"
    """judge: belle (0-1 score per class) or mtbench (1-10 rating)."""
    judge_limit: int = 0
    """judge: judge only the first N questions (0: all)."""
    trust_remote_code: bool = False
    """Let the run's model code (auto_map) run while scoring; also on for runs whose train config sets trust_remote_code."""

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            close = difflib.get_close_matches(self.metric, list(METRICS), n=2)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise ZhtuneError(
                f"config key 'metric': unknown metric '{self.metric}'. Available: {', '.join(METRICS)}.{hint}"
            )
        if not self.data:
            raise ZhtuneError("config key 'data': give at least one test file")
        for name in ("max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ZhtuneError(f"config key '{name}': must be >= 1, got {getattr(self, name)}")
        if self.max_per_category < 0:
            raise ZhtuneError(f"config key 'max_per_category': must be >= 0, got {self.max_per_category}")
        if self.judge is not None and self.judge.api_key:
            raise ZhtuneError("config key 'judge.api_key': keep keys out of grid files; set OPENAI_API_KEY")


@dataclass
class ExperimentConfig:
    """A grid of training runs over a base config, each scored the same way."""

    base: str | dict
    """Train config shared by every run: a train YAML file (relative to the grid file) or an inline mapping of train keys."""
    axes: dict
    """Train keys to vary, each with a list of values (or a mapping label: value); every combination is one run."""
    output_dir: str
    """Experiment directory: runs/<name>/ per run, results.md, results.json, loss_curves.png, metric.png."""
    overrides: dict = field(default_factory=dict)
    """Train keys applied to every run, over the base config (axis values win over both)."""
    eval: EvalConfig | None = None
    """How each run is scored (see the eval keys below); without it the table compares losses only."""

    def __post_init__(self) -> None:
        if not self.axes:
            raise ZhtuneError("axes: give at least one train key to vary, e.g. axes: {method: [full, lora]}")
        check_train_keys(self.overrides, "overrides")
        check_train_keys(self.axes, "axes")
        for key, values in self.axes.items():
            if not isinstance(values, (list, dict)):
                raise ZhtuneError(
                    f"axes: '{key}' must be a list of values (or a mapping label: value), got {values!r}"
                )
            if not values:
                raise ZhtuneError(f"axes: '{key}' has no values; give at least one")


def check_train_keys(values: dict[str, Any], where: str) -> None:
    """Every key of ``values`` must be a train config key (zhtune's or LLaMA-Factory's, see
    :mod:`zhtune.train.lf_keys`) the experiment does not manage itself."""
    known = [f.name for f in dataclasses.fields(TrainConfig)] + [*LF_KEYS, *COMBINED_KEYS]
    for key in values:
        if key in MANAGED_KEYS:
            raise ZhtuneError(f"{where}: '{key}' is set by the experiment for each run; remove it")
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=3, cutoff=0.6)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise ZhtuneError(
                f"{where}: unknown config key '{key}'.{hint} (see `zhtune train --help` for all keys)"
            )


def load_experiment(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Grid YAML + ``key=value`` overrides -> a validated :class:`ExperimentConfig`.

    A dotted key reaches into a section: ``eval.max_new_tokens=8``, ``overrides.max_steps=50``,
    ``axes.lr=[1e-4,2e-4]``. A ``base`` path is resolved relative to the grid file.
    """
    source = str(path)
    values = read_yaml(path)
    for key, value in parse_overrides(overrides or []).items():
        *heads, last = key.split(".")
        section = values
        for i, head in enumerate(heads):
            section = section.setdefault(head, {})
            if not isinstance(section, dict):
                rest = ".".join([*heads[i + 1 :], last])
                raise ZhtuneError(
                    f"override '{key}': '{head}' is not a mapping in {source} (train keys for every run: "
                    f"overrides.{rest}={value})"
                )
        section[last] = value
    section = values.get("eval")
    if section is not None:
        if not isinstance(section, dict):
            raise ZhtuneError(f"{source}: eval: expected a mapping of eval keys, got {section!r}")
        judge_keys = section.get("judge")
        if judge_keys is not None:
            if not isinstance(judge_keys, dict):
                raise ZhtuneError(
                    f"{source}: eval: judge: expected a mapping of endpoint keys, got {judge_keys!r}"
                )
            given = build_config(EndpointOptions, judge_keys, source=f"{source}: eval: judge")
            section["judge"] = dataclasses.replace(
                default_judge(), **{k: getattr(given, k) for k in judge_keys}
            )
        values["eval"] = build_config(EvalConfig, section, source=f"{source}: eval")
    if isinstance(values.get("base"), str):
        values["base"] = str(Path(path).parent / values["base"])  # an absolute base stays as it is
    return build_config(ExperimentConfig, values, source=source)


# --------------------------------------------------------------------------------------------
# Metrics: a registry, so another metric is one more entry
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Metric:
    """One way to score a tuned run: ``score(run_dir, eval config, test records) -> scores``, where
    the test records are those :func:`load_eval_records` read once per experiment (empty unless
    ``reads_records``) and scores is
    ``{"overall": float, "scores": {column: float}, "counts": {column: n}, ...}`` (more keys are kept
    in the run's eval cache; ``"cached": True`` when it was read back, not scored)."""

    name: str
    score: Callable[[Path, EvalConfig, list[dict[str, Any]]], dict[str, Any]]
    fmt: str = "{:.1%}"
    """How a score is written in the table and on the chart."""
    max_value: float | None = 1.0
    """The best possible score (the chart's axis ends there), or None if unbounded."""
    higher_is_better: bool = True
    reads_records: bool = False
    """The metric reads ``EvalConfig.data`` as test records (checked before anything trains)."""
    describe: Callable[[EvalConfig], str] | None = None
    """The report's sentence on what was scored (default: the number of test records)."""


RecordScorer = Callable[[Any, Any, str, list[dict[str, Any]], EvalConfig], dict[str, Any]]
"""(model, tokenizer, template name, records, eval config) -> scores: a metric over test records."""


def on_records(scorer: RecordScorer) -> Callable[[Path, EvalConfig, list[dict[str, Any]]], dict[str, Any]]:
    """A record metric as a :class:`Metric` score: load the run's model and score the test
    records, caching the result in ``RUN/eval/<metric>.json`` with the settings it was made
    with (metric, max_new_tokens, a hash of the records), reused while they stay the same."""

    def score(run_dir: Path, ev: EvalConfig, records: list[dict[str, Any]]) -> dict[str, Any]:
        digest = hashlib.sha1(json.dumps(records, ensure_ascii=False, sort_keys=True).encode()).hexdigest()
        settings = {"metric": ev.metric, "max_new_tokens": ev.max_new_tokens, "records": len(records),
                    "sha1": digest}  # fmt: skip
        path = RunDir(run_dir).eval_dir / f"{ev.metric}.json"
        if path.exists():
            cached = json.loads(path.read_text(encoding="utf-8"))
            if cached.get("settings") == settings:
                return {**cached, "cached": True}
        model, tokenizer, template = load_for_inference(run_dir, trust_remote_code=ev.trust_remote_code)
        result = {"settings": settings, **scorer(model, tokenizer, template, records, ev)}
        del model, tokenizer
        gc.collect()
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(result, ensure_ascii=False, indent=1) + "\n")
        return result

    return score


def exact_match_scores(
    model: Any, tokenizer: Any, template: str, records: list[dict[str, Any]], ev: EvalConfig
) -> dict[str, Any]:

    return exact_match(
        model, tokenizer, template, records, batch_size=ev.batch_size, max_new_tokens=ev.max_new_tokens
    )


def gen_scores(
    model: Any, tokenizer: Any, template: str, records: list[dict[str, Any]], ev: EvalConfig
) -> dict[str, Any]:
    """The greedy answers of :func:`exact_match_scores`, scored by ``zhtune eval gen``'s metrics."""

    answers = exact_match_scores(model, tokenizer, template, records, ev)["predictions"]
    rows = [
        {"category": p["category"], "scores": score_pair(p["prediction"], p["reference"])} for p in answers
    ]
    return {**aggregate(rows), "predictions": answers}


def _one_file(ev: EvalConfig) -> str:
    if len(ev.data) != 1:
        raise ZhtuneError(f"eval metric {ev.metric}: give one file or folder in 'data', got {len(ev.data)}")
    return ev.data[0]


def _exam(run_dir: Path, ev: EvalConfig, records: list[dict[str, Any]]) -> dict[str, Any]:
    """``zhtune eval exam`` on the run (resumable: a finished exam is read back, not redone), with
    the exam's categories as the table's columns and its subjects kept beside them."""

    options = ExamOptions(
        data=_one_file(ev), output=str(RunDir(run_dir).eval_dir), shots=ev.shots, batch_size=ev.batch_size,
        runtime=RuntimeOptions(trust_remote_code=ev.trust_remote_code),
    )  # fmt: skip
    report = run_exam(str(run_dir), options)
    return {**report, "scores": report["categories"], "counts": {}, "subjects": report["scores"]}


def _judge(run_dir: Path, ev: EvalConfig, records: list[dict[str, Any]]) -> dict[str, Any]:
    """``zhtune eval judge`` on the run (resumable and cached: a judged question is not asked
    again); the judge's API key comes from $OPENAI_API_KEY, never from the grid file."""

    options = JudgeOptions(
        data=_one_file(ev), judge=ev.judge or default_judge(), protocol=ev.judge_protocol,
        output=str(RunDir(run_dir).eval_dir), limit=ev.judge_limit, batch_size=ev.batch_size,
        max_new_tokens=ev.max_new_tokens, progress=False,
        runtime=RuntimeOptions(trust_remote_code=ev.trust_remote_code),
    )  # fmt: skip
    report = judge(str(run_dir), options)
    if report.get("failed"):
        raise ZhtuneError(
            f"eval metric judge: {report['failed']} questions of {run_dir} were never judged; re-run"
        )
    return report


METRICS: dict[str, Metric] = {
    m.name: m
    for m in [
        Metric("exact_match", on_records(exact_match_scores), reads_records=True),
        Metric("gen", on_records(gen_scores), reads_records=True),
        Metric(
            "exam",
            _exam,
            describe=lambda ev: f"exam on {', '.join(ev.data)} ({ev.shots} shots; columns: categories).",
        ),
        Metric(
            "judge",
            _judge,
            fmt="{:.3f}",
            describe=lambda ev: f"LLM judge ({ev.judge_protocol}) on {', '.join(ev.data)}; columns: classes.",
        ),
    ]
}


# --------------------------------------------------------------------------------------------
# The runs of a grid
# --------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One point of the grid."""

    name: str
    """Directory name, from the axis values (``method=lora,lr=0.0002``)."""
    label: str
    """Readable label for tables and legends (``method=lora, lr=0.0002``)."""
    axes: dict[str, str]
    """Axis key -> the value as shown (a label for mapping axes, a file's stem for paths)."""
    train: TrainConfig
    """The validated train config; output_dir is ``EXPERIMENT/runs/<name>``."""

    @property
    def dir(self) -> Path:
        return Path(self.train.output_dir)


def show_value(value: Any) -> str:
    """A short text for an axis value: numbers as written, files by their stem, lists joined by +."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "+".join(show_value(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    text = str(value)
    if "/" in text or "\\" in text:
        return Path(text.rstrip("/\\")).stem
    return text


def run_name(axes: dict[str, str]) -> str:
    """A directory name from the shown axis values: ``key=value,key=value``, other characters ``_``."""
    name = ",".join(f"{k}={v}" for k, v in axes.items())
    name = re.sub(r"[^\w.=,+-]", "_", name)
    if len(name) > 120:  # file systems cap names at 255 bytes; keep it readable and unique
        name = name[:100] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return name


def _axis_value(key: str, value: Any) -> Any:
    """An axis value as the train config reads it (``"1e-3"`` is 0.001, so it labels as one),
    or as given where it is not a valid one (building the run then names the run and the key)."""
    if key not in {f.name for f in dataclasses.fields(TrainConfig)}:
        return value  # a LLaMA-Factory key: translated per run
    try:
        return coerce_value(TrainConfig, key, value)
    except ZhtuneError:
        return value


def plan_runs(cfg: ExperimentConfig, source: str = "experiment") -> list[Run]:
    """Every combination of axis values as a :class:`Run` with a validated train config.

    Base, then ``overrides``, then the run's axis values; errors name the grid file and the run.
    """
    if isinstance(cfg.base, str):
        if not Path(cfg.base).is_file():
            raise ZhtuneError(f"{source}: base: train config not found: {cfg.base}")
        base = read_yaml(cfg.base)
        base_source = f"{source}: base {cfg.base}"
    else:
        base, base_source = dict(cfg.base), f"{source}: base"
    # a usable train YAML names the managed keys (LLaMA-Factory's output_dir too): dropped below
    check_train_keys({k: v for k, v in base.items() if k not in MANAGED_KEYS}, base_source)
    shared = [(base, base_source), (cfg.overrides, f"{source}: overrides")]

    axes: list[list[tuple[str, Any]]] = []
    for key, values in cfg.axes.items():
        if isinstance(values, dict):
            choices = [(label, _axis_value(key, v)) for label, v in values.items()]
        else:
            choices = [(show_value(v), v) for v in (_axis_value(key, v) for v in values)]
        shown = [str(label) for label, _ in choices]
        twice = sorted({s for s in shown if shown.count(s) > 1})
        if twice:
            raise ZhtuneError(
                f"{source}: axes: '{key}' has values that look the same ({', '.join(twice)}); "
                f"name them with a mapping, e.g. {key}: {{a: ..., b: ...}}"
            )
        axes.append([(str(label), value) for label, value in choices])

    runs: list[Run] = []
    for combo in itertools.product(*axes):
        shown = {key: label for key, (label, _) in zip(cfg.axes, combo)}
        label = ", ".join(f"{k}={v}" for k, v in shown.items())
        name = run_name(shown)
        where = f"{source}: run {label}"
        try:  # each layer in zhtune's or LLaMA-Factory's keys, translated, later layers winning
            merged = merge_layers(
                TrainConfig, [*shared, ({key: value for key, (_, value) in zip(cfg.axes, combo)}, where)]
            )
            values = {k: v for k, v in merged.items() if k not in MANAGED_KEYS}
            values["output_dir"] = str(Path(cfg.output_dir) / "runs" / name)
            train_cfg = build_config(TrainConfig, values, source=where)
        except ZhtuneError as err:  # type errors come without the source; name the run in every case
            raise ZhtuneError(str(err) if str(err).startswith(where) else f"{where}: {err}") from None
        runs.append(Run(name, label, shown, train_cfg))
    names = [r.name for r in runs]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise ZhtuneError(
            f"{source}: axis values give runs the same directory name ({', '.join(clash)}); "
            "label them with a mapping (axes: {key: {label: value, ...}})"
        )
    return runs


# --------------------------------------------------------------------------------------------
# Training: skip finished runs, resume interrupted ones
# --------------------------------------------------------------------------------------------
def _requested(run: Run) -> dict[str, Any]:
    return {k: v for k, v in to_dict(run.train).items() if k not in MANAGED_KEYS}


def _check_same_request(run: Run) -> None:
    """A run directory left by an earlier invocation must have been asked for the same settings."""
    path = run.dir / REQUEST_FILE
    if not path.exists():
        return
    before = json.loads(path.read_text(encoding="utf-8"))["train"]
    now = _requested(run)
    changed = [k for k in now if k in before and before[k] != now[k]]
    if changed:
        diff = ", ".join(f"{k}: {before[k]!r} -> {now[k]!r}" for k in changed)
        raise ZhtuneError(
            f"run {run.label}: {run.dir} was trained with other settings ({diff}); "
            "delete that directory to retrain it, or use another output_dir"
        )


def train_run(run: Run, progress: bool = True) -> str:
    """Train ``run`` unless its directory holds a finished run; returns ``skipped``, ``resumed``
    or ``trained``."""

    _check_same_request(run)
    run_dir = RunDir(run.dir)
    if run_dir.results_path.exists():
        return "skipped"
    resume = run_dir.latest_checkpoint() is not None
    # a directory without a checkpoint holds only a partial log: start it afresh
    cfg = dataclasses.replace(run.train, resume=resume, overwrite=not resume)
    run.dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(run_dir.eval_dir, ignore_errors=True)  # scores of earlier weights
    record = {"name": run.name, "label": run.label, "axes": run.axes, "train": _requested(run)}
    (run.dir / REQUEST_FILE).write_text(json.dumps(record, ensure_ascii=False, indent=1) + "\n", "utf-8")
    train(cfg, progress=progress)
    return "resumed" if resume else "trained"


# --------------------------------------------------------------------------------------------
# Evaluation: cached per run in RUN/eval/<metric>.json
# --------------------------------------------------------------------------------------------
def load_eval_records(ev: EvalConfig) -> list[dict[str, Any]]:
    """The test records (canonical), those ending in an assistant turn, at most
    ``max_per_category`` of each category."""

    records, n_rejected = load_conversations(ev.data)
    usable = [r for r in records if len(r["messages"]) >= 2 and r["messages"][-1]["role"] == "assistant"]
    if n_rejected or len(usable) < len(records):
        skipped = n_rejected + len(records) - len(usable)
        print(
            f"eval data: {skipped} records skipped (unreadable or not ending in an answer)", file=sys.stderr
        )
    if not usable:
        raise ZhtuneError(f"eval: no usable test records in {', '.join(ev.data)}")
    if ev.max_per_category:
        seen: dict[str, int] = {}
        kept = []
        for r in usable:
            cat = r.get("meta", {}).get("category", "all")
            seen[cat] = seen.get(cat, 0) + 1
            if seen[cat] <= ev.max_per_category:
                kept.append(r)
        usable = kept
    return usable


def evaluate_run(run: Run, ev: EvalConfig, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Score a run with ``ev.metric`` (``records``: the test records, read once for all runs). Its model's own code runs only with ``trust_remote_code``:
    the grid's own key (in ``eval`` or in the run's train config), never what the run directory
    recorded."""
    trusted = ev.trust_remote_code or run.train.trust_remote_code
    return METRICS[ev.metric].score(run.dir, dataclasses.replace(ev, trust_remote_code=trusted), records)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def result_row(run: Run, scores: dict[str, Any] | None) -> dict[str, Any]:
    """One run's line of the report: axis values, train results and (if scored) the metric."""
    results = RunDir(run.dir).results()
    if results is None:
        raise ZhtuneError(f"run {run.label}: {run.dir} has no {rundir.RESULTS} (training did not finish)")
    row: dict[str, Any] = {"name": run.name, "label": run.label, "run_dir": str(run.dir), "axes": run.axes}
    for key in (
        "trainable_params",
        "total_params",
        "steps",
        "train_seconds",
        "final_loss",
        "final_eval_loss",
    ):
        row[key] = results.get(key)
    if scores is not None:
        row.update(overall=scores["overall"], scores=scores["scores"], counts=scores["counts"])
    return row


def format_table(rows: list[dict[str, Any]], metric: Metric | None) -> str:
    """The markdown comparison table: a column per axis, training figures, then the metric
    overall and per category."""
    axis_keys = list(rows[0]["axes"])
    categories = list(rows[0].get("scores", {})) if metric else []
    head = [*axis_keys, "trainable params", "train s", "final loss", "eval loss"]
    align = ["---"] * len(axis_keys) + ["---:"] * 4
    if metric:
        head += [metric.name, *categories]
        align += ["---:"] * (1 + len(categories))
    lines = []
    for r in rows:
        share = r["trainable_params"] / max(r["total_params"], 1)
        cells = [
            *(r["axes"][k] for k in axis_keys),
            f"{r['trainable_params']:,} ({share:.2%})",
            fmt_value(r["train_seconds"], "{:.1f}"),
            fmt_value(r["final_loss"], "{:.4f}"),
            fmt_value(r["final_eval_loss"], "{:.4f}"),
        ]
        if metric:
            cells += [
                fmt_value(r["overall"], metric.fmt),
                *(fmt_value(r["scores"].get(c), metric.fmt) for c in categories),
            ]
        lines.append(cells)
    return markdown_table(head, lines, align)


def write_report(
    cfg: ExperimentConfig, runs: list[Run], rows: list[dict[str, Any]], source: str
) -> tuple[str, Path]:
    """Write results.md, results.json, loss_curves.png and metric.png; returns the table and
    the experiment directory."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    metric = METRICS[cfg.eval.metric] if cfg.eval else None
    table = format_table(rows, metric)
    if cfg.eval and metric and metric.describe is not None:
        scored = metric.describe(cfg.eval)
    elif cfg.eval and metric:
        counts = rows[0]["counts"]
        scored = f"{metric.name} on {sum(counts.values())} test records (" + ", ".join(
            f"{c}: {n}" for c, n in counts.items()
        )
        scored += f") from {', '.join(cfg.eval.data)}, max_new_tokens {cfg.eval.max_new_tokens}."
    else:
        scored = "No eval configured: losses only."
    (out / "results.md").write_text(
        f"# Experiment {source}\n\n{len(rows)} runs. {scored}\n\n{table}\n\n"
        "![loss curves](loss_curves.png)\n\n![metric per run](metric.png)\n",
        encoding="utf-8",
    )
    summary = {
        "grid": source,
        "axes": list(cfg.axes),
        "metric": metric.name if metric else None,
        "eval": to_dict(cfg.eval) if cfg.eval else None,
        "runs": rows,
    }
    (out / "results.json").write_text(json.dumps(summary, ensure_ascii=False, indent=1) + "\n", "utf-8")

    plot_loss_curves({run.label: RunDir(run.dir).log() for run in runs}, out / "loss_curves.png")
    labels = [r["label"] for r in rows]
    if metric:
        series = {"all": [r["overall"] for r in rows]}
        if len(rows[0]["scores"]) > 1:
            series.update({c: [r["scores"][c] for r in rows] for c in rows[0]["scores"]})
        plot_bars(labels, series, metric.name, out / "metric.png", metric.fmt, metric.max_value)
    else:
        series = {"final loss": [r["final_loss"] for r in rows]}
        if any(r["final_eval_loss"] is not None for r in rows):
            series["validation loss"] = [r["final_eval_loss"] for r in rows]
        plot_bars(labels, series, "loss", out / "metric.png")
    return table, out


# --------------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------------
def run_experiment(
    cfg: ExperimentConfig, source: str = "experiment", progress: bool = True
) -> list[dict[str, Any]]:
    """Train and score every run of the grid, write the report and print the table; returns
    the rows of the table (as in ``results.json``)."""

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    runs = plan_runs(cfg, source)  # every run's config is valid before the first one trains
    reads_records = cfg.eval is not None and METRICS[cfg.eval.metric].reads_records
    records = load_eval_records(cfg.eval) if reads_records else []  # bad test data fails before training
    say(
        f"zhtune experiment: {len(runs)} runs ({' x '.join(f'{k}: {len(v)}' for k, v in cfg.axes.items())}) "
        f"-> {cfg.output_dir}"
        + (
            f"; {cfg.eval.metric} on {len(records) if reads_records else ', '.join(cfg.eval.data)}"
            + (" test records" if reads_records else "")
            if cfg.eval
            else "; no eval configured"
        )
    )
    rows = []
    for i, run in enumerate(runs, 1):
        started = time.time()
        say(f"\n[{i}/{len(runs)}] {run.label} -> {run.dir}")
        state = train_run(run, progress=progress)
        if state == "skipped":
            say(f"[{i}/{len(runs)}] finished earlier: training skipped")
        scores = None
        if cfg.eval:
            scores = evaluate_run(run, cfg.eval, records)
            how = "cached" if scores.get("cached") else "scored"
            shown = fmt_value(scores["overall"], METRICS[cfg.eval.metric].fmt)
            say(f"[{i}/{len(runs)}] {cfg.eval.metric} {shown} ({how})")
        rows.append(result_row(run, scores))
        if state != "skipped":
            say(f"[{i}/{len(runs)}] {state} in {time.time() - started:.0f} s")
    table, out = write_report(cfg, runs, rows, source)
    print(f"\n{table}\n")
    print(
        f"Report: {out / 'results.md'} (data: results.json; charts: loss_curves.png, metric.png). "
        "Re-running skips finished runs."
    )
    return rows
