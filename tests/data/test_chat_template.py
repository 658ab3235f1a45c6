"""Loss masks from a model's own Jinja chat template (``template: tokenizer``, what ``auto`` picks
for every tokenizer that has one).

Fixture tokenizers carry the published templates of Qwen2.5, Qwen3, LLaMA-3, Mistral, GLM-4 and
Yi (``tests/fixtures/chat_templates``, sources in SOURCES.md) on the tiny test vocabulary; SmolLM2's
real tokenizer is checked under the ``real`` marker. For each: the labelled tokens are exactly
the assistant replies with their end-of-turn text (golden strings below), and the ids are those
``apply_chat_template(..., tokenize=True)`` gives, so training sees what serving sees.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from tests.conftest import write_jsonl
from zhtune.data.chat_template import ChatTemplateMasker, RenderError, end_of_turn_token_ids
from zhtune.data.dataset import tokenize_records
from zhtune.data.templates import IGNORE_INDEX, TEMPLATES, prepare_tokenizer, render, stop_token_ids

FIXTURES = Path(__file__).parent.parent / "fixtures" / "chat_templates"

SYSTEM = {"role": "system", "content": "你是助手。"}
TURNS = [
    {"role": "user", "content": "一加一？"},
    {"role": "assistant", "content": "二"},
    {"role": "user", "content": "再加一？"},
    {"role": "assistant", "content": "三"},
]

# name -> (special tokens, bos, eos, the trained text of TURNS' replies)
PUBLISHED = {
    "qwen2.5": (["<|im_start|>", "<|im_end|>", "<|endoftext|>"], None, "<|im_end|>", "二<|im_end|>\n三<|im_end|>\n"),
    # Qwen3 drops earlier replies' think blocks and gives the last one an (empty) block
    "qwen3": (
        ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>"],
        None,
        "<|im_end|>",
        "二<|im_end|>\n<think>\n\n</think>\n\n三<|im_end|>\n",
    ),
    "llama3": (
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|begin_of_text|>",
        "<|eot_id|>",
        "二<|eot_id|>三<|eot_id|>",
    ),
    "mistral": (["<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", " 二</s> 三</s>"),
    # GLM-4 writes nothing after a reply: the next turn's <|user|> and a final eos are trained
    "glm4": (
        ["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|endoftext|>"],
        None,
        "<|endoftext|>",
        "\n二<|user|>\n三<|endoftext|>",
    ),
    "yi": (["<|im_start|>", "<|im_end|>", "<|endoftext|>"], None, "<|im_end|>", "二<|im_end|>\n三<|im_end|>\n"),
}


def published_tokenizer(base, name: str):
    """The tiny test tokenizer carrying a published template and its special tokens."""
    specials, bos, eos, _ = PUBLISHED[name]
    tok = copy.deepcopy(base)
    tok.add_special_tokens({"extra_special_tokens": specials}, replace_extra_special_tokens=False)
    tok.bos_token, tok.eos_token = bos, eos
    tok.chat_template = (FIXTURES / f"{name}.jinja").read_text(encoding="utf-8")
    return tok


def trained_text(tok, ids: list[int], labels: list[int]) -> str:
    return tok.decode([i for i, label in zip(ids, labels) if label != IGNORE_INDEX])


def template_ids(tok, messages) -> list[int]:
    out = tok.apply_chat_template(messages, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_template_trains_every_reply_and_nothing_else(name, tiny_tokenizer):
    tok = published_tokenizer(tiny_tokenizer, name)
    ids, labels = render(None, TURNS, tok)
    assert trained_text(tok, ids, labels) == PUBLISHED[name][3]
    text = tok.decode(ids)
    for prompt in ("一加一？", "再加一？"):
        assert prompt in text  # the user turns are there, just not trained
    if name != "glm4":  # GLM-4's final eos is zhtune's addition (its template writes no end)
        assert ids == template_ids(tok, TURNS)
    else:
        assert ids[:-1] == template_ids(tok, TURNS) and ids[-1] == tok.eos_token_id


@pytest.mark.parametrize("name", sorted(set(PUBLISHED) - {"mistral"}))
def test_system_prompt_is_never_trained(name, tiny_tokenizer):
    tok = published_tokenizer(tiny_tokenizer, name)
    ids, labels = render(None, [SYSTEM, *TURNS], tok)
    assert "你是助手。" in tok.decode(ids)
    assert trained_text(tok, ids, labels) == PUBLISHED[name][3]


def test_default_system_prompt_inserted_by_the_template_is_not_trained(tiny_tokenizer):
    tok = published_tokenizer(tiny_tokenizer, "qwen2.5")
    ids, labels = render(None, TURNS[:2], tok)
    assert tok.decode(ids).startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    assert trained_text(tok, ids, labels) == "二<|im_end|>\n"


def test_qwen3_thinking_blocks(tiny_tokenizer):
    """A reply's think block is trained where the template keeps it (the last reply) and gone
    where the template drops it (replies before the last user turn), as served."""
    tok = published_tokenizer(tiny_tokenizer, "qwen3")
    thought = [
        TURNS[0],
        {"role": "assistant", "content": "<think>\n一加一等于二\n</think>\n\n二"},
        TURNS[2],
        {"role": "assistant", "content": "<think>\n二加一等于三\n</think>\n\n三"},
    ]
    ids, labels = render(None, thought, tok)
    assert trained_text(tok, ids, labels) == "二<|im_end|>\n<think>\n二加一等于三\n</think>\n\n三<|im_end|>\n"
    assert "一加一等于二" not in tok.decode(ids)
    assert ids == template_ids(tok, thought)


def test_mistral_with_a_system_prompt_cannot_be_masked_and_is_rejected(tiny_tokenizer):
    """Mistral's template puts the system prompt into the *last* user turn only, so the text of
    earlier turns changes as the conversation grows: a clear error, and the record is rejected."""
    tok = published_tokenizer(tiny_tokenizer, "mistral")
    with pytest.raises(RenderError, match=r"messages\[2\].*rewrites earlier turns"):
        render(None, [SYSTEM, *TURNS], tok)
    records = [{"id": "sys", "messages": [SYSTEM, *TURNS]}, {"id": "plain", "messages": TURNS}]
    out = tokenize_records(records, tok, None, cutoff_len=256)
    assert len(out.examples) == 1
    assert [r["id"] for r in out.rejects] == ["sys"] and "rewrites earlier turns" in out.rejects[0]["reason"]


def test_generation_markers_are_used_where_present(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{% if m.role == 'assistant' %}A: {% generation %}{{ m.content }}.{% endgeneration %}\n"
        "{% else %}Q: {{ m.content }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}A: {% endif %}"
    )
    masker = ChatTemplateMasker(tok)
    assert masker.markers
    ids, labels = masker.render(TURNS)
    assert trained_text(tok, ids, labels) == "二.三."


def test_train_on_prompt_labels_every_token(tiny_tokenizer):
    tok = published_tokenizer(tiny_tokenizer, "llama3")
    ids, labels = render(None, TURNS, tok, train_on_prompt=True)
    assert labels == ids


def test_generation_prompt_is_the_templates_own(tiny_tokenizer):
    tok = published_tokenizer(tiny_tokenizer, "llama3")
    ids, labels = render(None, [SYSTEM, *TURNS[:3]], tok, add_generation_prompt=True)
    text = tok.apply_chat_template([SYSTEM, *TURNS[:3]], tokenize=False, add_generation_prompt=True)
    assert tok.decode(ids) == text and text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert set(labels) == {IGNORE_INDEX}


@pytest.mark.parametrize(("name", "stop"), [("llama3", "<|eot_id|>"), ("qwen2.5", "<|im_end|>")])
def test_end_of_turn_token_stops_generation(name, stop, tiny_tokenizer):
    tok = published_tokenizer(tiny_tokenizer, name)
    tok.eos_token = "<|endoftext|>" if name == "qwen2.5" else tok.eos_token  # a base model's eos
    assert tok.convert_tokens_to_ids(stop) in end_of_turn_token_ids(tok)
    assert tok.convert_tokens_to_ids(stop) in stop_token_ids(None, tok)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_training_ids_equal_the_saved_templates_ids(name, tiny_tokenizer, tmp_path):
    """Train/serve parity for every shipped template: the ids training renders are the ids the
    run's saved tokenizer gives through ``apply_chat_template``, and the tokenizer path renders
    the same as the named one."""
    from transformers import AutoTokenizer

    from tests.conftest import CONV

    tok = copy.deepcopy(tiny_tokenizer)
    prepare_tokenizer(tok, TEMPLATES[name])
    tok.save_pretrained(tmp_path)
    saved = AutoTokenizer.from_pretrained(tmp_path)
    for conv in (CONV, CONV[1:]):
        named = render(TEMPLATES[name], conv, tok)
        assert named[0] == template_ids(saved, conv)
        assert render(None, conv, saved) == named


def test_tokenize_records_with_the_tokenizers_template(tiny_tokenizer, tmp_path):
    tok = published_tokenizer(tiny_tokenizer, "qwen2.5")
    records = [{"id": f"r{i}", "messages": TURNS} for i in range(3)]
    write_jsonl(tmp_path / "d.jsonl", records)
    out = tokenize_records(records, tok, None, cutoff_len=512)
    assert len(out.examples) == 3 and not out.rejects
    ex = out.examples[0]
    assert trained_text(tok, ex["input_ids"], ex["labels"]) == PUBLISHED["qwen2.5"][3]


# -- the real model's own template ------------------------------------------------------------------
@pytest.mark.real
@pytest.mark.parametrize("with_system", [False, True])
def test_smollm2_template(smollm2, with_system):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    conv = [SYSTEM, *TURNS] if with_system else TURNS
    ids, labels = render(None, conv, tok)
    assert ids == template_ids(tok, conv)
    assert trained_text(tok, ids, labels) == "二<|im_end|>\n三<|im_end|>\n"
    text = tok.decode(ids)
    assert ("You are a helpful AI assistant named SmolLM" in text) is not with_system
    assert stop_token_ids(None, tok) == [tok.convert_tokens_to_ids("<|im_end|>")]
