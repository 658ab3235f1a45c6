"""Build a tokenizer and a small random causal LM locally, with no download.

Used by the quickstart and the tests: a byte-level BPE tokenizer trained on given text (digits
split one per token, as LLaMA and Qwen do) and a LLaMA-architecture model built ``from_config``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

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
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)
