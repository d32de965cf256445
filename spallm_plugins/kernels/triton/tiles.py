"""Tile-shape and tuning rules shared by the Triton launchers and the backend's ``can_implement`` (no triton import)."""

from __future__ import annotations

MAX_REGISTERS = 128  # per thread, so that two CTAs of 4 warps or more fit an SM's register file (sm90)
GEMV_MAX_ROWS = 16  # decode: up to this many rows go to the GEMV kernel, more to the tiled matmul
GEMV_DOT_ROWS = 5  # from this many rows (the 5-16 bucket) on, the GEMV multiplies with tl.dot on a 16-row tile
GEMV_BYTES_MAX_ROWS = GEMV_DOT_ROWS - 1  # 2/4-bit codes at up to this many rows: the byte-wise GEMV

# Above the GEMV range the layer runs as dequantize (one Triton pass, codes -> W in the activation dtype)
# then cuBLAS, forward and backward: on an H200 the fused tiled kernels were slower than that pair at every
# prefill and training shape timed (docs/kernels.md). A W larger than DEQUANTIZE_MAX_BYTES is never
# materialised: such layers keep the fused kernels.
DEQUANTIZE_MIN_ROWS = GEMV_MAX_ROWS + 1
DEQUANTIZE_MAX_BYTES = 1 << 31

M_BUCKET_STARTS = (1, 2, 5, 17, 65, 257)  # row-count buckets 1, 2-4, 5-16, 17-64, 65-256, >256
AUTOTUNE_KEY = ["M_BUCKET", "N", "K", "GROUP_SIZE", "BITS"]  # the row bucket and the layer shape, never M


def m_bucket(rows: int) -> int:
    """The first row count of ``rows``' autotuning bucket (1, 2-4, 5-16, 17-64, 65-256, >256).

    The autotuned kernels key on this instead of M: keyed on M, every new prefill length would
    benchmark all configs again (seconds of compiling and timing in the middle of a request), while
    the best tile hardly changes within a bucket. Zero rows share the one-row bucket.
    """
    if rows < 0:
        raise ValueError(f"row count must be >= 0, got {rows}")
    return max(start for start in M_BUCKET_STARTS if start <= max(rows, 1))


def table_grad_block_k(group_size: int, preferred: int = 64) -> int:
    """Largest power-of-two BLOCK_K <= preferred that divides the group size (>= 16), or 0 if none."""
    bk = preferred
    while bk >= 16:
        if group_size % bk == 0:
            return bk
        bk //= 2
    return 0


def dequantized_path(rows: int, out_features: int, in_features: int, element_size: int) -> bool:
    """Whether ``rows`` rows through an ``out x in`` layer go through dequantize + cuBLAS (see above)."""
    return rows >= DEQUANTIZE_MIN_ROWS and out_features * in_features * element_size <= DEQUANTIZE_MAX_BYTES
