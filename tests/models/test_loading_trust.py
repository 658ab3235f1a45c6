"""Remote code runs only with the loading command's ``--trust-remote-code`` (issue 18, item 2).

A run's ``config.yaml`` or an export's ``zhtune_export.json`` that says ``trust_remote_code: true``
only asks: every loader (chat's, predict, serve, eval, export, the web UI, a run used as a
training base) refuses it without the flag, naming the file that asked, before anything imports
the model's own module. Each such module here writes a marker file when imported; the tests check
that it never was. With the flag, transformers' ``from_pretrained`` is replaced by a recorder (the
module is never really run) to show the flag gets through.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from zhtune.cli import main
from zhtune.errors import ZhtuneError
from zhtune.models.loading import (
    check_remote_code,
    load_for_inference,
    remote_code_files,
    resolve_source,
)

EXAMS = Path(__file__).resolve().parents[1] / "fixtures" / "exam"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def remote_model(tiny_model_dir: Path, out: Path, marker: Path, model_type: str = "llama") -> Path:
    """The tiny model in ``out`` with ``modeling_evil.py`` (writes ``marker`` when imported) named
    by ``auto_map`` in its config.json. A known ``model_type`` (llama) leaves transformers able to
    load it with its own code when remote code is off."""
    shutil.copytree(tiny_model_dir, out)
    (out / "modeling_evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('remote code ran')\n", encoding="utf-8"
    )
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    config["model_type"] = model_type
    config["auto_map"] = {
        "AutoConfig": "modeling_evil.EvilConfig",
        "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
    }
    (out / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return out


def run_dir(weights: Path, out: Path, asks: bool = True) -> Path:
    """A finished full-weights run directory around ``weights`` whose config.yaml asks for
    remote code (``asks``)."""
    out.mkdir()
    shutil.copytree(weights, out / "model")
    for name in TOKENIZER_FILES:
        if (weights / name).is_file():
            shutil.copy(weights / name, out / name)
    (out / "config.yaml").write_text(
        f"model: {weights}\nmethod: full\ntemplate: chatml\ntrust_remote_code: {str(asks).lower()}\n",
        encoding="utf-8",
    )
    return out


def export_dir(weights: Path, out: Path) -> Path:
    """A ``zhtune export`` directory of ``weights`` whose manifest asks for remote code."""
    shutil.copytree(weights, out)
    manifest = {"template": "chatml", "adapter": None, "trust_remote_code": True}
    (out / "zhtune_export.json").write_text(json.dumps(manifest), encoding="utf-8")
    return out


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "REMOTE_CODE_RAN"


@pytest.fixture
def weights(tiny_model_dir, tmp_path, marker) -> Path:
    return remote_model(tiny_model_dir, tmp_path / "weights", marker)


@pytest.fixture
def run(weights, tmp_path) -> Path:
    return run_dir(weights, tmp_path / "run")


@pytest.fixture
def recorded(monkeypatch) -> dict[str, list[object]]:
    """Replace AutoConfig/AutoTokenizer/AutoModelForCausalLM.from_pretrained by recorders: the
    ``trust_remote_code`` of each call is noted under the class's name, then the real loader runs
    with it off (the tiny llama loads with transformers' own code; the module is never imported)."""
    import transformers

    seen: dict[str, list[object]] = {}
    for cls in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        real = cls.from_pretrained.__func__

        def recorder(klass, path, *args, _real=real, _name=cls.__name__, **kwargs):
            seen.setdefault(_name, []).append(kwargs.get("trust_remote_code"))
            kwargs["trust_remote_code"] = False
            return _real(klass, path, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(recorder))
    return seen


def loaded_with(recorded: dict[str, list[object]], trust: bool) -> bool:
    """The tokenizer and the model were each loaded once, told ``trust_remote_code=trust``."""
    return recorded.get("AutoTokenizer") == [trust] and recorded.get("AutoModelForCausalLM") == [trust]


def asked_by(path: Path) -> str:
    """The start of the refusal for a source whose ``path`` asked."""
    return f"{path} sets trust_remote_code: loading it would run the Python files in"


# --------------------------------------------------------------------------------------------
# resolve_source: the metadata asks, only the caller's flag trusts
# --------------------------------------------------------------------------------------------
def test_metadata_asks_but_never_trusts(run, weights, tmp_path):
    src = resolve_source(run)
    assert src.trust_remote_code is False
    assert src.asks_remote_code == str(run / "config.yaml")
    assert resolve_source(run, trust_remote_code=True).trust_remote_code is True
    export = export_dir(weights, tmp_path / "export")
    src = resolve_source(export)
    assert src.trust_remote_code is False and src.asks_remote_code == str(export / "zhtune_export.json")
    plain = resolve_source(weights)
    assert plain.trust_remote_code is False and plain.asks_remote_code is None
    assert remote_code_files(weights) == ["modeling_evil.py"]


def test_an_adapter_run_on_a_base_run_that_asks_is_asked_for_too(run, tmp_path):
    adapter_run = tmp_path / "lora"
    (adapter_run / "adapter").mkdir(parents=True)
    (adapter_run / "config.yaml").write_text(f"model: {run}\nmethod: lora\n", encoding="utf-8")
    src = resolve_source(adapter_run)
    assert src.asks_remote_code == str(run / "config.yaml") and src.trust_remote_code is False
    with pytest.raises(ZhtuneError, match="pass --trust-remote-code"):
        check_remote_code(src)


# --------------------------------------------------------------------------------------------
# chat's loader (load_for_inference), with and without the flag
# --------------------------------------------------------------------------------------------
def test_a_run_that_asks_is_refused_without_the_flag(run, marker):
    with pytest.raises(ZhtuneError) as err:
        load_for_inference(run)
    message = str(err.value)
    assert message.startswith(asked_by(run / "config.yaml"))
    assert f"{run / 'model'} (e.g. modeling_evil.py); pass --trust-remote-code to allow that" in message
    assert not marker.exists()


def test_an_export_that_asks_is_refused_without_the_flag(weights, tmp_path, marker):
    export = export_dir(weights, tmp_path / "export")
    with pytest.raises(ZhtuneError, match="zhtune_export.json sets trust_remote_code") as err:
        load_for_inference(export)
    assert str(err.value).startswith(asked_by(export / "zhtune_export.json"))
    assert "--trust-remote-code" in str(err.value) and not marker.exists()


def test_the_flag_is_passed_to_transformers(run, recorded, marker):
    model, tokenizer, template = load_for_inference(run, trust_remote_code=True)
    assert template == "chatml" and model is not None and tokenizer is not None
    assert loaded_with(recorded, True)
    assert not marker.exists()  # the recorder loads with transformers' own llama code


def test_without_the_flag_transformers_is_told_false_even_for_a_run_that_does_not_ask(
    weights, tmp_path, recorded
):
    quiet = run_dir(weights, tmp_path / "quiet", asks=False)  # no ask: transformers decides (llama code)
    load_for_inference(quiet)
    assert loaded_with(recorded, False)


def test_metadata_that_asks_where_no_code_is_named_loads_as_usual(tiny_model_dir, tmp_path):
    """Nothing would run (no auto_map): the ask changes nothing, the run loads without the flag."""
    plain = run_dir(tiny_model_dir, tmp_path / "no-code")
    assert resolve_source(plain).asks_remote_code
    load_for_inference(plain)


def test_a_model_folder_with_its_own_code_is_refused_by_name(tiny_model_dir, tmp_path, marker):
    """No metadata asks, and transformers has no code of its own for the model type: its refusal
    becomes a ZhtuneError naming the directory and the flag."""
    folder = remote_model(tiny_model_dir, tmp_path / "custom", marker, model_type="evil_llama")
    with pytest.raises(ZhtuneError) as err:
        load_for_inference(folder)
    message = str(err.value)
    assert message.startswith(
        f"{folder} ships its own model code (its auto_map names modeling_evil.py): loading it would run "
        f"the Python files in {folder}; "
    )
    assert "pass --trust-remote-code to allow that" in message
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# every command: refused without the flag (exit 1, the file named, nothing imported)
# --------------------------------------------------------------------------------------------
def _refused(argv: list[str], run: Path, marker: Path, capsys) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"error: {asked_by(run / 'config.yaml')}" in err
    assert "pass --trust-remote-code to allow that" in err
    assert not marker.exists()
    return err


def test_chat_refuses(run, marker, capsys):
    _refused(["chat", str(run)], run, marker, capsys)


def test_serve_refuses(run, marker, capsys):
    pytest.importorskip("uvicorn")
    pytest.importorskip("starlette")
    _refused(["serve", str(run), "--port", "9"], run, marker, capsys)


def test_predict_refuses_and_passes_the_flag(run, marker, tmp_path, capsys, recorded):
    data = tmp_path / "in.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "一加一？"}]}\n', encoding="utf-8")
    out = tmp_path / "out.jsonl"
    argv = ["predict", str(run), str(data), "-o", str(out), "--max-new-tokens", "2"]
    _refused(argv, run, marker, capsys)
    assert recorded == {} and not out.exists()
    assert main([*argv, "--trust-remote-code"]) == 0
    assert loaded_with(recorded, True)
    assert len(out.read_text(encoding="utf-8").splitlines()) == 1


def test_eval_exam_refuses(run, marker, tmp_path, capsys):
    _refused(
        [
            "eval",
            "exam",
            str(run),
            "--data",
            str(EXAMS / "cmmlu"),
            "--shots",
            "2",
            "-o",
            str(tmp_path / "ev"),
        ],
        run,
        marker,
        capsys,
    )


def test_eval_gen_and_judge_pass_the_flag_on(run, tmp_path, monkeypatch):
    """gen and judge answer through predict: the flag goes with them."""
    import zhtune.eval.gen as gen_module
    import zhtune.eval.judge as judge_module

    calls: list[bool] = []

    def fake_predict(*args, trust_remote_code=False, **kwargs):
        calls.append(trust_remote_code)
        raise ZhtuneError("stop here")

    for module in (gen_module, judge_module):
        monkeypatch.setattr(module, "predict", fake_predict)
    data = tmp_path / "in.jsonl"
    data.write_text(
        '{"messages": [{"role": "user", "content": "一加一？"}, {"role": "assistant", "content": "二"}]}\n',
        encoding="utf-8",
    )
    questions = tmp_path / "q.json"
    questions.write_text(
        json.dumps([{"question": "一加一？", "std_answer": "二", "class": "math"}], ensure_ascii=False),
        encoding="utf-8",
    )
    judge = ["--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "judge"]
    for flag in ([], ["--trust-remote-code"]):
        assert (
            main(["eval", "gen", str(run), "--data", str(data), "--output-dir", str(tmp_path / "g"), *flag])
            == 1
        )
        assert (
            main(
                [
                    "eval",
                    "judge",
                    str(run),
                    "--data",
                    str(questions),
                    "-o",
                    str(tmp_path / "j"),
                    *judge,
                    *flag,
                ]
            )
            == 1
        )
    assert calls == [False, False, True, True]


def test_export_refuses_and_passes_the_flag(run, marker, tmp_path, capsys, recorded):
    out = tmp_path / "export"
    _refused(["export", str(run), "-o", str(out)], run, marker, capsys)
    assert recorded == {} and not out.exists()
    assert main(["export", str(run), "-o", str(out), "--trust-remote-code"]) == 0
    assert loaded_with(recorded, True)
    manifest = json.loads((out / "zhtune_export.json").read_text(encoding="utf-8"))
    # the export still names the module: it asks in turn, so loading it needs the flag again
    assert manifest["trust_remote_code"] is True
    with pytest.raises(ZhtuneError, match="zhtune_export.json sets trust_remote_code"):
        load_for_inference(out)


# --------------------------------------------------------------------------------------------
# the web UI: fixed at launch, a run picked by a visitor cannot switch it on
# --------------------------------------------------------------------------------------------
def test_webui_chat_model_refuses_a_run_that_asks_and_keeps_its_model(run, tiny_model_dir, marker):
    from zhtune.infer.webui import ChatModel

    chat = ChatModel()
    chat.load(tiny_model_dir)
    with pytest.raises(ZhtuneError, match="config.yaml sets trust_remote_code.*--trust-remote-code"):
        chat.load(run)  # what "Chat with this run" calls; the page shows the error
    assert chat.run == Path(tiny_model_dir) and not marker.exists()


def test_webui_launched_with_the_flag_passes_it_for_every_run(run, recorded):
    from zhtune.infer.webui import ChatModel

    chat = ChatModel(trust_remote_code=True)
    chat.load(run)
    assert chat.run == run and loaded_with(recorded, True)


def test_webui_command_refuses_the_run_it_starts_with(run, marker, capsys):
    pytest.importorskip("gradio")
    _refused(["webui", str(run), "--port", "9"], run, marker, capsys)


# --------------------------------------------------------------------------------------------
# training: only the new run's own config key counts
# --------------------------------------------------------------------------------------------
def test_a_run_used_as_a_training_base_passes_no_trust_on(run, marker, tmp_path, train_file, capsys):
    argv = ["train", f"model={run}", f"data={train_file}", f"output_dir={tmp_path / 'new'}", "max_steps=1"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"error: {asked_by(run / 'config.yaml')}" in err
    assert "set trust_remote_code: true in the training config to allow that" in err
    assert not marker.exists()


def test_the_training_config_key_is_what_counts(run, recorded, marker):
    from zhtune.config import build_config
    from zhtune.train.config import TrainConfig
    from zhtune.train.setup import resolve_model

    cfg = build_config(
        TrainConfig, {"model": str(run), "data": ["x.jsonl"], "output_dir": "o", "trust_remote_code": True}
    )
    _, src, *_ = resolve_model(cfg)
    assert src.trust_remote_code is True
    assert recorded["AutoTokenizer"] == [True] and True in recorded["AutoConfig"]
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# --help
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "command",
    [
        ["chat"],
        ["predict"],
        ["serve"],
        ["webui"],
        ["eval", "exam"],
        ["eval", "gen"],
        ["eval", "judge"],
        ["export"],
    ],
    ids=" ".join,
)
def test_every_loading_command_lists_the_flag(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*command, "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split()).lower()
    assert (
        "--trust-remote-code allow the model's own python code (auto_map) to run; never switched on by a "
        "run's or export's metadata" in out
    )
    assert "--no-trust-remote-code" not in out
