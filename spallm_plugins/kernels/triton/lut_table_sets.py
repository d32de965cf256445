"""LUT matmul over many table sets sharing one set of codes: row ``m`` reads ``tables[slots[m]]``.

Multi-tenant serving: every request's rows carry the slot of their table set. A program owns a
``[BLOCK_M, BLOCK_N]`` output tile and visits only the slots its rows use, smallest first (the next
is the smallest slot above the current one among its rows), masking the other rows' inputs: the
code tile is unpacked once per slot present, and a slot no row of the tile uses is never read. With
more rows than one decode tile (``M > 16``) the launcher sorts the rows by slot first (on the
device, ``torch.sort``) and the kernel reads and writes rows through that order, so a tile holds one
tenant's rows, or the few at a boundary, whatever order the batch came in; the result is in the
original row order. There is no host sync and no data-dependent shape: the launch is CUDA-graph
safe. Slots are clamped in the kernel, so padded rows with stale slots are harmless.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import dot_flags, dot_operands, gather_weight_tile, interpreting
from .layout import kernel_codes
from .tiles import AUTOTUNE_KEY, GEMV_MAX_ROWS, m_bucket

CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
]


@triton.jit(do_not_specialize=["M_BUCKET"])
def lut_table_sets_kernel(x_ptr, codes_ptr, tables_ptr, slots_ptr, order_ptr, bias_ptr, y_ptr, M, N, K, S, M_BUCKET,
                          stride_xm, stride_cn, stride_ts, stride_tn, stride_ym,
                          SORTED: tl.constexpr, HAS_BIAS: tl.constexpr, GROUP_SIZE: tl.constexpr, BITS: tl.constexpr,
                          NUM_CODES: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # positions in slot order when SORTED
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs < M, offs_n < N
    if SORTED:
        offs_m = tl.load(order_ptr + offs, mask=mask_m, other=0).to(tl.int32)  # the rows of x and y
    else:
        offs_m = offs
    slots = tl.load(slots_ptr + offs, mask=mask_m, other=0).to(tl.int32)
    slots = tl.minimum(tl.maximum(slots, 0), S - 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    slot = tl.min(tl.where(mask_m, slots, S), axis=0)
    while slot < S:  # once per distinct slot of the tile's rows
        rows = mask_m & (slots == slot)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=rows[:, None] & mask_k[None, :],
                        other=0.0)  # fmt: skip
            w = gather_weight_tile(codes_ptr, tables_ptr + slot * stride_ts, offs_n, offs_k, mask_n, mask_k,
                                   stride_cn, stride_tn, K, GROUP_SIZE, BITS, NUM_CODES)  # fmt: skip
            a, b = dot_operands(x, w, UPCAST)
            acc += tl.dot(a, tl.trans(b), out_dtype=tl.float32, input_precision=PRECISION)
        slot = tl.min(tl.where(mask_m & (slots > slot), slots, S), axis=0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])  # fmt: skip


_autotuned = triton.autotune(configs=CONFIGS, key=AUTOTUNE_KEY)(lut_table_sets_kernel)


def lut_table_sets(
    x: torch.Tensor,
    codes: torch.Tensor,
    table_sets: torch.Tensor,
    slots: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    block: tuple[int, int, int] | None = None,
    sort: bool | None = None,
) -> torch.Tensor:
    """``x [M, K]`` -> ``[M, N]``, row ``m`` through ``table_sets[slots[m]]`` (``[S, N, gpr, 2**bits]``).

    ``sort``: group the rows by slot before tiling (default: when ``M > 16``, more rows than a decode
    tile; a shape rule, so the same launch is captured into a CUDA graph every time).
    """
    M, K = x.shape
    S, N, groups, num_codes = table_sets.shape
    codes = kernel_codes(codes, bits)  # 3-bit: bit planes (a no-op when prepared)
    x, codes, slots = x.contiguous(), codes.contiguous(), slots.contiguous()  # the kernel assumes unit inner strides
    table_sets = table_sets.contiguous()  # read in their own dtype; tiles are cast in registers
    has_bias = bias is not None
    bias = bias.contiguous() if has_bias else table_sets  # without a bias the kernel never reads it
    by_slot = sort if sort is not None else M > GEMV_MAX_ROWS
    if by_slot:  # clamping is monotonic: stale slots sort next to the slot they are clamped to
        slots, order = torch.sort(slots)
    else:
        order = slots  # never read
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    args = (x, codes, table_sets, slots, order, bias, y, M, N, K, S, m_bucket(M),
            x.stride(0), codes.stride(0), table_sets.stride(0), table_sets.stride(1), y.stride(0))  # fmt: skip
    meta = dict(SORTED=by_slot, HAS_BIAS=has_bias, GROUP_SIZE=K // groups, BITS=bits, NUM_CODES=num_codes,
                **dot_flags(x.dtype))  # fmt: skip
    if block is None and interpreting():
        block = (16, 32, 32)  # the CPU interpreter cannot autotune (no device timer)
    if block is None:
        grid = lambda m: (triton.cdiv(M, m["BLOCK_M"]), triton.cdiv(N, m["BLOCK_N"]))  # noqa: E731
        _autotuned[grid](*args, **meta)
    else:
        bm, bn, bk = block
        lut_table_sets_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
            *args, **meta, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk
        )
    return y
