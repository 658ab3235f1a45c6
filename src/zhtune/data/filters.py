"""Per-record cleaning rules of ``zhtune data clean``: html -> markdown and the content filters.

Each filter looks at one canonical conversation and answers ``None`` (keep) or the reason it
should go, so the caller can count it and write it to the rejects file. The rules follow the
projects whose data our users know:

- FastChat's ShareGPT cleaning: html pages of ChatGPT replies -> markdown with the page debris
  removed ("Copy code" buttons, "2 / 2" regenerate counters, stray ``div``/``span``), code
  fences restored with their language; error replies ("Too many requests in 1 hour"); too-short
  conversations; a trailing user turn (nothing to learn from).
- BELLE's post-filters of its 1M set: replies where the model calls itself GPT/ChatGPT/OpenAI,
  incomplete inputs the model could not answer ("please provide the text"), and Chinese
  instructions answered in English (unless a translation was asked for).

Only html conversion needs a package (``markdownify``, imported on first use); the rest is
regular expressions.
"""

from __future__ import annotations

import re
from typing import Any

from zhtune.data.lang import guess_lang

Messages = list[dict[str, str]]

# --------------------------------------------------------------------------- html -> markdown

#: A tag that marks a reply as html (outside code): block or inline formatting, not ``<T>``.
_HTML_TAG = re.compile(
    r"</?(?:div|p|span|pre|code|ol|ul|li|br|hr|h[1-6]|table|thead|tbody|tr|td|th|strong|em|b|i|a|"
    r"blockquote|button|svg|img)(?:\s[^<>]*)?/?>",
    re.IGNORECASE,
)
_FENCED = re.compile(r"```.*?(?:```|\Z)|`[^`\n]*`", re.DOTALL)
#: "2 / 2" at the very start: the page's regenerate counter.
_REGENERATE = re.compile(r"\A\s*\d+\s*/\s*\d+\s*")
_COPY_CHARS = re.compile(r"Copy\d+ chars / \d+ words")
#: A code fence whose body is only the leftover "Copy code" label.
_EMPTY_FENCE = re.compile(r"```[^\n`]*\n?\s*(?:Copy code)?\s*```\n?")
_COPY_CODE = re.compile(r"^[\w+#.-]*Copy code\s*$\n?", re.MULTILINE)
_BLANK_LINES = re.compile(r"\n{3,}")


def looks_like_html(text: str) -> bool:
    """True when ``text`` has html tags outside markdown code (fenced or inline), where a tag
    is the sample of the language being discussed, not markup."""
    return bool(_HTML_TAG.search(text)) and bool(_HTML_TAG.search(_FENCED.sub("", text)))


#: Rendered text: paragraphs, list items, or the chat page's own markers.
_RENDERED = re.compile(r"<(?:p|li|h[1-6]|blockquote)[\s>]|class=\"markdown|Copy code", re.IGNORECASE)
#: Html that is the answer itself (a web page, an SVG): never converted.
_DOCUMENT = re.compile(r"<(?:!DOCTYPE|html|head|body|style|script|svg|form|input)[\s>]", re.IGNORECASE)
#: A question about markup or code: its html reply is the answer, not a rendered page.
_ASKS_FOR_MARKUP = re.compile(
    r"html|css|svg|xml|markup|web|网页|页面|网站|标记|标签|代码|code|模板|template|布局|layout|格式|format|"
    r"组件|component",
    re.IGNORECASE,
)


def is_rendered_html(text: str, question: str = "", page_dump: bool = False) -> bool:
    """True when ``text`` is a chat page's rendered reply to convert to markdown.

    In a ``page_dump`` (raw ShareGPT, where code in a reply is escaped and every tag is the
    page's rendering, as FastChat assumes) any html outside code counts. Elsewhere html in a reply
    is usually the answer (a web page, a component), so only a turn that is html from its first
    to its last character, with rendered text (``<p>``, ``<li>``, headings, the page's markdown
    class) and no document-level tags, answering a ``question`` that neither contains tags nor
    asks for markup, code or a format, counts.
    """
    if not looks_like_html(text):
        return False
    if page_dump:
        return True
    body = text.strip()
    return (
        body.startswith("<")
        and body.endswith(">")
        and bool(_RENDERED.search(body))
        and not _DOCUMENT.search(body)
        and not _ASKS_FOR_MARKUP.search(question)
        and not _HTML_TAG.search(question)
    )


def _code_language(el: Any) -> str:
    """The language of a ``<pre>`` block from ``class="language-x"`` on it or its ``<code>``."""
    for node in (el, el.find("code")):
        for cls in (node.get("class") or []) if node is not None else []:
            if cls.startswith("language-"):
                return cls.removeprefix("language-")
    return ""


