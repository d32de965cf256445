"""Calibrated sketching of one linear: loss-error-aware tables, error-feedback codes, table refit.

With ``H = 2/n * sum(x x^T)`` from calibration inputs, the layer's output error for a weight
estimate ``Ŵ`` is ``sum_r (w_r - ŵ_r) H (w_r - ŵ_r)^T``. The steps:

1. **Damping.** ``H += damping * mean(diag(H)) * I``; dead columns (never active) get ``H_ii = 1`` and
   zero weight. If Cholesky still fails, damping is multiplied by 10 (and a warning says so).
2. **Tables** (LeanQuant's loss-error-aware grid): weighted k-means per row-group, where column
   ``c`` has weight ``U_cc ** -p`` with ``U`` the upper Cholesky factor of ``H^-1``. Columns whose
   rounding errors are expensive pull the table values toward themselves.
3. **Codes** by GPTQ-style error feedback: columns in order (optionally by descending ``H_cc``,
   "act-order", undone before writing), each rounded to the nearest value of its row-group's table,
   the scaled error pushed onto the columns not yet assigned, in blocks with lazy batch updates.
4. **Refit** (beyond the reference): with codes fixed the loss is quadratic in the table values, so
   each row's tables are re-solved by preconditioned conjugate gradient on the normal equations
   ``(S H S^T) t = S H w`` (``S`` the one-hot code matrix; every product is a batched matmul with
   ``H``, never an ``S H S^T`` per row). A row keeps its new tables only if its loss went down.
   With ``refit_rounds > 1`` the codes are re-assigned (step 3) with the refit tables and refit
   again, keeping each row's best.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..config import SketchConfig
from ..format import pack_codes
from .kmeans import kmeans_uniforms, weighted_kmeans_1d
from .memory import row_chunks
from .result import SketchResult

logger = logging.getLogger(__name__)
MAX_DAMPING_RETRIES = 6


class HessianError(ValueError):
    """The Hessian of a layer is unusable (not finite, or not positive definite even when damped)."""


@dataclass
class PreparedHessian:
    hessian: torch.Tensor  # undamped, dead columns set to 1, original order (the loss metric)
    perm: torch.Tensor  # processing order of the columns (identity unless act-order)
    inverse_cholesky: torch.Tensor  # upper Cholesky factor of the damped, permuted inverse
    dead: torch.Tensor  # bool [in]
    damping: float  # the fraction of mean(diag) finally used


def prepare_hessian(
    hessian: torch.Tensor,
    damping: float,
    name: str = "layer",
    act_order: bool = False,
    *,
    overwrite: bool = False,
) -> PreparedHessian:
    """Fix dead columns, order columns (act-order: by descending ``H_cc``), damp and factor.

    Retries with 10x the damping while Cholesky fails, saying so in a warning. With ``overwrite``
    the caller hands a float32 ``hessian`` over: its dead columns are fixed in place and it becomes
    the prepared Hessian itself, one ``[in, in]`` matrix fewer than a copy (3.3 GB for a 70B
    down_proj). The damped copy is factored, inverted and factored again in its own memory: LAPACK
    and cuSOLVER work on column-major matrices, so every step reads and writes the same
    column-major view of it (``work.mT``; a row-major ``out`` would make torch allocate a proxy
    matrix and copy it back). Two ``[in, in]`` matrices are alive at once, the Hessian and the
    factor; on CUDA ``cholesky_inverse`` works on one or two copies of its own (cuSOLVER's solve
    against the identity, by torch version).
    """
    h = hessian.detach()
    if h.dtype != torch.float32:
        h = h.float()
    elif not overwrite:
        h = h.clone()
    lowest, highest = torch.aminmax(h, dim=1)  # NaN and inf show in these without an [in, in] temporary
    if not (torch.isfinite(lowest).all() and torch.isfinite(highest).all()):
        raise HessianError(f"{name}: the Hessian has NaN or inf entries (non-finite calibration activations?)")
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    n = h.shape[0]
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else torch.arange(n)
    perm = perm.to(h.device)
    mean_diag = float(torch.diagonal(h).mean())
    fraction = damping
    info = torch.zeros((), dtype=torch.int32, device=h.device)
    for attempt in range(MAX_DAMPING_RETRIES + 1):
        work = h[perm[:, None], perm] if act_order else h.clone()
        work.diagonal().add_(fraction * mean_diag)
        factor = work.mT  # symmetric: the same matrix, column-major; only this view is passed in and out below
        del work
        torch.linalg.cholesky_ex(factor, out=(factor, info))
        if not int(info):
            torch.cholesky_inverse(factor, out=factor)
            torch.linalg.cholesky_ex(factor, upper=True, out=(factor, info))
            if not int(info):
                if attempt:
                    logger.warning("%s: Hessian not positive definite; succeeded with damping %.3g", name, fraction)
                return PreparedHessian(h, perm, factor, dead, fraction)
        del factor
        if attempt == MAX_DAMPING_RETRIES:
            break
        fraction = max(fraction, 1e-6) * 10
        logger.warning("%s: Hessian is not positive definite after damping; retrying with damping %.3g", name, fraction)
    raise HessianError(
        f"{name}: the Hessian is not positive definite even with damping {fraction:.3g} x mean(diag); "
        "check the calibration data"
    )


def loss_error_aware_weights(inverse_cholesky: torch.Tensor, exponent: float) -> torch.Tensor:
    """LeanQuant's k-means column weights ``U_cc ** -p``, normalised to mean 1 (processing order)."""
    weights = torch.diagonal(inverse_cholesky).clamp_min(1e-12) ** (-exponent)
    return weights / weights.mean()


