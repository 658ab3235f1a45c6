"""``zhtune serve`` as its users meet it: a real server process, talked to with the official
``openai`` client (and raw ``httpx`` where a client would refuse to send the request)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import openai
import pytest
import torch

from tests.serving import zhtune_serve
from zhtune.errors import ZhtuneError
from zhtune.infer.engine import find_stop, unsure_tail
from zhtune.infer.generate import (
    BatchDecoder,
    GenerationOptions,
    Prompter,
    Sampling,
    generate_batch,
    generate_replies,
)
from zhtune.models.loading import load_for_inference
from zhtune.models.tiny import TINY_CONFIG_KEYS, build_tiny_model

KEY = "sk-zhtune-test"
NAME = "tiny-chat"
QUESTIONS = [
    "把 345 写成中文数字。",
    "What number is 三百九十九?",
    "Reverse the string: 春夏秋冬",
    "一",
    "Write 17 in Chinese numerals.",
    "Reverse the string: 河云马林山",
    "把 1002 写成中文数字。",
    "What number is 九十?",
]


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny random model with its weight matrices scaled up 8x. Its logits are sharper, so
    greedy replies differ from prompt to prompt (some end on eos, some run to max_tokens); the
    unscaled model answers every prompt with the same token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("serve") / NAME
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def server(run_dir, tmp_path_factory):
    """``zhtune serve RUN`` on a free port, as a user starts it; yields its base URL."""
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    with zhtune_serve(run_dir, log, "--api-key", KEY, "--batch-wait-ms", "50", timeout=60) as url:
        yield url


@pytest.fixture(scope="module")
def local(run_dir):
    """The same run loaded in this process, for reference outputs from ``generate_batch``."""
    model, tokenizer, template = load_for_inference(run_dir)
    return model, tokenizer, Prompter(tokenizer, template)


def reference(local, question: str, max_tokens: int) -> str:
    """What ``zhtune.infer.generate`` replies to ``question`` alone (greedy)."""
    model, tokenizer, prompter = local
    prompt = prompter.prompt_ids([{"role": "user", "content": question}])
    return generate_batch(
        model,
        tokenizer,
        [prompt],
        GenerationOptions(max_new_tokens=max_tokens, temperature=0),
        prompter.stop_ids,
    )[0]


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


def chat(client, question: str, **kw):
    return client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": question}], **kw)


def stream_text(client, question: str, **kw) -> tuple[str, list]:
    chunks = list(chat(client, question, stream=True, **kw))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def test_models_and_a_greedy_chat_reply(client, local):
    assert [m.id for m in client.models.list()] == [NAME]
    reply = chat(client, QUESTIONS[0], temperature=0, max_tokens=12)
    assert reply.model == NAME and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == reference(local, QUESTIONS[0], 12)
    assert reply.usage.completion_tokens <= 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_32_concurrent_requests_are_batched_and_batching_changes_nothing(server, local):
    """Streamed and whole replies to 32 different concurrent prompts are decoded together in a
    few left-padded batches, and each equals the reply to its prompt alone."""
    questions = [f"{q} ({i})" for i, q in enumerate(QUESTIONS * 4)]
    before = httpx.get(f"{server}/health").json()["batching"]

    async def ask(aclient, question: str, stream: bool) -> str:
        kw = dict(
            model="default", messages=[{"role": "user", "content": question}], temperature=0, max_tokens=10
        )
        if not stream:
            return (await aclient.chat.completions.create(**kw)).choices[0].message.content
        pieces = [
            c.choices[0].delta.content or ""
            async for c in await aclient.chat.completions.create(**kw, stream=True)
        ]
        return "".join(pieces)

    async def ask_all() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0) as aclient:
            return await asyncio.gather(
                *(ask(aclient, q, stream=i % 2 == 1) for i, q in enumerate(questions))
            )

    replies = asyncio.run(ask_all())
    assert replies == [reference(local, q, 10) for q in questions]
    assert len(set(replies)) > 8  # the model does not say the same thing to everyone
    after = httpx.get(f"{server}/health").json()["batching"]
    assert after["requests"] - before["requests"] == 32
    assert after["batches"] - before["batches"] < 32
    assert after["max_batch_size_seen"] > 1


def test_streaming_gives_the_same_text_as_a_whole_reply(client):
    whole = chat(client, QUESTIONS[2], temperature=0, max_tokens=12)
    text, chunks = stream_text(client, QUESTIONS[2], temperature=0, max_tokens=12)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    # sampling with a seed is reproducible, streamed or not
    sampled = chat(client, QUESTIONS[2], temperature=1.0, top_p=0.9, seed=11, max_tokens=12)
    assert stream_text(client, QUESTIONS[2], temperature=1.0, top_p=0.9, seed=11, max_tokens=12)[0] == (
        sampled.choices[0].message.content
    )


def test_n_choices_and_usage(client):
    reply = chat(client, QUESTIONS[1], n=2, temperature=1.0, seed=3, max_tokens=8)
    assert [c.index for c in reply.choices] == [0, 1]
    texts = [c.message.content for c in reply.choices]
    assert texts[0] != texts[1]  # each choice draws its own tokens
    assert [
        c.message.content
        for c in chat(client, QUESTIONS[1], n=2, temperature=1.0, seed=3, max_tokens=8).choices
    ] == texts
    assert 2 <= reply.usage.completion_tokens <= 16


def test_max_tokens_ends_with_length_and_stop_strings_cut_the_reply(client, local):
    long_question = next(q for q in QUESTIONS if len(reference(local, q, 16)) >= 8)
    short = chat(client, long_question, temperature=0, max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3

    full = reference(local, long_question, 16)
    at = next(i for i in range(2, len(full) - 1) if "\ufffd" not in full[i : i + 2])
    stop = full[at : at + 2]
    cut = chat(client, long_question, temperature=0, max_tokens=16, stop=[stop, "never-seen"])
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert (
        stream_text(client, long_question, temperature=0, max_tokens=16, stop=stop)[0]
        == full[: full.index(stop)]
    )


def test_completions_take_a_raw_prompt(client, local):
    model, tokenizer, prompter = local
    prompt = "Reverse the string: 春夏秋冬\n"
    reply = client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=8)
    ids = tokenizer(prompt)["input_ids"]
    opts = GenerationOptions(max_new_tokens=8, temperature=0)
    assert reply.choices[0].text == generate_batch(model, tokenizer, [ids], opts, prompter.stop_ids)[0]
    assert reply.usage.prompt_tokens == len(ids)
    streamed = client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=8, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == reply.choices[0].text


def test_errors_are_openai_shaped_and_the_server_survives_them(server, client):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, "hi", max_tokens=100_000)
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, "hi", temperature=3)
    assert err.value.param == "temperature"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=NAME, messages=[{"role": "assistant", "content": "hi"}])

    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(f"{server}/v1/chat/completions", content=b'{"model": "tiny', headers=headers)
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(f"{server}/v1/completions", json={"model": NAME, "prompt": [10**6]}, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert httpx.get(f"{server}/v1/nowhere", headers=headers).status_code == 404
    assert httpx.get(f"{server}/health").json()["status"] == "ok"
    assert chat(client, "hi", temperature=0, max_tokens=2).choices[0].message.content is not None


@pytest.mark.parametrize(
    ("text", "stops", "tail", "stop_at"),
    [
        ("abc", [], 0, None),
        ("ab\ufffd\ufffd", [], 2, None),  # an incomplete UTF-8 character
        ("hello wor", ["world"], 3, None),  # may become a stop string
        ("hello world!", ["world"], 0, 6),
        ("xa", ["ab", "zz"], 1, None),
    ],
)
def test_streamed_text_holds_back_what_may_change(text, stops, tail, stop_at):
    assert unsure_tail(text, stops) == tail
    assert find_stop(text, stops) == stop_at


def decode_all(decoder: BatchDecoder, rows: int) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in range(rows)]
    while decoder.running:
        for row, token, _ in decoder.step():
            out[row].append(token)
    return out


@pytest.mark.parametrize("family", list(TINY_CONFIG_KEYS))
def test_batch_decoder_equals_generate_on_every_family(family, tiny_tokenizer):
    """The server's decode loop (left padding, own position ids, KV cache, rows leaving the batch
    early) gives each row what ``model.generate`` gives its prompt alone."""
    model = build_tiny_model(family, tiny_tokenizer).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    prompter = Prompter(tiny_tokenizer, "chatml")
    prompts = [prompter.prompt_ids([{"role": "user", "content": q}]) for q in QUESTIONS[:4]]
    budgets = [8, 3, 8, 5]
    expected = []
    for prompt, budget in zip(prompts, budgets):
        opts = GenerationOptions(max_new_tokens=budget, temperature=0)
        reply = generate_replies(model, tiny_tokenizer, [prompt], opts, prompter.stop_ids)[0]
        expected.append(reply.token_ids + prompter.stop_ids[:1] * reply.stopped)
    decoder = BatchDecoder(model, prompts, [Sampling(b) for b in budgets], prompter.stop_ids, 0)
    assert decode_all(decoder, 4) == expected
    # a seeded sampled row draws the same tokens alone or in a batch
    sampled = Sampling(8, temperature=1.0, top_p=0.8, seed=5)
    alone = decode_all(BatchDecoder(model, prompts[:1], [sampled], prompter.stop_ids, 0), 1)[0]
    batched = BatchDecoder(
        model, prompts, [sampled, Sampling(8), Sampling(8, 0.7, seed=1), sampled], prompter.stop_ids, 0
    )
    assert decode_all(batched, 4)[0] == alone


def _virtual_token_model(method: str, tiny_tokenizer):
    """A sharpened tiny llama with a peft prefix / prompt / P-tuning adapter whose 4 virtual
    tokens are large enough to change what it says."""
    import peft

    torch.manual_seed(0)
    model = build_tiny_model("llama", tiny_tokenizer).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    common = {"task_type": peft.TaskType.CAUSAL_LM, "num_virtual_tokens": 4}
    config = {
        "prefix": lambda: peft.PrefixTuningConfig(**common),
        "prompt": lambda: peft.PromptTuningConfig(**common),
        "ptuning": lambda: peft.PromptEncoderConfig(**common, encoder_hidden_size=model.config.hidden_size),
    }[method]()
    tuned = peft.get_peft_model(model, config).eval()
    with torch.no_grad():
        for p in tuned.prompt_encoder.parameters():
            p.mul_(20)
    return tuned


@pytest.mark.parametrize("method", ["prefix", "prompt", "ptuning"])
def test_batch_decoder_adds_virtual_tokens_as_peft_generate_does(method, tiny_tokenizer):
    """Prefix tuning (virtual keys and values in every layer) and prompt / P-tuning (virtual
    input embeddings): each padded row of the batch decodes what peft's own ``generate`` gives
    its prompt alone, and the adapter changes the replies."""
    model = _virtual_token_model(method, tiny_tokenizer)
    prompter = Prompter(tiny_tokenizer, "chatml")
    prompts = [prompter.prompt_ids([{"role": "user", "content": q}]) for q in QUESTIONS[:4]]
    opts = GenerationOptions(max_new_tokens=6, temperature=0)
    expected, plain = [], []
    for prompt in prompts:
        reply = generate_replies(model, tiny_tokenizer, [prompt], opts, prompter.stop_ids)[0]
        expected.append(reply.token_ids + prompter.stop_ids[:1] * reply.stopped)
        with model.disable_adapter():
            plain.append(
                generate_replies(model, tiny_tokenizer, [prompt], opts, prompter.stop_ids)[0].token_ids
            )
    assert [e[: len(p)] for e, p in zip(expected, plain)] != plain  # the virtual tokens matter
    decoder = BatchDecoder(model, prompts, [Sampling(6)] * 4, prompter.stop_ids, 0)
    decoder.finish([2])  # a row that leaves before the prefill
    got = decode_all(decoder, 4)
    assert got[:2] + got[3:] == expected[:2] + expected[3:] and got[2] == []


@pytest.fixture(scope="module")
def prefix_run(run_dir, train_file, tmp_path_factory) -> Path:
    """A prefix-tuning run (2 steps at a high learning rate) on the sharpened model."""
    from zhtune.config import build_config
    from zhtune.train.config import TrainConfig
    from zhtune.train.sft import train

    values = dict(model=str(run_dir), data=[str(train_file)], template="chatml", cutoff_len=64, method="prefix",
                  num_virtual_tokens=4, max_steps=2, lr=0.5, output_dir=str(tmp_path_factory.mktemp("prefix") / "run"))  # fmt: skip
    return train(build_config(TrainConfig, values), progress=False)


def test_serve_a_prefix_tuning_run(prefix_run, tmp_path):
    """A run whose adapter adds virtual tokens is served, batched, with the replies that
    ``zhtune predict``'s generate gives each question alone."""
    model, tokenizer, template = load_for_inference(prefix_run)
    prompter = Prompter(tokenizer, template)
    local = (model, tokenizer, prompter)
    with zhtune_serve(prefix_run, tmp_path / "server.log", "--batch-wait-ms", "200", timeout=60) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)

        async def ask_all() -> list[str]:
            replies = await asyncio.gather(
                *[
                    client.chat.completions.create(
                        model=prefix_run.name,
                        messages=[{"role": "user", "content": q}],
                        max_tokens=8,
                        temperature=0,
                    )
                    for q in QUESTIONS[:4]
                ]
            )
            return [r.choices[0].message.content for r in replies]

        got = asyncio.run(ask_all())
    assert got == [reference(local, q, 8) for q in QUESTIONS[:4]]


