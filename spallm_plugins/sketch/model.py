"""Sketch layers and whole models in memory: the sketcher builds ``SketchedLinear`` layers."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..config import SketchConfig
from ..convert import resolve_targets, set_submodule
from ..layer import SketchedLinear
from .gptq import PreparedHessian
from .linear import sketch_linear
from .result import SketchResult


def sketch_layer(
    linear: nn.Linear,
    config: SketchConfig,
    hessian: torch.Tensor | PreparedHessian | None = None,
    name: str = "layer",
    max_memory: int | None = None,
) -> tuple[SketchedLinear, SketchResult]:
    """Sketch a dense ``nn.Linear`` (read, not modified) into a ``SketchedLinear``.

    Returns the layer and the sketch's result (losses, refit statistics, for reports); the layer
    holds the result's codes and tables themselves, not a copy. The bias keeps its dtype.
    ``max_memory`` bounds the sketching workspace (bytes, see :mod:`.memory`).
    """
    result = sketch_linear(linear.weight, config, hessian=hessian, name=name, max_memory=max_memory)
    bias = None if linear.bias is None else linear.bias.detach().clone()
    return SketchedLinear.from_result(result, config, bias=bias), result


def sketch_model(
    model: nn.Module,
    config: SketchConfig,
    hessians: Callable[[str], torch.Tensor | None] | None = None,
    progress: bool = False,
    max_memory: int | None = None,
) -> dict[str, float]:
    """Sketch every target linear in place (data-free unless ``hessians(name)`` gives one).

    Returns the per-layer sketch loss. Each dense weight is freed as soon as its layer is replaced.
    """
    from tqdm.auto import tqdm

    targets = resolve_targets(model, config)
    losses: dict[str, float] = {}
    for name in tqdm(list(targets), desc="sketching", unit="layer", disable=not progress):
        linear = targets.pop(name)  # nothing else may keep the replaced dense layer alive
        hessian = hessians(name) if hessians else None
        layer, result = sketch_layer(linear, config, hessian=hessian, name=name, max_memory=max_memory)
        set_submodule(model, name, layer)
        losses[name] = result.loss
        del linear, hessian, layer
    return losses
