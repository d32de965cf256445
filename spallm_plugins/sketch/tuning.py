"""Block-wise table tuning (``tune_steps``): a sketched block's tables fitted to the dense block's outputs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..layer import SketchedLinear
from .blocks import block_output


def _block_loss(block, hidden, kwargs_list, targets) -> float:
    total = 0.0
    for h, kw, target in zip(hidden, kwargs_list, targets):
        total += float((block_output(block(h, **kw)) - target).pow(2).sum())
    return total


def tune_block_tables(
    block: nn.Module,
    layers: dict[str, SketchedLinear],
    hidden: Sequence[torch.Tensor],
    kwargs_list: list[dict[str, Any]],
    targets: Sequence[torch.Tensor],
    steps: int,
    lr: float,
) -> dict[str, float]:
    """Tune the tables of a sketched block so that its outputs match the dense block's (``targets``) on
    the same inputs: Adam on the block's mean squared output error, one calibration batch per step.

    Each layer was sketched to its own output error; this fits the block as a whole (the layers'
    errors interact through the attention and the gated MLP), as AQLM's block fine-tuning does for
    its codebooks. Tables train in float32 and are stored back in their dtype; the block keeps the
    tuned tables only if its output error over all batches went down.
    """
    with torch.no_grad():
        before = _block_loss(block, hidden, kwargs_list, targets)
    stored = {name: layer.tables.detach().clone() for name, layer in layers.items()}
    for layer in layers.values():
        layer.tables = nn.Parameter(layer.tables.detach().float(), requires_grad=True)
    optimizer = torch.optim.Adam([layer.tables for layer in layers.values()], lr=lr)
    with torch.enable_grad():
        for step in range(steps):
            batch = step % len(hidden)
            output = block_output(block(hidden[batch], **kwargs_list[batch]))
            loss = torch.nn.functional.mse_loss(output, targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    del optimizer
    with torch.no_grad():
        for name, layer in layers.items():
            layer.tables = nn.Parameter(layer.tables.detach().to(stored[name].dtype), requires_grad=True)
        after = _block_loss(block, hidden, kwargs_list, targets)
        if not after < before:
            for name, layer in layers.items():
                layer.tables = nn.Parameter(stored[name], requires_grad=True)
    return {"loss_before": before, "loss_after": after, "kept": after < before}