@pytest.mark.parametrize("poison", [{"top_p": 1e-300}, {"top_p": 5e-45, "temperature": 2}, {"temperature": 1e-300}])
def test_a_request_with_extreme_sampling_fails_nobody(server, local, poison):
    """Settings that underflow in float32 (top_p 1e-300 is 0) used to leave nothing to sample and
    fail the whole batch: now the most likely token is always kept, so the poison request gets an
    answer and the innocent requests batched with it get exactly their greedy replies."""
    questions = [f"{q} (p)" for q in QUESTIONS[:4]]

    async def ask(aclient, question: str, extra: dict) -> str:
        kw = dict(model="default", messages=[{"role": "user", "content": question}], max_tokens=8)
        return (await aclient.chat.completions.create(**kw, **extra)).choices[0].message.content

    async def ask_all() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0) as aclient:
            poisoned = ask(aclient, questions[0], {"temperature": 1, **poison})
            innocent = [ask(aclient, q, {"temperature": 0}) for q in questions[1:]]
            return await asyncio.gather(poisoned, *innocent)

    replies = asyncio.run(ask_all())
    assert replies[1:] == [reference(local, q, 8) for q in questions[1:]]
    assert isinstance(replies[0], str)


def test_sampling_with_vanishing_top_p_is_greedy(tiny_tokenizer):
    model = build_tiny_model("llama", tiny_tokenizer).eval()
    prompter = Prompter(tiny_tokenizer, "chatml")
    prompts = [prompter.prompt_ids([{"role": "user", "content": q}]) for q in QUESTIONS[:2]]
    greedy = decode_all(BatchDecoder(model, prompts, [Sampling(6)] * 2, prompter.stop_ids, 0), 2)
    tiny = [Sampling(6, temperature=1.0, top_p=1e-300, seed=3), Sampling(6, temperature=1.0, top_p=1e-45, seed=4)]
    assert decode_all(BatchDecoder(model, prompts, tiny, prompter.stop_ids, 0), 2) == greedy


