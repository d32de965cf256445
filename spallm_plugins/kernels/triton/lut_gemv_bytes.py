"""Byte-wise LUT GEMV for 2- and 4-bit codes at 1-4 rows (decode): each program reads whole code bytes.

The generic GEMV (:mod:`.lut_gemv`) addresses each weight's code on its own (``k // (8 / bits)``), so a
4-bit byte is loaded twice and no load is vectorised. Here a ``[BLOCK_N, BLOCK_KB]`` tile of packed
bytes is loaded contiguously, and each of a byte's ``8 // bits`` fields is looked up in the tables and
multiplied with its column of ``x`` (read with that stride). On an H200 (bf16, 4-bit, gpr 4, M = 1)
that took 4096 x 4096 from 97 us to 33 us and 11008 x 4096 from 271 us to 71 us (cuBLAS on the dense
weight: 18 and 34 us): the table gathers, one L1 access per weight, are what is left. 3-bit codes
(bit planes) and 5-16 rows stay on the generic kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import accumulate_rows, interpreting
from .lut_gemv import launch_split_k
from .tiles import AUTOTUNE_KEY, GEMV_BYTES_MAX_ROWS, m_bucket

# The five fastest of the tiles swept on an H200 at M = 1 and 4 (docs/kernels.md).
CONFIGS = [
    triton.Config({"BLOCK_N": 8, "BLOCK_KB": 128, "SPLIT_K": 8}, num_warps=2),
    triton.Config({"BLOCK_N": 16, "BLOCK_KB": 128, "SPLIT_K": 4}, num_warps=4),
    triton.Config({"BLOCK_N": 32, "BLOCK_KB": 128, "SPLIT_K": 4}, num_warps=4),
    triton.Config({"BLOCK_N": 16, "BLOCK_KB": 512, "SPLIT_K": 2}, num_warps=4),
    triton.Config({"BLOCK_N": 32, "BLOCK_KB": 256, "SPLIT_K": 2}, num_warps=8),
]


@triton.jit(do_not_specialize=["M_BUCKET"])
def lut_gemv_bytes_kernel(x_ptr, codes_ptr, tables_ptr, out_ptr, M, N, K, M_BUCKET, stride_xm, stride_cn, stride_tn,
                          GROUP_SIZE: tl.constexpr, BITS: tl.constexpr, NUM_CODES: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr,
                          SPLIT_K: tl.constexpr):  # fmt: skip
    PER_BYTE: tl.constexpr = 8 // BITS
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    byte_columns = K // PER_BYTE
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    per_split = tl.cdiv(tl.cdiv(byte_columns, SPLIT_K), BLOCK_KB) * BLOCK_KB
    start = pid_k * per_split
    for b0 in range(start, start + per_split, BLOCK_KB):
        offs_b = b0 + tl.arange(0, BLOCK_KB)
        mask_b = offs_b < byte_columns
        mask = mask_n[:, None] & mask_b[None, :]
        packed = tl.load(codes_ptr + offs_n[:, None] * stride_cn + offs_b[None, :], mask=mask, other=0).to(tl.int32)
        for field in tl.static_range(PER_BYTE):
            code = (packed >> (field * BITS)) & (NUM_CODES - 1)
            col = offs_b * PER_BYTE + field
            w = tl.load(tables_ptr + offs_n[:, None] * stride_tn + (col // GROUP_SIZE)[None, :] * NUM_CODES + code,
                        mask=mask, other=0.0).to(tl.float32)  # fmt: skip
            acc = accumulate_rows(acc, w, x_ptr, stride_xm, col, mask_b, M, offs_m, BLOCK_M, BLOCK_KB)
    tl.atomic_add(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc, mask=(offs_m < M)[:, None] & mask_n[None, :])


_autotuned = triton.autotune(configs=CONFIGS, key=AUTOTUNE_KEY, reset_to_zero=["out_ptr"])(lut_gemv_bytes_kernel)


def lut_gemv_bytes(
    x: torch.Tensor,
    codes: torch.Tensor,
    tables: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    block: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """``x [M <= 4, K]`` -> ``[M, N]`` for 2- or 4-bit format-v1 codes. ``block=(BLOCK_N, BLOCK_KB, SPLIT_K)``
    (``BLOCK_KB`` in bytes of codes) skips autotuning."""
    M, K = x.shape
    if M > GEMV_BYTES_MAX_ROWS or bits not in (2, 4):
        raise ValueError(
            f"lut_gemv_bytes takes 2- or 4-bit codes and M <= {GEMV_BYTES_MAX_ROWS}, got {bits} bits, M={M}"
        )
    N, groups, num_codes = tables.shape
    x, codes, tables = x.contiguous(), codes.contiguous(), tables.contiguous()  # unit inner strides
    out = torch.zeros(M, N, dtype=torch.float32, device=x.device)
    args = (x, codes, tables, out, M, N, K, m_bucket(M), x.stride(0), codes.stride(0), tables.stride(0))
    meta = dict(GROUP_SIZE=K // groups, BITS=bits, NUM_CODES=num_codes, BLOCK_M=max(1, triton.next_power_of_2(M)))
    if block is None and interpreting():
        block = (16, 32, 2)  # the CPU interpreter cannot autotune (no device timer)
    fixed = None if block is None else dict(zip(("BLOCK_N", "BLOCK_KB", "SPLIT_K"), block))
    return launch_split_k(_autotuned, lut_gemv_bytes_kernel, args, meta, fixed, out, bias, x.dtype)
