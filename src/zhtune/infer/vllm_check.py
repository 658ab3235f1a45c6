"""Whether vLLM can serve a run's adapter without merging (``--enable-lora``), checked by reading
``adapter_config.json`` against what vLLM's LoRA loader accepts.

vLLM is not run here (it needs a GPU and its own install), so this only reads the config; the
rules are those of vLLM's ``PEFTHelper`` and its ``--max-lora-rank`` choices: a plain LoRA
(rank-stabilised allowed), no DoRA, no ``modules_to_save``, no trained bias, a rank it offers,
and LoRA on the decoder's linear layers (vLLM packs q/k/v and gate/up itself). ``zhtune export``
prints the verdict and the command to run, and stores both in the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM's ``--max-lora-rank`` takes (16 by default)."""
VLLM_DEFAULT_MAX_RANK = 16
EMBEDDING_MODULES = ("embed_tokens", "lm_head", "wte", "word_embeddings", "embed_out")


@dataclass
class VllmVerdict:
    """What vLLM's LoRA serving makes of one adapter."""

    ready: bool
    problems: list[str] = field(default_factory=list)
    """Why vLLM would refuse it (empty when ready)."""
    flags: list[str] = field(default_factory=list)
    """Flags ``vllm serve`` needs beyond ``--enable-lora`` (e.g. ``--max-lora-rank 64``)."""

    def as_dict(self) -> dict[str, Any]:
        return {"lora_ready": self.ready, "problems": self.problems, "flags": self.flags}


def check_adapter(config: dict[str, Any]) -> VllmVerdict:
    """The verdict for an adapter's ``adapter_config.json`` (as a dict)."""
    problems: list[str] = []
    peft_type = str(config.get("peft_type", "?"))
    if peft_type != "LORA":
        problems.append(f"vLLM serves LoRA adapters only, not {peft_type}")
        return VllmVerdict(False, problems)
    if config.get("use_dora"):
        problems.append("vLLM does not serve DoRA adapters (use_dora)")
    if config.get("modules_to_save"):
        problems.append(
            f"vLLM does not load modules_to_save ({', '.join(config['modules_to_save'])}): train without "
            "them, or merge"
        )
    if config.get("bias", "none") != "none":
        problems.append(f"vLLM does not load trained biases (bias={config['bias']})")
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    embedding = [t for t in targets if t.split(".")[-1] in EMBEDDING_MODULES]
    if embedding:
        problems.append(f"vLLM applies LoRA to linear layers, not to {', '.join(embedding)}")
    rank = int(config.get("r", 0))
    flags: list[str] = []
    if rank > max(VLLM_RANKS):
        problems.append(f"rank {rank} is above vLLM's largest --max-lora-rank ({max(VLLM_RANKS)})")
    elif rank > VLLM_DEFAULT_MAX_RANK:
        flags.append(f"--max-lora-rank {next(r for r in VLLM_RANKS if r >= rank)}")
    return VllmVerdict(not problems, problems, flags)


def vllm_commands(
    merged_dir: str, base: str, adapter_dir: str, name: str, verdict: VllmVerdict | None
) -> list[str]:
    """The ``vllm serve`` commands for an export: the merged directory, and (when the adapter
    passes) the base with the adapter served unmerged."""
    lines = [f"vllm serve {merged_dir}"]
    if verdict is not None and verdict.ready:
        extra = "".join(" " + f for f in verdict.flags)
        lines.append(f"vllm serve {base} --enable-lora --lora-modules {name}={adapter_dir}{extra}")
    return lines
