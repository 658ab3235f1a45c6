"""Golden tests: every template renders a multi-turn conversation to the exact expected text,
labels exactly the assistant turns, and its Jinja chat_template reproduces the same text."""

from __future__ import annotations

import copy

import pytest
from transformers import AutoTokenizer

from tests.conftest import CONV
from zhtune.data.templates import (
    IGNORE_INDEX,
    TEMPLATES,
    get_template,
    prepare_tokenizer,
    render,
    render_text,
    stop_token_ids,
)
from zhtune.errors import ZhtuneError

GOLDEN = {
    "belle": (
        "你是助手。\n\nHuman: 一加一？\n\nAssistant: 二</s>Human: 再加一？\n\nAssistant: 三</s>",
        ["二</s>", "三</s>"],
    ),
    "alpaca": (
        "你是助手。\n\n### Instruction:\n一加一？\n\n### Response:\n二</s>\n\n### Instruction:\n再加一？\n\n### Response:\n三</s>\n\n",
        ["二</s>\n\n", "三</s>\n\n"],
    ),
    "chatml": (
        "<|im_start|>system\n你是助手。<|im_end|>\n<|im_start|>user\n一加一？<|im_end|>\n<|im_start|>assistant\n二<|im_end|>\n"
        "<|im_start|>user\n再加一？<|im_end|>\n<|im_start|>assistant\n三<|im_end|>\n",
        ["二<|im_end|>\n", "三<|im_end|>\n"],
    ),
    "qwen": (
        "<|im_start|>system\n你是助手。<|im_end|>\n<|im_start|>user\n一加一？<|im_end|>\n<|im_start|>assistant\n二<|im_end|>\n"
        "<|im_start|>user\n再加一？<|im_end|>\n<|im_start|>assistant\n三<|im_end|>\n",
        ["二<|im_end|>\n", "三<|im_end|>\n"],
    ),
    "llama3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n你是助手。<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n一加一？<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n二<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n再加一？<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n三<|eot_id|>",
        ["二<|eot_id|>", "三<|eot_id|>"],
    ),
    "llama2": (
        "<s>[INST] <<SYS>>\n你是助手。\n<</SYS>>\n\n一加一？ [/INST] 二 </s><s>[INST] 再加一？ [/INST] 三 </s>",
        [" 二 </s>", " 三 </s>"],
    ),
    "gemma": (
        "<s><start_of_turn>user\n你是助手。\n\n一加一？<end_of_turn>\n<start_of_turn>model\n二<end_of_turn>\n"
        "<start_of_turn>user\n再加一？<end_of_turn>\n<start_of_turn>model\n三<end_of_turn>\n",
        ["二<end_of_turn>\n", "三<end_of_turn>\n"],
    ),
    "default": (
        "你是助手。\nHuman: 一加一？\nAssistant: 二</s>\nHuman: 再加一？\nAssistant: 三</s>\n",
        ["二</s>\n", "三</s>\n"],
    ),
}


@pytest.fixture
def tok(tiny_tokenizer):
    return copy.deepcopy(tiny_tokenizer)


def labelled_spans(input_ids: list[int], labels: list[int], tokenizer) -> list[str]:
    """Decode each maximal run of labelled tokens."""
    spans, current = [], []
    for i, label in zip(input_ids, labels):
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            assert label == i
            current.append(i)
    if current:
        spans.append(current)
    return [tokenizer.decode(s) for s in spans]


def test_every_template_has_a_golden_case():
    assert set(GOLDEN) == set(TEMPLATES)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_render_text_and_loss_mask(name, tok):
    template = get_template(name)
    prepare_tokenizer(tok, template)
    text, responses = GOLDEN[name]
    assert render_text(template, CONV, tok) == text
    input_ids, labels = render(template, CONV, tok)
    assert len(input_ids) == len(labels)
    assert tok.decode(input_ids) == text
    assert labelled_spans(input_ids, labels, tok) == responses


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_saved_chat_template_reproduces_training_text(name, tok, tmp_path):
    template = get_template(name)
    prepare_tokenizer(tok, template)
    tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.apply_chat_template(CONV, tokenize=False) == GOLDEN[name][0]
    prompt = reloaded.apply_chat_template(CONV[:-1], tokenize=False, add_generation_prompt=True)
    assert prompt == render_text(template, CONV[:-1], tok, add_generation_prompt=True)
    assert GOLDEN[name][0].startswith(prompt)
    no_system = CONV[1:3]
    assert reloaded.apply_chat_template(no_system, tokenize=False) == render_text(template, no_system, tok)


def test_train_on_prompt_labels_everything(tok):
    template = get_template("chatml")
    input_ids, labels = render(template, CONV, tok, train_on_prompt=True)
    assert labels == input_ids


def test_default_system_is_used_when_conversation_has_none(tok):
    text = render_text(get_template("qwen"), CONV[1:3], tok)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")


def test_tokenizer_template_matches_the_named_one(tok):
    """template 'tokenizer' (the tokenizer's own chat_template) labels the same tokens."""
    template = get_template("chatml")
    prepare_tokenizer(tok, template)
    assert render(None, CONV, tok) == render(template, CONV, tok)


def test_braces_in_content_are_literal(tok):
    conv = [{"role": "user", "content": "{content} {eos}"}, {"role": "assistant", "content": "{x}"}]
    assert render_text(get_template("belle"), conv, tok) == "Human: {content} {eos}\n\nAssistant: {x}</s>"


def test_stop_tokens_include_template_stop_words(tok):
    template = get_template("chatml")
    prepare_tokenizer(tok, template)
    assert stop_token_ids(template, tok) == [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]


def test_missing_special_tokens_are_added(tok):
    n_before = len(tok)
    added = prepare_tokenizer(tok, get_template("llama3"))
    assert added == 4 and len(tok) == n_before + 4
    assert tok.convert_tokens_to_ids("<|eot_id|>") >= n_before


def test_unknown_template_suggests_close_names():
    with pytest.raises(ZhtuneError, match="Did you mean: chatml"):
        get_template("chatm")


def test_render_batch_equals_one_call_per_segment(tok, skill_records):
    """Batched rendering (one backend call for many conversations) gives exactly the ids and
    labels of tokenizing each segment through the tokenizer's own ``__call__``."""
    from zhtune.data.templates import render_batch, segments, special_texts

    convs = (
        [CONV]
        + [r["messages"] for r in skill_records[0][:20]]
        + [[{"role": "user", "content": "😀 ñ <|im_end|>"}]]
    )
    for name in ("chatml", "belle", "llama3"):
        template = get_template(name)
        prepare_tokenizer(tok, template)
        batched = render_batch(template, convs[:-1], tok) + render_batch(
            template, convs[-1:], tok, add_generation_prompt=True
        )
        for k, (messages, (ids, labels)) in enumerate(zip(convs, batched)):
            expect_ids, expect_labels = [], []
            for text, is_response in segments(template, messages, special_texts(tok), k == len(convs) - 1):
                piece = tok(text, add_special_tokens=False)["input_ids"]
                expect_ids += piece
                expect_labels += piece if is_response else [IGNORE_INDEX] * len(piece)
            assert (ids, labels) == (expect_ids, expect_labels)
