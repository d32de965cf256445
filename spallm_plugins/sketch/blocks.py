"""The decoder blocks of a model: which ``nn.ModuleList`` holds them, and the first block's inputs.

What every block-by-block pass needs before it can touch a block: the block list that holds every
target linear, and the first block's inputs per calibration batch (captured by stopping the model's
forward at the first block).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a hook once a forward has given what it was run for; caught by whoever ran it."""


def find_blocks(model: nn.Module, targets: dict[str, nn.Linear]) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` of decoder blocks that holds every target linear."""
    best: tuple[str, nn.ModuleList, int] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module):
            inside = sum(1 for t in targets if t.startswith(name + "."))
            if inside and (best is None or inside > best[2]):
                best = (name, module, inside)
    if best is None or best[2] != len(targets):
        outside = sorted(t for t in targets if best is None or not t.startswith(best[0] + "."))
        raise ValueError(
            f"calibrated sketching needs every target linear inside the decoder blocks; outside: {outside[:3]} "
            "(exclude them with modules_to_not_convert)"
        )
    return best[0], best[1]


def relative_name(name: str, prefix: str) -> str:
    """``name`` (a module's full name) relative to the module named ``prefix`` that holds it."""
    return name[len(prefix) + 1 :]


def block_output(out: Any) -> torch.Tensor:
    """The hidden states a decoder block returns (blocks return a tuple or the tensor itself)."""
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    blocks: nn.ModuleList,
    ids: torch.Tensor,
    batch_size: int,
    device: torch.device,
    into: Any = None,
) -> tuple[Sequence[torch.Tensor], list[dict[str, Any]]]:
    """Inputs (hidden states and keyword arguments) of the first block, per calibration batch.

    The hidden states are appended to ``into`` (a :class:`~.progress.SpilledActivations`: files, one
    batch in memory at a time) when given.
    """
    hidden: Any = [] if into is None else into
    kwargs_list: list[dict[str, Any]] = []

    def hook(module, args, kwargs):
        hidden.append(args[0] if args else kwargs.pop("hidden_states"))
        kwargs_list.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in ids.split(batch_size):
            try:
                model(batch.to(device), use_cache=False)
            except StopForward:
                pass
    finally:
        handle.remove()
    return hidden, kwargs_list
