"""Dequantize: packed codes and tables to the dense ``W [N, K]`` in the activation dtype, one pass.

Above the GEMV range the backend multiplies with cuBLAS on this W (:func:`~.tiles.dequantized_path`):
the pass reads the codes and tables once and writes W once (for 4-bit codes and a bf16 W, 2.5 bytes
per weight), which costs less than the fused tiled kernels' repeated gathers inside ``tl.dot`` loops.
2- and 4-bit codes are read as whole bytes (contiguous loads), each byte's fields looked up in turn;
3-bit bit planes go through the per-weight gather. On an H200 (bf16, 4-bit, gpr 4) the byte-wise pass
took 68 us for 4096 x 4096 and 167 us for 11008 x 4096 (the per-weight gather: 95 us for 4096 x 4096):
bound by the table gathers in L1, not by HBM (42 MB would take 10 us). Code words (the decode layout,
:func:`~.layout.code_words`) have their own pass, so a layer prepared for decode prefills without
unpacking its codes first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import gather_weight_tile
from .layout import UNIT_CODES, code_columns, kernel_codes


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


@triton.jit
def word_value(word0, word1, word2, V: tl.constexpr, BITS: tl.constexpr):
    """Value slot ``V`` of code-word units (:func:`~.layout._pack_unit` places it); 3-bit units are the
    three words ``word0..2``, the other widths one word (``word1``, ``word2`` unused)."""
    if BITS == 4:
        return (word0 >> (4 * V)) & 15
    elif BITS == 2:
        return (word0 >> (4 * (V % 8) + 2 * (V // 8))) & 3
    else:
        SHIFT: tl.constexpr = 4 * (V % 8)
        if V // 8 == 0:
            return (word0 >> SHIFT) & 7
        elif V // 8 == 1:
            return (word1 >> SHIFT) & 7
        elif V // 8 == 2:
            return (word2 >> SHIFT) & 7
        else:
            top = SHIFT + 3
            return ((word0 >> top) & 1) | (((word1 >> top) & 1) << 1) | (((word2 >> top) & 1) << 2)


@triton.jit
def dequantize_words_kernel(words_ptr, tables_ptr, w_ptr, N, K, stride_tn, stride_wn, GROUP_SIZE: tl.constexpr,
                            BITS: tl.constexpr, KW: tl.constexpr, NUM_CODES: tl.constexpr,
                            BLOCK_N: tl.constexpr):  # fmt: skip
    """Program ``(n, c)``: ``BLOCK_N`` rows of chunk ``c`` (``KW`` units, all in one table group)."""
    VALUES: tl.constexpr = 32 // BITS if BITS != 3 else 32
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    chunk = tl.program_id(1)
    offs_j = tl.arange(0, KW)
    mask = (offs_n < N)[:, None]
    word_ptrs = words_ptr + (chunk * KW + offs_j)[None, :] * N + offs_n[:, None]
    word0 = tl.load(word_ptrs, mask=mask, other=0)
    word1, word2 = word0, word0
    if BITS == 3:
        word1 = tl.load(word_ptrs + (K // VALUES) * N, mask=mask, other=0)
        word2 = tl.load(word_ptrs + 2 * (K // VALUES) * N, mask=mask, other=0)
    row = tables_ptr + offs_n[:, None] * stride_tn + (chunk * KW * VALUES // GROUP_SIZE) * NUM_CODES
    columns = w_ptr + offs_n[:, None] * stride_wn + chunk * KW * VALUES + offs_j[None, :]
    for v in tl.static_range(VALUES):
        w = tl.load(row + word_value(word0, word1, word2, v, BITS), mask=mask, other=0.0)
        tl.store(columns + v * KW, w.to(w_ptr.dtype.element_ty), mask=mask)


def lut_dequantize_words(words: torch.Tensor, tables: torch.Tensor, bits: int, dtype: torch.dtype,
                         block_n: int = 64) -> torch.Tensor:  # fmt: skip
    """:func:`lut_dequantize` for code words ``[planes, chunks, KW, N]``."""
    N, groups, num_codes = tables.shape
    _, chunks, kw, _ = words.shape
    K = chunks * kw * UNIT_CODES[bits]
    words, tables = words.contiguous(), tables.contiguous()
    w = torch.empty(N, K, dtype=dtype, device=tables.device)
    dequantize_words_kernel[(triton.cdiv(N, block_n), chunks)](
        words, tables, w, N, K, tables.stride(0), w.stride(0), GROUP_SIZE=K // groups, BITS=bits, KW=kw,
        NUM_CODES=num_codes, BLOCK_N=block_n, num_warps=4,
    )  # fmt: skip
    return w


def lut_dequantize(codes: torch.Tensor, tables: torch.Tensor, bits: int, dtype: torch.dtype,
                   block: tuple[int, int] | None = None) -> torch.Tensor:  # fmt: skip
    """``W [N, K]`` in ``dtype`` with ``W[n, k] = tables[n, k // (K / groups), code[n, k]]``; codes in
    format v1 or the kernels' layout. ``block``: ``(BLOCK_N, BLOCK_KB)`` (bytes of codes) for 2/4-bit,
    ``(BLOCK_N, BLOCK_K)`` (columns) for 3-bit. Code words go to :func:`lut_dequantize_words`."""
    if codes.dim() == 4:
        return lut_dequantize_words(codes, tables, bits, dtype)
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
