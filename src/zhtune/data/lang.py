"""A tiny script-based language guess: enough to tag records ``zh`` / ``en`` and report shares.

It counts characters, it does not model language: Chinese is recognised by its ideographs,
English by Latin letters. Japanese text (kanji + kana) and Korean come out as ``other``; any
Latin-script language (French, German, pinyin) comes out as ``en``. Swapping in a real detector
(fastText ``lid.176``, ``lingua``) is a later issue; this one is pure Python, has no model to
download, and costs a few microseconds per record (counting by ``re.sub`` lengths, which allocates one
string per pattern instead of one per character).
"""

from __future__ import annotations

import re

# CJK Unified Ideographs + Extension A + Compatibility Ideographs + Extensions B-F (planes 2-3).
_CJK = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]")
_KANA_HANGUL = re.compile("[\u3040-\u30ff\u31f0-\u31ff\uac00-\ud7af\u1100-\u11ff]")
_LATIN = re.compile("[A-Za-z\u00c0-\u024f]")
_NON_LETTER = re.compile(r"[\W\d_]+")  # anything but a Unicode letter or ideograph

#: Share of ideographs among all letters above which a text counts as Chinese. Chinese
#: text routinely embeds English terms (``使用 Python 的 random 模块``), hence the low bar.
ZH_SHARE = 0.2
#: Only the first this-many characters are looked at: the guess does not improve with more.
MAX_CHARS = 2048


def guess_lang(text: str) -> str:
    """Guess the language of ``text``: ``"zh"``, ``"en"``, ``"other"``, or ``"unknown"``.

    ``zh`` when CJK ideographs make up at least :data:`ZH_SHARE` of the letters (and the text
    has no significant kana/hangul, which would make it Japanese/Korean); ``en`` when Latin
    letters are the majority; ``other`` for any other script; ``unknown`` when the text has
    no letters at all (empty, digits, punctuation).
    """
    letters = _NON_LETTER.sub("", text[:MAX_CHARS])
    if not letters:
        return "unknown"
    n = len(letters)
    cjk = n - len(_CJK.sub("", letters))
    if cjk and cjk >= ZH_SHARE * n and n - len(_KANA_HANGUL.sub("", letters)) < 0.05 * n:
        return "zh"
    if n - len(_LATIN.sub("", letters)) > 0.5 * n:
        return "en"
    return "other"
