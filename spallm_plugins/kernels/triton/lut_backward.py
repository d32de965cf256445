"""Backward of the LUT linear: ``grad_x = grad_y @ W`` and the fused table gradient.

The table gradient never materialises ``grad_W = grad_y^T x`` (``[N, K]``) in memory: each program
computes one ``[BLOCK_N, BLOCK_K]`` tile of it in registers (``tl.dot``, fp32, reduced over M), bins it
by code (``2**bits`` sums per row) and adds the bins into ``grad_tables[n, group, code]``, either with
fp32 atomics or, in deterministic mode, into per-K-block partials summed afterwards in a fixed order.
The binning is one masked 2-D reduction over K per code value, each placed into its column of a
``[BLOCK_N, 2**bits]`` tile: a ``[BLOCK_N, BLOCK_K, 2**bits]`` one-hot would hold 2**bits times the
tile in registers (16x at 4 bits) and spill. The input gradient gathers W tile by tile for ``tl.dot``,
as the forward matmul does.

Above the GEMV range (:func:`~.tiles.dequantized_path`) the backend instead takes ``grad_W`` from
cuBLAS and bins it with :func:`bin_weight_grad` (one program per row block and table group, a fixed
summation order: deterministic with no second pass), and ``grad_x`` from cuBLAS on the dequantized W.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import bin_by_code, dot_flags, dot_operands, gather_weight_tile, unpack_codes_tile
from .layout import code_columns, kernel_codes
from .tiles import table_grad_block_k


@triton.jit
def lut_grad_input_kernel(g_ptr, codes_ptr, tables_ptr, gx_ptr, M, N, K, stride_gm, stride_cn, stride_tn, stride_xm,
                          GROUP_SIZE: tl.constexpr, BITS: tl.constexpr, NUM_CODES: tl.constexpr,
                          PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_m, mask_k = offs_m < M, offs_k < K
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        g = tl.load(
            g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :], mask=mask_m[:, None] & mask_n[None, :], other=0.0
        )
        w = gather_weight_tile(codes_ptr, tables_ptr, offs_n, offs_k, mask_n, mask_k, stride_cn, stride_tn, K,
                               GROUP_SIZE, BITS, NUM_CODES)  # fmt: skip
        a, b = dot_operands(g, w, UPCAST)
        acc += tl.dot(a, b, out_dtype=tl.float32, input_precision=PRECISION)
    tl.store(gx_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], acc.to(gx_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_k[None, :])  # fmt: skip


@triton.jit
def lut_grad_tables_kernel(g_ptr, x_ptr, codes_ptr, out_ptr, M, N, K, stride_gm, stride_xm, stride_cn,
                           GROUP_SIZE: tl.constexpr, BITS: tl.constexpr, NUM_CODES: tl.constexpr,
                           GROUPS: tl.constexpr, DETERMINISTIC: tl.constexpr, PRECISION: tl.constexpr,
                           UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n, mask_k = offs_n < N, offs_k < K
    grad_w = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        g = tl.load(
            g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :], mask=mask_m[:, None] & mask_n[None, :], other=0.0
        )
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0
        )
        a, b = dot_operands(tl.trans(g), x, UPCAST)
        grad_w += tl.dot(a, b, out_dtype=tl.float32, input_precision=PRECISION)
    mask = mask_n[:, None] & mask_k[None, :]
    code = tl.where(mask, unpack_codes_tile(codes_ptr, offs_n, offs_k, mask, stride_cn, K, BITS), NUM_CODES)
    bins = bin_by_code(grad_w, code, NUM_CODES)
    values = tl.arange(0, NUM_CODES)
    group = (pid_k * BLOCK_K) // GROUP_SIZE  # BLOCK_K divides GROUP_SIZE: one group per tile
    if DETERMINISTIC:
        ptrs = out_ptr + pid_k * N * NUM_CODES + offs_n[:, None] * NUM_CODES + values[None, :]
        tl.store(ptrs, bins, mask=mask_n[:, None])
    else:
        ptrs = out_ptr + offs_n[:, None] * (GROUPS * NUM_CODES) + group * NUM_CODES + values[None, :]
        tl.atomic_add(ptrs, bins, mask=mask_n[:, None])


def lut_grad_input(grad_out: torch.Tensor, codes: torch.Tensor, tables: torch.Tensor, bits: int,
                   block: tuple[int, int, int] = (64, 64, 64)) -> torch.Tensor:  # fmt: skip
    """``grad_out [M, N] @ W [N, K]`` with W gathered on the fly."""
    M, N = grad_out.shape
    _, groups, num_codes = tables.shape
    K = code_columns(codes, bits)
    grad_out, codes = grad_out.contiguous(), kernel_codes(codes, bits).contiguous()  # unit inner strides
    tables = tables.to(grad_out.dtype).contiguous()
    gx = torch.empty(M, K, dtype=grad_out.dtype, device=grad_out.device)
    bm, bn, bk = block
    lut_grad_input_kernel[(triton.cdiv(M, bm), triton.cdiv(K, bk))](
        grad_out, codes, tables, gx, M, N, K, grad_out.stride(0), codes.stride(0), tables.stride(0), gx.stride(0),
        GROUP_SIZE=K // groups, BITS=bits, NUM_CODES=num_codes, **dot_flags(grad_out.dtype),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
    )  # fmt: skip
    return gx


def lut_grad_tables(grad_out: torch.Tensor, x: torch.Tensor, codes: torch.Tensor, groups: int, bits: int,
                    deterministic: bool = False, block: tuple[int, int] = (64, 64)) -> torch.Tensor:  # fmt: skip
    """Fused ``grad_tables [N, groups, 2**bits]`` (fp32) without a dense ``grad_W``."""
    M, N = grad_out.shape
    K = x.shape[1]
    num_codes = 1 << bits
    group_size = K // groups
    bk = table_grad_block_k(group_size)
    if not bk:
        raise ValueError(f"group size {group_size} has no power-of-two divisor >= 16 for the table-gradient kernel")
    bm, bn = block
    grad_out, codes = grad_out.contiguous(), kernel_codes(codes, bits).contiguous()  # unit inner strides
    x = x.contiguous().to(grad_out.dtype)
    k_blocks = triton.cdiv(K, bk)
    if deterministic:
        out = torch.empty(k_blocks, N, num_codes, dtype=torch.float32, device=x.device)
    else:
        out = torch.zeros(N, groups, num_codes, dtype=torch.float32, device=x.device)
    lut_grad_tables_kernel[(triton.cdiv(N, bn), k_blocks)](
        grad_out, x, codes, out, M, N, K, grad_out.stride(0), x.stride(0), codes.stride(0),
        GROUP_SIZE=group_size, BITS=bits, NUM_CODES=num_codes, GROUPS=groups, DETERMINISTIC=deterministic,
        **dot_flags(grad_out.dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
    )  # fmt: skip
    if deterministic:
        out = out.view(groups, k_blocks // groups, N, num_codes).sum(1).permute(1, 0, 2).contiguous()
    return out


@triton.jit
def bin_weight_grad_kernel(gw_ptr, codes_ptr, out_ptr, N, K, stride_gn, stride_cn, GROUP_SIZE: tl.constexpr,
                           BITS: tl.constexpr, NUM_CODES: tl.constexpr, GROUPS: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    pid_n = tl.program_id(0)
    group = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    bins = tl.zeros((BLOCK_N, NUM_CODES), dtype=tl.float32)
    group_end = (group + 1) * GROUP_SIZE
    for k0 in range(group * GROUP_SIZE, group_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = mask_n[:, None] & (offs_k < group_end)[None, :]
        grad_w = tl.load(gw_ptr + offs_n[:, None] * stride_gn + offs_k[None, :], mask=mask, other=0.0)
        code = tl.where(mask, unpack_codes_tile(codes_ptr, offs_n, offs_k, mask, stride_cn, K, BITS), NUM_CODES)
        bins += bin_by_code(grad_w.to(tl.float32), code, NUM_CODES)
    values = tl.arange(0, NUM_CODES)
    ptrs = out_ptr + offs_n[:, None] * (GROUPS * NUM_CODES) + group * NUM_CODES + values[None, :]
    tl.store(ptrs, bins, mask=mask_n[:, None])


def bin_weight_grad(grad_w: torch.Tensor, codes: torch.Tensor, groups: int, bits: int,
                    block: tuple[int, int] = (32, 64)) -> torch.Tensor:  # fmt: skip
    """``grad_tables [N, groups, 2**bits]`` (fp32) from a dense ``grad_W [N, K]``: each table value's
    gradient is the sum of ``grad_W`` over the weights whose code names it."""
    N, K = grad_w.shape
    num_codes = 1 << bits
    grad_w, codes = grad_w.contiguous(), kernel_codes(codes, bits).contiguous()
    out = torch.empty(N, groups, num_codes, dtype=torch.float32, device=grad_w.device)
    bn, bk = block
    bin_weight_grad_kernel[(triton.cdiv(N, bn), groups)](
        grad_w, codes, out, N, K, grad_w.stride(0), codes.stride(0), GROUP_SIZE=K // groups, BITS=bits,
        NUM_CODES=num_codes, GROUPS=groups, BLOCK_N=bn, BLOCK_K=min(bk, triton.next_power_of_2(K // groups)),
    )  # fmt: skip
    return out
