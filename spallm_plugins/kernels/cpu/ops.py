"""The CPU kernels as ``torch.library`` custom ops (``torch.ops.spallm.*_cpu``), each with a fake
implementation, so torch.compile and vLLM's compiled CPU models trace through them."""

from __future__ import annotations

import torch

from .library import dequantize, lut_linear

# Up to this many rows of x the LUT GEMM beats dequantize + matmul, above it the pair wins
# (`spallm bench kernels --device cpu`; the timings are in docs/kernels.md).
GEMV_MAX_ROWS = 32


def linear_rows(
    x: torch.Tensor, codes: torch.Tensor, tables: torch.Tensor, bias: torch.Tensor | None, bits: int
) -> torch.Tensor:
    """``x [M, in] -> [M, out]`` in ``x.dtype`` (computed in float32): the LUT GEMM for up to
    ``GEMV_MAX_ROWS`` rows, dequantize + dense matmul for more. The choice is made inside the op, so a
    compiled graph with a dynamic number of rows does not guard on it."""
    x32 = x.float()
    bias32 = None if bias is None else bias.float()
    if x.shape[0] <= GEMV_MAX_ROWS:
        y = lut_linear(x32, codes, tables, bias32, bits)
    else:
        y = torch.nn.functional.linear(x32, dequantize(codes, tables, bits), bias32)
    return y.to(x.dtype)


lut_linear_cpu = torch.library.custom_op("spallm::lut_linear_cpu", linear_rows, mutates_args=())


@lut_linear_cpu.register_fake
def _(x, codes, tables, bias, bits):
    return x.new_empty(x.shape[0], tables.shape[0])


@torch.library.custom_op("spallm::dequantize_cpu", mutates_args=())
def dequantize_cpu(codes: torch.Tensor, tables: torch.Tensor, bits: int) -> torch.Tensor:
    """The dense float32 weight ``[out, in]``."""
    return dequantize(codes, tables, bits)


@dequantize_cpu.register_fake
def _(codes, tables, bits):
    return tables.new_empty(tables.shape[0], codes.shape[-1] * 8 // bits, dtype=torch.float32)
