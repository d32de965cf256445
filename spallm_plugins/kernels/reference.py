"""PyTorch reference of the LUT linear: the ground truth every kernel is tested against.

``W[r, c] = tables[r, c // (in / gpr), codes[r, c]]``; forward is ``x @ W.T + b``. Backward:
``grad_x = grad_y @ W`` and, with ``grad_W = grad_y.T @ x``,
``grad_tables[r, g, k] = sum(grad_W[r, c] for c in group g if codes[r, c] == k)`` (a scatter-add).
Runs on any device and dtype torch supports.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..format import unpack_codes
from . import LUTProblem


def flat_indices(codes: torch.Tensor, bits: int, groups_per_row: int) -> torch.Tensor:
    """int64 ``[out*gpr, in/gpr]`` index of each weight into ``tables.view(out*gpr, 2**bits)``."""
    unpacked = unpack_codes(codes, bits)
    out_features, in_features = unpacked.shape
    return unpacked.view(out_features * groups_per_row, in_features // groups_per_row).long()


def dequantize(
    codes: torch.Tensor,
    tables: torch.Tensor,
    bits: int,
    dtype: torch.dtype | None = None,
    indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gather the dense weight ``[out, in]`` from packed codes and tables.

    The (small) tables are cast to ``dtype`` before the gather, which is exact and much faster than
    gathering float16 on a CPU. ``indices``: :func:`flat_indices` of ``codes``, when already at hand.
    """
    out_features, groups_per_row, num_codes = tables.shape
    idx = flat_indices(codes, bits, groups_per_row) if indices is None else indices
    flat_tables = tables.reshape(out_features * groups_per_row, num_codes)
    if dtype is not None:
        flat_tables = flat_tables.to(dtype)
    return torch.gather(flat_tables, 1, idx).view(out_features, -1)


