"""Format adapters: exact canonical messages per format, detection, mapping, errors."""

from __future__ import annotations

import pytest

from zhtune.data.formats import (
    FORMATS,
    apply_mapping,
    detect_format,
    get_format,
    ignored_fields,
    split_dialogue,
)
from zhtune.data.lang import guess_lang
from zhtune.data.schema import RecordError
from zhtune.errors import ZhtuneError


def msgs(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in pairs]


def convert(fmt: str, raw: dict) -> list[dict[str, str]]:
    return FORMATS[fmt].to_messages(raw)


def test_alpaca_instruction_input_output():
    raw = {"instruction": "Translate.", "input": "你好", "output": "Hello"}
    assert convert("alpaca", raw) == msgs(("user", "Translate.\n你好"), ("assistant", "Hello"))


def test_alpaca_empty_input_system_and_history():
    raw = {"instruction": "Go on.", "input": " ", "output": "OK", "system": "S", "history": [["q1", "a1"]]}
    assert convert("alpaca", raw) == msgs(
        ("system", "S"), ("user", "q1"), ("assistant", "a1"), ("user", "Go on."), ("assistant", "OK")
    )


@pytest.mark.parametrize(
    "raw, field, reason",
    [
        ({"instruction": "q"}, "output", "missing"),
        ({"instruction": 3, "output": "a"}, "instruction", "must be a string, got int"),
        ({"instruction": "q", "output": "a", "history": [["only one"]]}, "history[0]", "pair of strings"),
        ({"instruction": "q", "output": "a", "history": "x"}, "history", "must be a list, got str"),
    ],
)
def test_alpaca_errors_name_the_field(raw, field, reason):
    with pytest.raises(RecordError) as e:
        convert("alpaca", raw)
    assert e.value.field == field and reason in e.value.reason


def test_belle_single_turn():
    assert convert("belle", {"input": "写诗", "target": "好"}) == msgs(("user", "写诗"), ("assistant", "好"))


def test_belle_multi_turn_half_and_full_width_markers():
    raw = {
        "input": "Human: 你好\n\nAssistant: 你好！\n\nHuman：讲个笑话\n\nAssistant:",
        "target": "从前有座山。",
    }
    assert convert("belle", raw) == msgs(
        ("user", "你好"), ("assistant", "你好！"), ("user", "讲个笑话"), ("assistant", "从前有座山。")
    )


def test_markers_only_count_at_line_starts():
    assert split_dialogue("Explain what 'Human: x' means") is None
    assert split_dialogue("Human: say 'Assistant: hi'\nAssistant:") == msgs(("user", "say 'Assistant: hi'"))


def test_alpaca_with_belle_multiturn_instruction():
    raw = {
        "instruction": "Human:你好\nAssistant:你好！\nHuman:再见\nAssistant:",
        "input": "",
        "output": "再见！",
    }
    assert convert("alpaca", raw) == msgs(
        ("user", "你好"), ("assistant", "你好！"), ("user", "再见"), ("assistant", "再见！")
    )


def test_sharegpt_from_value_and_role_content():
    raw = {
        "conversations": [
            {"from": "system", "value": "S"},
            {"from": "human", "value": "Q"},
            {"from": "GPT", "value": "A"},
        ]
    }
    assert convert("sharegpt", raw) == msgs(("system", "S"), ("user", "Q"), ("assistant", "A"))
    raw = {
        "system": "S2",
        "conversations": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
    }
    assert convert("sharegpt", raw) == msgs(("system", "S2"), ("user", "Q"), ("assistant", "A"))
    for who in ("chatgpt", "bing", "bard", "model"):
        assert convert("sharegpt", {"conversations": [{"from": who, "value": "x"}]})[0]["role"] == "assistant"


def test_sharegpt_unknown_speaker():
    with pytest.raises(RecordError) as e:
        convert(
            "sharegpt", {"conversations": [{"from": "human", "value": "Q"}, {"from": "robot", "value": "A"}]}
        )
    assert e.value.field == "conversations[1].from" and "unknown speaker 'robot'" in e.value.reason


def test_openai_content_parts_joined():
    raw = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
        ]
    }
    assert convert("openai", raw) == msgs(("user", "a\nb"))
    with pytest.raises(RecordError) as e:
        convert(
            "openai", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}
        )
    assert e.value.field == "messages[0].content[0]" and "image_url" in e.value.reason


def test_seed_explodes_instances():
    raw = {
        "instruction": "Antonym?",
        "instances": [{"input": "hot", "output": "cold"}, {"input": "", "output": "x"}],
    }
    parts = FORMATS["seed"].explode(raw)
    assert [convert("seed", p) for p in parts] == [
        msgs(("user", "Antonym?\nhot"), ("assistant", "cold")),
        msgs(("user", "Antonym?"), ("assistant", "x")),
    ]
    with pytest.raises(RecordError, match="instances"):
        FORMATS["seed"].explode({"instruction": "q", "instances": []})


def test_text_format_is_not_chat():
    assert convert("text", {"text": "一段文字"}) == msgs(("assistant", "一段文字"))
    assert FORMATS["text"].chat is False
    with pytest.raises(RecordError, match="empty"):
        convert("text", {"text": "  "})


@pytest.mark.parametrize(
    "raw, name",
    [
        ({"messages": [], "text": "x"}, "openai"),
        ({"conversations": []}, "sharegpt"),
        ({"instruction": "q", "instances": []}, "seed"),
        ({"instruction": "q", "input": "", "output": "a"}, "alpaca"),
        ({"input": "q", "target": "a"}, "belle"),
        ({"text": "x"}, "text"),
        ({"question": "q", "answer": "a"}, None),
    ],
)
def test_detect_format(raw, name):
    assert detect_format(raw) == name


def test_apply_mapping_renames_and_shadows():
    raw = {"zh_instruction": "问", "zh_output": "答", "output": "en answer", "en_input": ""}
    mapped = apply_mapping(raw, {"zh_instruction": "instruction", "zh_output": "output"})
    assert mapped == {"instruction": "问", "output": "答", "en_input": ""}
    assert detect_format(mapped) == "alpaca"
    assert apply_mapping({"output": "kept"}, {"zh_output": "output"}) == {"output": "kept"}


def test_ignored_fields():
    raw = {"id": 1, "instruction": "q", "output": "a", "category": "c", "en_input": "", "metadata": {}}
    assert ignored_fields(FORMATS["alpaca"], raw) == ["en_input"]


def test_unknown_format_lists_close_matches():
    with pytest.raises(ZhtuneError, match=r"unknown format 'sharegtp'; did you mean 'sharegpt'\?.*alpaca"):
        get_format("sharegtp")


@pytest.mark.parametrize(
    "text, lang",
    [
        ("", "unknown"),
        ("1234 !!", "unknown"),
        ("给出保持健康的三个建议。", "zh"),
        ("请你写出一个可以生成五个不同随机数的 Python 程序 using the random module", "zh"),
        ("Give three tips for staying healthy.", "en"),
        ("Привет, как дела?", "other"),
        ("東京はとても大きな都市です", "other"),
    ],
)
def test_guess_lang(text, lang):
    assert guess_lang(text) == lang
