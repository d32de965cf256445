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


def sketch_layers(
    module: nn.Module,
    targets: dict[str, nn.Linear],
    config: SketchConfig,
    *,
    prefix: str = "",
    hessians: Callable[[str], torch.Tensor | None] | None = None,
    max_memory: int | None = None,
    on_layer: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Sketch the linears ``targets`` (names relative to ``module``) in place, one after the other.

    ``targets`` is emptied as it goes: each dense layer is freed as soon as it is replaced. Returns the
    per-layer sketch loss under the full names (``prefix.name``), which ``hessians(name)`` also takes;
    ``on_layer(name)`` is called after each layer (progress).
    """
    losses: dict[str, float] = {}
    for rel_name in list(targets):
        linear = targets.pop(rel_name)  # nothing else may keep the replaced dense layer alive
        name = f"{prefix}.{rel_name}" if prefix else rel_name
        hessian = hessians(name) if hessians else None
        layer, result = sketch_layer(linear, config, hessian=hessian, name=name, max_memory=max_memory)
        set_submodule(module, rel_name, layer)
        losses[name] = result.loss
        del linear, hessian, layer
        if on_layer is not None:
            on_layer(rel_name)
    return losses


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
    with tqdm(total=len(targets), desc="sketching", unit="layer", disable=not progress) as bar:
        return sketch_layers(model, targets, config, hessians=hessians, max_memory=max_memory,
                             on_layer=lambda _: bar.update(1))  # fmt: skip