@pytest.fixture(scope="module")
def limited_app(run_dir):
    """The app in this process with small limits (starlette's TestClient drives it)."""
    from starlette.testclient import TestClient

    from zhtune.infer.engine import Engine
    from zhtune.infer.serve import Limits, create_app

    model, tokenizer, template = load_for_inference(run_dir)
    engine = Engine(model, tokenizer, template, batch_wait_ms=1).start()
    app = create_app(engine, NAME, limits=Limits(max_body_bytes=4096, max_messages=4, max_choices=3))
    with TestClient(app) as test_client:
        yield test_client


def test_request_limits_are_openai_shaped_4xx(limited_app):
    big = {"model": NAME, "messages": [{"role": "user", "content": "x" * 5000}]}
    r = limited_app.post("/v1/chat/completions", json=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert "--max-body-mb" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(10):
            yield b"x" * 1000

    r = limited_app.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    many = {"model": NAME, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}] * 3}
    r = limited_app.post("/v1/chat/completions", json=many)
    assert r.status_code == 400 and "--max-messages" in r.json()["error"]["message"]

    r = limited_app.post("/v1/completions", json={"model": NAME, "prompt": ["a", "b"], "n": 2, "max_tokens": 2})
    assert r.status_code == 400 and "prompts x n" in r.json()["error"]["message"]

    ok = limited_app.post(
        "/v1/chat/completions",
        json={"model": NAME, "messages": [{"role": "user", "content": QUESTIONS[0]}], "max_tokens": 4, "temperature": 0},
    )
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["role"] == "assistant"
    assert limited_app.get("/health").json()["status"] == "ok"