def lut_linear(
    x: torch.Tensor, codes: torch.Tensor, tables: torch.Tensor, bias: torch.Tensor | None, bits: int
) -> torch.Tensor:
    w = dequantize(codes, tables, bits, x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


def table_grad(grad_w: torch.Tensor, codes: torch.Tensor, bits: int, groups_per_row: int) -> torch.Tensor:
    """Reduce a dense ``grad_W [out, in]`` into the ``2**bits`` bins of every row-group.

    Accumulates in float32 (float64 when ``grad_w`` is float64).
    """
    out_features = grad_w.shape[0]
    acc = torch.promote_types(grad_w.dtype, torch.float32)
    idx = flat_indices(codes, bits, groups_per_row)
    grad = torch.zeros(out_features * groups_per_row, 1 << bits, dtype=acc, device=grad_w.device)
    grad.scatter_add_(1, idx, grad_w.reshape(idx.shape).to(acc))
    return grad.view(out_features, groups_per_row, 1 << bits)


def lut_linear_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    codes: torch.Tensor,
    tables: torch.Tensor,
    bits: int,
    need_input_grad: bool,
    need_tables_grad: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    grad_x = grad_tables = None
    if need_input_grad:
        grad_x = grad_out @ dequantize(codes, tables, bits, grad_out.dtype)
    if need_tables_grad:
        acc = torch.promote_types(grad_out.dtype, torch.float32)
        grad_w = grad_out.reshape(-1, grad_out.shape[-1]).t().to(acc) @ x.reshape(-1, x.shape[-1]).to(acc)
        grad_tables = table_grad(grad_w, codes, bits, tables.shape[1])
    return grad_x, grad_tables


def lut_linear_table_sets(
    x: torch.Tensor,
    codes: torch.Tensor,
    table_sets: torch.Tensor,
    slots: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    graph_safe: bool | None = None,
) -> torch.Tensor:
    """Row ``m`` of ``x`` through the table set ``table_sets[slots[m]]``, all sets over the same ``codes``.

    ``table_sets [S, out, gpr, 2**bits]``, ``slots [M]`` integer, clamped into ``[0, S)`` (as the
    kernels do). Only the slots in use are computed. The CPU path finds them with a host sync and runs
    one LUT linear per distinct slot on that slot's rows. ``graph_safe`` (default on an accelerator,
    where a host sync would break CUDA graphs): :func:`table_sets_graph_safe`, no syncs and no
    data-dependent shapes.
    """
    slots = checked_slots(x, slots, table_sets.shape[0])
    if graph_safe if graph_safe is not None else x.device.type != "cpu":
        return table_sets_graph_safe(x, codes, table_sets, slots, bias, bits)
    idx = flat_indices(codes, bits, table_sets.shape[2])  # unpacked once for all sets
    b = None if bias is None else bias.to(x.dtype)

    def forward_set(rows: torch.Tensor, slot: int) -> torch.Tensor:
        w = dequantize(codes, table_sets[slot], bits, x.dtype, indices=idx)
        return torch.nn.functional.linear(rows, w, b)

    return per_slot(x, slots, forward_set)


def checked_slots(x: torch.Tensor, slots: torch.Tensor, num_sets: int) -> torch.Tensor:
    """``slots`` (one per row of ``x``) clamped into ``[0, num_sets)``, as the kernels read them."""
    if slots.shape != (x.shape[0],):
        raise ValueError(f"slots has shape {list(slots.shape)}, expected [{x.shape[0]}] (one per row of x)")
    return slots.clamp(0, num_sets - 1)


def per_slot(
    x: torch.Tensor, slots: torch.Tensor, forward_set: Callable[[torch.Tensor, int], torch.Tensor]
) -> torch.Tensor:
    """``forward_set(rows, slot)`` once per distinct slot, on that slot's rows of ``x``, scattered back in
    row order. Reads the slots on the host (one sync): for CPU paths, never inside a CUDA graph."""
    present = torch.unique(slots).tolist()
    if len(present) == 1:
        return forward_set(x, present[0])
    y = None
    for slot in present:
        rows = (slots == slot).nonzero().squeeze(1)
        part = forward_set(x[rows], slot)
        if y is None:
            y = part.new_empty(x.shape[0], part.shape[-1])
        y[rows] = part
    return y


def used_slots(slots: torch.Tensor, num_sets: int) -> torch.Tensor:
    """The distinct values of ``slots`` (in ``[0, num_sets)``) ascending, then ``num_sets`` as padding:
    ``min(len(slots), num_sets)`` entries, a shape known without looking at the values (no host sync)."""
    used = torch.zeros(num_sets, dtype=torch.bool, device=slots.device).scatter_(0, slots.long(), True)
    ids = torch.arange(num_sets, device=slots.device)
    return torch.where(used, ids, num_sets).sort().values[: min(slots.shape[0], num_sets)]


def table_sets_graph_safe(
    x: torch.Tensor,
    codes: torch.Tensor,
    table_sets: torch.Tensor,
    slots: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
) -> torch.Tensor:
    """:func:`lut_linear_table_sets` without host syncs or data-dependent shapes (CUDA-graph safe).

    One LUT linear per entry of :func:`used_slots`: the distinct slots in use, so at most
    ``min(M, S)`` instead of one per table set (a decode batch of two tenants among 32 loaded sets
    computes 2, not 32); each row keeps its own slot's result. Where fewer distinct slots are in use
    than that bound, the padding entries still run (on the last set) and are discarded: a graph has
    fixed work. ``slots`` must already be in ``[0, S)``.
    """
    num_sets, out_features = table_sets.shape[:2]
    if x.shape[0] == 0:
        return x.new_empty(0, out_features)
    idx = flat_indices(codes, bits, table_sets.shape[2])  # unpacked once for all sets
    b = None if bias is None else bias.to(x.dtype)
    candidates = used_slots(slots, num_sets)
    y = None
    for j in range(candidates.shape[0]):
        slot = candidates[j : j + 1]
        tables = table_sets.index_select(0, slot.clamp(max=num_sets - 1))[0]  # a tensor index: no sync
        y_slot = torch.nn.functional.linear(x, dequantize(codes, tables, bits, x.dtype, indices=idx), b)
        y = y_slot if y is None else torch.where((slots == slot)[:, None], y_slot, y)  # entry 0 is in use
    return y


class ReferenceBackend:
    """Always available; the fallback and the ground truth."""

    name = "reference"
    priority = 0
    min_capability = 0

    def can_implement(self, problem: LUTProblem) -> tuple[bool, str]:
        return True, ""

    def prepare_weights(self, codes, tables, bits):
        return codes, tables

    def restore_weights(self, codes, tables, bits):
        return codes, tables

    def forward(self, x, codes, tables, bias, bits):
        return lut_linear(x, codes, tables, bias, bits)

    def forward_table_sets(self, x, codes, table_sets, slots, bias, bits):
        return lut_linear_table_sets(x, codes, table_sets, slots, bias, bits)

    def backward(self, grad_out, x, codes, tables, bits, need_input_grad, need_tables_grad):
        return lut_linear_backward(grad_out, x, codes, tables, bits, need_input_grad, need_tables_grad)
