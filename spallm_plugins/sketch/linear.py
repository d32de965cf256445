"""Sketch one linear weight into codes and tables."""

from __future__ import annotations

import torch

from ..config import SketchConfig
from ..format import pack_codes
from .gptq import PreparedHessian, layer_loss, sketch_linear_calibrated
from .kmeans import assign_nearest, kmeans_uniforms, weighted_kmeans_1d
from .memory import row_chunks
from .result import SketchResult


def row_groups(weight: torch.Tensor, groups_per_row: int) -> torch.Tensor:
    """``[out, in] -> [out*gpr, in/gpr]``: one row per (row, group)."""
    out_features, in_features = weight.shape
    return weight.reshape(out_features * groups_per_row, in_features // groups_per_row)


def sketch_linear(
    weight: torch.Tensor,
    config: SketchConfig,
    hessian: torch.Tensor | PreparedHessian | None = None,
    name: str = "layer",
    max_memory: int | None = None,
) -> SketchResult:
    """Sketch ``weight [out, in]`` per ``config``.

    ``method="gptq"`` is the calibrated method (:mod:`spallm_plugins.sketch.gptq`) and needs the
    layer's Hessian. ``method="kmeans"`` is weighted k-means per row-group: data-free with unit
    weights, or, given a Hessian, with its diagonal as column weights. Either way the rows are
    sketched in chunks whose workspace fits ``max_memory`` bytes (:mod:`.memory`), with the same
    result for any chunk size.
    """
    out_features, in_features = weight.shape
    config.check_in_features(in_features, name)
    if config.method == "gptq":
        if hessian is None:
            raise ValueError(
                f"{name}: sketch method 'gptq' needs calibration data (a Hessian); use method 'kmeans' without"
            )
        return sketch_linear_calibrated(weight, config, hessian, name, max_memory=max_memory)
    if isinstance(hessian, PreparedHessian):
        raise TypeError(f"{name}: a prepared Hessian is for method 'gptq'; method 'kmeans' takes the Hessian itself")
    gpr, k = config.groups_per_row, config.num_codes
    column_weight = None
    if hessian is not None:
        diag = torch.diagonal(hessian).float().clamp_min(0)
        column_weight = (diag + 1e-8 * diag.mean().clamp_min(1e-12)).view(gpr, in_features // gpr)
    uniforms = kmeans_uniforms(out_features * gpr, k, config.seed, config.kmeans_restarts)
    codes, tables, losses = [], [], []
    for rows in row_chunks(out_features, in_features, max_memory):
        w = weight[rows].detach().float()
        groups = row_groups(w, gpr)
        centroids, _ = weighted_kmeans_1d(
            groups,
            k,
            None if column_weight is None else column_weight.repeat(w.shape[0], 1),
            iters=config.kmeans_iters,
            restarts=config.kmeans_restarts,
            uniforms=uniforms[:, rows.start * gpr : rows.stop * gpr],
            assignments=False,
        )
        chunk_tables = centroids.to(config.torch_table_dtype())
        # Assign against the stored (rounded) table values so codes match what inference will see.
        assign = assign_nearest(groups, chunk_tables.float())
        recon = chunk_tables.float().gather(1, assign)
        if hessian is None:
            losses.append(((groups - recon) ** 2).view(w.shape[0], in_features).sum(1))
        else:
            losses.append(layer_loss(w, recon.view(w.shape[0], in_features), hessian.float()))
        codes.append(pack_codes(assign.view(w.shape[0], in_features), config.bits, name=f"{name}.codes"))
        tables.append(chunk_tables.view(w.shape[0], gpr, k))
    return SketchResult(codes=torch.cat(codes), tables=torch.cat(tables), loss=float(torch.cat(losses).sum()))
