"""``zhtune experiment``: a 2x2 grid on the tiny model trains, scores and reports every run;
a re-run skips them; an interrupted run resumes; bad grids fail with a clear message."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import write_jsonl
from zhtune.cli import main
from zhtune.errors import ZhtuneError
from zhtune.pipelines.experiment import load_experiment, plan_runs, run_experiment, run_name, show_value

GRIDS = sorted((Path(__file__).parents[2] / "src" / "zhtune" / "configs" / "experiments").glob("*.yaml"))
HEADER = ["method", "lr", "trainable params", "train s", "final loss", "eval loss", "exact_match"]


def write_grid(path: Path, grid: dict) -> Path:
    path.write_text(yaml.safe_dump(grid, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def run_quietly(grid: Path, *overrides: str) -> tuple[list[dict], str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        rows = run_experiment(load_experiment(grid, list(overrides)), source=str(grid), progress=False)
    return rows, out.getvalue()


def table_rows(md: str) -> list[list[str]]:
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines if "---" not in ln]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy machine two threads per
    process spin against each other (a 4x slowdown measured on 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def grid(tmp_path_factory, tiny_model_dir, train_file, skill_records) -> Path:
    tmp = tmp_path_factory.mktemp("experiment")
    test_file = write_jsonl(tmp / "test.jsonl", skill_records[1])
    base = {
        "model": str(tiny_model_dir),
        "data": [str(train_file)],
        "output_dir": "ignored: each run gets its own",
        "template": "chatml",
        "max_steps": 12,
        "batch_size": 16,
        "logging_steps": 3,
        "save_steps": 6,
        "val_size": 16,
        "cutoff_len": 64,
    }
    write_grid(tmp / "base.yaml", base)
    return write_grid(
        tmp / "grid.yaml",
        {
            "base": "base.yaml",  # relative to the grid file
            "axes": {"method": ["full", "lora"], "lr": [1.0e-3, 3.0e-3]},
            "eval": {"data": [str(test_file)], "max_new_tokens": 6, "max_per_category": 7},
            "output_dir": str(tmp / "exp"),
        },
    )


@pytest.fixture(scope="module")
def experiment(grid) -> tuple[Path, list[dict], str]:
    rows, log = run_quietly(grid)
    return grid.parent / "exp", rows, log


def test_every_run_is_trained_and_scored(experiment):
    out, rows, log = experiment
    names = sorted(p.name for p in (out / "runs").iterdir())
    assert names == [
        "method=full,lr=0.001",
        "method=full,lr=0.003",
        "method=lora,lr=0.001",
        "method=lora,lr=0.003",
    ]
    for name in names:
        run = out / "runs" / name
        results = json.loads((run / "train_results.json").read_text())
        assert results["steps"] == 12 and results["final_eval_loss"] is not None
        assert (run / ("model" if "full" in name else "adapter")).is_dir()
        scored = json.loads((run / "eval" / "exact_match.json").read_text())
        assert scored["counts"] == {"num2zh": 7, "reverse": 7, "zh2num": 7}
    for i in range(1, 5):
        assert f"[{i}/4]" in log


def test_table_has_a_column_per_axis_and_a_row_per_run(experiment):
    out, _, log = experiment
    header, *body = table_rows((out / "results.md").read_text())
    assert header == [*HEADER, "num2zh", "reverse", "zh2num"]
    assert len(body) == 4
    for cells in body:
        row = dict(zip(header, cells))
        run = out / "runs" / f"method={row['method']},lr={row['lr']}"
        results = json.loads((run / "train_results.json").read_text())
        scored = json.loads((run / "eval" / "exact_match.json").read_text())
        assert row["final loss"] == f"{results['final_loss']:.4f}"
        assert row["eval loss"] == f"{results['final_eval_loss']:.4f}"
        assert row["train s"] == f"{results['train_seconds']:.1f}"
        assert row["trainable params"].startswith(f"{results['trainable_params']:,} (")
        assert row["exact_match"] == f"{scored['overall']:.1%}"
        assert row["zh2num"] == f"{scored['scores']['zh2num']:.1%}"
    lora, full = (next(dict(zip(header, c)) for c in body if c[0] == m) for m in ("lora", "full"))
    assert lora["trainable params"] != full["trainable params"] and full["trainable params"].endswith(
        "(100.00%)"
    )
    assert "| method | lr |" in log  # the table is printed at the end


def test_results_json_holds_the_same_numbers(experiment):
    out, rows, _ = experiment
    data = json.loads((out / "results.json").read_text())
    assert data["axes"] == ["method", "lr"] and data["metric"] == "exact_match"
    assert data["runs"] == rows and len(rows) == 4
    for row in rows:
        results = json.loads((Path(row["run_dir"]) / "train_results.json").read_text())
        assert row["final_loss"] == results["final_loss"]
        assert row["trainable_params"] == results["trainable_params"]
        assert 0.0 <= row["overall"] <= 1.0 and set(row["scores"]) == {"num2zh", "reverse", "zh2num"}
    assert [r["axes"] for r in rows] == [
        {"method": "full", "lr": "0.001"},
        {"method": "full", "lr": "0.003"},
        {"method": "lora", "lr": "0.001"},
        {"method": "lora", "lr": "0.003"},
    ]


def test_charts_are_written(experiment):
    out, _, _ = experiment
    for name in ("loss_curves.png", "metric.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name


def test_rerun_from_the_cli_skips_finished_runs(experiment, grid, capsys):
    out, _, _ = experiment
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/train_results.json")}
    assert main(["experiment", str(grid), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("training skipped") == 4 and captured.err.count("(cached)") == 4
    assert "| method | lr |" in captured.out
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/train_results.json")} == stamps


def test_rerun_with_other_settings_is_refused(experiment, grid):
    with pytest.raises(ZhtuneError, match=r"method=full, lr=0.001: .*other settings \(max_steps: 12 -> 20\)"):
        run_quietly(grid, "overrides.max_steps=20")


def test_unknown_axis_key_is_named_with_a_suggestion(grid, tmp_path, capsys):
    bad = yaml.safe_load(grid.read_text())
    bad["base"] = str(grid.parent / "base.yaml")
    bad["axes"] = {"method": ["full"], "lrr": [1.0e-3]}
    path = write_grid(tmp_path / "bad.yaml", bad)
    with pytest.raises(ZhtuneError, match=r"bad\.yaml: axes: unknown config key 'lrr'\. Did you mean: lr\?"):
        load_experiment(path)
    assert main(["experiment", str(path)]) == 1
    assert "unknown config key 'lrr'" in capsys.readouterr().err


def test_bad_grids_fail_clearly(grid, tmp_path):
    good = yaml.safe_load(grid.read_text())
    good["base"] = str(grid.parent / "base.yaml")
    path = write_grid(tmp_path / "g.yaml", good)
    with pytest.raises(ZhtuneError, match="axes: 'lr' has no values"):
        load_experiment(path, ["axes.lr=[]"])
    with pytest.raises(ZhtuneError, match="'output_dir' is set by the experiment"):
        load_experiment(path, ["axes.output_dir=[a,b]"])
    with pytest.raises(ZhtuneError, match=r"g\.yaml: eval: unknown config key 'max_tokens'"):
        load_experiment(path, ["eval.max_tokens=3"])
    with pytest.raises(ZhtuneError, match=r"run method=nosuch, lr=0\.001: config key 'method'"):
        plan_runs(load_experiment(path, ["axes.method=[full,nosuch]"]), str(path))
    with pytest.raises(ZhtuneError, match="name them with a mapping"):
        plan_runs(load_experiment(path, ["axes.lr=[0.001,1e-3]"]), str(path))


def test_without_eval_the_table_compares_losses(grid, tmp_path):
    base = yaml.safe_load((grid.parent / "base.yaml").read_text())
    path = write_grid(
        tmp_path / "losses.yaml",
        {
            "base": {**base, "max_steps": 3, "save_steps": 0, "method": "full"},
            "axes": {"data": {"first": [base["data"][0]], "again": base["data"]}},
            "output_dir": str(tmp_path / "exp"),
        },
    )
    rows, _ = run_quietly(path)
    header, *body = table_rows((tmp_path / "exp" / "results.md").read_text())
    assert header == ["data", "trainable params", "train s", "final loss", "eval loss"]
    assert [c[0] for c in body] == ["first", "again"] and "overall" not in rows[0]
    assert (tmp_path / "exp" / "metric.png").stat().st_size > 5_000
    assert (tmp_path / "exp" / "runs" / "data=first" / "train_results.json").exists()


def test_interrupted_run_resumes_from_its_checkpoint(experiment, grid):
    out, _, _ = experiment
    run = out / "runs" / "method=full,lr=0.001"
    before = [json.loads(ln) for ln in (run / "trainer_log.jsonl").read_text().splitlines()]
    (run / "train_results.json").unlink()  # as if killed after the checkpoint at step 6
    shutil.rmtree(run / "model")
    assert (run / "checkpoints" / "step-6").is_dir()
    _, log = run_quietly(grid)
    assert "[1/4] resumed" in log and log.count("training skipped") == 3
    after = [json.loads(ln) for ln in (run / "trainer_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in after] == [r["step"] for r in before]
    assert after[-1]["loss"] == pytest.approx(before[-1]["loss"], rel=1e-4)
    assert json.loads((run / "train_results.json").read_text())["steps"] == 12
    assert (run / "eval" / "exact_match.json").exists()


def test_names_and_labels():
    assert show_value(2.0e-4) == "0.0002" and show_value(True) == "true"
    assert show_value(["data/belle.jsonl", "data/alpaca.json"]) == "belle+alpaca"
    assert run_name({"method": "lora", "data": "a b/c"}) == "method=lora,data=a_b_c"
    assert len(run_name({"k": "x" * 300})) < 120


@pytest.mark.parametrize("path", GRIDS, ids=lambda p: p.name)
def test_shipped_grids_parse(path):
    cfg = load_experiment(path)
    runs = plan_runs(cfg, str(path))
    assert len(runs) >= 2 and all(r.dir.parent == Path(cfg.output_dir) / "runs" for r in runs)


def test_grids_are_shipped():
    assert GRIDS


def test_exponent_notation_is_read_as_a_number_and_type_errors_name_the_run(grid, tmp_path):
    good = yaml.safe_load(grid.read_text())
    good["base"] = str(grid.parent / "base.yaml")
    good["axes"] = {"lr": ["1e-3", "2e-3"], "max_steps": [5, "many"]}
    path = write_grid(tmp_path / "g.yaml", good)
    with pytest.raises(ZhtuneError, match=r"g\.yaml: run lr=0\.001, max_steps=many: config key 'max_steps'"):
        plan_runs(load_experiment(path), str(path))
    runs = plan_runs(load_experiment(path, ["axes.max_steps=[5]"]), str(path))
    assert [r.train.lr for r in runs] == [1e-3, 2e-3] and runs[0].name == "lr=0.001,max_steps=5"


def test_help_shows_every_grid_and_eval_key(capsys):
    from dataclasses import fields

    from zhtune.config import field_docs
    from zhtune.pipelines.experiment import EvalConfig, ExperimentConfig

    for cls in (ExperimentConfig, EvalConfig):
        assert {f.name for f in fields(cls)} == set(field_docs(cls))
    with pytest.raises(SystemExit) as exit_:
        main(["experiment", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "axes (dict; required)" in text and "max_per_category (int; default: 0)" in text


def test_gen_metric_scores_the_same_answers_with_eval_gens_metrics(tiny_model_dir, skill_records):
    from zhtune.eval.gen import score_pair
    from zhtune.models.loading import load_for_inference
    from zhtune.pipelines.experiment import EvalConfig, gen_scores

    model, tokenizer, template = load_for_inference(tiny_model_dir)
    records = skill_records[1][:6]
    ev = EvalConfig(data=["unused.jsonl"], metric="gen", max_new_tokens=8, batch_size=4)
    result = gen_scores(model, tokenizer, template, records, ev)
    answers = result["predictions"]
    assert [a["reference"] for a in answers] == [r["messages"][-1]["content"] for r in records]
    rouge_l = [score_pair(a["prediction"], a["reference"])["rouge-l"] for a in answers]
    assert result["overall"] == pytest.approx(sum(rouge_l) / len(rouge_l) / 100, abs=1e-4)
    assert sum(result["counts"].values()) == 6 and set(result["metrics"]) >= {
        "bleu-4",
        "rouge-1",
        "exact_match",
    }


def test_exam_metric_scores_each_run_with_eval_exam(experiment, grid):
    """metric: exam runs `zhtune eval exam` on every run (training skipped: the runs are
    finished); the table's columns are the exam's categories. Runs last: it rewrites the report."""
    exam_dir = Path(__file__).parent.parent / "fixtures" / "exam" / "cmmlu"
    rows, log = run_quietly(
        grid,
        "axes.method=[full]",
        "axes.lr=[0.001]",
        "eval.metric=exam",
        f"eval.data=[{exam_dir}]",
        "eval.shots=1",
    )
    run = grid.parent / "exp" / "runs" / "method=full,lr=0.001"
    report = json.loads((run / "eval" / "exam.json").read_text())
    assert report["metric"] == "exam" and report["shots"] == 1 and report["questions"] > 0
    assert (run / "eval" / "exam_predictions.jsonl").exists()
    (row,) = rows
    assert row["overall"] == report["overall"] and row["scores"] == report["categories"]
    results = (grid.parent / "exp" / "results.md").read_text()
    assert "exam on" in results and f"{report['overall']:.1%}" in results
    assert "training skipped" in log


def test_judge_metric_scores_each_run_with_eval_judge(experiment, grid):
    """metric: judge runs `zhtune eval judge` on every run against an OpenAI-compatible judge
    (a scripted stub); the columns are the classes, and a re-run asks the judge nothing."""
    from tests.stub_openai import StubServer

    data = Path(__file__).parent.parent / "fixtures" / "judge" / "eval_set.json"
    with StubServer(lambda request, n: "得分：0.7") as server:
        args = [
            "axes.method=[full]", "axes.lr=[0.001]", "eval.metric=judge", f"eval.data=[{data}]",
            f"eval.judge.base_url={server.base_url}", "eval.judge.model=stub-judge", "eval.judge_limit=4",
        ]  # fmt: skip
        (row,), log = run_quietly(grid, *args)
        sent = len(server.requests)
        run_quietly(grid, *args)
        assert len(server.requests) == sent == 4
    report = json.loads(
        (grid.parent / "exp" / "runs" / "method=full,lr=0.001" / "eval" / "judge.json").read_text()
    )
    assert row["overall"] == report["overall"] == pytest.approx(0.7)
    assert row["scores"] == report["scores"] and set(row["scores"].values()) == {0.7}
    assert "LLM judge (belle)" in (grid.parent / "exp" / "results.md").read_text() and "judge 0.700" in log


def test_a_grid_in_llamafactory_keys_plans_the_same_runs(grid, tmp_path):
    """A grid whose base and overrides are written in LLaMA-Factory's keys (and an axis over one of
    them) plans the runs zhtune's own keys would: translated layer by layer, later layers winning."""
    good = yaml.safe_load(grid.read_text())
    base = yaml.safe_load((grid.parent / "base.yaml").read_text())
    lf_base = {("learning_rate" if k == "lr" else k): v for k, v in base.items()}
    good["base"] = lf_base
    good["overrides"] = {**good.get("overrides", {}), "lora_target": "q_proj,v_proj"}
    good["axes"] = {"learning_rate": ["1e-3", "2e-3"]}
    path = write_grid(tmp_path / "g.yaml", good)
    runs = plan_runs(load_experiment(path), str(path))
    assert [r.train.lr for r in runs] == [1e-3, 2e-3]
    assert all(r.train.lora_target == ["q_proj", "v_proj"] for r in runs)
    assert any("learning_rate" in note for note in runs[0].train.translated)
