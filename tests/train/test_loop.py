"""The training loop's optimizer step (``zhtune.train.loop``)."""

from __future__ import annotations

import pytest
import torch

from tests.train.test_sft import make_cfg
from zhtune.train.loop import batch_stream, optimizer_step
from zhtune.train.setup import setup


def test_clipping_sees_every_gradient_of_the_model(tiny_model_dir, train_file, tmp_path):
    """The step clips the optimizer's parameters, not ``model.parameters()``: the same gradients
    (LoRA's; the frozen weights have none), so the same norm, as the whole model's."""
    s = setup(make_cfg(tiny_model_dir, train_file, tmp_path / "run", method="lora", max_steps=1, batch_size=4))
    seen: dict[str, object] = {}
    clip = s.accelerator.clip_grad_norm_

    def spy(parameters, max_norm):
        parameters = list(parameters)
        every = [p.grad for p in s.model.parameters() if p.grad is not None]
        seen["counts"] = (sum(p.grad is not None for p in parameters), len(every))
        seen["norm"] = float(torch.linalg.vector_norm(torch.stack([g.float().norm() for g in every])))
        return clip(parameters, max_norm)

    s.accelerator.clip_grad_norm_ = spy
    _, _, _, grad_norm = optimizer_step(s, [next(batch_stream(s, 0, 0))[2]], 0)
    clipped, every = seen["counts"]
    assert clipped == every > 0
    assert float(grad_norm) == pytest.approx(seen["norm"], rel=1e-5)
