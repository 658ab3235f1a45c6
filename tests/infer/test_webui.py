"""zhtune webui: finding and summarising runs, the streaming chat handler, and the real page
in headless Chromium (skipped, with the reason, where gradio, playwright or Chromium is missing).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.serving import zhtune_server
from zhtune.cli import build_parser
from zhtune.config import build_config
from zhtune.errors import ZhtuneError
from zhtune.infer.generate import GenerationOptions
from zhtune.infer.webui import (
    ChatModel,
    WebUIOptions,
    clear_chat,
    fit_context,
    import_gradio,
    list_runs,
    loss_curve,
    message_text,
    read_run,
    reports_markdown,
    respond,
    run_label,
    summary_markdown,
    to_messages,
)
from zhtune.train.config import TrainConfig
from zhtune.train.sft import train

GREEDY = GenerationOptions(max_new_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory, tiny_model_dir, train_file) -> Path:
    """A runs folder: a finished tiny full fine-tuning run with eval reports, a run still
    training (config and log only, the log ending on a half-written line) one level down, and
    folders that are not runs."""
    runs = tmp_path_factory.mktemp("runs")
    cfg = build_config(
        TrainConfig,
        {
            "model": str(tiny_model_dir),
            "data": [str(train_file)],
            "output_dir": str(runs / "tiny-full"),
            "template": "chatml",
            "method": "full",
            "max_steps": 12,
            "batch_size": 8,
            "lr": 3e-3,
            "logging_steps": 3,
            "cutoff_len": 64,
            "val_size": 8,
        },
    )
    run = train(cfg, progress=False)
    (run / "eval").mkdir()
    (run / "eval" / "exact_match.json").write_text(json.dumps({"overall": 0.25, "by_skill": {"num2zh": 0.5}}))
    (run / "eval" / "report.md").write_text("| skill | score |\n| --- | --- |\n| num2zh | 50.0% |\n")

    live = runs / "sweep" / "lr-1e-3"
    live.mkdir(parents=True)
    (live / "config.yaml").write_text((run / "config.yaml").read_text())
    rows = [{"step": s, "loss": 6.0 - s / 10} for s in (1, 2, 3)]
    (live / "trainer_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')
    (runs / "data").mkdir()
    (runs / "data" / "train.jsonl").write_text("{}\n")
    (runs / "base").mkdir()
    (runs / "base" / "config.json").write_text("{}")
    return runs


@pytest.fixture(scope="module")
def chat(runs_dir) -> ChatModel:
    model = ChatModel()
    model.load(runs_dir / "tiny-full")
    return model


class EchoChat(ChatModel):
    """A stand-in model: replies with fixed pieces and records the prompt it was given."""

    def __init__(self, pieces: list[str]) -> None:
        super().__init__()
        self.pieces, self.prompts = pieces, []

    def stream(self, messages, options):
        self.prompts.append(messages)
        yield from self.pieces


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------
def test_lists_finished_and_training_runs_newest_first(runs_dir):
    runs = list_runs(runs_dir)
    assert [run_label(r, runs_dir) for r in runs] == ["sweep/lr-1e-3", "tiny-full"]
    assert list_runs(runs_dir / "tiny-full") == [runs_dir / "tiny-full"]  # a run is its own folder
    assert list_runs(runs_dir, max_depth=1) == [runs_dir / "tiny-full"]
    assert list_runs(runs_dir / "missing") == []
    assert run_label(runs_dir / "tiny-full", runs_dir / "sweep") == str((runs_dir / "tiny-full").resolve())


def test_reads_a_finished_runs_config_results_and_eval_reports(runs_dir, tmp_path):
    summary = read_run(runs_dir / "tiny-full")
    assert summary.finished
    assert "method: full" in summary.config_text and "max_steps: 12" in summary.config_text
    assert summary.results is not None and summary.results["steps"] == 12
    assert [r["step"] for r in summary.log if "loss" in r] == [3, 6, 9, 12]
    assert list(summary.eval_reports) == ["eval/exact_match.json", "eval/report.md"]
    header = summary_markdown(summary, "tiny-full")
    assert "### tiny-full" in header and "| steps | 12 |" in header and "finished" in header
    reports = reports_markdown(summary)
    assert "```json" in reports and '"num2zh": 0.5' in reports and "| num2zh | 50.0% |" in reports
    assert loss_curve(summary, tmp_path) == runs_dir / "tiny-full" / "loss.png"


def test_links_out_of_the_runs_folder_are_never_followed(runs_dir, tmp_path):
    """A symlinked run outside the runs folder is not listed, and an eval report that is a link
    (say to /etc/passwd) is not shown."""
    outside = tmp_path / "elsewhere" / "secret-run"
    shutil.copytree(runs_dir / "tiny-full", outside, ignore=shutil.ignore_patterns("model", "eval"))
    secret = tmp_path / "secret.md"
    secret.write_text("password: hunter2\n")
    linked_runs = tmp_path / "runs-with-links"
    linked_runs.mkdir()
    (linked_runs / "outside").symlink_to(outside, target_is_directory=True)
    shutil.copytree(runs_dir / "tiny-full", linked_runs / "own", ignore=shutil.ignore_patterns("model"))
    (linked_runs / "own" / "eval" / "passwd.md").symlink_to(secret)
    assert list_runs(linked_runs) == [linked_runs / "own"]
    summary = read_run(linked_runs / "own")
    assert "eval/passwd.md" not in summary.eval_reports and "hunter2" not in reports_markdown(summary)
    assert list(summary.eval_reports) == ["eval/exact_match.json", "eval/report.md"]


def test_a_run_still_training_is_plotted_from_its_log(runs_dir, tmp_path):
    live = runs_dir / "sweep" / "lr-1e-3"
    summary = read_run(live)
    assert not summary.finished and summary.results is None and summary.eval_reports == {}
    assert [r["step"] for r in summary.log] == [1, 2, 3]  # the half-written row is skipped
    assert "last log row: step 3" in summary_markdown(summary, "lr-1e-3")
    png = loss_curve(summary, tmp_path)
    assert png is not None and png.parent == tmp_path and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (live / "loss.png").exists()  # the run directory is only read
    with pytest.raises(ZhtuneError, match="not a run directory"):
        read_run(runs_dir / "data")


# --------------------------------------------------------------------------------------------
# Chat
# --------------------------------------------------------------------------------------------
def test_page_messages_become_canonical_turns():
    parts = [{"type": "text", "text": "你"}, {"type": "text", "text": "好"}, {"type": "file", "file": {}}]
    assert message_text("hi") == "hi" and message_text(parts) == "你好" and message_text(None) == ""
    history = [{"role": "user", "content": parts, "metadata": None}, {"role": "assistant", "content": "在"}]
    assert to_messages(history, " 你是助手。 ") == [
        {"role": "system", "content": "你是助手。"},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "在"},
    ]
    assert to_messages(history, "  ")[0]["role"] == "user"


def test_reply_streams_into_the_history_piece_by_piece():
    chat = EchoChat(["三百", "零", "五 "])
    first = [
        {"role": "user", "content": [{"type": "text", "text": "一"}]},
        {"role": "assistant", "content": "1"},
    ]
    steps = list(respond(chat, " Write 305 in Chinese numerals. ", first, "sys", GREEDY))
    boxes, histories = zip(*steps)
    assert set(boxes) == {""}  # the input box is cleared at once
    replies = [h[-1]["content"] for h in histories]
    assert replies == ["", "三百", "三百零", "三百零五 ", "三百零五"]
    assert histories[-1][:3] == [
        {"role": "user", "content": "一"},
        {"role": "assistant", "content": "1"},
        {"role": "user", "content": "Write 305 in Chinese numerals."},
    ]
    assert chat.prompts == [[{"role": "system", "content": "sys"}, *histories[-1][:3]]]


def test_empty_message_and_clear_change_nothing_else():
    chat = EchoChat(["x"])
    history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert list(respond(chat, "   ", history, "", GREEDY)) == [("   ", history)]
    assert chat.prompts == []
    assert clear_chat() == ("", [])


def test_the_tiny_run_streams_a_reply(chat):
    torch.manual_seed(0)  # sampled: the barely trained model's greedy reply is empty
    options = GenerationOptions(max_new_tokens=12, temperature=1.0)
    replies = [h[-1]["content"] for _, h in respond(chat, "把 305 写成中文数字。", [], "", options)]
    assert replies[0] == "" and len(set(replies)) >= 4  # empty, then a reply that grows
    assert all(b.startswith(a) for a, b in zip(replies[:-1], replies[1:-1]))
    assert replies[-1] == replies[-2].strip()
    assert "Chatting with" in chat.describe() and "chatml" in chat.describe()


def test_the_chat_tab_says_where_the_model_runs(chat):
    if torch.cuda.is_available():
        pytest.skip("device auto is a GPU here")
    assert chat.placement == "cpu, fp32" and "cpu, fp32" in chat.describe()  # auto on a CPU-only machine


def test_the_chat_keeps_to_the_models_context(chat):
    """A conversation the context cannot hold is refused: a huge paste from its length alone (no
    tokenizing, no generation slot held), one just over by its tokens; a reply is cut to the room
    left, so prompt plus reply never pass the context."""
    context = chat.context
    assert context == 512  # the tiny model's max_position_embeddings
    started = time.perf_counter()
    with pytest.raises(ZhtuneError, match=r"2,000,000 characters, more than this model's 512-token context"):
        list(respond(chat, "x" * 2_000_000, [], "", GREEDY))
    assert time.perf_counter() - started < 1.0
    with pytest.raises(ZhtuneError, match=r"this model's context is 512: shorten the message or clear the chat"):
        list(respond(chat, "一 " * 600, [], "", GREEDY))

    prompter = chat._prompter
    long = "一二三 " * 100
    prompt, options = fit_context(prompter, [{"role": "user", "content": long}], GREEDY, context, 100)
    assert options is GREEDY  # room enough: unchanged
    wide = GenerationOptions(max_new_tokens=10_000, temperature=0.0)
    prompt, options = fit_context(prompter, [{"role": "user", "content": long}], wide, context, 100)
    assert len(prompt) + options.max_new_tokens == context and options.max_new_tokens < 10_000


def test_no_model_loaded_says_what_to_do():
    with pytest.raises(ZhtuneError, match="Runs tab"):
        list(respond(ChatModel(), "hi", [], "", GREEDY))


def test_missing_gradio_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # makes `import gradio` fail
    with pytest.raises(ZhtuneError, match=r"\[webui\]"):
        import_gradio()


def test_cli_defaults_bind_to_localhost():
    args = build_parser().parse_args(["webui"])
    assert (args.run, args.runs_dir, args.host, args.port) == (None, "", "127.0.0.1", 7860)
    args = build_parser().parse_args(["webui", "runs/x", "--port", "9000", "--temperature", "0"])
    assert (args.run, args.port, args.temperature) == ("runs/x", 9000, 0.0)


# --------------------------------------------------------------------------------------------
# The page, in a real browser
# --------------------------------------------------------------------------------------------
def chromium_binary() -> str | None:
    """A Chromium or Chrome executable: $ZHTUNE_CHROMIUM, or one on PATH (Debian: apt-get install chromium)."""
    names = [os.environ.get("ZHTUNE_CHROMIUM", ""), "chromium", "chromium-browser", "google-chrome"]
    return next((path for name in names if name and (path := shutil.which(name))), None)


def browser_missing() -> str | None:
    """Why the browser test cannot run here, or None."""
    if chromium_binary() is None:
        return "no Chromium binary (apt-get install chromium, or set ZHTUNE_CHROMIUM)"
    if importlib.util.find_spec("gradio") is None:
        return "gradio is not installed (pip install -e '.[webui]')"
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install -e '.[dev]')"
    return None


@pytest.fixture
def webui_server(runs_dir, tmp_path):
    """``zhtune webui RUN`` in a subprocess on a free port; yields its URL once it answers."""
    env = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    args = ["webui", str(runs_dir / "tiny-full")]
    # sampled, for a reply of several pieces; seeded, since this little model's first sampled token
    # is its end marker (an empty reply) 7% of the time
    args += ["--temperature", "1.0", "--max-new-tokens", "48", "--seed", "0"]
    with zhtune_server(args, tmp_path / "server.log", "/", timeout=60, cwd=tmp_path, env=env) as url:
        yield url + "/"


# Records every text the newest reply shows, as the page changes (so streaming can be seen).
WATCH_REPLY = """() => {
    window.replies = [];
    const chatbot = document.querySelector('#chatbot');
    new MutationObserver(() => {
        const bots = chatbot.querySelectorAll('[data-testid="bot"]');
        const text = bots.length ? bots[bots.length - 1].innerText.trim() : '';
        if (text && text !== window.replies[window.replies.length - 1]) window.replies.push(text);
    }).observe(chatbot, {childList: true, subtree: true, characterData: true});
}"""


@pytest.mark.skipif(browser_missing() is not None, reason=str(browser_missing()))
def test_browser_chat_streams_and_runs_tab_shows_the_run(webui_server, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        instance = pw.chromium.launch(executable_path=chromium_binary(), headless=True, args=["--no-sandbox"])
        try:
            page = instance.new_page(viewport={"width": 1280, "height": 900})
            outside = []  # the page must reach nothing but the local server
            page.on("request", lambda r: None if r.url.startswith(webui_server) else outside.append(r.url))
            page.goto(webui_server)
            page.wait_for_selector("#message textarea")
            page.evaluate(WATCH_REPLY)
            page.fill("#message textarea", "把 305 写成中文数字。")
            page.click("#send")
            page.wait_for_function("window.replies.length > 0", timeout=30_000)
            replies, deadline = [], time.time() + 30
            while time.time() < deadline:  # done once the reply stops changing for a second
                time.sleep(1.0)
                seen = page.evaluate("window.replies")
                if seen == replies:
                    break
                replies = seen
            shot = tmp_path / "webui_chat.png"
            page.screenshot(path=str(shot))
            assert page.locator('[data-testid="user"]').inner_text().strip() == "把 305 写成中文数字。"
            assert replies and all(b.startswith(a) for a, b in zip(replies, replies[1:])), replies
            data = shot.read_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000

            page.get_by_role("tab", name="Runs").click()
            page.wait_for_function(
                "document.querySelector('#run-summary').innerText.includes('finished')", timeout=15_000
            )
            summary = page.inner_text("#run-summary")
            assert "tiny-full" in summary and "train_results.json" in summary and "###" not in summary
            config = page.inner_text("#run-config")
            assert "method: full" in config and "max_steps: 12" in config
            assert "num2zh" in page.inner_text("#run-reports")
            page.screenshot(path=str(tmp_path / "webui_runs.png"), full_page=True)

            page.click("#run-picker input")  # another run: the one still training
            page.get_by_role("option", name="sweep/lr-1e-3").click()
            page.wait_for_function(
                "document.querySelector('#run-summary').innerText.includes('last log row: step 3')",
                timeout=15_000,
            )
            page.click("#run-picker input")  # back to the finished run, and chat with it
            page.get_by_role("option", name="tiny-full").click()
            page.wait_for_function(
                "document.querySelector('#run-summary').innerText.includes('finished')", timeout=15_000
            )
            page.click("#chat-with")
            page.get_by_role("tab", name="Chat").click()
            page.wait_for_function(
                "document.querySelectorAll('#chatbot [data-testid=\"user\"]').length === 0", timeout=15_000
            )  # switching the model starts a new conversation
            assert "/tiny-full" in page.inner_text("#chat-status")
            assert outside == []
        finally:
            instance.close()
    print(f"reply texts seen while streaming: {replies}; screenshots in {tmp_path}")


def test_a_non_loopback_page_needs_a_login(capsys, monkeypatch):
    from zhtune.cli import main

    monkeypatch.delenv("ZHTUNE_WEBUI_AUTH", raising=False)
    assert main(["webui", "--host", "0.0.0.0"]) == 1
    assert "pass --auth USER:PASSWORD, or --insecure-no-auth" in capsys.readouterr().err
    assert main(["webui", "--auth", "nopassword"]) == 1
    assert "--auth takes USER:PASSWORD" in capsys.readouterr().err
    monkeypatch.setenv("ZHTUNE_WEBUI_AUTH", "")  # set but empty is an error, never "no login"
    assert main(["webui", "--host", "0.0.0.0"]) == 1
    assert "ZHTUNE_WEBUI_AUTH is set but empty" in capsys.readouterr().err
    monkeypatch.setenv("ZHTUNE_WEBUI_AUTH", "ann:s3cret")
    assert WebUIOptions(host="0.0.0.0").login() == ("ann", "s3cret")
    assert WebUIOptions(auth="bob:pw").login() == ("bob", "pw")  # the flag wins over the variable
    assert build_parser().parse_args(["webui"]).auth == ""  # read at launch: --help never shows it
