"""Chat templates as data, and the one render function: conversation -> ``input_ids`` + loss mask.

A :class:`Template` is a handful of format strings. ``{content}`` marks where a message goes,
``{bos}`` / ``{eos}`` stand for the tokenizer's special-token text. From the same strings we
derive (a) the token ids and loss mask used in training (:func:`render`) and (b) a Jinja
``chat_template`` saved with the tokenizer (:func:`to_jinja`), so that
``tokenizer.apply_chat_template`` produces exactly the text zhtune trained on.

Rendering a conversation concatenates, in order::

    prefix
    system.format(content=...)                    # if a system message or a default system
    for each user/assistant pair:
        user.format(content=...)                  # prompt: masked out of the loss
        assistant_prefix                          # prompt: masked
        assistant.format(content=...)             # response: in the loss (with its end marker)

``tokenizer`` is a pseudo-template that defers to the tokenizer's own ``chat_template``: the model's
own format, masked by :mod:`zhtune.data.chat_template`. ``template: auto`` picks it whenever the
tokenizer has one (:func:`zhtune.models.families.resolve_template`).
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, replace
from typing import Any

from zhtune.data.chat_template import IGNORE_INDEX, ChatTemplateMasker, RenderError, end_of_turn_token_ids
from zhtune.data.chat_template import render_text as chat_template_text
from zhtune.errors import ZhtuneError


@dataclass(frozen=True)
class Template:
    """How one model family lays out a conversation as text."""

    name: str
    user: str
    """Text of a user turn, with ``{content}``."""
    assistant: str
    """Text of an assistant turn, with ``{content}``; ends with the marker the model must learn to emit."""
    assistant_prefix: str = ""
    """Text that opens an assistant turn (part of the prompt, so not trained on)."""
    system: str = "{content}"
    """Text of a system message, with ``{content}``."""
    default_system: str = ""
    """System message used when the conversation has none ("" = no system block)."""
    prefix: str = ""
    """Text at the very start, e.g. ``{bos}``."""
    system_in_user: bool = False
    """Put the system block inside the first user turn (Llama-2's ``[INST] <<SYS>>...``)."""
    stop_words: tuple[str, ...] = ()
    """Extra strings that end generation besides the tokenizer's eos (e.g. ``<|im_end|>``)."""
    special_tokens: tuple[str, ...] = ()
    """Special tokens the template needs in the vocabulary (added to a tokenizer that lacks them)."""


CHATML = Template(
    name="chatml",
    system="<|im_start|>system\n{content}<|im_end|>\n",
    user="<|im_start|>user\n{content}<|im_end|>\n",
    assistant_prefix="<|im_start|>assistant\n",
    assistant="{content}<|im_end|>\n",
    stop_words=("<|im_end|>",),
    special_tokens=("<|im_start|>", "<|im_end|>"),
)

TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in [
        # BELLE: "Human: {instruction}\n\nAssistant: {output}</s>", multi-turn concatenated.
        Template(
            name="belle",
            system="{content}\n\n",
            user="Human: {content}\n\nAssistant: ",
            assistant="{content}{eos}",
        ),
        Template(
            name="alpaca",
            default_system="Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.",
            system="{content}\n\n",
            user="### Instruction:\n{content}\n\n### Response:\n",
            assistant="{content}{eos}\n\n",
        ),
        CHATML,
        replace(CHATML, name="qwen", default_system="You are a helpful assistant."),
        Template(
            name="llama3",
            prefix="<|begin_of_text|>",
            system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
            user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
            assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n",
            assistant="{content}<|eot_id|>",
            stop_words=("<|eot_id|>",),
            special_tokens=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        ),
        # Llama-2 chat: the system prompt sits inside the first [INST] block.
        Template(
            name="llama2",
            system="<<SYS>>\n{content}\n<</SYS>>\n\n",
            system_in_user=True,
            user="{bos}[INST] {content} [/INST]",
            assistant=" {content} {eos}",
        ),
        # Gemma: no system role; a system message opens the first user turn (Gemma 3's template).
        Template(
            name="gemma",
            prefix="{bos}",
            system="{content}\n\n",
            system_in_user=True,
            user="<start_of_turn>user\n{content}<end_of_turn>\n",
            assistant_prefix="<start_of_turn>model\n",
            assistant="{content}<end_of_turn>\n",
            stop_words=("<end_of_turn>",),
            special_tokens=("<start_of_turn>", "<end_of_turn>"),
        ),
        Template(
            name="default",
            system="{content}\n",
            user="Human: {content}\nAssistant: ",
            assistant="{content}{eos}\n",
        ),
    ]
}
"""Registry of built-in templates; ``tokenizer`` (the tokenizer's own chat_template) is handled apart."""


