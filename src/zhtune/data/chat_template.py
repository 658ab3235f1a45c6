"""Loss masks from any Jinja chat template: train on exactly the text the model's own template renders.

A tokenizer's ``chat_template`` says how a conversation is laid out, not which of its characters
the model should learn to write. :class:`ChatTemplateMasker` works that out, for any template,
by rendering again:

1. **``{% generation %}`` markers**, where the template has them: transformers reports the
   assistant tokens itself (``return_assistant_tokens_mask``).
2. **Rendering prefixes and diffing**, otherwise. The whole conversation is rendered once, ``T``.
   For assistant message ``i``:

   - its reply *starts* where the conversation before it, rendered with the generation prompt
     (``P_i``), ends; ``P_i`` must be a prefix of ``T``;
   - its reply *ends* with the template's end-of-turn text (``<|im_end|>\\n``, ``<|eot_id|>``,
     ``</s>``, ...: what follows a reply that closes a conversation). For the last reply that
     is the end of ``T``. For an earlier one, the text from that end-of-turn marker to the next
     generation prompt is rendered on its own (a stand-in reply followed by the real next user
     turn) and must end ``P_{i+2}``, which must again be a prefix of ``T``.

   Templates that rewrite history (Qwen3 drops the ``<think>`` block of every reply before the
   last user turn) are handled, since ``T``, ``P_i`` and ``P_{i+2}`` all render history the same
   way. A template that changes earlier turns as the conversation grows, so that no prefix
   holds (Mistral's moves the system prompt into the *last* user turn), cannot be masked; such a
   conversation raises :class:`RenderError` naming the turn.

The trained text is every assistant reply with its end-of-turn marker; system, user and tool text
never (and neither is a default system prompt the template inserts by itself). A template that
writes nothing after a reply (GLM-4 ends a reply with the *next* turn's ``<|user|>``) trains that
next token instead, and the tokenizer's eos after the last reply, so the model learns to stop.

Token ids come from tokenizing ``T`` in one piece, exactly as ``apply_chat_template(...,
tokenize=True)`` does, so training sees the ids serving sees; character spans become token labels
through the fast tokenizer's offsets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from zhtune.errors import ZhtuneError

IGNORE_INDEX = -100

_STAND_IN = "\u2063zhtune-stand-in-reply\u2063"
"""A reply text no real data contains (invisible separators around a name)."""
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class RenderError(ZhtuneError):
    """A conversation the chat template cannot render or mask (the record is rejected)."""


@dataclass(frozen=True)
class Span:
    """Characters ``[start, end)`` of the rendered text that carry the loss."""

    start: int
    end: int
    next_token: bool = False
    """Also train the first token after ``end`` (templates with no end-of-turn text)."""


def has_generation_markers(chat_template: str) -> bool:
    """True if the template marks assistant text with ``{% generation %}`` blocks."""
    return bool(_GENERATION_TAG.search(chat_template))


class ChatTemplateMasker:
    """Renders conversations with a tokenizer's ``chat_template`` into ``(input_ids, labels)``.

    Build one per tokenizer: it renders a stand-in conversation once to learn the template's
    end-of-turn text.
    """

    def __init__(self, tokenizer: Any) -> None:
        template = _chat_template(tokenizer)
        self.tokenizer = tokenizer
        self.markers = has_generation_markers(template) and bool(getattr(tokenizer, "is_fast", False))
        final = self._render([{"role": "user", "content": "x"}, _assistant(_STAND_IN)], False)
        if _STAND_IN not in final:
            raise ZhtuneError("the tokenizer's chat_template drops assistant replies; choose a named template")
        self.end_of_turn = final[final.rindex(_STAND_IN) + len(_STAND_IN) :]
        """Text the template writes after a reply that closes the conversation."""

    # -- rendering --------------------------------------------------------------------------
    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return render_text(self.tokenizer, messages, add_generation_prompt)

    def spans(self, messages: list[dict[str, str]]) -> tuple[str, list[Span]]:
        """The full text of ``messages`` and the character spans of every assistant reply."""
        text = self._render(messages, False)
        system = [messages[0]] if messages and messages[0]["role"] == "system" else []
        out: list[Span] = []
        prompt = None  # P_i of the next reply, when already rendered
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            if prompt is None:
                prompt = self._render(messages[:i], True)
            start = _checked_prefix(prompt, text, i, "the conversation before it")
            if i == len(messages) - 1:
                end, prompt = len(text), None
            else:
                end, prompt = self._end_before(messages, i, system, text)
            if not text[start:end].endswith(self.end_of_turn):
                raise RenderError(
                    f"messages[{i}]: the reply does not end with the template's end-of-turn text "
                    f"{self.end_of_turn!r}, so its end cannot be found; choose a named template"
                )
            last = i == len(messages) - 1
            out.append(Span(start, end, next_token=not self.end_of_turn and not last))
        return text, out

    def _end_before(
        self, messages: list[dict[str, str]], i: int, system: list[dict[str, str]], text: str
    ) -> tuple[int, str | None]:
        """Where reply ``i`` (not the last message) ends in ``text``, and ``P_{i+2}`` (the prompt
        of the next reply, or None when the conversation ends with the message after ``i``)."""
        more = i + 2 < len(messages)
        head = self._render(messages[: i + 2], more)
        _checked_prefix(head, text, i + 1, "the conversation up to it")
        stand_in = self._render([*system, {"role": "user", "content": "x"}, _assistant(_STAND_IN), messages[i + 1]], more)
        piece = stand_in[stand_in.rindex(_STAND_IN) + len(_STAND_IN) :]
        if not (head.endswith(piece) and piece.startswith(self.end_of_turn)):
            raise RenderError(
                f"messages[{i + 1}]: the template renders this turn differently depending on the turns "
                "before it, so the reply before it cannot be delimited; choose a named template"
            )
        return len(head) - len(piece) + len(self.end_of_turn), head if more else None

    # -- tokens -----------------------------------------------------------------------------
    def render(
        self, messages: list[dict[str, str]], train_on_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` of one conversation; labels are ``IGNORE_INDEX`` outside the
        assistant replies (everywhere labelled with ``train_on_prompt``)."""
        return self.render_batch([messages], train_on_prompt)[0]

    def render_batch(
        self, conversations: list[list[dict[str, str]]], train_on_prompt: bool = False
    ) -> list[tuple[list[int], list[int]] | RenderError]:
        """:meth:`render` for many conversations, one tokenizer call for all of them. A
        conversation that cannot be rendered or masked gives its :class:`RenderError` in place."""
        rendered: list[tuple[str, list[Span]] | RenderError] = []
        for messages in conversations:
            try:
                rendered.append(self._marked(messages) if self.markers else self.spans(messages))
            except RenderError as err:
                rendered.append(err)
        texts = [r[0] for r in rendered if not isinstance(r, RenderError)]
        encoded = iter(_encode_with_offsets(self.tokenizer, texts))
        eos = self.tokenizer.eos_token_id
        out: list[tuple[list[int], list[int]] | RenderError] = []
        for item in rendered:
            if isinstance(item, RenderError):
                out.append(item)
                continue
            ids, offsets = next(encoded)
            labels = list(ids) if train_on_prompt else _labels(ids, offsets, item[1])
            if not self.end_of_turn and eos is not None and item[1] and item[1][-1].end == len(item[0]):
                ids, labels = [*ids, eos], [*labels, eos]  # no end-of-turn text: learn to stop on eos
            out.append((list(ids), labels))
        return out

    def _marked(self, messages: list[dict[str, str]]) -> tuple[str, list[Span]]:
        """Spans from the template's ``{% generation %}`` blocks (transformers finds them)."""
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            texts, indices = render_jinja_template(
                conversations=[messages],
                chat_template=self.tokenizer.chat_template,
                return_assistant_tokens_mask=True,
                **self.tokenizer.special_tokens_map,
            )
        except Exception as err:
            raise RenderError(f"the chat template refused the conversation: {err}") from None
        return texts[0], [Span(a, b) for a, b in indices[0]]


