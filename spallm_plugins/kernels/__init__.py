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
    """``min_capability``: the lowest CUDA compute capability (``major * 10 + minor``, 80 = sm80) at which
    the backend runs anything, 0 when it needs no GPU; ``can_implement`` still refuses per dtype. vLLM
    asks a quantization method for one such number (``get_min_capability``). Backends written before
    it may lack it: read it with :func:`backend_min_capability`."""

    name: str
    priority: int
    min_capability: int

    def can_implement(self, problem: LUTProblem) -> tuple[bool, str]:
        """Return ``(True, "")`` or ``(False, reason)``; the reason is shown by ``spallm info --kernels``."""
        ...

    def prepare_weights(
        self, codes: torch.Tensor, tables: torch.Tensor, bits: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Optional. Load-time layout step (vLLM's ``process_weights_after_loading``): called once after
        the weights are loaded, it returns ``(codes, tables)`` in the layout this backend's ``forward``,
        ``forward_table_sets`` and ``backward`` read, e.g. the Triton backend's 3-bit codes as bit
        planes. What it returns is only meaningful to this backend, so a layer that keeps it must keep
        calling this backend (or keep the format-v1 tensors too, as :class:`~spallm_plugins.layer.SketchedLinear`
        does: :func:`spallm_plugins.ops.lut_linear` prepares its codes once per codes tensor and caches
        them, and passes tables as they are, since they train). Call it through :func:`prepare_weights`,
        which is the identity for backends without it."""
        ...

    def restore_weights(
        self, codes: torch.Tensor, tables: torch.Tensor, bits: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Optional. Exact inverse of ``prepare_weights``: the format-v1 tensors back (to save or
        dequantize a layer that kept only the prepared ones). Call it through :func:`restore_weights`."""
        ...

    def forward(
        self, x: torch.Tensor, codes: torch.Tensor, tables: torch.Tensor, bias: torch.Tensor | None, bits: int
    ) -> torch.Tensor:
        """``x [M, in] -> y [M, out]``; codes packed uint8 ``[out, in*bits/8]`` (format v1, or as this
        backend's ``prepare_weights`` returned them); tables ``[out, gpr, 2**bits]``."""
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


def backend_min_capability(backend: object) -> int:
    """``backend.min_capability``, 0 for a backend that does not declare one."""
    return int(getattr(backend, "min_capability", 0))


def prepare_weights(
    backend: object, codes: torch.Tensor, tables: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``backend.prepare_weights(codes, tables, bits)``, or the tensors unchanged if it has no such step."""
    prepare = getattr(backend, "prepare_weights", None)
    return (codes, tables) if prepare is None else prepare(codes, tables, bits)


def restore_weights(
    backend: object, codes: torch.Tensor, tables: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``backend.restore_weights(codes, tables, bits)`` (format v1 from what :func:`prepare_weights`
    returned), or the tensors unchanged if it has no such step."""
    restore = getattr(backend, "restore_weights", None)
    return (codes, tables) if restore is None else restore(codes, tables, bits)