def get_template(name: str) -> Template | None:
    """Look up a template by name; ``None`` for ``tokenizer``. Unknown names raise with close matches."""
    if name == "tokenizer":
        return None
    if name not in TEMPLATES:
        close = difflib.get_close_matches(name, [*TEMPLATES, "tokenizer"], n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ZhtuneError(f"unknown template '{name}'. Known: {', '.join([*TEMPLATES, 'tokenizer'])}.{hint}")
    return TEMPLATES[name]


def special_texts(tokenizer: Any) -> dict[str, str]:
    """The text of the tokenizer's bos and eos tokens ("" where it has none)."""
    return {"bos": tokenizer.bos_token or "", "eos": tokenizer.eos_token or ""}


def fill_slot(fmt: str, specials: dict[str, str], content: str = "") -> str:
    """One of a template's slots (``user``, ``assistant``, ``prefix``...) with its ``{bos}``,
    ``{eos}`` and ``{content}`` filled in (``str.replace``, not ``str.format``: message content may
    itself contain braces)."""
    return (
        fmt.replace("{bos}", specials["bos"]).replace("{eos}", specials["eos"]).replace("{content}", content)
    )


def segments(
    template: Template,
    messages: list[dict[str, str]],
    specials: dict[str, str],
    add_generation_prompt: bool = False,
) -> list[tuple[str, bool]]:
    """Lay a conversation out as ``[(text, is_response), ...]`` following ``template``.

    ``is_response`` is True for assistant turns (content plus end marker): the tokens that carry
    the loss. With ``add_generation_prompt`` the text ends with the assistant prefix, ready for
    generation (a trailing assistant message is then not expected). Neighbouring pieces with the
    same flag are joined.
    """
    out: list[tuple[str, bool]] = []
    if template.prefix:
        out.append((fill_slot(template.prefix, specials), False))
    system = template.default_system
    rest = messages
    if messages and messages[0]["role"] == "system":
        system, rest = messages[0]["content"], messages[1:]
    system_text = fill_slot(template.system, specials, system) if system else ""
    if system_text and not template.system_in_user:
        out.append((system_text, False))
        system_text = ""
    for msg in rest:
        if msg["role"] == "user":
            out.append((fill_slot(template.user, specials, system_text + msg["content"]), False))
            system_text = ""
        else:
            out.append((fill_slot(template.assistant_prefix, specials), False))
            out.append((fill_slot(template.assistant, specials, msg["content"]), True))
    if add_generation_prompt:
        if rest and rest[-1]["role"] == "assistant":
            raise ValueError("add_generation_prompt needs a conversation that ends with a user turn")
        out.append((fill_slot(template.assistant_prefix, specials), False))
    return _merge(out)


def _merge(segs: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """Join neighbouring segments with the same flag (fewer, longer pieces tokenize more naturally)."""
    merged: list[tuple[str, bool]] = []
    for text, flag in segs:
        if not text:
            continue
        if merged and merged[-1][1] == flag:
            merged[-1] = (merged[-1][0] + text, flag)
        else:
            merged.append((text, flag))
    return merged


def render_text(
    template: Template, messages: list[dict[str, str]], tokenizer: Any, add_generation_prompt: bool = False
) -> str:
    """The full text of a conversation under ``template`` (what :func:`to_jinja` reproduces)."""
    return "".join(
        text for text, _ in segments(template, messages, special_texts(tokenizer), add_generation_prompt)
    )


def render(
    template: Template | None,
    messages: list[dict[str, str]],
    tokenizer: Any,
    train_on_prompt: bool = False,
    add_generation_prompt: bool = False,
) -> tuple[list[int], list[int]]:
    """Turn one conversation into ``(input_ids, labels)`` for causal-LM training.

    ``labels[i]`` is ``input_ids[i]`` on response tokens (every assistant turn, including its end
    marker) and ``IGNORE_INDEX`` elsewhere; with ``train_on_prompt`` every token is labelled.
    Each segment is tokenized on its own (no special tokens added), so a label boundary never
    falls inside a token. ``template=None`` uses the tokenizer's own chat_template. With
    ``add_generation_prompt`` the ids end with the assistant prefix: a prompt for generation
    laid out exactly as in training.
    """
    return render_batch(template, [messages], tokenizer, train_on_prompt, add_generation_prompt)[0]


def encode_many(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of every text, no special tokens added. A fast tokenizer's Rust backend is
    called directly (``encode_batch_fast``: no offsets, no Python wrapper per text), which
    halves the cost of the ids; the ids are those of ``tokenizer(texts)``."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    encode = getattr(backend, "encode_batch_fast", None)
    if encode is None:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [e.ids for e in encode(texts, add_special_tokens=False)]


def render_batch(
    template: Template | None,
    conversations: list[list[dict[str, str]]],
    tokenizer: Any,
    train_on_prompt: bool = False,
    add_generation_prompt: bool = False,
) -> list[tuple[list[int], list[int]]]:
    """:func:`render` for many conversations at once: the segments of all of them go to the
    tokenizer in one call (the fast tokenizer encodes a batch on every core and pays its Python
    overhead once), which makes tokenizing a dataset several times faster than one call per
    conversation. The ids are exactly those of :func:`render`."""
    if template is None:
        return _render_with_chat_template(conversations, tokenizer, train_on_prompt, add_generation_prompt)
    specials = special_texts(tokenizer)
    segs = [segments(template, messages, specials, add_generation_prompt) for messages in conversations]
    texts = [text for conv in segs for text, _ in conv]
    encoded = iter(encode_many(tokenizer, texts))
    out = []
    for conv in segs:
        input_ids: list[int] = []
        labels: list[int] = []
        for _, is_response in conv:
            ids = next(encoded)
            input_ids.extend(ids)
            labels.extend(ids if (is_response or train_on_prompt) else [IGNORE_INDEX] * len(ids))
        out.append((input_ids, labels))
    return out


def _render_with_chat_template(
    conversations: list[list[dict[str, str]]],
    tokenizer: Any,
    train_on_prompt: bool,
    add_generation_prompt: bool,
) -> list[tuple[list[int], list[int]]]:
    """:func:`render_batch` with the tokenizer's own chat_template
    (:class:`~zhtune.data.chat_template.ChatTemplateMasker`); the first conversation that cannot
    be masked raises its error. A generation prompt is the template's own (one render, no mask
    to derive), every label ignored."""
    if add_generation_prompt:
        ids = encode_many(tokenizer, [chat_template_text(tokenizer, m, True) for m in conversations])
        return [(x, [IGNORE_INDEX] * len(x)) for x in ids]
    out = []
    for item in ChatTemplateMasker(tokenizer).render_batch(conversations, train_on_prompt):
        if isinstance(item, RenderError):
            raise item
        out.append(item)
    return out


def _lit(text: str) -> str:
    """A Jinja string literal for ``text`` (Jinja unescapes Python-style escapes)."""
    return json.dumps(text, ensure_ascii=False)


def split_slot(fmt: str, specials: dict[str, str]) -> tuple[str, str]:
    """A slot's text before and after its ``{content}``, specials filled in: what a chat-template
    language (Jinja here, Go's for Ollama) writes around the message it inserts."""
    head, _, tail = fmt.partition("{content}")
    return fill_slot(head, specials), fill_slot(tail, specials)


def to_jinja(template: Template, tokenizer: Any) -> str:
    """A Jinja ``chat_template`` that renders exactly :func:`render_text`'s output.

    Special-token text (bos/eos) is baked in as literals, so the template needs no variables
    beyond ``messages`` and ``add_generation_prompt``.
    """
    sp = special_texts(tokenizer)
    sys_head, sys_tail = split_slot(template.system, sp)
    user_head, user_tail = split_slot(template.user, sp)
    asst_head, asst_tail = split_slot(template.assistant, sp)
    gen = fill_slot(template.assistant_prefix, sp)
    # Plain concatenation: '%' and '{' both occur in Jinja syntax, so no format strings here.
    parts = []
    if template.prefix:
        parts.append("{{ " + _lit(fill_slot(template.prefix, sp)) + " }}")
    parts += [
        "{%- if messages and messages[0]['role'] == 'system' -%}",
        "{%- set system = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}",
        "{%- else -%}",
        "{%- set system = " + _lit(template.default_system) + " -%}{%- set loop_messages = messages -%}",
        "{%- endif -%}",
        "{%- set ns = namespace(system='') -%}",
        "{%- if system -%}{%- set ns.system = "
        + _lit(sys_head)
        + " + system + "
        + _lit(sys_tail)
        + " -%}{%- endif -%}",
    ]
    if not template.system_in_user:
        parts.append("{{ ns.system }}{%- set ns.system = '' -%}")
    parts += [
        "{%- for message in loop_messages -%}",
        "{%- if message['role'] == 'user' -%}",
        "{{ " + _lit(user_head) + " + ns.system + message['content'] + " + _lit(user_tail) + " }}",
        "{%- set ns.system = '' -%}",
        "{%- else -%}",
        "{{ " + _lit(gen + asst_head) + " + message['content'] + " + _lit(asst_tail) + " }}",
        "{%- endif -%}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}{{ " + _lit(gen) + " }}{%- endif -%}",
    ]
    return "".join(parts)


def stop_token_ids(template: Template | None, tokenizer: Any) -> list[int]:
    """Token ids that end generation: the tokenizer's eos plus the template's stop words (for
    the tokenizer's own chat_template, the special tokens of its end-of-turn text)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if template is None:
        extra = end_of_turn_token_ids(tokenizer) if getattr(tokenizer, "chat_template", None) else []
        return ids + [t for t in extra if t not in ids]
    for word in template.stop_words:
        tid = tokenizer.convert_tokens_to_ids(word)
        if tid is not None and tid != tokenizer.unk_token_id and tid not in ids:
            ids.append(tid)
    return ids


def prepare_tokenizer(tokenizer: Any, template: Template | None) -> int:
    """Make ``tokenizer`` ready for ``template``: add missing special tokens and a pad token,
    and install the template as its ``chat_template``. Returns how many tokens were added
    (the model's embeddings must then be resized)."""
    added = 0
    if template is not None:
        missing = [t for t in template.special_tokens if t not in tokenizer.get_vocab()]
        if missing:
            added += tokenizer.add_special_tokens(
                {"extra_special_tokens": missing}, replace_extra_special_tokens=False
            )
        tokenizer.chat_template = to_jinja(template, tokenizer)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            added += tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return added


__all__ = [
    "IGNORE_INDEX",
    "TEMPLATES",
    "Template",
    "get_template",
    "prepare_tokenizer",
    "render",
    "render_text",
    "segments",
    "stop_token_ids",
    "to_jinja",
]
