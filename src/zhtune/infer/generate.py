"""Generation: one prompt builder shared with training, batched greedy/sampled decoding, streaming.

Prompts are built with the same template code that renders training data
(:func:`zhtune.data.templates.render`), so inference sees exactly the text layout the model
was tuned on.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from zhtune.data.templates import get_template, render, stop_token_ids
from zhtune.errors import ZhtuneError


@dataclass
class GenerationOptions:
    """Decoding settings (the defaults are those of ``zhtune chat``)."""

    max_new_tokens: int = 512
    """Most tokens to generate per reply."""
    temperature: float = 0.7
    """Sampling temperature; 0 means greedy decoding."""
    top_p: float = 0.9
    """Nucleus sampling: keep the smallest token set with this much probability."""
    top_k: int = 50
    """Sample among the k most likely tokens (0: no limit)."""
    repetition_penalty: float = 1.0
    """>1 discourages repeating tokens already in the context (1.0: off)."""
    no_repeat_ngram_size: int = 0
    """Never repeat an n-gram of this size (0: off)."""

    def to_generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``model.generate``."""
        kw = asdict(self)
        if self.temperature <= 0:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kw.update(do_sample=True)
        return kw


class Prompter:
    """Builds prompt token ids for a conversation under a template name."""

    def __init__(self, tokenizer: Any, template_name: str) -> None:
        self.tokenizer = tokenizer
        self.template = get_template(template_name)
        self.stop_ids = stop_token_ids(self.template, tokenizer)

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of ``messages`` followed by the assistant prefix (ready to generate)."""
        return render(self.template, messages, self.tokenizer, add_generation_prompt=True)[0]


@dataclass
class Reply:
    """One generated reply."""

    text: str
    """The decoded reply, special tokens removed."""
    token_ids: list[int]
    """The new tokens, up to (not including) the first stop token."""
    stopped: bool
    """True if a stop token ended the reply; False if it ran into ``max_new_tokens``."""


def placement(model: Any) -> str:
    """Where a loaded model runs and in what dtype, for start-up lines: ``"cuda:0, bf16"``."""
    import torch

    p = next(model.parameters())
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    return f"{p.device}, {names.get(p.dtype, str(p.dtype).removeprefix('torch.'))}"


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[Any, Any]:
    """``(input_ids, attention_mask)``, both ``(len(prompts), longest)`` long tensors, each
    prompt right-aligned (left padding, so every row's next token comes at the last position)."""
    import torch

    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, longest - len(p) :] = 1
    return ids, mask


def generate_replies(
    model: Any, tokenizer: Any, prompts: list[list[int]], options: GenerationOptions, stop_ids: list[int]
) -> list[Reply]:
    """Generate a reply for each prompt (token ids), left-padded into one batch (with the KV
    cache); each reply is cut at its first stop token."""
    import torch

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    input_ids, attention_mask = left_pad(prompts, pad_id)
    longest = input_ids.shape[1]
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            eos_token_id=stop_ids,
            pad_token_id=pad_id,
            **options.to_generate_kwargs(),
        )
    replies = []
    for row in out[:, longest:].tolist():
        end = next((i for i, t in enumerate(row) if t in stop_ids), None)
        ids = row if end is None else row[:end]
        replies.append(Reply(tokenizer.decode(ids, skip_special_tokens=True), ids, end is not None))
    return replies


def generate_batch(
    model: Any, tokenizer: Any, prompts: list[list[int]], options: GenerationOptions, stop_ids: list[int]
) -> list[str]:
    """Generate a reply for each prompt (token ids), left-padded into one batch; returns the
    decoded new text of each, special tokens removed."""
    return [r.text for r in generate_replies(model, tokenizer, prompts, options, stop_ids)]


def stream_generate(
    model: Any, tokenizer: Any, prompt: list[int], options: GenerationOptions, stop_ids: list[int]
) -> Iterator[str]:
    """Yield the reply to one prompt piece by piece as it is generated (generation runs in a
    background thread; text arrives at word/character boundaries)."""
    import threading

    import torch
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    kwargs = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        eos_token_id=stop_ids,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0],
        streamer=streamer,
        **options.to_generate_kwargs(),
    )
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with torch.no_grad():
                model.generate(**kwargs)
        except BaseException as err:  # surfaced in the caller's thread below
            errors.append(err)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if errors:
        raise errors[0]


@dataclass
class Sampling:
    """How one row of a :class:`BatchDecoder` picks its tokens."""

    max_new_tokens: int
    """Most tokens to generate (a stop token counts as one)."""
    temperature: float = 0.0
    """0 picks the most likely token (greedy); above 0 samples from the softened distribution."""
    top_p: float = 1.0
    """Sample only from the smallest set of tokens with this much probability."""
    top_k: int = 0
    """Sample only from the k most likely tokens (0: no limit)."""
    seed: int | None = None
    """Seed of the row's own random generator (None: a random seed)."""


