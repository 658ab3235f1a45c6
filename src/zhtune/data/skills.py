"""The quickstart's bundled skills: small, checkable instruction data in Chinese and English.

Three skills a tiny model can learn on a CPU in minutes, each scored by exact match:

* ``num2zh``  — write an Arabic number in Chinese numerals (``305`` -> ``三百零五``);
* ``zh2num``  — read Chinese numerals back (``三百零五`` -> ``305``);
* ``reverse`` — write a short Chinese string backwards.

The split is by *value*: numbers and strings in the test set never occur in training, so a high
after-training score means the model learned the rule, not the answers. The generated files ship
in ``zhtune/assets/quickstart/`` (Alpaca layout, so the quickstart also exercises the reader);
:func:`write_skill_data` regenerates them bit for bit.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DIGITS = "零一二三四五六七八九"
UNITS = ("", "十", "百", "千")
CHARS = "春夏秋冬山水风云花月日星天地人心门书画茶酒诗歌江河湖海雨雪松竹梅兰鸟鱼龙虎马牛羊田林石"

PROMPTS = {
    "num2zh": ["把 {q} 写成中文数字。", "{q} 用汉字怎么写？", "Write {q} in Chinese numerals."],
    "zh2num": ["“{q}”是多少？用阿拉伯数字回答。", "把{q}写成阿拉伯数字。", "What number is {q}?"],
    "reverse": ["把“{q}”倒过来写。", "Reverse the string: {q}"],
}


def to_chinese(n: int) -> str:
    """Chinese numerals for ``0 <= n <= 9999``: 10 -> 十, 105 -> 一百零五, 1050 -> 一千零五十."""
    if not 0 <= n <= 9999:
        raise ValueError(f"out of range: {n}")
    if n == 0:
        return DIGITS[0]
    s = str(n)
    out, pending_zero = "", False
    for i, ch in enumerate(s):
        d, pos = int(ch), len(s) - 1 - i
        if d == 0:
            pending_zero = True
            continue
        if pending_zero:
            out += DIGITS[0]
            pending_zero = False
        out += DIGITS[d] + UNITS[pos]
    return out[1:] if len(s) == 2 and out.startswith("一十") else out


def _records(skill: str, pairs: list[tuple[str, str]], rng: random.Random, phrasings: int) -> list[dict]:
    records = []
    for q, a in pairs:
        for prompt in rng.sample(PROMPTS[skill], k=min(phrasings, len(PROMPTS[skill]))):
            records.append({"instruction": prompt.format(q=q), "input": "", "output": a, "category": skill})
    return records


def make_skill_data(
    seed: int = 0, max_number: int = 999, test_fraction: float = 0.15
) -> tuple[list[dict], list[dict]]:
    """Generate ``(train, test)`` Alpaca-layout records (with a ``category`` field), split by value."""
    rng = random.Random(seed)
    numbers = list(range(max_number + 1))
    rng.shuffle(numbers)
    n_test = int(len(numbers) * test_fraction)
    test_nums, train_nums = numbers[:n_test], numbers[n_test:]
    strings = sorted({"".join(rng.sample(CHARS, rng.randint(3, 6))) for _ in range(2000)})
    rng.shuffle(strings)
    test_strs, train_strs = strings[:n_test], strings[n_test:]

    def pairs(nums: list[int], strs: list[str]) -> dict[str, list[tuple[str, str]]]:
        return {
            "num2zh": [(str(n), to_chinese(n)) for n in nums],
            "zh2num": [(to_chinese(n), str(n)) for n in nums],
            "reverse": [(s, s[::-1]) for s in strs],
        }

    train = [r for skill, ps in pairs(train_nums, train_strs).items() for r in _records(skill, ps, rng, 2)]
    test = [r for skill, ps in pairs(test_nums, test_strs).items() for r in _records(skill, ps, rng, 1)]
    rng.shuffle(train)
    return train, test


def write_skill_data(out_dir: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Write ``train.json`` and ``test.json`` (JSON arrays, one record per line) to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, records in zip(("train", "test"), make_skill_data(seed)):
        path = out / f"{name}.json"
        lines = ",\n".join(json.dumps(r, ensure_ascii=False) for r in records)
        path.write_text(f"[\n{lines}\n]\n", encoding="utf-8")
        paths.append(path)
    return paths[0], paths[1]


def bundled_dir() -> Path:
    """Where the shipped quickstart data lives inside the installed package."""
    return Path(__file__).resolve().parent.parent / "assets" / "quickstart"
