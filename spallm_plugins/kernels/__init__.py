"""Kernel backends for the LUT linear ``y = x @ W.T + b`` with ``W`` gathered from codes and tables.

A backend is any object with the :class:`KernelBackend` shape. Backends come from the ``spallm``
pluggy hook ``spallm_kernel_backends`` (built-in: the PyTorch reference; the Triton kernels; and any
third-party package's). :func:`spallm_plugins.ops.select_backend` picks, per call, the
highest-priority backend whose ``can_implement`` accepts the problem.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class LUTProblem:
    """What a backend needs to know to accept or refuse a call."""

    device_type: str
    dtype: torch.dtype
    table_dtype: torch.dtype
    bits: int
    in_features: int
    out_features: int
    groups_per_row: int
    rows: int
    needs_grad: bool = False


@runtime_checkable
class KernelBackend(Protocol):
    name: str
    priority: int

    def can_implement(self, problem: LUTProblem) -> tuple[bool, str]:
        """Return ``(True, "")`` or ``(False, reason)``; the reason is shown by ``spallm info --kernels``."""
        ...

    def forward(
        self, x: torch.Tensor, codes: torch.Tensor, tables: torch.Tensor, bias: torch.Tensor | None, bits: int
    ) -> torch.Tensor:
        """``x [M, in] -> y [M, out]``; codes packed uint8 ``[out, in*bits/8]``; tables ``[out, gpr, 2**bits]``."""
        ...

    def forward_table_sets(
        self,
        x: torch.Tensor,
        codes: torch.Tensor,
        table_sets: torch.Tensor,
        slots: torch.Tensor,
        bias: torch.Tensor | None,
        bits: int,
    ) -> torch.Tensor:
        """Optional. Multi-tenant forward: row ``m`` uses ``table_sets[slots[m]]`` (``[S, out, gpr, 2**bits]``),
        every set over the same codes; ``slots`` is in range (callers clamp). Backends without it fall
        back to the reference (:func:`spallm_plugins.ops.lut_linear_table_sets`)."""
        ...

    def backward(
        self,
        grad_out: torch.Tensor,
        x: torch.Tensor,
        codes: torch.Tensor,
        tables: torch.Tensor,
        bits: int,
        need_input_grad: bool,
        need_tables_grad: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Return ``(grad_x [M, in], grad_tables [out, gpr, 2**bits] accumulated in at least float32)``; ``None`` where not needed."""
        ...
