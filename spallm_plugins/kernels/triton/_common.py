"""Shared Triton helpers: unpacking codes and turning a code tile into weights.

Two ways to read ``W[n, k]`` for a tile. :func:`gather_weight_tile` loads one table value per
weight from global memory (an L1 hit after the first touch; any group size). :func:`staged_weight_tile`,
for a tile inside one group, loads that group's ``2**bits`` table values of each row once, as
``[BLOCK_N]`` vectors in registers, and picks each weight's value with a fixed tree of selects on
its code bits: no per-element address and no memory access at all beyond the codes. A register
``tl.gather`` would be the natural form, but its layout pass asserts (the process aborts) when the
index is much longer than the source along the gathered axis (triton#5836, #11600, both in the 3.6
the GPU host runs), which is exactly a ``[BLOCK_N, 2**bits]`` table against a ``[BLOCK_N, BLOCK_K]`` tile.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def unpack_plane(codes_ptr, offs_n, offs_k, mask, stride_cn, WIDTH: tl.constexpr):
    """``WIDTH``-bit fields of a ``[BLOCK_N, BLOCK_K]`` tile, ``8 // WIDTH`` per byte little-endian along k."""
    per_byte: tl.constexpr = 8 // WIDTH
    packed = tl.load(codes_ptr + offs_n[:, None] * stride_cn + (offs_k[None, :] // per_byte), mask=mask, other=0)
    return (packed.to(tl.int32) >> ((offs_k[None, :] % per_byte) * WIDTH).to(tl.int32)) & ((1 << WIDTH) - 1)


@triton.jit
def unpack_codes_tile(codes_ptr, offs_n, offs_k, mask, stride_cn, K, BITS: tl.constexpr):
    """The k-bit codes of a ``[BLOCK_N, BLOCK_K]`` tile in the kernels' layout (``kernel_codes``).

    2- and 4-bit: format v1 as stored. 3-bit: bit planes, each row the low two bits of its K codes
    packed like 2-bit codes (``K / 4`` bytes) followed by their high bits, eight per byte (``K / 8``),
    combined here in registers.
    """
    if BITS == 3:
        low = unpack_plane(codes_ptr, offs_n, offs_k, mask, stride_cn, 2)
        high = unpack_plane(codes_ptr + K // 4, offs_n, offs_k, mask, stride_cn, 1)
        return low | (high << 2)
    else:
        return unpack_plane(codes_ptr, offs_n, offs_k, mask, stride_cn, BITS)


@triton.jit
def gather_weight_tile(codes_ptr, tables_ptr, offs_n, offs_k, mask_n, mask_k, stride_cn, stride_tn, K,
                       GROUP_SIZE: tl.constexpr, BITS: tl.constexpr, NUM_CODES: tl.constexpr):  # fmt: skip
    """``W[n, k]`` for a ``[BLOCK_N, BLOCK_K]`` tile: unpack the k-bit code, then read the table value."""
    mask = mask_n[:, None] & mask_k[None, :]
    code = unpack_codes_tile(codes_ptr, offs_n, offs_k, mask, stride_cn, K, BITS)
    group = offs_k[None, :] // GROUP_SIZE
    return tl.load(tables_ptr + offs_n[:, None] * stride_tn + group * NUM_CODES + code, mask=mask, other=0.0)


@triton.jit
def staged_weight_tile(codes_ptr, tables_ptr, offs_n, offs_k, mask_n, mask_k, stride_cn, stride_tn, K, group,
                       BITS: tl.constexpr, NUM_CODES: tl.constexpr):  # fmt: skip
    """``W[n, k]`` for a ``[BLOCK_N, BLOCK_K]`` tile whose columns all lie in table group ``group``.

    Codes are resolved four at a time: the low two bits pick one of four values with three selects,
    the bits above choose between those quads (none for 2-bit). A 4-bit code costs about 20 integer
    operations per weight (a ``code == j`` chain: about 32; a one-hot: 3-D registers), 2-bit about 5.
    Masked weights are 0, as in :func:`gather_weight_tile`.
    """
    mask = mask_n[:, None] & mask_k[None, :]
    code = unpack_codes_tile(codes_ptr, offs_n, offs_k, mask, stride_cn, K, BITS)
    bit0 = (code & 1) != 0
    bit1 = (code & 2) != 0
    row = tables_ptr + offs_n * stride_tn + group * NUM_CODES
    w = select_quad(row, mask_n, bit0, bit1)
    for quad in tl.static_range(1, NUM_CODES // 4):
        w = tl.where((code >> 2) == quad, select_quad(row + 4 * quad, mask_n, bit0, bit1), w)
    return tl.where(mask, w, 0.0)


@triton.jit
def select_quad(row, mask_n, bit0, bit1):
    """Of four consecutive table values per row (``row``: ``[BLOCK_N]`` pointers), the one each weight's
    two low code bits name (``bit0``, ``bit1``: ``[BLOCK_N, BLOCK_K]``)."""
    t0 = tl.load(row, mask=mask_n, other=0.0)[:, None]
    t1 = tl.load(row + 1, mask=mask_n, other=0.0)[:, None]
    t2 = tl.load(row + 2, mask=mask_n, other=0.0)[:, None]
    t3 = tl.load(row + 3, mask=mask_n, other=0.0)[:, None]
    return tl.where(bit1, tl.where(bit0, t3, t2), tl.where(bit0, t1, t0))


@triton.jit
def weight_tile(codes_ptr, tables_ptr, offs_n, offs_k, k0, mask_n, mask_k, stride_cn, stride_tn, K,
                GROUP_SIZE: tl.constexpr, BITS: tl.constexpr, NUM_CODES: tl.constexpr, BLOCK_K: tl.constexpr,
                STAGED: tl.constexpr):  # fmt: skip
    """``W[n, k]`` for the ``[BLOCK_N, BLOCK_K]`` tile starting at column ``k0`` (a multiple of ``BLOCK_K``):
    from tables staged in registers when ``STAGED`` and the tile lies in one group (``BLOCK_K`` divides
    the group size), else gathered from global memory."""
    if STAGED and GROUP_SIZE % BLOCK_K == 0:
        return staged_weight_tile(codes_ptr, tables_ptr, offs_n, offs_k, mask_n, mask_k, stride_cn, stride_tn, K,
                                  k0 // GROUP_SIZE, BITS, NUM_CODES)  # fmt: skip
    else:
        return gather_weight_tile(codes_ptr, tables_ptr, offs_n, offs_k, mask_n, mask_k, stride_cn, stride_tn, K,
                                  GROUP_SIZE, BITS, NUM_CODES)  # fmt: skip


@triton.jit
def accumulate_rows(acc, w, x_ptr, stride_xm, cols, mask_cols, M, offs_m, BLOCK_M: tl.constexpr, WIDTH: tl.constexpr):
    """``acc [BLOCK_M, N] += x[:, cols] @ w.T`` for a few rows, on CUDA cores (``w [N, WIDTH]`` float32):
    one reduction per row, decode's case where a 16-row ``tl.dot`` tile would be mostly padding."""
    for m in tl.static_range(BLOCK_M):
        row_ok = tl.full((WIDTH,), m, tl.int32) < M
        x = tl.load(x_ptr + m * stride_xm + cols, mask=mask_cols & row_ok, other=0.0).to(tl.float32)
        row = tl.sum(w * x[None, :], axis=1)
        acc = tl.where(offs_m[:, None] == m, acc + row[None, :], acc)
    return acc


@triton.jit
def bin_by_code(grad_w, code, NUM_CODES: tl.constexpr):
    """``bins[n, j] = sum of grad_w[n, k] over the k where code[n, k] == j``: a ``[BLOCK_N, NUM_CODES]``
    fp32 tile from ``[BLOCK_N, BLOCK_K]`` tiles, one masked 2-D reduction per code value (a 3-D
    one-hot would hold ``NUM_CODES`` times the tile in registers and spill). Codes outside
    ``[0, NUM_CODES)`` (masked lanes) fall in no bin."""
    values = tl.arange(0, NUM_CODES)
    bins = tl.zeros((grad_w.shape[0], NUM_CODES), dtype=tl.float32)
    for j in tl.static_range(NUM_CODES):
        bin_j = tl.sum(tl.where(code == j, grad_w, 0.0), axis=1)
        bins = tl.where(values[None, :] == j, bin_j[:, None], bins)
    return bins


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (CPU tests)."""
    return bool(triton.knobs.runtime.interpret)


def dot_flags(dtype) -> dict:
    """Launch constants for ``tl.dot``: exact fp32 (no TF32) for fp32 inputs; and under the CPU
    interpreter, whose bf16 ``dot`` is wrong (numpy has no bf16), upcast bf16 tiles to fp32."""
    import torch

    return {
        "PRECISION": "ieee" if dtype == torch.float32 else "tf32",
        "UPCAST": bool(dtype == torch.bfloat16 and interpreting()),
    }


@triton.jit
def dot_operands(a, b, UPCAST: tl.constexpr):
    if UPCAST:
        return a.to(tl.float32), b.to(tl.float32)
    return a, b.to(a.dtype)