def layer_loss(weight: torch.Tensor, estimate: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Per-row output error ``(w - ŵ) H (w - ŵ)^T``."""
    diff = (weight - estimate).float()
    return ((diff @ hessian) * diff).sum(1)


def error_feedback_codes(
    weight: torch.Tensor,
    tables: torch.Tensor,
    group_of_column: torch.Tensor,
    inverse_cholesky: torch.Tensor,
    block_size: int = 128,
) -> torch.Tensor:
    """Assign codes column by column, pushing each column's scaled rounding error onto later columns.

    ``weight`` ``[out, in]`` and ``inverse_cholesky`` are in processing order; ``tables`` is
    ``[out, groups, k]`` with sorted rows; ``group_of_column[c]`` is the table group of processed
    column ``c``. Returns int64 codes ``[out, in]`` in processing order.
    """
    w = weight.float().clone()
    out_features, in_features = w.shape
    codes = torch.empty(out_features, in_features, dtype=torch.long, device=w.device)
    group_tables = [tables[:, g].contiguous() for g in range(tables.shape[1])]
    group_midpoints = [((t[:, 1:] + t[:, :-1]) * 0.5).contiguous() for t in group_tables]
    groups = group_of_column.tolist()
    for start in range(0, in_features, block_size):
        end = min(start + block_size, in_features)
        block = w[:, start:end].T.contiguous()  # column-major: each column is a contiguous row here
        errors = torch.empty_like(block)
        u_block = inverse_cholesky[start:end, start:end]
        for i in range(end - start):
            g = groups[start + i]
            column = block[i].unsqueeze(1)
            code = torch.searchsorted(group_midpoints[g], column)
            err = (column - group_tables[g].gather(1, code)).squeeze(1) / u_block[i, i]
            block[i:].addr_(u_block[i, i:], err, alpha=-1)
            errors[i] = err
            codes[:, start + i] = code.squeeze(1)
        w[:, end:] -= errors.T @ inverse_cholesky[start:end, end:]
    return codes


def refit_tables(
    weight: torch.Tensor,
    codes: torch.Tensor,
    tables: torch.Tensor,
    hessian: torch.Tensor,
    iters: int = 10,
    tol: float = 1e-6,
    error_product: torch.Tensor | None = None,
) -> torch.Tensor:
    """Least-squares tables for fixed codes: minimise ``(w - S^T t) H (w - S^T t)^T`` per row.

    Batched Jacobi-preconditioned conjugate gradient over all rows, warm-started at ``tables``; a
    row stops at its own convergence, so its result does not depend on the other rows.
    ``codes`` are int64 ``[out, in]``; returns float32 tables of the same shape as ``tables``.
    ``error_product`` is ``(w - S^T tables) @ H`` when the caller already has it (the loss before
    the refit needs the same product); each product with ``H`` is most of the refit's cost.
    """
    out_features, groups, k = tables.shape
    in_features = weight.shape[1]
    entries = groups * k
    group = torch.arange(in_features, device=weight.device) // (in_features // groups)
    index = group[None, :] * k + codes  # [out, in] -> table entry

    def gather(t):  # S^T t: the weight each table set implies
        return t.gather(1, index)

    def reduce(v):  # S v: sum over the columns of each entry
        return torch.zeros(out_features, entries, dtype=v.dtype, device=v.device).scatter_add_(1, index, v)

    t = tables.reshape(out_features, entries).float().clone()
    h = hessian.float()
    diag = reduce(torch.diagonal(h).expand(out_features, -1).contiguous())
    used = diag > 0
    precond = torch.where(used, 1.0 / diag.clamp_min(1e-30), torch.zeros_like(diag))
    if error_product is None:
        error_product = (weight.float() - gather(t)) @ h
    residual = reduce(error_product)  # S H (w - S^T t): the right-hand side less S H S^T t
    del error_product
    z = precond * residual
    p = z.clone()
    rz = (residual * z).sum(1, keepdim=True)
    start_norm = residual.norm(dim=1, keepdim=True).clamp_min(1e-30)
    active = torch.ones_like(start_norm, dtype=torch.bool)
    for _ in range(iters):
        hp = reduce(gather(p) @ h)
        denom = (p * hp).sum(1, keepdim=True)
        alpha = torch.where((denom > 0) & active, rz / denom.clamp_min(1e-30), torch.zeros_like(denom))
        t += alpha * p
        residual -= alpha * hp
        active &= residual.norm(dim=1, keepdim=True) / start_norm >= tol
        if not active.any():
            break
        z = precond * residual
        rz_new = (residual * z).sum(1, keepdim=True)
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(1e-30), torch.zeros_like(rz))
        p = z + beta * p
        rz = rz_new
    return t.view(out_features, groups, k)


def sketch_linear_calibrated(
    weight: torch.Tensor,
    config: SketchConfig,
    hessian: torch.Tensor | PreparedHessian,
    name: str = "layer",
    block_size: int = 128,
    max_memory: int | None = None,
) -> SketchResult:
    """Sketch ``weight [out, in]`` against the calibration Hessian ``[in, in]`` (see module docstring).

    ``hessian`` may come already prepared (:func:`prepare_hessian` with ``config``'s damping and
    act-order): linears that share an input (q/k/v, gate/up) share one factorisation.
    Rows are sketched in chunks whose workspace fits ``max_memory`` bytes (:mod:`.memory`); the
    result does not depend on the chunk size.
    """
    out_features, in_features = weight.shape
    config.check_in_features(in_features, name)
    shape = (hessian.hessian if isinstance(hessian, PreparedHessian) else hessian).shape
    if shape != (in_features, in_features):
        raise HessianError(f"{name}: Hessian shape {tuple(shape)}, expected {(in_features, in_features)}")
    gpr = config.groups_per_row
    if isinstance(hessian, PreparedHessian):
        prepared = hessian
    else:
        prepared = prepare_hessian(hessian.to(weight.device), config.damping, name, config.act_order)
    column_weight = loss_error_aware_weights(prepared.inverse_cholesky, config.grid_exponent)
    column_weight = column_weight[torch.argsort(prepared.perm)]  # original column order
    uniforms = kmeans_uniforms(out_features * gpr, config.num_codes, config.seed, config.kmeans_restarts)
    parts = [
        _sketch_rows(
            weight[rows], config, prepared, column_weight, uniforms[:, rows.start * gpr : rows.stop * gpr], block_size
        )
        for rows in row_chunks(out_features, in_features, max_memory)
    ]
    codes, tables, loss_before, loss_after, kept = (torch.cat(column) for column in zip(*parts))
    return SketchResult(
        codes=codes,
        tables=tables,
        loss=float(loss_after.sum()),
        loss_before_refit=float(loss_before.sum()),
        refit_rows=int(kept.sum()),
        damping=prepared.damping,
    )


def _sketch_rows(
    weight: torch.Tensor,
    config: SketchConfig,
    prepared: PreparedHessian,
    column_weight: torch.Tensor,
    uniforms: torch.Tensor,
    block_size: int,
) -> tuple[torch.Tensor, ...]:
    """Tables, codes and refit for some rows: ``(packed codes, tables, loss before/after refit, refit kept)``."""
    out_features, in_features = weight.shape
    gpr, k = config.groups_per_row, config.num_codes
    group_size = in_features // gpr
    w = weight.detach().float().clone()
    w[:, prepared.dead] = 0
    perm, upper = prepared.perm, prepared.inverse_cholesky
    inv_perm = torch.argsort(perm)

    groups = w.reshape(out_features * gpr, group_size)
    group_weights = column_weight.view(gpr, group_size).repeat(out_features, 1)
    centroids, _ = weighted_kmeans_1d(
        groups,
        k,
        group_weights,
        iters=config.kmeans_iters,
        restarts=config.kmeans_restarts,
        uniforms=uniforms,
        assignments=False,
    )
    del groups, group_weights
    tables = centroids.to(config.torch_table_dtype()).float().view(out_features, gpr, k)

    def assign(t: torch.Tensor) -> torch.Tensor:
        return error_feedback_codes(w[:, perm], t, perm // group_size, upper, block_size)[:, inv_perm]

    codes = assign(tables)
    error = w - gather_weight(tables, codes)
    error_product = error @ prepared.hessian
    loss_before = (error_product * error).sum(1)  # layer_loss, sharing its product with the refit
    del error
    loss_after = loss_before
    kept = torch.zeros(out_features, dtype=torch.bool, device=w.device)
    for round_index in range(config.refit_rounds if config.refit else 0):
        if round_index:
            codes = torch.where(kept[:, None], assign(tables), codes)
        refit = refit_tables(w, codes, tables, prepared.hessian, error_product=error_product)
        error_product = None
        refit = refit.to(config.torch_table_dtype()).float()
        refit = refit.sort(dim=-1)
        # sorting permutes the entries of each table: remap codes so each still points at its value
        rank = torch.argsort(refit.indices, dim=-1).view(out_features * gpr, k)
        remapped = rank.gather(1, codes.view(out_features * gpr, group_size)).view(out_features, in_features)
        new_loss = layer_loss(w, gather_weight(refit.values, remapped), prepared.hessian)
        better = new_loss < loss_after
        kept |= better
        tables = torch.where(better[:, None, None], refit.values, tables)
        codes = torch.where(better[:, None], remapped, codes)
        loss_after = torch.where(better, new_loss, loss_after)
    packed = pack_codes(codes, config.bits)
    return packed, tables.to(config.torch_table_dtype()), loss_before, loss_after, kept


def gather_weight(tables: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Dense ``[out, in]`` weight from float tables ``[out, gpr, k]`` and unpacked int64 codes."""
    out_features, gpr, k = tables.shape
    in_features = codes.shape[1]
    flat = tables.reshape(out_features * gpr, k)
    return flat.gather(1, codes.reshape(out_features * gpr, in_features // gpr)).view(out_features, in_features)


__all__ = [
    "HessianError",
    "error_feedback_codes",
    "gather_weight",
    "layer_loss",
    "prepare_hessian",
    "refit_tables",
    "sketch_linear_calibrated",
]
