"""``zhtune webui [RUN]``: a browser UI to chat with a run and to browse runs.

Two tabs, one page:

* **Chat** streams replies from one model (a run, an export or a plain model directory) with the
  same prompt builder and streaming generator as ``zhtune chat``
  (:class:`~zhtune.infer.generate.Prompter`, :func:`~zhtune.infer.generate.stream_generate`);
  decoding settings, a system message and "clear" sit beside the conversation.
* **Runs** lists the run directories under a folder and shows the one picked: its resolved
  ``config.yaml``, loss curve, ``train_results.json`` and eval reports (``eval/*.md``,
  ``eval/*.json``). "Chat with this run" loads it into the chat tab.

The file reads top to bottom: runs (plain functions), chat (plain functions), then the page,
which is the only part that touches gradio; gradio is imported there, lazily, so ``zhtune
--help`` stays fast and zhtune works without it. One model is loaded per server and shared by
every open page: this is a local tool, bound to 127.0.0.1 unless ``--host`` says otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from zhtune import rundir
from zhtune.errors import ZhtuneError
from zhtune.flags import flag
from zhtune.infer.engine import chars_beyond_context, context_length, max_token_chars
from zhtune.infer.generate import GenerationOptions, Prompter, placement, stream_generate
from zhtune.infer.serve_config import credential, refuse_open_bind
from zhtune.models.device import RuntimeOptions, resolve_device
from zhtune.rundir import RunDir

MAX_REPORT_CHARS = 20_000
"""Longer eval reports are cut to this many characters on the page."""


@dataclass
class WebUIOptions:
    """Options of ``zhtune webui`` (decoding, device, dtype and remote code apart)."""

    runs_dir: str = ""
    """Folder of runs to browse (empty: RUN's parent folder, or ./runs)."""
    host: str = "127.0.0.1"
    """Address to bind (127.0.0.1: this machine only; any other needs --auth or --insecure-no-auth)."""
    port: int = 7860
    """Port to listen on."""
    auth: str = flag(default="", metavar="USER:PASSWORD")
    """A login in front of the page (empty: $ZHTUNE_WEBUI_AUTH if set, else none; needed for a non-loopback --host)."""
    insecure_no_auth: bool = False
    """Serve on a non-loopback --host without --auth (anyone who can reach it reads your runs)."""
    system: str = ""
    """Starting system message."""
    seed: int | None = None
    """Seed the sampler once at start: the same messages sent to a fresh server get the same sampled replies (empty: random)."""

    def login(self) -> tuple[str, str] | None:
        """``(user, password)`` from ``--auth`` or ``$ZHTUNE_WEBUI_AUTH``, None for no login; refuses
        a malformed pair, an empty variable, and a non-loopback bind without a login."""
        auth = credential(self.auth, "ZHTUNE_WEBUI_AUTH", "set it to USER:PASSWORD, or unset it")
        login = None
        if auth is not None:
            user, sep, password = auth.partition(":")
            if not (sep and user and password):
                raise ZhtuneError("--auth takes USER:PASSWORD (both non-empty)")
            login = (user, password)
        refuse_open_bind(
            self.host, login is not None, self.insecure_no_auth, "--auth", "read your runs and use the model",
            "--auth USER:PASSWORD",
        )  # fmt: skip
        return login


# ---------------------------------------------------------------------------------------------
# Runs: find them, summarise one
# ---------------------------------------------------------------------------------------------
def is_run(path: Path) -> bool:
    """A zhtune run directory, finished or still training (:attr:`zhtune.rundir.RunDir.is_run`)."""
    return RunDir(path).is_run


def list_runs(runs_dir: str | Path, max_depth: int = 3) -> list[Path]:
    """Run directories under ``runs_dir`` (itself included), at most ``max_depth`` folders
    down, newest first. The inside of a run (weights, checkpoints) is not searched, and no
    symbolic link is followed (a link could lead the page out of ``runs_dir``)."""
    root = Path(runs_dir)
    found: list[Path] = []

    def walk(folder: Path, depth: int) -> None:
        if is_run(folder):
            found.append(folder)
            return
        if depth >= max_depth:
            return
        try:
            children = sorted(
                p for p in folder.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")
            )
        except OSError:  # unreadable folder: not ours to report
            return
        for child in children:
            walk(child, depth + 1)

    if root.is_dir():
        walk(root, 0)
    return sorted(found, key=lambda run: RunDir(run).last_change(), reverse=True)


def run_label(run: Path, runs_dir: str | Path) -> str:
    """How a run is named on the page: its path relative to ``runs_dir`` (the folder name for
    ``runs_dir`` itself, the full path for a run outside it)."""
    run, root = Path(run).resolve(), Path(runs_dir).resolve()
    if run == root:
        return run.name
    return run.relative_to(root).as_posix() if run.is_relative_to(root) else str(run)


@dataclass
class RunSummary:
    """What the runs tab shows of one run directory."""

    path: Path
    config_text: str
    """``config.yaml`` as written by ``zhtune train`` (every key resolved, defaults included)."""
    results: dict[str, Any] | None
    """``train_results.json``; None while the run is training (or if it was interrupted)."""
    log: list[dict[str, Any]]
    """Rows of ``trainer_log.jsonl``."""
    eval_reports: dict[str, str] = field(default_factory=dict)
    """``eval/NAME`` -> its text (Markdown as is, JSON pretty-printed), for ``eval/*.md`` and ``*.json``."""

    @property
    def finished(self) -> bool:
        return RunDir(self.path).finished


def read_run(run: str | Path) -> RunSummary:
    """Read a run directory's config, results, log and eval reports (what exists of them)."""
    p = Path(run)
    rd = RunDir(p)
    if not rd.config_path.is_file():
        raise ZhtuneError(f"{p} is not a run directory (no {rundir.CONFIG})")
    results, log = rd.results(), rd.log()  # a run still training may end on a half-written line
    reports = {}
    inside = rd.eval_dir.is_dir() and not rd.eval_dir.is_symlink()
    for f in sorted(p for p in rd.eval_dir.glob("*") if not p.is_symlink()) if inside else []:  # no links out
        if f.suffix == ".md":
            reports[f"eval/{f.name}"] = f.read_text(encoding="utf-8")
        elif f.suffix == ".json":
            text = f.read_text(encoding="utf-8")
            try:
                text = json.dumps(json.loads(text), ensure_ascii=False, indent=1)
            except json.JSONDecodeError:  # shown as it is
                pass
            reports[f"eval/{f.name}"] = text
    return RunSummary(p, rd.config_path.read_text(encoding="utf-8"), results, log, reports)


def loss_curve(summary: RunSummary, plot_dir: str | Path) -> Path | None:
    """The run's loss plot: its ``loss.png`` if that is up to date with the log, otherwise one
    drawn from ``trainer_log.jsonl`` into ``plot_dir`` (a run still training has no
    ``loss.png`` yet); None without logged losses. The run directory is never written."""
    png, log = summary.path / rundir.LOSS_PLOT, RunDir(summary.path).log_path
    if png.is_file() and (not log.exists() or png.stat().st_mtime >= log.stat().st_mtime):
        return png
    if not any("loss" in row or "eval_loss" in row for row in summary.log):
        return None
    from zhtune.plots import plot_loss

    name = hashlib.sha1(str(summary.path.resolve()).encode()).hexdigest()[:12]
    out = Path(plot_dir) / f"{name}-loss.png"
    plot_loss(summary.log, out, title=f"{summary.path.name}: {len(summary.log)} log rows")
    return out


def summary_markdown(summary: RunSummary, label: str) -> str:
    """The run's header: name, path, state, and ``train_results.json`` as a table."""
    state = "finished" if summary.finished else "training (or stopped before saving)"
    last = summary.log[-1] if summary.log else {}
    lines = [f"### {label}", f"`{summary.path}` — {state}"]
    if not summary.finished and last:
        lines.append(f"last log row: step {last.get('step')}, loss {last.get('loss', last.get('eval_loss'))}")
    if summary.results is not None:
        lines += ["", "**train_results.json**", "", "| key | value |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in summary.results.items()]
    if not summary.eval_reports:
        lines += ["", "No eval reports (`eval/*.md`, `eval/*.json`) in this run."]
    return "\n".join(lines)


def reports_markdown(summary: RunSummary) -> str:
    """Every eval report under a heading: Markdown as is, JSON in a code block."""
    parts = []
    for name, text in summary.eval_reports.items():
        if len(text) > MAX_REPORT_CHARS:
            text = text[:MAX_REPORT_CHARS] + f"\n... (cut; the whole file is {summary.path / name})"
        parts.append(f"#### {name}\n\n" + (text if name.endswith(".md") else f"```json\n{text}\n```"))
    return "\n\n".join(parts)


# ---------------------------------------------------------------------------------------------
# Chat: the model being talked to, and the reply handler
# ---------------------------------------------------------------------------------------------
class ChatModel:
    """The one model the chat tab talks to; the runs tab can switch it to another run."""

    def __init__(
        self,
        dtype: str = "auto",
        template: str | None = None,
        device: str = "auto",
        trust_remote_code: bool = False,
    ) -> None:
        self.dtype, self.device = dtype, device
        self.trust_remote_code = trust_remote_code
        """``--trust-remote-code``, fixed at launch: no visitor, and no run they pick, can switch it on."""
        self.placement = ""
        """Where the loaded model runs and its dtype (``"cpu, fp32"``)."""
        self.template_override = template
        self.run: Path | None = None
        self.template = ""
        self.context = 0
        """The loaded model's context in tokens (prompt plus reply)."""
        self._max_chars = 0
        self._model: Any = None
        self._prompter: Prompter | None = None
        self._lock = threading.Lock()

    def load(self, run: str | Path) -> None:
        """Load a run (or export, or model directory) in place of the current model. A run that asks
        for remote code the server was not launched with raises :class:`ZhtuneError` (shown on the
        page) and the current model stays."""
        from zhtune.models.loading import load_for_inference

        model, tokenizer, template = load_for_inference(
            run, dtype=self.dtype, device=self.device, trust_remote_code=self.trust_remote_code
        )
        context, max_chars = context_length(model, tokenizer), max_token_chars(tokenizer)
        with self._lock:
            self.template, self.placement = self.template_override or template, placement(model)
            self._model, self._prompter = model, Prompter(tokenizer, self.template)
            self.context, self._max_chars, self.run = context, max_chars, Path(run)

    def describe(self) -> str:
        if self.run is None:
            return "No model loaded: pick a run in the **Runs** tab and press *Chat with this run*."
        return f"Chatting with `{self.run}` (template `{self.template}`, {self.placement})."

    def stream(self, messages: list[dict[str, str]], options: GenerationOptions) -> Iterator[str]:
        """The reply to ``messages`` (canonical turns), piece by piece."""
        with self._lock:
            model, prompter, context, max_chars = self._model, self._prompter, self.context, self._max_chars
        if model is None or prompter is None:
            raise ZhtuneError("no model loaded: pick a run in the Runs tab and press 'Chat with this run'")
        prompt, options = fit_context(prompter, messages, options, context, max_chars)
        yield from stream_generate(model, prompter.tokenizer, prompt, options, prompter.stop_ids)


def fit_context(
    prompter: Prompter,
    messages: list[dict[str, str]],
    options: GenerationOptions,
    context: int,
    max_chars: int,
) -> tuple[list[int], GenerationOptions]:
    """The prompt ids of ``messages`` and ``options`` with the reply cut to the room left in a
    ``context``-token window. A conversation that cannot fit is refused with what to do: from its
    length in characters alone when no tokenization could make it fit (over ``context`` tokens of
    ``max_chars`` characters each; a 2 MB paste is refused at once instead of holding the page's
    one generation slot), else from its token count."""
    chars = chars_beyond_context([m["content"] for m in messages], context, max_chars)
    if chars:
        raise ZhtuneError(
            f"the conversation has {chars:,} characters, more than this model's {context:,}-token context "
            "can hold: shorten the message or clear the chat"
        )
    prompt = prompter.prompt_ids(messages)
    room = context - len(prompt)
    if room < 1:
        raise ZhtuneError(
            f"the conversation is {len(prompt):,} tokens and this model's context is {context:,}: "
            "shorten the message or clear the chat"
        )
    if options.max_new_tokens > room:
        options = replace(options, max_new_tokens=room)
    return prompt, options


def message_text(content: Any) -> str:
    """The text of a chat message as the page sends it back: a string, or (gradio 5+) a list of
    parts such as ``{"type": "text", "text": ...}``; files and other parts are left out."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, list | tuple):
        return "".join(message_text(part) for part in content)
    return ""


def canonical_turns(history: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The page's conversation as canonical ``{role, content}`` turns (extra keys dropped)."""
    return [{"role": m["role"], "content": message_text(m["content"])} for m in history]


def to_messages(history: list[dict[str, Any]], system: str = "") -> list[dict[str, str]]:
    """Canonical turns for the prompt: the system message (if any), then the conversation."""
    system = system.strip()
    return ([{"role": "system", "content": system}] if system else []) + canonical_turns(history)


def respond(
    chat: ChatModel,
    message: str,
    history: list[dict[str, Any]],
    system: str,
    options: GenerationOptions,
) -> Iterator[tuple[str, list[dict[str, str]]]]:
    """The send handler: yield ``(input box text, conversation)`` as the reply grows.

    The first yield clears the input box and shows the user turn with an empty reply; each
    generated piece then yields the conversation with the reply so far. An empty message changes
    nothing.
    """
    turns = canonical_turns(history)
    if not message.strip():
        yield message, turns
        return
    turns.append({"role": "user", "content": message.strip()})
    prompt = to_messages(turns, system)
    reply = ""
    yield "", [*turns, {"role": "assistant", "content": reply}]
    for piece in chat.stream(prompt, options):
        if not piece:  # the streamer also reports "nothing new yet"
            continue
        reply += piece
        yield "", [*turns, {"role": "assistant", "content": reply}]
    yield "", [*turns, {"role": "assistant", "content": reply.strip()}]


def clear_chat() -> tuple[str, list[dict[str, str]]]:
    """The clear handler: an empty input box and an empty conversation."""
    return "", []


# ---------------------------------------------------------------------------------------------
# The page (gradio)
# ---------------------------------------------------------------------------------------------
def import_gradio() -> Any:
    """Import gradio with its telemetry and version check off, or say which extra installs it."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local directories only, never the hub
    try:
        import gradio
    except ImportError:
        raise ZhtuneError(
            "zhtune webui needs gradio, which is not installed: "
            "pip install -c constraints.txt -e '.[webui]' (or pip install 'zhtune[webui]')"
        ) from None
    return gradio


def build_app(chat: ChatModel, runs_dir: str | Path, defaults: GenerationOptions, system: str = "") -> Any:
    """The page: a Chat tab and a Runs tab, wired to the functions above."""
    import tempfile

    gr = import_gradio()
    plot_dir = tempfile.mkdtemp(prefix="zhtune-webui-")

    def run_choices() -> list[tuple[str, str]]:
        runs = list_runs(runs_dir)
        if (
            chat.run is not None
            and is_run(chat.run)
            and chat.run.resolve() not in {r.resolve() for r in runs}
        ):
            runs.insert(0, chat.run)
        return [(run_label(r, runs_dir), str(r)) for r in runs]

    def on_send(message, history, system, temperature, top_p, top_k, max_new_tokens, repetition_penalty):
        options = GenerationOptions(
            max_new_tokens=int(max_new_tokens),
            temperature=float(temperature),
            top_p=float(top_p),
            top_k=int(top_k),
            repetition_penalty=float(repetition_penalty),
            no_repeat_ngram_size=defaults.no_repeat_ngram_size,
        )
        try:
            yield from respond(chat, message, history, system, options)
        except ZhtuneError as err:
            raise gr.Error(str(err)) from None

    def listed(run: str) -> str:
        """``run`` if the page lists it (a visitor can name no other directory), else an error."""
        if run not in {value for _, value in run_choices()}:
            raise gr.Error(f"{run} is not a run under {runs_dir}")
        return run

    def on_pick(run: str | None):
        if not run:
            return f"No runs under `{runs_dir}`.", None, "", ""
        from PIL import Image

        run = listed(run)
        try:
            summary = read_run(run)
        except (ZhtuneError, OSError, json.JSONDecodeError) as err:  # e.g. deleted since listed
            raise gr.Error(f"cannot read {run}: {err}") from None
        png = loss_curve(summary, plot_dir)
        image = Image.open(png).convert("RGB") if png else None  # served as a copy: run dirs stay private
        return (
            summary_markdown(summary, run_label(Path(run), runs_dir)),
            image,
            summary.config_text,
            reports_markdown(summary),
        )

    def on_refresh(current: str | None):
        choices = run_choices()
        values = [value for _, value in choices]
        keep = current if current in values else (str(chat.run) if str(chat.run) in values else None)
        pick = keep or (values[0] if values else None)
        return gr.Dropdown(choices=choices, value=pick), *on_pick(pick)

    def on_chat_with(run: str | None):
        if not run:
            raise gr.Error("pick a run first")
        try:
            chat.load(listed(run))
        except ZhtuneError as err:
            raise gr.Error(str(err)) from None
        return chat.describe(), *clear_chat()

    with gr.Blocks(title="zhtune webui", analytics_enabled=False) as app:
        gr.Markdown("## zhtune webui")
        with gr.Tab("Chat", id="chat"):
            status = gr.Markdown(chat.describe(), elem_id="chat-status")
            with gr.Row():
                with gr.Column(scale=3):
                    chatbot = gr.Chatbot(label="Conversation", height=420, elem_id="chatbot")
                    with gr.Row():
                        box = gr.Textbox(
                            placeholder="Type a message and press Enter or Send",
                            show_label=False,
                            scale=5,
                            elem_id="message",
                        )
                        send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                    with gr.Row():
                        stop = gr.Button("Stop", elem_id="stop")
                        clear = gr.Button("Clear history", elem_id="clear")
                with gr.Column(scale=1):
                    system_box = gr.Textbox(value=system, label="System message", lines=3)
                    temperature = gr.Slider(
                        0,
                        max(2.0, defaults.temperature),
                        value=defaults.temperature,
                        step=0.05,
                        label="temperature (0: greedy)",
                    )
                    top_p = gr.Slider(0.05, 1, value=defaults.top_p, step=0.05, label="top_p")
                    top_k = gr.Slider(
                        0, max(200, defaults.top_k), value=defaults.top_k, step=1, label="top_k (0: no limit)"
                    )
                    max_new = gr.Slider(
                        1,
                        max(4096, defaults.max_new_tokens),
                        value=defaults.max_new_tokens,
                        step=1,
                        label="max_new_tokens",
                    )
                    penalty = gr.Slider(
                        min(1.0, defaults.repetition_penalty),
                        max(2.0, defaults.repetition_penalty),
                        value=defaults.repetition_penalty,
                        step=0.01,
                        label="repetition_penalty (1: off)",
                    )
        with gr.Tab("Runs", id="runs"):
            with gr.Row():
                picker = gr.Dropdown(label=f"Runs under {runs_dir}", scale=4, elem_id="run-picker")
                refresh = gr.Button("Refresh", scale=1)
                use = gr.Button("Chat with this run", variant="primary", scale=1, elem_id="chat-with")
            with gr.Row():
                with gr.Column():
                    header = gr.Markdown(elem_id="run-summary")
                    curve = gr.Image(label="loss curve", type="pil", interactive=False, elem_id="loss-curve")
                config = gr.Code(
                    label="config.yaml", language="yaml", interactive=False, elem_id="run-config"
                )
            reports = gr.Markdown(elem_id="run-reports")

        inputs = [box, chatbot, system_box, temperature, top_p, top_k, max_new, penalty]
        sending = [
            box.submit(on_send, inputs, [box, chatbot]),
            send.click(on_send, inputs, [box, chatbot]),
        ]
        stop.click(None, cancels=sending)
        clear.click(clear_chat, None, [box, chatbot], cancels=sending)
        shown = [header, curve, config, reports]
        picker.input(on_pick, picker, shown)
        refresh.click(on_refresh, picker, [picker, *shown])
        use.click(on_chat_with, picker, [status, box, chatbot], cancels=sending)
        app.load(on_refresh, picker, [picker, *shown])
    return app


def launch(
    run: str | None,
    opts: WebUIOptions,
    runtime: RuntimeOptions,
    template: str | None = None,
    defaults: GenerationOptions | None = None,
) -> None:
    """``zhtune webui``: load ``run`` (if given), build the page and serve it until Ctrl-C.
    ``opts.seed`` seeds torch's sampler once, after loading: a fresh server then samples the same
    replies to the same messages. ``runtime.trust_remote_code`` (``--trust-remote-code``) holds for
    every run loaded while it serves; without it, a run asking for remote code shows an error
    instead. A non-loopback ``opts.host`` needs a login (:meth:`WebUIOptions.login`)."""
    login = opts.login()
    host, port, runs_dir = opts.host, opts.port, opts.runs_dir
    gr = import_gradio()  # fail before loading a model if gradio is missing
    device = resolve_device(runtime.device)  # and before serving a page that could never load one
    folder = Path(runs_dir) if runs_dir else (Path(run).resolve().parent if run else Path("runs"))
    chat = ChatModel(runtime.dtype, template, device, runtime.trust_remote_code)
    if run:
        chat.load(run)
    app = build_app(chat, folder, defaults or GenerationOptions(), opts.system)
    if opts.seed is not None:
        import torch

        torch.manual_seed(opts.seed)
    print(
        f"zhtune webui (gradio {gr.__version__}): {chat.describe()}\n"
        f"  runs from {folder}\n"
        f"  open http://{host}:{port} (Ctrl-C stops)",
        flush=True,
    )
    app.queue(default_concurrency_limit=1).launch(
        server_name=host,
        server_port=port,
        share=False,
        quiet=True,
        show_error=True,
        ssr_mode=False,
        mcp_server=False,
        run_history=False,
        footer_links=["api", "settings"],
        auth=login,
    )
