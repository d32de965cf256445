"""Shared Triton helpers: unpacking codes and gathering table values inside a tile."""

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
