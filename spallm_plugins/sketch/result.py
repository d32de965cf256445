"""What sketching one linear produces (its own module, so the data-free and calibrated paths share it)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SketchResult:
    codes: torch.Tensor  # packed uint8 [out, in*bits/8]
    tables: torch.Tensor  # [out, groups_per_row, 2**bits] in the config's table dtype
    loss: float  # output error sum_r (w - ŵ) H (w - ŵ)^T with a Hessian, else squared weight error
    loss_before_refit: float | None = None
    refit_rows: int = 0  # rows whose refit tables were kept
    damping: float | None = None  # damping finally used (after retries)
