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


def generate_batch(
    model: Any, tokenizer: Any, prompts: list[list[int]], options: GenerationOptions, stop_ids: list[int]
) -> list[str]:
    """Generate a reply for each prompt (token ids), left-padded into one batch; returns the
    decoded new text of each, special tokens removed."""
    import torch

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    longest = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, p in enumerate(prompts):
        input_ids[i, longest - len(p) :] = torch.tensor(p)
        attention_mask[i, longest - len(p) :] = 1
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            eos_token_id=stop_ids,
            pad_token_id=pad_id,
            **options.to_generate_kwargs(),
        )
    return tokenizer.batch_decode(out[:, longest:], skip_special_tokens=True)


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
