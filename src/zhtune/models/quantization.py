"""bitsandbytes settings for a quantized base (QLoRA training, and loading a QLoRA run back)."""

from __future__ import annotations

from typing import Any


def quantization_config(bits: int, compute_dtype: str) -> Any:
    """bitsandbytes settings for a QLoRA base: NF4 with double quantization, or int8."""
    import torch
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(compute_dtype, torch.float32),
    )
