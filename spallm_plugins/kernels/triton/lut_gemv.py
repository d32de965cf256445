"""LUT GEMV for decode (M <= 16): many rows per program, split-K, one pass over codes and tables.

Each program reads a ``[BLOCK_N, BLOCK_K]`` slab of packed codes (and the few table values it
indexes) exactly once and multiplies it with all M input rows, so the bytes moved are the codes,
the tables and ``x`` once: ``N*K*bits/8 + N*groups*2**bits*2 + M*K*2``. Partial sums over K-splits
are combined with fp32 atomics.

No intermediate is 3-D (a ``[M, BLOCK_N, BLOCK_K]`` product costs M times the weight tile in
registers). Up to 4 rows (buckets 1 and 2-4) multiply on the CUDA cores, row by row, a 2-D product
reduced over K; from 5 rows (``GEMV_DOT_ROWS``) the rows are padded to a 16-row tile for ``tl.dot``,
whose idle rows cost less than five or more passes over the tile.

Weights come from tables staged in registers (``STAGED``, :func:`~._common.staged_weight_tile`):
per K tile, each row's ``2**bits`` values of the tile's group are loaded once and every weight
selects its value by its code bits, instead of one global load per weight. Which is faster at
4 bits (about 20 selects per weight against one L1-hit load) depends on the GPU, so the autotuner
is given both; tiles that straddle a group boundary (``BLOCK_K`` not dividing the group size)
always gather.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import accumulate_rows, dot_flags, dot_operands, interpreting, weight_tile
from .layout import kernel_codes
from .tiles import AUTOTUNE_KEY, GEMV_DOT_ROWS, GEMV_MAX_ROWS, m_bucket

# At most 16 weights per thread: larger tiles (64 x 256 on 4 warps, as before) spill on sm90 with
# either way of reading the tables (ptxas -v; see tests/test_kernels_triton.py's sm90 compile checks).
CONFIGS = [
    triton.Config({"BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 4, "STAGED": True}, num_warps=8),
    triton.Config({"BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 8, "STAGED": True}, num_warps=8),
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 4, "STAGED": True}, num_warps=8),
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 8, "STAGED": True}, num_warps=8),
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 4, "STAGED": False}, num_warps=8),
    triton.Config({"BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 4, "STAGED": False}, num_warps=4),
]


@triton.jit(do_not_specialize=["M_BUCKET"])
def lut_gemv_kernel(x_ptr, codes_ptr, tables_ptr, out_ptr, M, N, K, M_BUCKET, stride_xm, stride_cn, stride_tn,
                    GROUP_SIZE: tl.constexpr, BITS: tl.constexpr, NUM_CODES: tl.constexpr,
                    PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, STAGED: tl.constexpr):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    mask_n, mask_m = offs_n < N, offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_k * k_per_split
    for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        w = weight_tile(codes_ptr, tables_ptr, offs_n, offs_k, k0, mask_n, mask_k, stride_cn, stride_tn, K,
                        GROUP_SIZE, BITS, NUM_CODES, BLOCK_K, STAGED)  # fmt: skip
        if BLOCK_M >= 16:
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :],
                        other=0.0)  # fmt: skip
            a, b = dot_operands(x, w, UPCAST)
            acc += tl.dot(a, tl.trans(b), out_dtype=tl.float32, input_precision=PRECISION)
        else:
            acc = accumulate_rows(acc, w.to(tl.float32), x_ptr, stride_xm, offs_k, mask_k, M, offs_m, BLOCK_M, BLOCK_K)
    tl.atomic_add(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask_m[:, None] & mask_n[None, :])


_autotuned = triton.autotune(configs=CONFIGS, key=AUTOTUNE_KEY, reset_to_zero=["out_ptr"])(lut_gemv_kernel)


def gemv_block_m(rows: int) -> int:
    """The row tile: the next power of two up to 4 rows (CUDA-core path), 16 from ``GEMV_DOT_ROWS`` on
    (``tl.dot`` tiles are at least 16 rows)."""
    return 16 if rows >= GEMV_DOT_ROWS else max(1, triton.next_power_of_2(rows))


def lut_gemv(
    x: torch.Tensor,
    codes: torch.Tensor,
    tables: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    block: tuple[int, int, int] | None = None,
    staged: bool = True,
) -> torch.Tensor:
    """``x [M <= 16, K]`` -> ``[M, N]``. ``block=(BLOCK_N, BLOCK_K, SPLIT_K)`` skips autotuning, with the
    tables staged in registers or (``staged=False``) gathered from global memory."""
    M, K = x.shape
    if M > GEMV_MAX_ROWS:
        raise ValueError(f"lut_gemv is for decode (M <= {GEMV_MAX_ROWS}), got M={M}; use lut_matmul")
    N, groups, num_codes = tables.shape
    codes = kernel_codes(codes, bits)  # 3-bit: bit planes (a no-op when prepared)
    x, codes, tables = x.contiguous(), codes.contiguous(), tables.contiguous()  # the kernel assumes unit inner strides
    out = torch.zeros(M, N, dtype=torch.float32, device=x.device)
    args = (x, codes, tables, out, M, N, K, m_bucket(M), x.stride(0), codes.stride(0), tables.stride(0))
    meta = dict(GROUP_SIZE=K // groups, BITS=bits, NUM_CODES=num_codes, **dot_flags(x.dtype),
                BLOCK_M=gemv_block_m(M))  # fmt: skip
    if block is None and interpreting():
        block = (32, 64, 2)  # the CPU interpreter cannot autotune (no device timer)
    fixed = None if block is None else dict(zip(("BLOCK_N", "BLOCK_K", "SPLIT_K"), block), STAGED=staged)
    return launch_split_k(_autotuned, lut_gemv_kernel, args, meta, fixed, out, bias, x.dtype)


def launch_split_k(autotuned, kernel, args: tuple, meta: dict, fixed: dict | None, out: torch.Tensor,
                   bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """Launch a split-K decode kernel on ``(cdiv(N, BLOCK_N), SPLIT_K)`` programs, autotuned or with the
    tile constants ``fixed``; the programs add into the fp32 ``out [M, N]``, returned with the bias in ``dtype``."""
    n = out.shape[1]
    if fixed is None:
        autotuned[lambda m: (triton.cdiv(n, m["BLOCK_N"]), m["SPLIT_K"])](*args, **meta)
    else:
        kernel[(triton.cdiv(n, fixed["BLOCK_N"]), fixed["SPLIT_K"])](*args, **meta, **fixed)
    if bias is not None:
        out += bias.float()
    return out.to(dtype)


def gemv_bytes(M: int, N: int, K: int, groups: int, bits: int, table_bytes: int = 2, act_bytes: int = 2) -> int:
    """Bytes a LUT GEMV must move: codes + tables + input + output, each once."""
    return N * K * bits // 8 + N * groups * (1 << bits) * table_bytes + M * K * act_bytes + M * N * act_bytes
