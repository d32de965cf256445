"""LUT GEMV for decode (M <= 16): many rows per program, split-K, one pass over codes and tables.

Each program reads a ``[BLOCK_N, BLOCK_K]`` slab of packed codes (and the few table values it
indexes) exactly once and multiplies it with all M input rows, so the bytes moved are the codes,
the tables and ``x`` once: ``N*K*bits/8 + N*groups*2**bits*2 + M*K*2``. Partial sums over K-splits
are combined with fp32 atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import gather_weight_tile, interpreting
from .layout import kernel_codes
from .tiles import AUTOTUNE_KEY, GEMV_MAX_ROWS, m_bucket

CONFIGS = [
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 256, "SPLIT_K": 4}, num_warps=4),
    triton.Config({"BLOCK_N": 128, "BLOCK_K": 128, "SPLIT_K": 4}, num_warps=4),
    triton.Config({"BLOCK_N": 32, "BLOCK_K": 512, "SPLIT_K": 2}, num_warps=4),
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 256, "SPLIT_K": 8}, num_warps=8),
    triton.Config({"BLOCK_N": 128, "BLOCK_K": 256, "SPLIT_K": 1}, num_warps=8),
]


@triton.jit(do_not_specialize=["M_BUCKET"])
def lut_gemv_kernel(x_ptr, codes_ptr, tables_ptr, out_ptr, M, N, K, M_BUCKET, stride_xm, stride_cn, stride_tn,
                    GROUP_SIZE: tl.constexpr, BITS: tl.constexpr, NUM_CODES: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    SPLIT_K: tl.constexpr):  # fmt: skip
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
        w = gather_weight_tile(codes_ptr, tables_ptr, offs_n, offs_k, mask_n, mask_k, stride_cn, stride_tn, K,
                               GROUP_SIZE, BITS, NUM_CODES).to(tl.float32)  # fmt: skip
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0).to(tl.float32)  # fmt: skip
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    tl.atomic_add(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask_m[:, None] & mask_n[None, :])


_autotuned = triton.autotune(configs=CONFIGS, key=AUTOTUNE_KEY, reset_to_zero=["out_ptr"])(lut_gemv_kernel)


def lut_gemv(
    x: torch.Tensor,
    codes: torch.Tensor,
    tables: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    block: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """``x [M <= 16, K]`` -> ``[M, N]``. ``block=(BLOCK_N, BLOCK_K, SPLIT_K)`` skips autotuning."""
    M, K = x.shape
    if M > GEMV_MAX_ROWS:
        raise ValueError(f"lut_gemv is for decode (M <= {GEMV_MAX_ROWS}), got M={M}; use lut_matmul")
    N, groups, num_codes = tables.shape
    codes = kernel_codes(codes, bits)  # 3-bit: bit planes (a no-op when prepared)
    x, codes, tables = x.contiguous(), codes.contiguous(), tables.contiguous()  # the kernel assumes unit inner strides
    out = torch.zeros(M, N, dtype=torch.float32, device=x.device)
    block_m = max(1, triton.next_power_of_2(M))
    args = (x, codes, tables, out, M, N, K, m_bucket(M), x.stride(0), codes.stride(0), tables.stride(0))
    meta = dict(GROUP_SIZE=K // groups, BITS=bits, NUM_CODES=num_codes, BLOCK_M=block_m)
    if block is None and interpreting():
        block = (32, 64, 2)  # the CPU interpreter cannot autotune (no device timer)
    if block is None:
        grid = lambda m: (triton.cdiv(N, m["BLOCK_N"]), m["SPLIT_K"])  # noqa: E731
        _autotuned[grid](*args, **meta)
    else:
        bn, bk, split = block
        lut_gemv_kernel[(triton.cdiv(N, bn), split)](*args, **meta, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split)
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype)


def gemv_bytes(M: int, N: int, K: int, groups: int, bits: int, table_bytes: int = 2, act_bytes: int = 2) -> int:
    """Bytes a LUT GEMV must move: codes + tables + input + output, each once."""
    return N * K * bits // 8 + N * groups * (1 << bits) * table_bytes + M * K * act_bytes + M * N * act_bytes