#: peft prompt-learning types :class:`BatchDecoder` decodes, and how their virtual tokens enter:
#: as keys and values in every layer's cache, or as input embeddings before the prompt.
VIRTUAL_TOKENS = {"PREFIX_TUNING": "cache", "PROMPT_TUNING": "embeds", "P_TUNING": "embeds"}


def prompt_learning(model: Any) -> tuple[Any, str | None, int]:
    """``(model to call, kind, virtual tokens)``: for a peft prefix / prompt / P-tuning model its
    base model, ``"cache"`` or ``"embeds"`` (:data:`VIRTUAL_TOKENS`) and how many virtual tokens
    it puts before every prompt; for any other model ``(model, None, 0)``. peft's own forward
    adds the virtual tokens on every call, so a decoder with a KV cache calls the base model and
    adds them once, at prefill. Raises :class:`ZhtuneError` for other prompt-learning types."""
    config = getattr(model, "active_peft_config", None)
    if config is None or not config.is_prompt_learning:
        return model, None, 0
    kind = VIRTUAL_TOKENS.get(config.peft_type.value)
    if kind is None:
        raise ZhtuneError(
            f"cannot decode {config.peft_type.value} adapters in batches (known: {', '.join(VIRTUAL_TOKENS)})"
        )
    return model.get_base_model(), kind, config.num_virtual_tokens


