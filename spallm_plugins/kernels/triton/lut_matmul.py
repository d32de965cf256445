"""Fused LUT matmul ``Y = X @ W.T (+ b)``, W gathered tile by tile from packed codes and tables.

For prefill and training (M > 16): each program dequantizes one ``[BLOCK_N, BLOCK_K]`` W tile per K
step (tables gathered; the cost is shared by all ``BLOCK_M`` rows) and hands it to ``tl.dot``, which
stages it in shared memory for the tensor cores; fp32 accumulation; the dense W never exists in memory.
Above the GEMV range the Triton backend dequantizes W once and calls cuBLAS instead (``tiles.DEQUANTIZE_MIN_ROWS``);
this kernel serves the layers whose W is too large to materialise (``tiles.DEQUANTIZE_MAX_BYTES``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import dot_flags, dot_operands, gather_weight_tile, interpreting
from .layout import kernel_codes
from .tiles import AUTOTUNE_KEY, m_bucket

# Hopper (H100/H200) likes 128x128/64 tiles with 4-8 warps; Ampere 128x64/32.
CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
]


@triton.jit(do_not_specialize=["M_BUCKET"])
def lut_matmul_kernel(x_ptr, codes_ptr, tables_ptr, bias_ptr, y_ptr, M, N, K, M_BUCKET,
                      stride_xm, stride_cn, stride_tn, stride_ym,
                      HAS_BIAS: tl.constexpr, GROUP_SIZE: tl.constexpr, BITS: tl.constexpr,
                      NUM_CODES: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0
        )
        w = gather_weight_tile(codes_ptr, tables_ptr, offs_n, offs_k, mask_n, mask_k, stride_cn, stride_tn, K,
                               GROUP_SIZE, BITS, NUM_CODES)  # fmt: skip
        a, b = dot_operands(x, w, UPCAST)
        acc += tl.dot(a, tl.trans(b), out_dtype=tl.float32, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])  # fmt: skip


_autotuned = triton.autotune(configs=CONFIGS, key=AUTOTUNE_KEY)(lut_matmul_kernel)


def lut_matmul(
    x: torch.Tensor,
    codes: torch.Tensor,
    tables: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    block: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """``x [M, K]`` -> ``[M, N]`` in ``x.dtype``. ``block=(BM, BN, BK)`` skips autotuning (tests, interpreter).

    ``codes`` in format v1 or already in the kernels' layout (:func:`~.layout.kernel_codes`)."""
    M, K = x.shape
    N, groups, num_codes = tables.shape
    x, codes = x.contiguous(), kernel_codes(codes, bits).contiguous()  # the kernel assumes unit inner strides
    tables = tables.to(x.dtype).contiguous()
    has_bias = bias is not None
    bias = bias.contiguous() if has_bias else tables  # without a bias the kernel never reads it
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    args = (x, codes, tables, bias, y, M, N, K, m_bucket(M),
            x.stride(0), codes.stride(0), tables.stride(0), y.stride(0))  # fmt: skip
    meta = dict(HAS_BIAS=has_bias, GROUP_SIZE=K // groups, BITS=bits, NUM_CODES=num_codes, **dot_flags(x.dtype))
    if block is None and interpreting():
        block = (32, 32, 32)  # the CPU interpreter cannot autotune (no device timer)
    if block is None:
        grid = lambda m: (triton.cdiv(M, m["BLOCK_M"]), triton.cdiv(N, m["BLOCK_N"]))  # noqa: E731
        _autotuned[grid](*args, **meta)
    else:
        bm, bn, bk = block
        lut_matmul_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](*args, **meta, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    return y
