"""Sketch one linear weight into codes and tables."""

from __future__ import annotations

import torch

from ..config import SketchConfig
from ..format import pack_codes
from .gptq import layer_loss, sketch_linear_calibrated
from .kmeans import assign_nearest, weighted_kmeans_1d
from .result import SketchResult


def row_groups(weight: torch.Tensor, groups_per_row: int) -> torch.Tensor:
    """``[out, in] -> [out*gpr, in/gpr]``: one row per (row, group)."""
    out_features, in_features = weight.shape
    return weight.reshape(out_features * groups_per_row, in_features // groups_per_row)


def sketch_linear(
    weight: torch.Tensor, config: SketchConfig, hessian: torch.Tensor | None = None, name: str = "layer"
) -> SketchResult:
    """Sketch ``weight [out, in]`` per ``config``.

    ``method="gptq"`` is the calibrated method (:mod:`spallm_plugins.sketch.gptq`) and needs the
    layer's Hessian. ``method="kmeans"`` is weighted k-means per row-group: data-free with unit
    weights, or, given a Hessian, with its diagonal as column weights.
    """
    out_features, in_features = weight.shape
    config.check_in_features(in_features, name)
    if config.method == "gptq":
        if hessian is None:
            raise ValueError(
                f"{name}: sketch method 'gptq' needs calibration data (a Hessian); use method 'kmeans' without"
            )
        return sketch_linear_calibrated(weight, config, hessian, name)
    gpr = config.groups_per_row
    w = weight.detach().float()
    groups = row_groups(w, gpr)
    col_weights = None
    if hessian is not None:
        diag = torch.diagonal(hessian).float().clamp_min(0)
        col_weights = (diag + 1e-8 * diag.mean().clamp_min(1e-12)).view(gpr, in_features // gpr)
        col_weights = col_weights.repeat(out_features, 1)
    centroids, _ = weighted_kmeans_1d(
        groups,
        config.num_codes,
        col_weights,
        iters=config.kmeans_iters,
        seed=config.seed,
        restarts=config.kmeans_restarts,
    )
    tables = centroids.to(config.torch_table_dtype())
    # Assign against the stored (rounded) table values so codes match what inference will see.
    assign = assign_nearest(groups, tables.float())
    recon = tables.float().gather(1, assign)
    if hessian is None:
        loss = float(((groups - recon) ** 2).sum())
    else:
        loss = float(layer_loss(w, recon.view(out_features, in_features), hessian.float()).sum())
    codes = pack_codes(assign.view(out_features, in_features), config.bits, name=f"{name}.codes")
    return SketchResult(codes=codes, tables=tables.view(out_features, gpr, config.num_codes), loss=loss)