def _chat_template(tokenizer: Any) -> str:
    """The tokenizer's chat_template, or a clear error when it has none."""
    template = getattr(tokenizer, "chat_template", None)
    if not template or not isinstance(template, str):
        raise ZhtuneError("template 'tokenizer' needs a tokenizer with a chat_template; choose a named template")
    return template


def render_text(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """``messages`` rendered by the tokenizer's own chat_template (with the generation prompt:
    what serving sends the model); a conversation the template refuses raises :class:`RenderError`."""
    _chat_template(tokenizer)
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as err:  # jinja2's TemplateError and the template's own raise_exception
        raise RenderError(f"the chat template refused the conversation: {err}") from None


def _assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


def _checked_prefix(prefix: str, text: str, index: int, what: str) -> int:
    """``len(prefix)``, after checking that ``text`` starts with it."""
    if not text.startswith(prefix):
        raise RenderError(
            f"messages[{index}]: the template renders {what} differently once later turns follow "
            "(it rewrites earlier turns), so no loss mask can be derived; choose a named template"
        )
    return len(prefix)


def _encode_with_offsets(tokenizer: Any, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """Token ids and character offsets of each text, no special tokens added (the ids of
    ``apply_chat_template(..., tokenize=True)``)."""
    if not texts:
        return []
    if not getattr(tokenizer, "is_fast", False):
        raise ZhtuneError(
            "template 'tokenizer' needs a fast tokenizer (tokenizer.json) to map the template's text "
            "to tokens; choose a named template"
        )
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return list(zip(enc["input_ids"], enc["offset_mapping"]))


def _labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[Span]) -> list[int]:
    """Labels from character spans: a token is trained if its characters overlap a span (every
    token between the first and the last such token of a span, whatever its offsets say)."""
    labels = [IGNORE_INDEX] * len(ids)
    j = 0
    for span in spans:
        while j < len(ids) and offsets[j][1] <= span.start:
            j += 1
        first = j
        while j < len(ids) and offsets[j][0] < span.end:
            j += 1
        if span.next_token and j < len(ids):
            j += 1
        for k in range(first, j):
            labels[k] = ids[k]
    return labels


def end_of_turn_token_ids(tokenizer: Any) -> list[int]:
    """The special tokens in the template's end-of-turn text (``<|im_end|>``, ``<|eot_id|>``):
    generation stops on them, besides eos."""
    tail = ChatTemplateMasker(tokenizer).end_of_turn
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return [t for t in tokenizer(tail, add_special_tokens=False)["input_ids"] if t in special]


__all__ = [
    "ChatTemplateMasker",
    "RenderError",
    "Span",
    "end_of_turn_token_ids",
    "has_generation_markers",
    "render_text",
]
