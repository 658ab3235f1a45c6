"""The shared prefix of many prompts and its cache."""

from __future__ import annotations

import torch


def test_shared_prefix_length_leaves_each_prompt_a_token():
    from zhtune.infer.prefix import shared_prefix_length

    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2, 3, 4, 7]]) == 3
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2  # the shorter one keeps its last token
    assert shared_prefix_length([[9, 2], [1, 2]]) == 0
    assert shared_prefix_length([[5]]) == 0


def test_repeat_cache_leaves_the_original_as_it_is(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from zhtune.infer.prefix import prefix_cache, repeat_cache

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    cache = prefix_cache(model, list(range(5, 25)))
    assert cache is not None and cache.get_seq_length() == 20
    keys = cache.layers[0].keys.clone()
    copied = repeat_cache(cache, 3)
    assert copied.layers[0].keys.shape[0] == 3 and cache.layers[0].keys.shape[0] == 1
    for row in range(3):
        assert torch.equal(copied.layers[0].keys[row], keys[0])
    assert torch.equal(cache.layers[0].keys, keys)
