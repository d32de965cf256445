"""Shared Triton helpers: unpacking codes and gathering table values inside a tile."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def unpack_codes_tile(codes_ptr, offs_n, offs_k, mask, stride_cn, BITS: tl.constexpr, NUM_CODES: tl.constexpr):
    """The k-bit codes of a ``[BLOCK_N, BLOCK_K]`` tile, packed little-endian along k (format v1)."""
    per_byte: tl.constexpr = 8 // BITS
    packed = tl.load(codes_ptr + offs_n[:, None] * stride_cn + (offs_k[None, :] // per_byte), mask=mask, other=0)
    return (packed.to(tl.int32) >> ((offs_k[None, :] % per_byte) * BITS).to(tl.int32)) & (NUM_CODES - 1)


@triton.jit
def gather_weight_tile(codes_ptr, tables_ptr, offs_n, offs_k, mask_n, mask_k, stride_cn, stride_tn,
                       GROUP_SIZE: tl.constexpr, BITS: tl.constexpr, NUM_CODES: tl.constexpr):  # fmt: skip
    """``W[n, k]`` for a ``[BLOCK_N, BLOCK_K]`` tile: unpack the k-bit code, then read the table value."""
    mask = mask_n[:, None] & mask_k[None, :]
    code = unpack_codes_tile(codes_ptr, offs_n, offs_k, mask, stride_cn, BITS, NUM_CODES)
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