def html_to_markdown(text: str) -> str:
    """Convert one html reply (a ShareGPT page) to markdown, removing the page's debris.

    Buttons and icons go (with their "Copy code" label), a ``<pre>`` keeps only its ``<code>``
    (the header with the language name goes; the language moves to the fence), ``div``/``span``
    wrappers are unwrapped, then FastChat's text fixes: the leading "2 / 2" regenerate counter,
    "Copy123 chars / 45 words", empty fences, runs of blank lines.
    """
    from bs4 import BeautifulSoup
    from markdownify import MarkdownConverter

    soup = BeautifulSoup(text, "html.parser")
    for el in soup.find_all(["button", "svg", "script", "style"]):
        el.decompose()
    for pre in soup.find_all("pre"):
        code = pre.find("code")
        lang = _code_language(pre)
        if code is not None:
            body = code.get_text()
            pre.clear()
            new_code = soup.new_tag("code", attrs={"class": f"language-{lang}"} if lang else {})
            new_code.string = body
            pre.append(new_code)
    for el in soup.find_all(["div", "span"]):
        el.unwrap()
    md = MarkdownConverter(
        heading_style="ATX", bullets="-", code_language_callback=_code_language, escape_underscores=False
    ).convert_soup(soup)
    md = _REGENERATE.sub("", md.strip(), count=1)
    md = _COPY_CHARS.sub("", md)
    md = _COPY_CODE.sub("", md)
    md = _EMPTY_FENCE.sub("", md)
    return _BLANK_LINES.sub("\n\n", md).strip()


# --------------------------------------------------------------------------- FastChat's filters

#: Replies that are the web UI's error messages, not answers (FastChat drops these).
ERROR_REPLIES = re.compile(
    r"Too many requests in 1 hour|Too many requests|Something went wrong|An error occurred|"
    r"There was an error generating a response|network error|Load failed|"
    r"The message you submitted was too long|Hmm\.\.\.something seems to have gone wrong|"
    r"Rate limit (?:reached|exceeded)|conversation not found",
    re.IGNORECASE,
)
#: Lower-case words one of which every :data:`ERROR_REPLIES` match contains: a reply with none
#: of them is not searched (the case-insensitive alternation is the slow part of the step).
_ERROR_ANCHORS = ("request", "wrong", "error", "failed", "too long", "rate limit", "not found")
_SPACE = re.compile(r"\s+")


def _mentions(text: str, anchors: tuple[str, ...]) -> bool:
    """True when lower-cased ``text`` contains one of ``anchors`` (a cheap test before a regex)."""
    low = text.lower()
    return any(a in low for a in anchors)


def error_reply(messages: Messages) -> str | None:
    """The reason when an assistant turn is a web-UI error message (e.g. "Too many requests")."""
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and len(m["content"]) < 300 and _mentions(m["content"], _ERROR_ANCHORS):
            hit = ERROR_REPLIES.search(m["content"])
            if hit:
                return f"messages[{i}]: the reply is an error message ({hit.group(0)!r})"
    return None


def too_short(messages: Messages, min_reply_chars: int = 1) -> str | None:
    """The reason when no user turn is answered, or the replies together hold fewer than
    ``min_reply_chars`` non-space characters (FastChat drops conversations of fewer than two
    turns). Emoji, Morse code or a single digit are answers, so nothing else is measured."""
    answered = any(a["role"] == "assistant" and q["role"] == "user" for q, a in zip(messages, messages[1:]))
    if not answered:
        return "no answered user turn"
    chars = sum(len(_SPACE.sub("", m["content"])) for m in messages if m["role"] == "assistant")
    if chars < min_reply_chars:
        return f"replies have {chars} character(s), fewer than {min_reply_chars}"
    return None


def trim_trailing_user(messages: Messages) -> Messages:
    """``messages`` without trailing user turns (a question with no answer teaches nothing)."""
    end = len(messages)
    while end and messages[end - 1]["role"] == "user":
        end -= 1
    return messages[:end]


# --------------------------------------------------------------------------- BELLE's filters

#: A reply in which the model names itself GPT / ChatGPT / OpenAI's model (BELLE removes these:
#: a Chinese model should not learn to claim it is ChatGPT).
SELF_REFERENCE = re.compile(
    r"ChatGPT|(?<![A-Za-z])GPT(?![A-Za-z])|OpenAI|as an AI language model|as a language model|"
    r"I am an AI (?:language )?model (?:developed|trained|created) by|"
    r"作为(?:一个|一名)?(?:AI|人工智能)?语言模型|我是(?:一个)?(?:由)?(?:OpenAI|开放人工智能)",
    re.IGNORECASE,
)
#: Lower-case words one of which every :data:`SELF_REFERENCE` match contains.
_SELF_ANCHORS = ("gpt", "openai", "language model", "i am an ai", "语言模型", "我是")

