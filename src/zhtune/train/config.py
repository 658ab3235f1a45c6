"""The training config: one YAML file per run, any key overridable as ``key=value``.

Each field's docstring is its ``--help`` text (see :mod:`zhtune.config`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

from zhtune.errors import ZhtuneError
from zhtune.train.lf_keys import translate
from zhtune.train.methods import check_method
from zhtune.train.tracking import check_trackers


@dataclass
class TrainConfig:
    """Supervised fine-tuning (SFT) of a causal LM from a local Hugging Face directory."""

    model: str
    """Local Hugging Face model directory, zhtune run directory, or .gguf file (dequantized once and cached) to start from."""
    data: list[str]
    """Training files (json, jsonl, csv, parquet, a datasets directory) in any supported format, or names of registered datasets (see `zhtune data list`)."""
    output_dir: str
    """Run directory to create: config.yaml, model/ or adapter/, tokenizer, logs, plots, checkpoints."""
    template: str = "auto"
    """Chat template: auto (the tokenizer's own chat_template if it has one, else the model family's), tokenizer, belle, alpaca, chatml, qwen, llama3, llama2, gemma, default."""
    format: str = "auto"
    """Input data format for every file: auto, alpaca, belle, sharegpt, openai (see `zhtune data convert`)."""
    registry: str = ""
    """Dataset registry YAML to look names in data up in first (then ./datasets.yaml, then zhtune's shipped one)."""
    stage: Literal["sft", "pt"] = "sft"
    """Training stage: sft (instruction tuning; loss on assistant turns) or pt (continued pre-training: texts concatenated and cut into cutoff_len blocks)."""
    method: str = "lora"
    """Tuning method: full, freeze, embeddings, lora, dora, rslora, pissa, adalora, ia3, prefix, prompt, ptuning, houlsby, pfeiffer, parallel, qlora (see README)."""
    init_adapter: str = ""
    """Continue tuning an existing adapter: a run directory or its adapter/ folder (same method)."""
    train_on_prompt: bool = False
    """Also compute the loss on system and user turns (default: assistant turns only)."""
    cutoff_len: int = 1024
    """Maximum tokens per sample (per packed sequence with packing); longer samples are truncated, counted and listed in truncated.jsonl."""
    packing: bool = False
    """SFT: pack several samples into each cutoff_len sequence, with no attention across samples (per-sample position ids)."""
    padding_free: bool = True
    """SFT without packing: run each micro-batch's samples as packed rows no longer than its longest sample (first-fit decreasing; each sample attends only to itself, its positions from 0), not padded to the longest: the same samples in each step and the same loss, without computing the padding (22% fewer token slots on the SmolLM2 benchmark); families that cannot pack, and virtual-token methods, are padded. false: pad every sample to the batch's longest."""
    group_by_length: bool = False
    """Batch samples of similar length together (less padding; order stays random across batches)."""
    max_samples: int = 0
    """Use at most this many records of each data entry, the first ones (0: all)."""
    val_size: float = 0.0
    """Held-out validation split: a fraction (< 1) or a number of records (>= 1); 0 for none."""
    val_data: list[str] = field(default_factory=list)
    """Separate validation files or registered dataset names (read like data; LLaMA-Factory's eval_dataset); instead of val_size."""
    epochs: float = 3.0
    """Passes over the training data (fractions allowed); ignored when max_steps > 0."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: use epochs)."""
    batch_size: int = 8
    """Samples per micro-batch (per device)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; the loss is normalised by the tokens of the whole step."""
    lr: float = 1.0e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norm weights)."""
    warmup_ratio: float = 0.0
    """Fraction of steps for linear warm-up."""
    warmup_steps: int = 0
    """Steps of linear warm-up; when > 0 it replaces warmup_ratio."""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate schedule after warm-up."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Compute precision: fp32, bf16 (autocast; works on CPU too), fp16 (GPU only)."""
    seed: int = 42
    """Random seed for data order, initialisation of new weights and dropout."""
    logging_steps: int = 10
    """Write a trainer_log.jsonl line every N optimizer steps."""
    eval_steps: int = 0
    """Evaluate validation loss every N steps (0: at the end of each epoch)."""
    save_steps: int = 0
    """Save a resumable checkpoint every N steps (0: none until the end)."""
    save_total_limit: int = 2
    """Keep at most this many checkpoints (oldest deleted first)."""
    resume: bool = False
    """Continue from the newest checkpoint in output_dir/checkpoints."""
    overwrite: bool = False
    """Allow writing into an output_dir that already holds a finished run."""
    lora_rank: int = 8
    """LoRA rank r."""
    lora_alpha: float = 16.0
    """LoRA scaling alpha (the update is scaled by alpha / r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch (0, LLaMA-Factory's default, is also ~1.5x faster on a CPU)."""
    lora_target: list[str] = field(default_factory=lambda: ["all"])
    """Modules to adapt (LoRA family and ia3): all (every linear layer but the head), default (the family's attention projections), or names."""
    modules_to_save: list[str] = field(default_factory=list)
    """LoRA family: modules trained in full and saved with the adapter, e.g. [embed_tokens, lm_head] to learn the rows of a resized vocabulary with stage pt (Chinese-LLaMA's recipe)."""
    freeze_layers: int = 2
    """freeze: train only the last N decoder layers (negative: the first N)."""
    adalora_init_rank: int = 12
    """adalora: starting rank of each adapted matrix; the budget shrinks to lora_rank on average."""
    num_virtual_tokens: int = 16
    """prefix, prompt, ptuning: number of virtual tokens."""
    adapter_size: int = 64
    """houlsby, pfeiffer, parallel: bottleneck width of each adapter."""
    adapter_scale: float = 1.0
    """houlsby, pfeiffer, parallel: scale applied to the adapter's output."""
    quantization_bits: Literal[4, 8] = 4
    """qlora: bits of the frozen base weights (bitsandbytes NF4 or int8)."""
    trust_remote_code: bool = False
    """Allow model code shipped inside the model directory to run (only for models you trust)."""
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = "auto"
    """Attention kernel: auto (transformers' default, SDPA), eager, sdpa, or flash_attention_2 (GPU, flash-attn installed; packed samples then run as variable-length sequences)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    ddp_timeout: int = 1800
    """Seconds a process waits for the others (collective operations) before a multi-process run fails."""
    num_workers: int = 0
    """DataLoader worker processes."""
    fused_loss: bool = True
    """Compute the loss from the last hidden states of the labelled positions, a chunk at a time, never the full logits (same loss, less time and memory); used (also under DDP) for families with a plain output layer and methods without virtual tokens, not with FSDP or DeepSpeed (sharded weights); false: the model's own loss."""
    fused_kernels: bool = True
    """Run LoRA layers, LLaMA-style RMSNorms and MLPs, and trained linear layers under autocast through zhtune's fused kernels (zhtune.train.fused: fewer passes over the activations and less kept for backward, same values); not with FSDP or DeepSpeed; false: the modules' own forward."""
    bf16_frozen: bool = True
    """precision bf16 with a method that freezes the base (LoRA, adapters...): keep the frozen weights in bf16 (no cast at every forward) and the trained ones in fp32."""
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers to log the trainer_log.jsonl scalars and this config to, through accelerate: tensorboard, wandb, mlflow, swanlab (each needs its package; see README), [] or none for none."""
    translated: list[str] = field(default_factory=list)
    """Written by zhtune: how LLaMA-Factory keys of the input were translated (shown at start); not a setting."""
    compile: bool | Literal["auto", "kernels", "blocks"] = "auto"
    """What torch.compile compiles. auto: on a CPU with a C++ compiler, the decoder blocks when the run is long enough to repay a first-time compilation (estimated from the model's size, tokens per step and steps), else the kernels; elsewhere (GPUs) nothing. kernels: the fused RMSNorm and, on a CPU in bf16, attention's backward (~2 s from Inductor's cache, ~22 s with an empty one, plus ~5 s per further 128-token length bucket that unpacked rows meet; a SmolLM2 LoRA step 13-20% faster on a CPU). blocks (or true): each decoder block too (another 2-9% a step, for ~5 s cached to ~20 s more compiling). false: nothing. Compiling on a CPU needs a C++ compiler."""

    @staticmethod
    def translate_keys(values: dict[str, Any], source: str) -> dict[str, Any]:
        """LLaMA-Factory's keys -> these (see :mod:`zhtune.train.lf_keys`)."""

        return translate(values, {f.name for f in fields(TrainConfig)}, source)

    def __post_init__(self) -> None:

        check_method(self)
        if not self.data:
            raise ZhtuneError("config key 'data': give at least one training file")
        for name in (
            "batch_size",
            "grad_accum",
            "cutoff_len",
            "logging_steps",
            "num_virtual_tokens",
            "adapter_size",
            "ddp_timeout",
        ):
            if getattr(self, name) < 1:
                raise ZhtuneError(f"config key '{name}': must be >= 1, got {getattr(self, name)}")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ZhtuneError("config keys 'epochs'/'max_steps': one of them must be > 0")
        if not 0 <= self.warmup_ratio < 1:
            raise ZhtuneError(f"config key 'warmup_ratio': must be in [0, 1), got {self.warmup_ratio}")

        self.report_to = [t for t in self.report_to if t != "none"]
        check_trackers(self.report_to)
        for name in ("max_samples", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ZhtuneError(f"config key '{name}': must be >= 0, got {getattr(self, name)}")
        if self.val_size < 0:
            raise ZhtuneError(f"config key 'val_size': must be >= 0, got {self.val_size}")
        if self.val_data and self.val_size:
            raise ZhtuneError(
                "config keys 'val_size' and 'val_data' (eval_dataset): choose one source of validation data"
            )