def test_exposure_rules(monkeypatch, run_dir, capsys):
    """A non-loopback bind needs a key (or --insecure-no-auth); an empty key variable is an error,
    never a silent 'no authentication'. Both are refused before any model is loaded."""
    from zhtune.cli import main
    from zhtune.infer.serve_config import ServeOptions

    monkeypatch.delenv("ZHTUNE_API_KEY", raising=False)
    assert ServeOptions().check() is None  # loopback, no key: allowed
    with pytest.raises(ZhtuneError, match="--host 0.0.0.0 without an API key"):
        ServeOptions(host="0.0.0.0").check()
    assert ServeOptions(host="0.0.0.0", api_key="k").check() == "k"
    assert ServeOptions(host="0.0.0.0", insecure_no_auth=True).check() is None
    monkeypatch.setenv("ZHTUNE_API_KEY", "  ")
    with pytest.raises(ZhtuneError, match="ZHTUNE_API_KEY is set but empty"):
        ServeOptions().check()
    monkeypatch.setenv("ZHTUNE_API_KEY", "from-env")
    assert ServeOptions(host="10.0.0.1").check() == "from-env"
    monkeypatch.delenv("ZHTUNE_API_KEY")
    assert main(["serve", str(run_dir), "--host", "0.0.0.0"]) == 1
    assert "--insecure-no-auth" in capsys.readouterr().err
    with pytest.raises(ZhtuneError, match="--max-messages must be at least 1"):
        ServeOptions(max_messages=0).check()


