"""The Triton kernels as ``torch.library`` custom ops, each with a fake (meta) implementation."""

from __future__ import annotations

import torch

from .dequantize import lut_dequantize
from .layout import code_columns, kernel_codes
from .lut_backward import bin_weight_grad
from .lut_backward import lut_grad_input as _grad_input
from .lut_backward import lut_grad_tables as _grad_tables
from .lut_gemv import lut_gemv
from .lut_gemv_bytes import lut_gemv_bytes
from .lut_gemv_words import WORDS_DTYPES, lut_gemv_words
from .lut_matmul import lut_matmul
from .lut_table_sets import lut_table_sets
from .tiles import GEMV_BYTES_MAX_ROWS, GEMV_MAX_ROWS, dequantized_path


@torch.library.custom_op("spallm::lut_linear", mutates_args=())
def lut_linear(
    x: torch.Tensor, codes: torch.Tensor, tables: torch.Tensor, bias: torch.Tensor | None, bits: int
) -> torch.Tensor:
    """``x [M, K] -> [M, N]``: decode (M <= 16) through a GEMV kernel (over code words when the codes are
    prepared so and x is fp16/bf16; else the byte-wise one for 2/4-bit codes at M <= 4); above it
    dequantize + cuBLAS, or the tiled matmul for a W too large to materialise (:func:`~.tiles.dequantized_path`).
    Code words dequantize from their own layout; the fused kernels unpack them on each call
    (:func:`~.layout.kernel_codes`): fp32 decode and Ws too large to materialise."""
    M, K = x.shape
    if codes.dim() == 4 and M <= GEMV_MAX_ROWS and x.dtype in WORDS_DTYPES:
        return lut_gemv_words(x, codes, tables, bias, bits)
    if codes.dim() == 4 and not dequantized_path(M, tables.shape[0], K, x.element_size()):
        codes = kernel_codes(codes, bits)
    if M <= GEMV_BYTES_MAX_ROWS and bits in (2, 4):
        return lut_gemv_bytes(x, codes, tables, bias, bits)
    if M <= GEMV_MAX_ROWS:
        return lut_gemv(x, codes, tables, bias, bits)
    if dequantized_path(M, tables.shape[0], K, x.element_size()):
        weight = lut_dequantize(codes, tables, bits, x.dtype)
        return torch.nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))
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
    """``x [M, K] -> [M, N]``, row ``m`` through ``table_sets[slots[m]]``: multi-tenant serving; decode
    over code words reads each row's set in the words GEMV."""
    if codes.dim() == 4 and x.shape[0] <= GEMV_MAX_ROWS and x.dtype in WORDS_DTYPES:
        return lut_gemv_words(x, codes, table_sets, bias, bits, slots=slots)
    codes = kernel_codes(codes, bits) if codes.dim() == 4 else codes
    return lut_table_sets(x, codes, table_sets, slots, bias, bits)


@lut_linear_table_sets.register_fake
def _(x, codes, table_sets, slots, bias, bits):
    return x.new_empty(x.shape[0], table_sets.shape[1])


@torch.library.custom_op("spallm::lut_grad_input", mutates_args=())
def lut_grad_input(grad_out: torch.Tensor, codes: torch.Tensor, tables: torch.Tensor, bits: int) -> torch.Tensor:
    """``grad_out [M, N] @ W``: on the dequantized W with cuBLAS above the GEMV range, else gathered per tile."""
    M, N = grad_out.shape
    if dequantized_path(M, N, code_columns(codes, bits), grad_out.element_size()):
        return grad_out @ lut_dequantize(codes, tables, bits, grad_out.dtype)
    return _grad_input(grad_out, codes, tables, bits)


@lut_grad_input.register_fake
def _(grad_out, codes, tables, bits):
    return grad_out.new_empty(grad_out.shape[0], code_columns(codes, bits))


@torch.library.custom_op("spallm::lut_grad_tables", mutates_args=())
def lut_grad_tables(
    grad_out: torch.Tensor, x: torch.Tensor, codes: torch.Tensor, groups: int, bits: int, deterministic: bool
) -> torch.Tensor:
    """``grad_tables [N, groups, 2**bits]`` (fp32): above the GEMV range ``grad_W = grad_outᵀ x`` from
    cuBLAS, binned by code (deterministic either way); else the fused kernel, which never holds ``grad_W``."""
    M, N = grad_out.shape
    if dequantized_path(M, N, x.shape[1], grad_out.element_size()):
        return bin_weight_grad(grad_out.t() @ x.to(grad_out.dtype), codes, groups, bits)
    return _grad_tables(grad_out, x, codes, groups, bits, deterministic)


@lut_grad_tables.register_fake
def _(grad_out, x, codes, groups, bits, deterministic):
    return grad_out.new_empty(codes.shape[0], groups, 1 << bits, dtype=torch.float32)
