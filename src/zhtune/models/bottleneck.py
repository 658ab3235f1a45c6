"""Bottleneck adapters (the Alpaca-CoT study's SadapterH, SadapterP and P-adapter).

peft has no bottleneck adapters and the ``adapters`` package pins transformers 4, so zhtune
carries its own, small and architecture-agnostic. An adapter is ``up(act(down(h)))``: a
``hidden -> size -> hidden`` MLP whose ``up`` starts at zero, so a fresh adapter leaves the model's
outputs unchanged. Three placements (Houlsby et al. 2019; Pfeiffer et al. 2021; He et al. 2022):

``houlsby``   sequential, after the attention block and after the MLP block: ``h + s * f(h)``
``pfeiffer``  sequential, after the MLP block only
``parallel``  beside the MLP block, reading its input: ``mlp(x) + s * f(x)``

Adapters are child modules of the block they adapt (``...mlp.bottleneck.down.weight``) applied by
forward hooks, so the base model's parameter names, and so its checkpoints, stay unchanged.
Families whose blocks add the residual inside the block (BLOOM) get the adapter on that sum.
A run saves ``adapter/bottleneck_config.json`` and ``adapter/bottleneck.safetensors``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

CONFIG_FILE = "bottleneck_config.json"
WEIGHTS_FILE = "bottleneck.safetensors"
ATTENTION_NAMES = ("self_attn", "self_attention", "attention", "attn")
"""Child names of a decoder layer's attention block across transformers' families."""
MLP_NAMES = ("mlp",)

PLACEMENTS: dict[str, tuple[tuple[str, str], ...]] = {
    "houlsby": (("attention", "sequential"), ("mlp", "sequential")),
    "pfeiffer": (("mlp", "sequential"),),
    "parallel": (("mlp", "parallel"),),
}
"""Kind -> (block, how) pairs: which blocks of each layer get an adapter, and how."""


@dataclass(frozen=True)
class BottleneckConfig:
    """What a saved bottleneck adapter needs to be rebuilt."""

    kind: str
    size: int
    scale: float = 1.0
    activation: str = "tanh"


def _decoder_layers(model: Any) -> list[tuple[str, Any, Any]]:
    """``(name, attention block, mlp block)`` for every decoder layer of ``model``."""
    found = []
    for name, module in model.named_modules():
        children = dict(module.named_children())
        attn = next((children[n] for n in ATTENTION_NAMES if n in children), None)
        mlp = next((children[n] for n in MLP_NAMES if n in children), None)
        if attn is not None and mlp is not None:
            found.append((name, attn, mlp))
    if not found:
        raise ValueError(
            f"no decoder layers with an attention block ({'/'.join(ATTENTION_NAMES)}) and an 'mlp' found "
            f"in {type(model).__name__}; bottleneck adapters do not support this architecture"
        )
    return found


def _make_adapter(hidden: int, size: int, activation: str) -> Any:
    import torch
    from torch import nn

    acts = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}
    adapter = nn.Sequential()
    adapter.add_module("down", nn.Linear(hidden, size))
    adapter.add_module("act", acts[activation]())
    adapter.add_module("up", nn.Linear(size, hidden))
    with torch.no_grad():
        adapter.up.weight.zero_()
        adapter.up.bias.zero_()
    return adapter


def _sequential_hook(scale: float) -> Any:
    def hook(module: Any, args: tuple, output: Any) -> Any:
        if isinstance(output, tuple):
            h = output[0]
            return (h + scale * module.bottleneck(h), *output[1:])
        return output + scale * module.bottleneck(output)

    return hook


def _parallel_hook(scale: float) -> Any:
    def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
        x = args[0] if args else kwargs["hidden_states"]
        return output + scale * module.bottleneck(x)

    return hook


def add_bottleneck_adapters(model: Any, config: BottleneckConfig) -> Any:
    """Freeze ``model`` and add trainable bottleneck adapters in place; returns ``model``.

    The new modules take the dtype and device of the block they adapt.
    """
    if config.kind not in PLACEMENTS:
        raise ValueError(f"unknown bottleneck kind {config.kind!r}; choose from {', '.join(PLACEMENTS)}")
    model.requires_grad_(False)
    hidden = model.config.hidden_size
    for _, attn, mlp in _decoder_layers(model):
        blocks = {"attention": attn, "mlp": mlp}
        for block_name, how in PLACEMENTS[config.kind]:
            block = blocks[block_name]
            ref = next(block.parameters())
            block.add_module(
                "bottleneck", _make_adapter(hidden, config.size, config.activation).to(ref.device, ref.dtype)
            )
            if how == "sequential":
                block.register_forward_hook(_sequential_hook(config.scale))
            else:
                block.register_forward_hook(_parallel_hook(config.scale), with_kwargs=True)
    model.zhtune_bottleneck = config
    return model


def adapter_state_dict(model: Any, state_dict: dict[str, Any] | None = None) -> dict[str, Any]:
    """The adapter weights only (names contain ``.bottleneck.``), from ``model`` or from a
    gathered full ``state_dict`` of it."""
    state = model.state_dict() if state_dict is None else state_dict
    return {k: v.detach().cpu().contiguous() for k, v in state.items() if ".bottleneck." in k}


def save_bottleneck(model: Any, directory: str | Path, state_dict: dict[str, Any] | None = None) -> None:
    """Write ``bottleneck_config.json`` and ``bottleneck.safetensors`` to ``directory``."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(asdict(model.zhtune_bottleneck), indent=2) + "\n")
    save_file(adapter_state_dict(model, state_dict), str(out / WEIGHTS_FILE))


def is_bottleneck_dir(directory: str | Path) -> bool:
    """True if ``directory`` holds a saved bottleneck adapter."""
    return (Path(directory) / CONFIG_FILE).is_file()


def load_bottleneck(model: Any, directory: str | Path, trainable: bool = False) -> Any:
    """Rebuild the adapters saved in ``directory`` on ``model`` and load their weights."""
    from safetensors.torch import load_file

    d = Path(directory)
    config = BottleneckConfig(**json.loads((d / CONFIG_FILE).read_text()))
    add_bottleneck_adapters(model, config)
    missing, unexpected = model.load_state_dict(load_file(str(d / WEIGHTS_FILE)), strict=False)
    missing = [k for k in missing if ".bottleneck." in k]
    if missing or unexpected:
        raise ValueError(
            f"{d / WEIGHTS_FILE} does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for name, p in model.named_parameters():
        p.requires_grad_(trainable and ".bottleneck." in name)
    return model
