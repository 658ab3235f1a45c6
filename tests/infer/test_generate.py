"""Generation: prompts match the training layout; batching (left padding) changes nothing."""

from __future__ import annotations

import io

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from zhtune.data.templates import get_template, render
from zhtune.infer.chat import chat_loop
from zhtune.infer.generate import GenerationOptions, Prompter, generate_batch, stream_generate


@pytest.fixture(scope="module")
def model_and_tok(tiny_model_dir):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def test_prompt_is_the_training_text_up_to_the_reply(model_and_tok):
    _, tok = model_and_tok
    conv = [{"role": "user", "content": "把 12 写成中文数字。"}, {"role": "assistant", "content": "十二"}]
    ids, labels = render(get_template("chatml"), conv, tok)
    prompt = Prompter(tok, "chatml").prompt_ids(conv[:1])
    first_label = next(i for i, lab in enumerate(labels) if lab != -100)
    assert ids[:first_label] == prompt


def test_batched_greedy_equals_one_at_a_time(model_and_tok):
    model, tok = model_and_tok
    p = Prompter(tok, "chatml")
    prompts = [
        p.prompt_ids([{"role": "user", "content": q}])
        for q in ("一", "把 345 写成中文数字。", "Reverse the string: 春夏秋冬")
    ]
    opts = GenerationOptions(max_new_tokens=6, temperature=0.0)
    batched = generate_batch(model, tok, prompts, opts, p.stop_ids)
    single = [generate_batch(model, tok, [q], opts, p.stop_ids)[0] for q in prompts]
    assert batched == single


def test_streaming_yields_the_same_text_as_batch(model_and_tok):
    model, tok = model_and_tok
    p = Prompter(tok, "chatml")
    prompt = p.prompt_ids([{"role": "user", "content": "把 7 写成中文数字。"}])
    opts = GenerationOptions(max_new_tokens=8, temperature=0.0)
    assert (
        "".join(stream_generate(model, tok, prompt, opts, p.stop_ids))
        == generate_batch(model, tok, [prompt], opts, p.stop_ids)[0]
    )


def test_greedy_options_disable_sampling():
    kw = GenerationOptions(temperature=0).to_generate_kwargs()
    assert kw["do_sample"] is False and kw["temperature"] is None
    assert GenerationOptions().to_generate_kwargs()["do_sample"] is True


def test_chat_keeps_multi_turn_history_and_commands(model_and_tok):
    model, tok = model_and_tok
    stdin = io.StringIO("你好\n/system 你是助手。\n一\n二\n/exit\nnot read\n")
    stdout = io.StringIO()
    history = chat_loop(
        model, tok, "chatml", GenerationOptions(max_new_tokens=4, temperature=0.0), stdin=stdin, stdout=stdout
    )
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in history if m["role"] == "user"] == ["一", "二"]
    assert "system message set: '你是助手。'" in stdout.getvalue()


def test_tokenizer_template_prompt_equals_the_named_template(model_and_tok):
    """template 'tokenizer' builds prompts through the same render path as a named template."""
    import copy

    from zhtune.data.templates import prepare_tokenizer

    _, tok = model_and_tok
    tok = copy.deepcopy(tok)
    prepare_tokenizer(tok, get_template("chatml"))
    conv = [
        {"role": "user", "content": "一"},
        {"role": "assistant", "content": "二"},
        {"role": "user", "content": "三"},
    ]
    assert Prompter(tok, "tokenizer").prompt_ids(conv) == Prompter(tok, "chatml").prompt_ids(conv)


def test_row_sampler_top_k_keeps_the_k_most_likely_tokens():
    import torch

    from zhtune.infer.generate import RowSampler, Sampling

    logits = torch.tensor([[0.0, 3.0, 2.9, 2.8, -1.0]] * 3)
    rows = [Sampling(8, temperature=5.0, top_k=1, seed=0), Sampling(8, temperature=5.0, top_k=2, seed=1),
            Sampling(8)]  # fmt: skip
    sampler = RowSampler(rows, "cpu")
    picks = torch.stack([sampler.pick(logits) for _ in range(200)])
    assert set(picks[:, 0].tolist()) == {1}  # top_k 1: always the most likely, however hot
    assert set(picks[:, 1].tolist()) == {1, 2}  # top_k 2: the two most likely, both drawn
    assert set(picks[:, 2].tolist()) == {1}  # greedy
    sampler.keep([1])
    assert set(sampler.pick(logits[:1]).tolist()) <= {1, 2}
