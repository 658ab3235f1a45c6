"""Exact-match accuracy of greedy answers, overall and per category.

Each record's last assistant turn is the reference; the conversation before it is the prompt.
The category is ``meta.category`` (``all`` if absent). Answers and references are compared after
stripping surrounding whitespace.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from zhtune.infer.generate import GenerationOptions, Prompter, generate_batch


def exact_match(
    model: Any,
    tokenizer: Any,
    template_name: str,
    records: list[dict[str, Any]],
    batch_size: int = 32,
    max_new_tokens: int = 32,
) -> dict[str, Any]:
    """Score ``records`` by greedy generation.

    Returns ``{"overall": float, "scores": {category: accuracy}, "counts": {category: n},
    "predictions": [{"id", "category", "prompt", "reference", "prediction", "correct"}]}``.
    """
    prompter = Prompter(tokenizer, template_name)
    options = GenerationOptions(max_new_tokens=max_new_tokens, temperature=0.0)
    predictions: list[dict[str, Any]] = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        prompts = [prompter.prompt_ids(r["messages"][:-1]) for r in chunk]
        answers = generate_batch(model, tokenizer, prompts, options, prompter.stop_ids)
        for rec, answer in zip(chunk, answers):
            reference = rec["messages"][-1]["content"]
            predictions.append(
                {
                    "id": rec.get("id"),
                    "category": rec.get("meta", {}).get("category", "all"),
                    "prompt": rec["messages"][-2]["content"],
                    "reference": reference,
                    "prediction": answer.strip(),
                    "correct": answer.strip() == reference.strip(),
                }
            )
    by_cat: dict[str, list[bool]] = defaultdict(list)
    for p in predictions:
        by_cat[p["category"]].append(p["correct"])
    return {
        "overall": sum(p["correct"] for p in predictions) / max(len(predictions), 1),
        "scores": {c: sum(v) / len(v) for c, v in sorted(by_cat.items())},
        "counts": {c: len(v) for c, v in sorted(by_cat.items())},
        "predictions": predictions,
    }
