"""Find a model's target linears, swap them for (empty) SketchedLinear layers, plan a sketch from shapes.

Model surgery only: the sketcher (:mod:`spallm_plugins.sketch`) builds sketched layers on top of this.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import SketchConfig
from .hooks import architecture_for
from .layer import SketchedLinear


class NoTargetsError(ValueError):
    """The model has no linear layer that the sketch config selects."""


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern)


def is_excluded(name: str, skip: list[str]) -> bool:
    return any(_matches(name, s) or name.startswith(s + ".") for s in skip)


def default_targets(model: nn.Module) -> tuple[str, ...] | None:
    spec = architecture_for(getattr(getattr(model, "config", None), "model_type", None))
    return spec.target_modules if spec else None


def is_target(name: str, config: SketchConfig, default: tuple[str, ...] | None) -> bool:
    """Whether the linear called ``name`` is sketched under ``config`` (``default``: the
    architecture's target names, used when ``config.target_modules`` is None)."""
    if is_excluded(name, config.modules_to_not_convert):
        return False
    targets = config.target_modules if config.target_modules is not None else default
    return targets is None or any(_matches(name, t) for t in targets)


def resolve_targets(model: nn.Module, config: SketchConfig) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules ``config`` selects in ``model``, by qualified name.

    ``target_modules=None`` uses the architecture's defaults (``spallm_architectures`` hook) and
    otherwise every linear layer; ``modules_to_not_convert`` always wins.
    """
    default = default_targets(model)
    targets = config.target_modules if config.target_modules is not None else default
    found: dict[str, nn.Linear] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and is_target(name, config, default):
            found[name] = module
    if not found:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise NoTargetsError(
            f"no linear layers to sketch in this {model_type} model (target_modules={targets}, "
            f"modules_to_not_convert={config.modules_to_not_convert}); unsupported architecture "
            "or targets that match nothing"
        )
    for name, module in found.items():
        config.check_in_features(module.in_features, name)
    return found


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def replace_with_empty(model: nn.Module, config: SketchConfig, device: torch.device | str | None = None) -> list[str]:
    """Replace targets with uninitialised SketchedLinear of the right shapes (before loading a checkpoint)."""
    names = []
    for name, linear in resolve_targets(model, config).items():
        set_submodule(model, name, SketchedLinear.empty_like(linear, config, device))
        names.append(name)
    return names


def sketched_layers(model: nn.Module) -> dict[str, SketchedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SketchedLinear)}


@dataclass
class SketchPlan:
    """What sketching a model would produce; computed from shapes only (works on the meta device)."""

    layers: list[tuple[str, int, int]]  # (name, out_features, in_features)
    table_values: int
    code_bytes: int
    table_bytes: int
    dense_rest_bytes: int
    dense_bytes: int
    sketched_weights: int

    @property
    def bits_per_weight(self) -> float:
        return 8 * (self.code_bytes + self.table_bytes) / max(self.sketched_weights, 1)


def plan_sketch(model: nn.Module, config: SketchConfig, dense_dtype_bytes: int = 2) -> SketchPlan:
    targets = resolve_targets(model, config)
    layers = [(n, m.out_features, m.in_features) for n, m in targets.items()]
    table_bytes_per = torch.empty((), dtype=config.torch_table_dtype()).element_size()
    table_values = sum(o * config.groups_per_row * config.num_codes for _, o, _ in layers)
    code_bytes = sum(o * i * config.bits // 8 for _, o, i in layers)
    sketched_weights = sum(o * i for _, o, i in layers)
    sketched_param_ids = {id(m.weight) for m in targets.values()}
    seen: set[int] = set()
    total = rest = 0
    for p in list(model.parameters()) + list(model.buffers()):
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if id(p) not in sketched_param_ids:
            rest += p.numel()
    return SketchPlan(
        layers=layers,
        table_values=table_values,
        code_bytes=code_bytes,
        table_bytes=table_values * table_bytes_per,
        dense_rest_bytes=rest * dense_dtype_bytes,
        dense_bytes=total * dense_dtype_bytes,
        sketched_weights=sketched_weights,
    )
