"""An Ollama ``Modelfile`` for an exported GGUF: the run's chat template in Ollama's Go template.

zhtune's templates are data (:class:`~zhtune.data.templates.Template`: format strings around
``{content}``), so each translates mechanically: the system block from ``.System`` (Ollama
fills it from the request's system message, else from the Modelfile's ``SYSTEM``, the
template's default), then every user and assistant message of ``.Messages`` with the same text
around it, then the assistant prefix after a last user turn. A run on the tokenizer's own Jinja
template (``template: tokenizer``) is translated when that template renders like one of
zhtune's (probed on sample conversations, its default system prompt recovered); otherwise the
Modelfile says it has no ``TEMPLATE`` and why.

``PARAMETER stop`` lists the template's stop words and the eos token's text, so Ollama ends a
reply where zhtune does.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from zhtune.data.chat_template import render_text as chat_template_text
from zhtune.data.templates import TEMPLATES, Template, fill_slot, render_text, special_texts, split_slot

PROBES = [
    [
        {"role": "user", "content": "U1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "U2"},
    ],
    [{"role": "system", "content": "S1"}, {"role": "user", "content": "U1"}],
    [
        {"role": "system", "content": "S1"},
        {"role": "user", "content": "U1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "U2"},
    ],
]
"""Conversations on which a Jinja chat template must render exactly like a zhtune template."""


def go_text(text: str) -> str:
    """``text`` as Go template output: literal, except ``{{`` (which would open an action)."""
    return text.replace("{{", '{{ "{{" }}')


def go_template(template: Template, specials: dict[str, str]) -> str:
    """Ollama's ``TEMPLATE`` rendering what :func:`~zhtune.data.templates.render_text` renders
    (with the generation prompt) for any conversation of system, user and assistant turns."""

    def around(fmt: str) -> tuple[str, str]:
        head, tail = split_slot(fmt, specials)
        return go_text(head), go_text(tail)

    sys_head, sys_tail = around(template.system)
    user_head, user_tail = around(template.user)
    asst_head, asst_tail = around(template.assistant)
    gen = go_text(fill_slot(template.assistant_prefix, specials))
    system_block = f"{sys_head}{{{{ $.System }}}}{sys_tail}"
    parts = [go_text(fill_slot(template.prefix, specials))]
    if template.system_in_user:  # the system block opens the first user turn
        parts.append('{{ $system := "" }}{{ if .System }}{{ $system = print ' + json.dumps(sys_head) + " .System "
                     + json.dumps(sys_tail) + " }}{{ end }}")  # fmt: skip
        user = f'{user_head}{{{{ $system }}}}{{{{ $system = "" }}}}{{{{ .Content }}}}{user_tail}'
    else:
        parts.append(f"{{{{ if .System }}}}{system_block}{{{{ end }}}}")
        user = f"{user_head}{{{{ .Content }}}}{user_tail}"
    parts += [
        "{{ range $i, $m := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}",
        f'{{{{ if eq .Role "user" }}}}{user}{{{{ if $last }}}}{gen}{{{{ end }}}}',
        f'{{{{ else if eq .Role "assistant" }}}}{gen}{asst_head}{{{{ .Content }}}}{asst_tail}',
        "{{ end }}{{ end }}",
    ]
    return "".join(parts)


def matching_template(tokenizer: Any) -> Template | None:
    """The zhtune template (its default system prompt recovered) that renders like the
    tokenizer's own Jinja ``chat_template`` on :data:`PROBES`, or None."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        want = [chat_template_text(tokenizer, probe, True) for probe in PROBES]
    except Exception:  # a template that cannot render the probes matches nothing
        return None
    specials = special_texts(tokenizer)
    for template in TEMPLATES.values():
        sys_head, tail = split_slot(template.system, specials)
        head = fill_slot(template.prefix, specials) + sys_head
        default = ""
        if want[0].startswith(head) and tail and tail in want[0][len(head) :]:
            default = want[0][len(head) :].split(tail, 1)[0]
        for candidate in dict.fromkeys([default, ""]):
            t = replace(template, default_system=candidate)
            if all(render_text(t, probe, tokenizer, True) == w for probe, w in zip(PROBES, want)):
                return t
    return None


def go_string(text: str) -> str:
    """A Modelfile argument: triple-quoted when it spans lines or has quotes."""
    if '"""' in text:
        raise ValueError('a Modelfile value cannot contain """')
    return f'"""{text}"""' if ("\n" in text or '"' in text) else json.dumps(text, ensure_ascii=False)


def modelfile(gguf_name: str, template: Template | None, tokenizer: Any, template_name: str) -> str:
    """The Modelfile for ``gguf_name`` (beside it) with the run's template (``template`` None:
    the tokenizer's own, translated when :func:`matching_template` finds its equal)."""
    lines = [f"# Ollama Modelfile written by zhtune export (template: {template_name})",
             "# ollama create NAME -f Modelfile && ollama run NAME", f"FROM ./{gguf_name}"]  # fmt: skip
    used = template if template is not None else matching_template(tokenizer)
    if used is None:
        lines.append(
            f"# no TEMPLATE: the tokenizer's own chat template renders like none of zhtune's templates "
            f"({', '.join(TEMPLATES)}), and Jinja is not translated; Ollama reads the GGUF's chat template"
        )
        stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    else:
        lines.append(f"TEMPLATE {go_string(go_template(used, special_texts(tokenizer)))}")
        if used.default_system:
            lines.append(f"SYSTEM {go_string(used.default_system)}")
        stops = list(
            dict.fromkeys([*used.stop_words, *([tokenizer.eos_token] if tokenizer.eos_token else [])])
        )
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in stops if s]
    return "\n".join(lines) + "\n"
