"""``zhtune chat RUN``: a multi-turn terminal chat that streams the reply as it is generated.

Commands typed at the prompt: ``/clear`` forgets the history, ``/system TEXT`` sets the system
message (and clears the history), ``/exit`` (or Ctrl-D) quits. Works with piped input too, so
it can be scripted and tested.
"""

from __future__ import annotations

import sys
from typing import IO, Any

from zhtune.infer.generate import GenerationOptions, Prompter, placement, stream_generate

HELP = "commands: /clear (new conversation), /system TEXT (set system message), /exit (quit)"


def chat_loop(
    model: Any,
    tokenizer: Any,
    template_name: str,
    options: GenerationOptions,
    system: str = "",
    stdin: IO[str] | None = None,
    stdout: IO[str] | None = None,
) -> list[dict[str, str]]:
    """Read user turns from ``stdin`` until EOF or ``/exit``; stream each reply to ``stdout``
    (default: the process's, looked up at call time).

    Returns the final conversation (handy for tests).
    """
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    prompter = Prompter(tokenizer, template_name)
    interactive = stdin.isatty()
    history: list[dict[str, str]] = []
    stdout.write(f"zhtune chat (template {template_name}; {placement(model)}); {HELP}\n")
    while True:
        if interactive:
            stdout.write("\n用户 User> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/clear":
            history = []
            stdout.write("(history cleared)\n")
            continue
        if text.startswith("/system"):
            system, history = text[len("/system") :].strip(), []
            stdout.write(f"(system message set: {system!r}; history cleared)\n")
            continue
        if not interactive:
            stdout.write(f"\n用户 User> {text}\n")
        history.append({"role": "user", "content": text})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        stdout.write("助手 Assistant> ")
        stdout.flush()
        reply = ""
        for piece in stream_generate(
            model, tokenizer, prompter.prompt_ids(messages), options, prompter.stop_ids
        ):
            reply += piece
            stdout.write(piece)
            stdout.flush()
        stdout.write("\n")
        history.append({"role": "assistant", "content": reply.strip()})
    return history
