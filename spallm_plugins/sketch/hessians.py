"""The Hessians of calibrated sketching: ``H = 2/n * sum(x x^T)`` of each target linear's input.

Collected by forward hooks, once per distinct input tensor (q/k/v and gate/up share theirs), and
scaled in place when first read, so that no ``[in, in]`` copy is ever made.
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import StopForward
from .calibration import CalibrationError


class HessianCollector:
    """Forward hooks that accumulate ``sum(x x^T)`` once per distinct input tensor of a forward call.

    With ``stop_when_reached``, the forward is stopped (:class:`~.blocks.StopForward`, caught by the
    caller) once every collected module has seen its input in a batch: nothing after them is needed.
    """

    def __init__(self, modules: dict[str, nn.Linear], block_index: int, stop_when_reached: bool = False):
        self.modules, self.block_index, self.stop_when_reached = modules, block_index, stop_when_reached
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.owner: dict[str, str] = {}
        self._seen: dict[tuple, tuple[str, torch.Tensor]] = {}
        self._reached: set[str] = set()
        self._scaled: set[str] = set()
        self._handles: list = []

    def __enter__(self) -> HessianCollector:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()

    def new_batch(self) -> None:
        self._seen = {}
        self._reached = set()

    def _hook(self, name: str):
        def hook(module, args, output):
            self._reached.add(name)
            self._collect(name, args[0])
            if self.stop_when_reached and len(self._reached) == len(self.modules):
                raise StopForward

        return hook

    def _collect(self, name: str, x: torch.Tensor) -> None:
        key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
        seen = self._seen.get(key)
        if seen is not None:
            self.owner.setdefault(name, seen[0])
            return
        # holding the tensor until the next batch keeps its memory from being reused, so an
        # equal data_ptr really means "the same input" (q/k/v, gate/up)
        self._seen[key] = (name, x)
        self.owner.setdefault(name, name)
        x2 = x.detach().reshape(-1, x.shape[-1]).float()
        if not torch.isfinite(x2).all():
            raise CalibrationError(
                f"block {self.block_index}, {name}: calibration activations contain NaN or inf "
                "(try float32, or other calibration text)"
            )
        if name in self._scaled:
            raise RuntimeError(
                f"block {self.block_index}, {name}: its Hessian was already read; collect before reading"
            )
        if name not in self.sums:
            self.sums[name] = torch.zeros(x2.shape[1], x2.shape[1], dtype=torch.float32, device=x2.device)
            self.counts[name] = 0
        self.sums[name].addmm_(x2.T, x2)
        self.counts[name] += x2.shape[0]

    def hessian(self, name: str) -> torch.Tensor:
        """``2 / n * sum(x x^T)`` of ``name``'s input: the collected sum, scaled in place.

        No copy is made (a 70B down_proj's is 3.3 GB): from the first call on the sum *is* the
        Hessian, one tensor for every layer that reads the same input, and collecting more into it
        is refused.
        """
        owner = self.owner.get(name)
        if owner is None:
            raise CalibrationError(
                f"block {self.block_index}, {name}: the calibration forward never reached this layer"
            )
        if owner not in self._scaled:
            self.sums[owner].mul_(2.0 / self.counts[owner])
            self._scaled.add(owner)
        return self.sums[owner]

    def release(self, name: str) -> None:
        """Drop the Hessian of ``name``'s input (and of every layer sharing it) once nothing reads it."""
        owner = self.owner.get(name)
        if owner is not None:
            self.sums.pop(owner, None)
