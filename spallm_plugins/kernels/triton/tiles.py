"""Tile-shape rules shared by the Triton launchers and the backend's ``can_implement`` (no triton import)."""

from __future__ import annotations

GEMV_MAX_ROWS = 16  # decode: up to this many rows go to the GEMV kernel, more to the tiled matmul


def table_grad_block_k(group_size: int, preferred: int = 64) -> int:
    """Largest power-of-two BLOCK_K <= preferred that divides the group size (>= 16), or 0 if none."""
    bk = preferred
    while bk >= 16:
        if group_size % bk == 0:
            return bk
        bk //= 2
    return 0
