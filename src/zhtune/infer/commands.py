"""``chat``, ``predict``, ``export``, ``serve`` and ``webui``: the inference stage's subcommands,
registered by the stage itself. Flags come from the options dataclasses (decoding:
:class:`GenerationOptions`; device, dtype and remote code: :class:`RuntimeOptions`; serving:
:class:`ServeOptions`); each handler imports what it runs when it runs."""

from __future__ import annotations

import argparse
from typing import Any

from zhtune.data.inputs import InputOptions, add_inputs_and_output
from zhtune.errors import ZhtuneError
from zhtune.flags import add_options, options_from
from zhtune.infer.backends import EngineOptions
from zhtune.infer.export import ExportOptions
from zhtune.infer.generate import GenerationOptions
from zhtune.infer.serve_config import ServeOptions
from zhtune.infer.webui import WebUIOptions
from zhtune.models.device import RuntimeOptions


def cmd_chat(args: argparse.Namespace) -> int:
    from zhtune.infer.chat import chat_loop
    from zhtune.models.loading import load_for_inference

    rt = options_from(RuntimeOptions, args)
    model, tokenizer, template = load_for_inference(
        args.run, dtype=rt.dtype, device=rt.device, trust_remote_code=rt.trust_remote_code
    )
    chat_loop(
        model, tokenizer, args.template or template, options_from(GenerationOptions, args), system=args.system
    )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from zhtune.infer.predict import predict

    rt, inputs = options_from(RuntimeOptions, args), options_from(InputOptions, args)
    return predict(
        args.run, args.inputs, args.output, options_from(GenerationOptions, args),
        batch_size=args.batch_size, template=args.template, dtype=rt.dtype, device=rt.device,
        fmt=inputs.format, mapping=inputs.mapping(), rejects=inputs.rejects_path(),
        allow_rejects=inputs.allow_rejects, progress=inputs.progress, seed=args.seed,
        trust_remote_code=rt.trust_remote_code, engine=options_from(EngineOptions, args),
    )  # fmt: skip


def cmd_export(args: argparse.Namespace) -> int:
    from zhtune.infer.export import export

    export(args.run, args.output, options_from(ExportOptions, args))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ZhtuneError(
            "zhtune serve needs the serving packages: pip install -c constraints.txt -e '.[serve]'"
        ) from None
    from zhtune.infer.serve import serve

    rt = options_from(RuntimeOptions, args)
    serve(
        args.run, options_from(ServeOptions, args), dtype=rt.dtype, device=rt.device,
        trust_remote_code=rt.trust_remote_code, engine_opts=options_from(EngineOptions, args),
    )  # fmt: skip
    return 0


def cmd_webui(args: argparse.Namespace) -> int:
    from zhtune.infer.webui import launch

    launch(
        args.run, options_from(WebUIOptions, args), options_from(RuntimeOptions, args),
        template=args.template, defaults=options_from(GenerationOptions, args),
    )  # fmt: skip
    return 0


def _model_parser(sub: Any, name: str, run_help: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand that runs a model: RUN, --template, the runtime flags."""
    p = sub.add_parser(name, **kwargs)
    p.add_argument("run", help=run_help, **({"nargs": "?"} if name == "webui" else {}))
    p.add_argument("--template", help="override the run's chat template")
    add_options(p, RuntimeOptions)
    return p


def register(sub: Any, full_help_for: str | None = None) -> None:
    """Add ``chat``, ``predict``, ``export``, ``serve`` and ``webui`` to the top-level subparsers."""
    ch = _model_parser(
        sub, "chat", "run directory (or local model directory)",
        help="multi-turn terminal chat with a run or model directory (streaming)",
    )  # fmt: skip
    ch.add_argument("--system", default="", help="system message")
    add_options(ch, GenerationOptions)
    ch.set_defaults(func=cmd_chat)

    pr = _model_parser(
        sub, "predict", "run directory (or local model directory, or an export)",
        help="batched generation over a data file -> JSON Lines of predictions (resumable)",
        description="Generate a reply for every record of IN (any format `zhtune data convert` reads; the "
        "last assistant turn, if any, is kept as the reference) and append {id, messages, prediction, "
        "reference, meta} rows to OUT. Ids already in OUT are skipped, so re-running after an "
        "interruption generates only what is missing. Rejected records go to OUT.rejects.jsonl. Greedy by "
        "default (temperature 0), so a resumed run gives the same rows.",
    )  # fmt: skip
    add_inputs_and_output(pr, "output .jsonl (appended to)")
    pr.add_argument("--batch-size", type=int, default=8, help="prompts per batch (default: 8)")
    add_options(pr, GenerationOptions, defaults=GenerationOptions(temperature=0.0))
    pr.add_argument("--seed", type=int, default=0, help="random seed for sampling (default: 0)")
    add_options(pr, InputOptions)
    add_options(pr, EngineOptions)
    pr.set_defaults(func=cmd_predict)

    ex = sub.add_parser(
        "export",
        help="a run as a standalone model directory: merge adapters, cast, quantize (8/4-bit)",
        description="Write RUN to DIR as safetensors with its tokenizer (chat_template), generation config "
        "(the template's stop ids) and a zhtune_export.json manifest, loadable by plain transformers. "
        "--quantize reports size and perplexity before/after (printed and in DIR/export_report.json).",
    )
    ex.add_argument("run", help="run directory (or local model directory)")
    ex.add_argument("-o", "--output", required=True, help="directory to create")
    add_options(ex, ExportOptions)
    ex.set_defaults(func=cmd_export)

    sv = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP API (chat/completions, streaming) with dynamic batching",
        description="Serve RUN at /v1/chat/completions, /v1/completions and /v1/models (model name: the "
        "run directory's name, or 'default'), plus /health. Requests arriving together are decoded "
        "together in one batch, streamed ones included.",
    )
    sv.add_argument("run", help="run directory (or local model directory)")
    add_options(sv, ServeOptions)
    add_options(sv, RuntimeOptions)
    add_options(sv, EngineOptions)
    sv.set_defaults(func=cmd_serve)

    wu = _model_parser(
        sub, "webui", "run directory (or local model directory) to chat with",
        help="browser UI: chat with a run (streaming), browse runs, loss curves and eval reports",
        description="Serve a web page (gradio; install the 'webui' extra) with a Chat tab, streaming replies "
        "from RUN with adjustable decoding settings, and a Runs tab showing each run's config.yaml, loss "
        "curve, train_results.json and eval reports; any run listed there can be loaded into the chat. "
        "The decoding flags below set the sliders' starting values.",
    )  # fmt: skip
    add_options(wu, WebUIOptions)
    add_options(wu, GenerationOptions)
    wu.set_defaults(func=cmd_webui)
