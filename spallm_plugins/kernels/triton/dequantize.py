"""Dequantize: packed codes and tables to the dense ``W [N, K]`` in the activation dtype, one pass.

Above the GEMV range the backend multiplies with cuBLAS on this W (:func:`~.tiles.dequantized_path`):
the pass reads the codes and tables once and writes W once (for 4-bit codes and a bf16 W, 2.5 bytes
per weight), which costs less than the fused tiled kernels' repeated gathers inside ``tl.dot`` loops.
2- and 4-bit codes are read as whole bytes (contiguous loads), each byte's fields looked up in turn;
3-bit bit planes go through the per-weight gather. On an H200 (bf16, 4-bit, gpr 4) the byte-wise pass
took 68 us for 4096 x 4096 and 167 us for 11008 x 4096 (the per-weight gather: 95 us for 4096 x 4096):
bound by the table gathers in L1, not by HBM (42 MB would take 10 us).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import gather_weight_tile
from .layout import code_columns, kernel_codes


@triton.jit
def dequantize_kernel(codes_ptr, tables_ptr, w_ptr, N, K, stride_cn, stride_tn, stride_wn, GROUP_SIZE: tl.constexpr,
                      BITS: tl.constexpr, NUM_CODES: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):  # fmt: skip
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n, mask_k = offs_n < N, offs_k < K
    w = gather_weight_tile(codes_ptr, tables_ptr, offs_n, offs_k, mask_n, mask_k, stride_cn, stride_tn, K,
                           GROUP_SIZE, BITS, NUM_CODES)  # fmt: skip
    tl.store(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], w.to(w_ptr.dtype.element_ty),
             mask=mask_n[:, None] & mask_k[None, :])  # fmt: skip


@triton.jit
def dequantize_bytes_kernel(codes_ptr, tables_ptr, w_ptr, N, K, stride_cn, stride_tn, stride_wn,
                            GROUP_SIZE: tl.constexpr, BITS: tl.constexpr, NUM_CODES: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr):  # fmt: skip
    PER_BYTE: tl.constexpr = 8 // BITS
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = tl.program_id(1) * BLOCK_KB + tl.arange(0, BLOCK_KB)
    mask = (offs_n < N)[:, None] & (offs_b < K // PER_BYTE)[None, :]
    packed = tl.load(codes_ptr + offs_n[:, None] * stride_cn + offs_b[None, :], mask=mask, other=0).to(tl.int32)
    for field in tl.static_range(PER_BYTE):
        col = offs_b * PER_BYTE + field
        code = (packed >> (field * BITS)) & (NUM_CODES - 1)
        w = tl.load(tables_ptr + offs_n[:, None] * stride_tn + (col // GROUP_SIZE)[None, :] * NUM_CODES + code,
                    mask=mask, other=0.0)  # fmt: skip
        tl.store(w_ptr + offs_n[:, None] * stride_wn + col[None, :], w.to(w_ptr.dtype.element_ty), mask=mask)


def lut_dequantize(codes: torch.Tensor, tables: torch.Tensor, bits: int, dtype: torch.dtype,
                   block: tuple[int, int] | None = None) -> torch.Tensor:  # fmt: skip
    """``W [N, K]`` in ``dtype`` with ``W[n, k] = tables[n, k // (K / groups), code[n, k]]``; codes in
    format v1 or the kernels' layout. ``block``: ``(BLOCK_N, BLOCK_KB)`` (bytes of codes) for 2/4-bit,
    ``(BLOCK_N, BLOCK_K)`` (columns) for 3-bit."""
    N, groups, num_codes = tables.shape
    K = code_columns(codes, bits)
    codes, tables = kernel_codes(codes, bits).contiguous(), tables.contiguous()
    w = torch.empty(N, K, dtype=dtype, device=tables.device)
    if bits in (2, 4):
        bn, bkb = block or (8, 512)
        dequantize_bytes_kernel[(triton.cdiv(N, bn), triton.cdiv(K * bits // 8, bkb))](
            codes, tables, w, N, K, codes.stride(0), tables.stride(0), w.stride(0), GROUP_SIZE=K // groups,
            BITS=bits, NUM_CODES=num_codes, BLOCK_N=bn, BLOCK_KB=bkb, num_warps=4,
        )  # fmt: skip
        return w
    bn, bk = block or (32, 256)
    dequantize_kernel[(triton.cdiv(N, bn), triton.cdiv(K, bk))](
        codes, tables, w, N, K, codes.stride(0), tables.stride(0), w.stride(0), GROUP_SIZE=K // groups, BITS=bits,
        NUM_CODES=num_codes, BLOCK_N=bn, BLOCK_K=bk, num_warps=4,
    )  # fmt: skip
    return w