def test_a_failed_generation_is_a_500_with_an_error_id_not_internals(limited_app, monkeypatch, capfd):
    import zhtune.infer.engine as engine_module

    class Broken:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("secret detail /home/me/model")

    monkeypatch.setattr(engine_module, "BatchDecoder", Broken)
    body = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    r = limited_app.post("/v1/chat/completions", json=body)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    message = r.json()["error"]["message"]
    assert "generation failed (error id err-" in message and "secret" not in message
    error_id = message.split("error id ")[1].split(";")[0]
    assert f"[{error_id}] generation failed" in capfd.readouterr().err  # the details are in the log
    monkeypatch.undo()
    assert limited_app.post("/v1/chat/completions", json=body).status_code == 200  # and the server goes on


def test_a_whole_answer_stops_when_its_client_leaves(monkeypatch):
    """A non-streaming request watches its connection: once the client is gone its job is
    cancelled, and the scheduler drops its rows at the next step (as for a stream)."""
    import zhtune.infer.serve as serve_module
    from zhtune.infer.engine import Job

    monkeypatch.setattr(serve_module, "DISCONNECT_POLL_S", 0.01)

    class Client:
        polls = 0

        async def is_disconnected(self) -> bool:
            self.polls += 1
            return self.polls >= 3

    job = Job(deliver=lambda event: None, remaining=1)
    asyncio.run(asyncio.wait_for(serve_module._cancel_on_disconnect(Client(), job), timeout=5))
    assert job.cancelled


def test_foreign_hosts_and_non_json_bodies_are_refused(limited_app, run_dir):
    """DNS rebinding (a page whose own name points at 127.0.0.1) meets a 421; a cross-site form
    post (a body that is not declared JSON) a 415; both OpenAI-shaped."""
    from starlette.testclient import TestClient

    from zhtune.infer.engine import Engine
    from zhtune.infer.serve import create_app
    from zhtune.infer.serve_config import ServeOptions

    body = '{"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}'
    r = limited_app.post("/v1/chat/completions", content=body, headers={"content-type": "text/plain"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"

    assert ServeOptions().hosts() == ("127.0.0.1", "localhost", "[::1]")
    assert ServeOptions(host="0.0.0.0", insecure_no_auth=True).hosts() is None
    assert ServeOptions(host="0.0.0.0", allowed_hosts="api.example.com, 10.0.0.5").hosts() == ("api.example.com", "10.0.0.5")
    model, tokenizer, template = load_for_inference(run_dir)
    app = create_app(Engine(model, tokenizer, template).start(), NAME, hosts=ServeOptions().hosts())
    with TestClient(app, base_url="http://evil.example:8000") as foreign:
        r = foreign.get("/health")
        assert r.status_code == 421 and "evil.example" in r.json()["error"]["message"]
    with TestClient(app, base_url="http://localhost:8000") as local_client:
        assert local_client.get("/health").status_code == 200