class RowSampler:
    """How each row of a batch picks its next token from its logits: greedy rows the argmax,
    sampling rows a draw from their temperature / top-k / top-p distribution with their own
    seeded generator (so a row's tokens do not depend on what it is batched with). Shared by
    every decoder (:class:`BatchDecoder`, :class:`~zhtune.infer.llamacpp.LlamaCppDecoder`)."""

    def __init__(self, samplings: list[Sampling], device: Any) -> None:
        import torch

        self._temperature = torch.tensor([s.temperature for s in samplings], device=device)
        self._top_p = torch.tensor([s.top_p for s in samplings], device=device)
        self._top_k = torch.tensor([s.top_k for s in samplings], device=device)
        self._generators = [_generator(s.seed, device) if s.temperature > 0 else None for s in samplings]

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (positions in the current batch), in that order."""
        import torch

        index = torch.tensor(rows, dtype=torch.long, device=self._temperature.device)
        self._temperature, self._top_p, self._top_k = (
            self._temperature[index], self._top_p[index], self._top_k[index]
        )  # fmt: skip
        self._generators = [self._generators[i] for i in rows]

    def pick(self, logits: Any) -> Any:
        """The next token of every row: ``logits`` ``(rows, vocab)`` -> ``(rows,)`` long.

        No row's settings can make the draw fail (which would fail every row batched with it):
        the most likely token is always kept, whatever ``top_p`` (1e-300 is 0 in float32), and a
        row whose probabilities are not finite (overflowing logits) takes its argmax."""
        import torch

        tokens = logits.argmax(dim=-1)
        sampled = [i for i, g in enumerate(self._generators) if g is not None]
        if not sampled:
            return tokens
        probs = torch.softmax(logits.float() / self._temperature.clamp(min=1e-6)[:, None], dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the most likely tokens until their total reaches top_p, and at most top_k of
        # them (0: no limit); the first one always
        drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= self._top_p[:, None]
        rank = torch.arange(drop.shape[-1], device=drop.device)[None, :]
        drop |= (self._top_k[:, None] > 0) & (rank >= self._top_k[:, None])
        drop[:, 0] = False
        sorted_probs[drop] = 0
        usable = torch.isfinite(sorted_probs).all(dim=-1) & (sorted_probs.sum(dim=-1) > 0)
        for i in sampled:
            if not usable[i]:
                continue  # keeps the argmax
            pick = torch.multinomial(sorted_probs[i], 1, generator=self._generators[i])
            tokens[i] = order[i, pick[0]]
        return tokens


def finish_reason(
    token: int, stop_ids: set[int], generated: int, budget: int, full: bool = False
) -> str | None:
    """Why a decoder's row ends after picking ``token`` as its ``generated``-th: ``"stop"`` (a
    stop token), ``"length"`` (its ``budget`` spent, or no room left in the context: ``full``),
    else None (it goes on)."""
    if token in stop_ids:
        return "stop"
    return "length" if generated >= budget or full else None


def decoder_samplings(options: GenerationOptions, n: int, seed: int) -> list[Sampling]:
    """``n`` rows' :class:`Sampling` for ``options`` (row ``i`` seeded ``seed + i``), for a
    decoder; the settings only ``model.generate`` has are refused."""
    if options.repetition_penalty != 1.0 or options.no_repeat_ngram_size:
        raise ZhtuneError(
            "--repetition-penalty and --no-repeat-ngram-size need --engine native (model.generate)"
        )
    return [
        Sampling(
            options.max_new_tokens, max(options.temperature, 0.0), options.top_p, options.top_k, seed + i
        )
        for i in range(n)
    ]


def decode_replies(decoder: Any, tokenizer: Any, n: int) -> list[Reply]:
    """Run ``decoder`` (:class:`BatchDecoder`'s contract) over its ``n`` rows to the end; each
    reply is cut at its stop token, as :func:`generate_replies` cuts them."""
    tokens: list[list[int]] = [[] for _ in range(n)]
    stopped = [False] * n
    try:
        while decoder.running:
            for row, token, reason in decoder.step():
                if reason == "stop":
                    stopped[row] = True
                else:
                    tokens[row].append(token)
    finally:
        decoder.close()
    return [Reply(tokenizer.decode(t, skip_special_tokens=True), t, s) for t, s in zip(tokens, stopped)]


class BatchDecoder:
    """Decode several prompts together, one token per row per step, with a KV cache.

    The prompts are left-padded into one batch and prefilled in one forward pass; each
    :meth:`step` then feeds every running row its last token and returns the token picked for
    each. Rows differ in everything but the model: each has its own token budget and sampling
    settings (greedy, or temperature/top-p with its own seeded generator, so a row's tokens do
    not depend on what it is batched with), and ends on a stop token or at its budget. Finished
    rows leave the batch (and the cache); the caller can end a row early with :meth:`finish`
    (a stop string, a client that went away)::

        decoder = BatchDecoder(model, prompts, samplings, stop_ids, pad_id)
        while decoder.running:
            for row, token, finish_reason in decoder.step():
                ...  # finish_reason: None, "stop" (token is a stop id) or "length"

    Position ids count only real tokens, as in ``model.generate``, so a padded row computes what
    it would compute alone.
    """

    def __init__(
        self,
        model: Any,
        prompts: list[list[int]],
        samplings: list[Sampling],
        stop_ids: list[int],
        pad_id: int,
    ) -> None:
        import torch

        self.model, kind, virtual = prompt_learning(model)
        self.samplings = samplings
        self.stop_ids = set(stop_ids)
        self.generated = [0] * len(prompts)
        self.running: list[int] = list(range(len(prompts)))
        """Rows still decoding, in batch order (rows are indices into ``prompts``)."""
        device = next(model.parameters()).device
        ids, mask = left_pad(prompts, pad_id)
        ids, mask = ids.to(device), mask.to(device)
        if kind is not None:  # the virtual tokens come first in every row, before its padding
            mask = torch.cat([mask.new_ones(len(prompts), virtual), mask], dim=1)
        self._inputs, self._mask = ids, mask
        self._positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self._cache: Any = None
        self._embeds: Any = None
        """Prefill input embeddings (virtual tokens, then the prompts) for prompt and P-tuning."""
        with torch.no_grad():
            if kind == "cache":
                self._cache = model.get_prompt(len(prompts))
                self._positions = self._positions[:, virtual:]
            elif kind == "embeds":
                words = self.model.get_input_embeddings()(ids)
                self._embeds = torch.cat([model.get_prompt(len(prompts)).to(words.dtype), words], dim=1)
        self._sampler = RowSampler(samplings, device)

    def step(self) -> list[tuple[int, int, str | None]]:
        """One forward pass: ``(row, token, finish_reason)`` for every running row."""
        import torch

        inputs = {"input_ids": self._inputs} if self._embeds is None else {"inputs_embeds": self._embeds}
        self._embeds = None
        with torch.no_grad():
            out = self.model(
                **inputs,
                attention_mask=self._mask,
                position_ids=self._positions,
                past_key_values=self._cache,
                use_cache=True,
                logits_to_keep=1,
            )
        self._cache = out.past_key_values
        tokens = self._sampler.pick(out.logits[:, -1, :].float())
        self._inputs = tokens[:, None]
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(self.running), 1)], dim=1)
        self._positions = self._positions[:, -1:] + 1
        results = []
        for row, token in zip(self.running, tokens.tolist()):
            self.generated[row] += 1
            reason = finish_reason(
                token, self.stop_ids, self.generated[row], self.samplings[row].max_new_tokens
            )
            results.append((row, token, reason))
        self.finish([row for row, _, reason in results if reason])
        return results

    def finish(self, rows: list[int]) -> None:
        """Drop ``rows`` from the batch (unknown or finished rows are ignored)."""
        import torch

        gone = set(rows)
        keep = [i for i, row in enumerate(self.running) if row not in gone]
        if len(keep) == len(self.running):
            return
        self.running = [self.running[i] for i in keep]
        index = torch.tensor(keep, dtype=torch.long, device=self._inputs.device)
        self._inputs, self._mask = self._inputs[index], self._mask[index]
        if self._embeds is not None:
            self._embeds = self._embeds[index]
        self._positions = self._positions[index]
        self._sampler.keep(keep)
        if self._cache is not None and keep:
            self._cache.batch_select_indices(index)

    def close(self) -> None:
        """Nothing to free (the KV cache goes with the object); a backend's decoder may hold more."""


def _generator(seed: int | None, device: Any) -> Any:
    import random

    import torch

    return torch.Generator(device=device).manual_seed(random.getrandbits(63) if seed is None else seed)