#: The reply says the input it needed was not given (BELLE: incomplete instructions).
MISSING_INPUT_REPLY = re.compile(
    r"(?:请|麻烦)(?:您|你)?(?:再)?(?:提供|给出|输入|发送|给我)(?:一下|一些)?(?:[^。，,.!?！？\n]{0,12})"
    r"(?:文本|文章|句子|段落|内容|数据|列表|代码|原文|材料|单词|词语|数字)"
    r"|(?:您|你)(?:并)?(?:没有|未)(?:提供|给出|给定|附上|输入)"
    r"|(?:没有|未)(?:提供|给出)(?:任何|具体的?)?(?:文本|文章|句子|段落|内容|数据|列表|代码|原文|材料)"
    r"|(?:please|kindly) provide (?:the|a|an|me with|some|more)"
    r"|you (?:did not|didn't|have not|haven't) (?:provide|include|give|specif)"
    r"|no (?:text|input|sentence|article|passage|data|list|code) (?:was |has been |is )?(?:provided|given)",
    re.IGNORECASE,
)
#: An instruction that ends announcing an input ("翻译以下句子：", "the following text:") with
#: nothing after the colon. A double colon ("鸟：啁啾：：") is an analogy to complete, not this.
_ANNOUNCES_INPUT = re.compile(
    r"(?:以下|下面|下列|如下|给定|这段|这篇|这句|这首|the following|given|this)[^。.:：\n]{0,16}(?<![:：])[:：]\s*$",
    re.IGNORECASE,
)
#: Replies this long are answers, whatever they ask for in passing.
_SHORT_REPLY = 200


def self_reference(messages: Messages) -> str | None:
    """The reason when a reply mentions GPT / ChatGPT / OpenAI or "as an AI language model"."""
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and _mentions(m["content"], _SELF_ANCHORS):
            hit = SELF_REFERENCE.search(m["content"])
            if hit:
                return f"messages[{i}]: the reply refers to {hit.group(0)!r}"
    return None


def incomplete_input(messages: Messages) -> str | None:
    """The reason when an instruction announces an input it does not contain ("翻译以下句子："
    with nothing after the colon) or the reply asks for the missing input ("请提供文本")."""
    for i, m in enumerate(messages):
        content = m["content"]
        if m["role"] == "user" and _ANNOUNCES_INPUT.search(content):
            return f"messages[{i}]: the instruction announces an input but ends at the colon"
        if m["role"] == "assistant" and len(content) < _SHORT_REPLY:
            hit = MISSING_INPUT_REPLY.search(content)
            if hit:
                return f"messages[{i}]: the reply asks for missing input ({hit.group(0)!r})"
    return None


#: A request for English (or a translation) makes an English reply to Chinese legitimate.
_ASKS_FOR_ENGLISH = re.compile(r"翻译|译成|译为|英文|英语|English|translate", re.IGNORECASE)
#: Signs of code, markup or formulas: an English-looking reply with these is not prose.
_CODE = re.compile(r"[{};=<>\\]|\w\(|\bdef |\breturn\b|\bfunction\b|\bimport\b|https?://|```")
_HAN = re.compile("[\u3400-\u4dbf\u4e00-\u9fff]")
#: English function words a reply needs to count as English prose (not names, a password, a
#: list of sites or a formula, which have none).
MIN_ENGLISH_WORDS = 3
_FUNCTION_WORD = re.compile(
    r"\b(?:the|an|is|are|was|were|be|of|to|and|in|on|that|it|for|with|you|this|can|will|not|as|by)\b",
    re.IGNORECASE,
)


def is_english_prose(text: str) -> bool:
    """True when ``text`` reads as English sentences: mostly Latin letters (:func:`guess_lang`),
    at least :data:`MIN_ENGLISH_WORDS` English function words ("the", "is", "of", ...), and no
    sign of code, a URL or a formula; any Chinese character (a Chinese reply quoting English
    titles) makes it not English."""
    return (
        not _HAN.search(text)
        and guess_lang(text) == "en"
        and len(_FUNCTION_WORD.findall(text)) >= MIN_ENGLISH_WORDS
        and not _CODE.search(text)
    )


def zh_instruction_en_reply(messages: Messages) -> str | None:
    """The reason when a Chinese instruction gets an English prose reply and no English was
    asked for (BELLE's filter: machine-translated sets often keep the English output). Code,
    URLs, formulas, names and passwords are not English prose and pass."""
    for i in range(1, len(messages)):
        user, reply = messages[i - 1], messages[i]
        if user["role"] != "user" or reply["role"] != "assistant":
            continue
        if _HAN.search(reply["content"]) or _ASKS_FOR_ENGLISH.search(user["content"]):
            continue  # (the cheap tests first: a reply with Chinese in it is not English prose)
        if guess_lang(user["content"]) == "zh" and is_english_prose(reply["content"]):
            return f"messages[{i}]: Chinese instruction, English reply"
    return None
