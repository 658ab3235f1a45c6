"""Build a tokenizer and a small random causal LM locally, with no download.

Used by the quickstart and the tests: a byte-level BPE tokenizer trained on given text (digits
split one per token, as LLaMA and Qwen do) and a small random causal LM of any supported family
(llama, qwen2, qwen3, mistral, gemma, bloom, gpt_neox, glm4) built ``from_config``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from zhtune.errors import ZhtuneError

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
CHAT_SPECIALS = ("<|im_start|>", "<|im_end|>")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2000) -> Any:
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it as a transformers fast tokenizer.

    Each Han character is its own pre-token (character-level Chinese, as in BERT-Chinese), so
    a small vocabulary never fuses whole words or numbers into one opaque token. Byte-level means
    any input (any script, emoji) encodes without unknown tokens. ``<s>``,
    ``</s>``, ``<pad>`` and the ChatML markers are special tokens, so every built-in template
    works without resizing the model.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.Split(Regex(r"\p{Han}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, *CHAT_SPECIALS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=list(CHAT_SPECIALS),
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )


# zhtune's size names -> each family's config keyword. A size a family leaves out is fixed by
# its architecture (BLOOM's MLP is 4 x hidden and it has ALiBi, not learned or rotary positions;
# GPT-NeoX has no grouped-query attention; Qwen2 derives head_dim from hidden / heads).
_DECODER = {
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "intermediate_size": "intermediate_size",
    "max_positions": "max_position_embeddings",
}
_NO_HEAD_DIM = {k: v for k, v in _DECODER.items() if k != "head_dim"}

TINY_CONFIG_KEYS: dict[str, dict[str, str]] = {
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _NO_HEAD_DIM,
    "qwen3": _DECODER,  # head_dim defaults to 128 whatever the width: set it
    "gemma": _DECODER,  # head_dim defaults to 256
    "glm4": _DECODER,  # head_dim defaults to 128, num_key_value_heads to 2
    "gpt_neox": {k: v for k, v in _NO_HEAD_DIM.items() if k != "num_kv_heads"},
    "bloom": {"hidden_size": "hidden_size", "num_layers": "n_layer", "num_heads": "n_head"},
}
"""Config keywords of each ``model_type`` that :func:`build_tiny_model` builds: adding a family
is adding a row."""


def build_tiny_model(
    model_type: str,
    tokenizer: Any,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    max_positions: int = 512,
    seed: int = 0,
) -> Any:
    """A randomly initialised causal LM of family ``model_type`` sized for a CPU.

    The vocabulary is the tokenizer's (``len(tokenizer)``), its bos/eos/pad ids are the model's,
    embeddings are tied, attention is multi-head (``head_dim = hidden_size / num_heads``). The
    defaults give about 0.1M parameters with an 800-token vocabulary.

    Saved next to a ``qwen2`` config, any tokenizer reloads as ``Qwen2Tokenizer``, which adds
    ``<|endoftext|>`` as its unk token when it has none: one token more than this model's
    vocabulary, so training resizes the embeddings and a LoRA adapter then carries them.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    keys = TINY_CONFIG_KEYS.get(model_type)
    if keys is None:
        raise ZhtuneError(f"no tiny model for '{model_type}'; known: {', '.join(TINY_CONFIG_KEYS)}")
    if hidden_size % num_heads:
        raise ZhtuneError(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
    sizes = {
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "num_kv_heads": num_heads,
        "head_dim": hidden_size // num_heads,
        "intermediate_size": intermediate_size,
        "max_positions": max_positions,
    }
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{name: sizes[size] for size, name in keys.items()},
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def build_tiny_llama(
    tokenizer: Any,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 344,
    max_positions: int = 512,
    seed: int = 0,
) -> Any:
    """A randomly initialised ``LlamaForCausalLM`` sized for a CPU (tied embeddings).

    The defaults give about 0.6M parameters with a 2k vocabulary; the issue's reference model is
    ``hidden_size=256, intermediate_size=688, num_layers=4``.
    """
    return build_tiny_model(
        "llama", tokenizer, hidden_size, num_layers, num_heads, intermediate_size, max_positions, seed
    )
