"""Fused prefill matmul over code words (fp16/bf16): the ``tl.dot`` B tile made in registers by the
decode kernel's PRMT lookup (:mod:`.lut_gemv_words`), so W is never written to memory.

Dequantize + cuBLAS writes and reads a dense W per call (2 bytes per weight each way), which at a few
hundred rows costs more than the GEMM itself. Here each ``[BLOCK_M, BLOCK_N]`` program walks K one chunk
of code words at a time: the chunk's value slots come out of the lookup as ``[BLOCK_N, KW]`` tiles,
are joined into one ``[BLOCK_N, chunk]`` tile (``tl.join``, a column order that is a fixed permutation
of the chunk's columns), and multiplied with the matching columns of x, which the launcher permutes
once per call (:func:`chunk_permutation`). Not dispatched yet: ``tests/gpu/run.sh`` times it beside
dequantize + cuBLAS, and ``ops.lut_linear`` should take it where that measurement says so.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import dot_flags, dot_operands, interpreting
from .layout import UNIT_CODES
from .lut_gemv_words import check_words, group_planes, prmt_const, quad_bytes, table_pairs

BLOCK = (128, 128, 8)  # BLOCK_M, BLOCK_N, num_warps; not tuned (no GPU has run it yet)


@triton.jit
def half_entry(pair, HIGH: tl.constexpr, FP16: tl.constexpr):
    """The low (or ``HIGH``) 16-bit half of an int32 as fp16 or bf16 (a truncation and a bitcast)."""
    bits16 = ((pair >> 16) if HIGH else pair).to(tl.int16)
    if FP16:
        return bits16.to(tl.float16, bitcast=True)
    else:
        return bits16.to(tl.bfloat16, bitcast=True)


@triton.jit
def selector_tile(selector, mask, low0, low1, low2, low3, high0, high1, high2, high3, BITS: tl.constexpr,
                  FP16: tl.constexpr, EMULATE: tl.constexpr):  # fmt: skip
    """The eight value slots of ``selector`` as one ``[BLOCK_N, KW, 2, 2, 2]`` tile: slot ``v`` at
    ``[..., v & 1, (v >> 1) & 1, v >> 2]`` (each ``tl.join`` adds the next bit as a new last axis)."""
    tables = (low0, low1, low2, low3, high0, high1, high2, high3)
    low, high = quad_bytes(selector, mask, 0, *tables, BITS, EMULATE)
    p01, p23 = prmt_const(low, high, 0x5140, EMULATE), prmt_const(low, high, 0x7362, EMULATE)
    first = tl.join(tl.join(half_entry(p01, False, FP16), half_entry(p01, True, FP16)),
                    tl.join(half_entry(p23, False, FP16), half_entry(p23, True, FP16)))  # fmt: skip
    low, high = quad_bytes(selector, mask, 1, *tables, BITS, EMULATE)
    p01, p23 = prmt_const(low, high, 0x5140, EMULATE), prmt_const(low, high, 0x7362, EMULATE)
    second = tl.join(tl.join(half_entry(p01, False, FP16), half_entry(p01, True, FP16)),
                     tl.join(half_entry(p23, False, FP16), half_entry(p23, True, FP16)))  # fmt: skip
    return tl.join(first, second)


@triton.jit
def chunk_tile(word_ptrs, mask_n, plane_stride, low0, low1, low2, low3, high0, high1, high2, high3,
               BITS: tl.constexpr, FP16: tl.constexpr, EMULATE: tl.constexpr):  # fmt: skip
    """A chunk's weights, ``[BLOCK_N, KW, 2, ...]`` with one axis per bit of the value slot (least
    significant first), from the same selectors as :func:`~.lut_gemv_words.accumulate_chunk`."""
    tables = (low0, low1, low2, low3, high0, high1, high2, high3)
    word = tl.load(word_ptrs, mask=mask_n[:, None], other=0)
    if BITS == 4:
        return selector_tile(word & 0x77777777, word, *tables, BITS, FP16, EMULATE)
    elif BITS == 2:
        return tl.join(selector_tile(word & 0x33333333, word, *tables, BITS, FP16, EMULATE),
                       selector_tile((word >> 2) & 0x33333333, word, *tables, BITS, FP16, EMULATE))  # fmt: skip
    else:
        word1 = tl.load(word_ptrs + plane_stride, mask=mask_n[:, None], other=0)
        word2 = tl.load(word_ptrs + 2 * plane_stride, mask=mask_n[:, None], other=0)
        spare = ((word >> 3) & 0x11111111) | ((word1 >> 2) & 0x22222222) | ((word2 >> 1) & 0x44444444)
        low = tl.join(selector_tile(word & 0x77777777, word, *tables, BITS, FP16, EMULATE),
                      selector_tile(word1 & 0x77777777, word, *tables, BITS, FP16, EMULATE))  # fmt: skip
        high = tl.join(selector_tile(word2 & 0x77777777, word, *tables, BITS, FP16, EMULATE),
                       selector_tile(spare, word, *tables, BITS, FP16, EMULATE))  # fmt: skip
        return tl.join(low, high)


@triton.jit
def lut_matmul_words_kernel(x_ptr, words_ptr, tables_ptr, out_ptr, M, N, K, stride_xm, stride_om, stride_tn,
                            GROUP_SIZE: tl.constexpr, BITS: tl.constexpr, KW: tl.constexpr, FP16: tl.constexpr,
                            EMULATE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """``out [M, N] = x_perm @ W.T`` (fp32 accumulation); ``x_ptr``: x with each chunk's columns in the
    order of the joined tile (:func:`chunk_permutation`)."""
    VALUES: tl.constexpr = 32 // BITS if BITS != 3 else 32
    CHUNK: tl.constexpr = KW * VALUES
    CHUNKS_PER_GROUP: tl.constexpr = GROUP_SIZE // CHUNK
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j, offs_c = tl.arange(0, KW), tl.arange(0, CHUNK)
    mask_m, mask_n = offs_m < M, offs_n < N
    plane_stride = (K // VALUES) * N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, K // GROUP_SIZE):
        low0, low1, low2, low3, high0, high1, high2, high3 = group_planes(tables_ptr, offs_n, mask_n, g, stride_tn,
                                                                          BITS, EMULATE)  # fmt: skip
        for c in range(g * CHUNKS_PER_GROUP, g * CHUNKS_PER_GROUP + CHUNKS_PER_GROUP):
            word_ptrs = words_ptr + (c * KW + offs_j)[None, :] * N + offs_n[:, None]
            w = tl.reshape(chunk_tile(word_ptrs, mask_n, plane_stride, low0, low1, low2, low3, high0, high1, high2,
                                      high3, BITS, FP16, EMULATE), (BLOCK_N, CHUNK))  # fmt: skip
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + c * CHUNK + offs_c[None, :], mask=mask_m[:, None],
                        other=0.0)  # fmt: skip
            a, b = dot_operands(x, w, UPCAST)
            acc += tl.dot(a, tl.trans(b), out_dtype=tl.float32, input_precision=PRECISION)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])  # fmt: skip


@functools.lru_cache(maxsize=64)
def chunk_permutation(k: int, kw: int, bits: int, device: torch.device | str) -> torch.Tensor:
    """int64 ``[k]``: entry ``c * chunk + i`` is the column of x that position ``i`` of chunk ``c``'s joined
    tile multiplies, ``v * KW + j`` within the chunk for ``i = j * V + bitreverse(v)`` (``V`` slots).
    Made once per layer shape and device (every call of a layer permutes x the same way)."""
    values = UNIT_CODES[bits]
    levels = values.bit_length() - 1
    i = torch.arange(kw * values, device=device)
    rest = i % values
    v = sum(((rest >> (levels - 1 - b)) & 1) << b for b in range(levels))
    within = v * kw + i // values
    chunk = kw * values
    return (torch.arange(k // chunk, device=device)[:, None] * chunk + within[None, :]).reshape(-1)


def lut_matmul_words(
    x: torch.Tensor,
    words: torch.Tensor,
    tables: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    block: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """``x [M, K]`` (fp16/bf16) -> ``[M, N]`` from code words; ``block=(BLOCK_M, BLOCK_N, num_warps)``,
    by default :data:`BLOCK` (no spills on sm90a at 2, 3 or 4 bits: ``tests/test_kernels_sass.py``)."""
    check_words("lut_matmul_words", x, words, bits)
    M, K = x.shape
    _, _, kw, N = words.shape
    groups = tables.shape[1]
    pairs = table_pairs(tables, x.dtype)
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    x_perm = x.index_select(1, chunk_permutation(K, kw, bits, x.device)).contiguous()
    bm, bn, warps = block or ((16, 32, 1) if interpreting() else BLOCK)
    lut_matmul_words_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
        x_perm, words.contiguous(), pairs, out, M, N, K, x_perm.stride(0), out.stride(0), pairs.stride(0),
        GROUP_SIZE=K // groups, BITS=bits, KW=kw, FP16=x.dtype == torch.float16, EMULATE=interpreting(),
        **dot_flags(x.dtype), BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
    )  # fmt: skip
    if bias is not None:
        out += bias.to(x.dtype)
    return out
