"""The Triton kernels as ``torch.library`` custom ops, each with a fake (meta) implementation."""

from __future__ import annotations

import torch

from .layout import code_columns
from .lut_backward import lut_grad_input as _grad_input
from .lut_backward import lut_grad_tables as _grad_tables
from .lut_gemv import lut_gemv
from .lut_matmul import lut_matmul
from .lut_table_sets import lut_table_sets
from .tiles import GEMV_MAX_ROWS


@torch.library.custom_op("spallm::lut_linear", mutates_args=())
def lut_linear(
    x: torch.Tensor, codes: torch.Tensor, tables: torch.Tensor, bias: torch.Tensor | None, bits: int
) -> torch.Tensor:
    """``x [M, K] -> [M, N]``: the GEMV kernel for decode (M <= 16), the tiled matmul otherwise."""
    if x.shape[0] <= GEMV_MAX_ROWS:
        return lut_gemv(x, codes, tables, bias, bits)
    return lut_matmul(x, codes, tables, bias, bits)


@lut_linear.register_fake
def _(x, codes, tables, bias, bits):
    return x.new_empty(x.shape[0], tables.shape[0])


@torch.library.custom_op("spallm::lut_linear_table_sets", mutates_args=())
def lut_linear_table_sets(
    x: torch.Tensor,
    codes: torch.Tensor,
    table_sets: torch.Tensor,
    slots: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
) -> torch.Tensor:
    """``x [M, K] -> [M, N]``, row ``m`` through ``table_sets[slots[m]]``: multi-tenant serving."""
    return lut_table_sets(x, codes, table_sets, slots, bias, bits)


@lut_linear_table_sets.register_fake
def _(x, codes, table_sets, slots, bias, bits):
    return x.new_empty(x.shape[0], table_sets.shape[1])


@torch.library.custom_op("spallm::lut_grad_input", mutates_args=())
def lut_grad_input(grad_out: torch.Tensor, codes: torch.Tensor, tables: torch.Tensor, bits: int) -> torch.Tensor:
    return _grad_input(grad_out, codes, tables, bits)


@lut_grad_input.register_fake
def _(grad_out, codes, tables, bits):
    return grad_out.new_empty(grad_out.shape[0], code_columns(codes, bits))


@torch.library.custom_op("spallm::lut_grad_tables", mutates_args=())
def lut_grad_tables(
    grad_out: torch.Tensor, x: torch.Tensor, codes: torch.Tensor, groups: int, bits: int, deterministic: bool
) -> torch.Tensor:
    return _grad_tables(grad_out, x, codes, groups, bits, deterministic)


@lut_grad_tables.register_fake
def _(grad_out, x, codes, groups, bits, deterministic):
    return grad_out.new_empty(codes.shape[0], groups, 1 << bits, dtype=torch.float32)
