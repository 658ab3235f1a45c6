"""Model-family defaults as data: chat template and LoRA targets per ``config.model_type``.

Adding a family is adding a row, never an ``if`` branch elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zhtune.errors import ZhtuneError


@dataclass(frozen=True)
class Family:
    """Defaults for one ``model_type``."""

    template: str
    """Template for ``template: auto`` when the tokenizer has no chat_template (base models)."""
    lora_default: tuple[str, ...]
    """Modules adapted by ``lora_target: [default]`` (the attention projections Alpaca-CoT used)."""
    template_if_token: dict[str, str] = field(default_factory=dict)
    """A token in the vocabulary that selects another template (LLaMA-3's ``<|eot_id|>``)."""
    packs: bool = True
    """Isolates packed samples given per-sample ``position_ids`` (tested); BLOOM's ALiBi takes no
    position ids, so packed samples would attend to each other."""
    plain_head: bool = True
    """Its logits are the output layer over the decoder's last hidden states, nothing after (no
    soft-capping or scaling), so training may compute the loss itself
    (:func:`zhtune.train.loss.fused_causal_lm_loss`, tested equal per family)."""


_QKV = ("q_proj", "k_proj", "v_proj", "o_proj")

FAMILIES: dict[str, Family] = {
    "llama": Family("llama2", _QKV, {"<|eot_id|>": "llama3"}),
    "mistral": Family("llama2", _QKV),
    "qwen2": Family("qwen", _QKV),
    "qwen3": Family("qwen", _QKV),
    "gemma": Family("gemma", _QKV),
    "gemma2": Family("gemma", _QKV, plain_head=False),  # final logit soft-capping
    # fused QKV; "dense" is the attention output only (the MLP's are dense_h_to_4h / dense_4h_to_h)
    "bloom": Family("belle", ("query_key_value", "dense"), packs=False),
    "gpt_neox": Family("default", ("query_key_value", "dense")),
    "glm4": Family("chatml", _QKV),
    "glm": Family("chatml", _QKV),  # transformers' GlmForCausalLM (glm-4-9b-chat-hf)
    # remote code: their forward is theirs, so their own loss is used
    "chatglm": Family("chatml", ("query_key_value", "dense"), plain_head=False),  # ChatGLM2/3, glm-4-9b-chat
    "baichuan": Family("belle", ("W_pack", "o_proj"), plain_head=False),
    "internlm2": Family("chatml", ("wqkv", "wo"), plain_head=False),
}


def resolve_template(
    requested: str, model_type: str, vocab: dict[str, int], chat_template: str | None
) -> tuple[str, str]:
    """``(template name, why)`` for a ``template:`` setting.

    An explicit name always wins. ``auto`` takes the tokenizer's own chat template whenever it
    has one (``tokenizer``: an instruct model is tuned in the format it was trained in, which
    LLaMA-Factory users know as avoiding template mismatch); a base model without one falls back
    to its family's template (:data:`FAMILIES`), else ``default``.
    """
    if requested != "auto":
        return requested, "set by template:"
    if chat_template:
        return "tokenizer", "auto: the tokenizer's own chat_template"
    fam = FAMILIES.get(model_type)
    if fam is None:
        return "default", f"auto: no chat_template and no family row for model type '{model_type}'"
    for token, name in fam.template_if_token.items():
        if token in vocab:
            return name, f"auto: no chat_template; family '{model_type}' with {token} in the vocabulary"
    return fam.template, f"auto: no chat_template; the '{model_type}' family's template"


def lora_targets(model_type: str, requested: list[str]) -> str | list[str]:
    """Resolve ``lora_target``: ``all`` -> every linear layer but the head; ``default`` -> the
    family's projections; anything else is a list of module names."""
    if requested == ["all"]:
        return "all-linear"
    if requested == ["default"]:
        fam = FAMILIES.get(model_type)
        return list(fam.lora_default) if fam else "all-linear"
    return requested


def can_pack(model_type: str) -> bool:
    """Whether packed samples can be kept apart in this family (position ids restart per sample)."""
    fam = FAMILIES.get(model_type)
    return fam is not None and fam.packs


def check_packing(model_type: str) -> None:
    """Raise a clear error if packed samples cannot be kept apart in this family."""
    if not can_pack(model_type):
        ok = ", ".join(k for k, f in FAMILIES.items() if f.packs)
        raise ZhtuneError(
            f"config key 'packing': not supported for model type '{model_type}' (packed samples would "
            f"attend to each other); supported: {ok}. Use group_by_length=true instead"
        )


def has_plain_head(model_type: str) -> bool:
    """Whether training may compute ``model_type``'s loss from its last hidden states
    (:attr:`Family.plain_head`; False for families not in :data:`FAMILIES`)."""
    fam = FAMILIES.get(model_type)
    return fam is not None and fam.plain_head
