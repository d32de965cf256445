"""The LUT linear as an autograd function, dispatched to the best kernel backend that can run it."""

from __future__ import annotations

import torch

from .hooks import select_backend
from .kernels import KernelBackend, LUTProblem
from .kernels.reference import lut_linear_table_sets as reference_table_sets


def describe_problem(x: torch.Tensor, codes: torch.Tensor, tables: torch.Tensor, bits: int) -> LUTProblem:
    out_features, groups_per_row, _ = tables.shape
    return LUTProblem(
        device_type=x.device.type,
        dtype=x.dtype,
        table_dtype=tables.dtype,
        bits=bits,
        in_features=x.shape[-1],
        out_features=out_features,
        groups_per_row=groups_per_row,
        rows=x.numel() // max(x.shape[-1], 1),
        needs_grad=torch.is_grad_enabled() and (x.requires_grad or tables.requires_grad),
    )


class LUTLinearFunction(torch.autograd.Function):
    """``y = x @ W.T + b`` with ``W`` gathered from ``tables`` by ``codes``; gradients for x, tables, bias."""

    @staticmethod
    def forward(ctx, x, codes, tables, bias, bits, backend):
        ctx.save_for_backward(x, codes, tables)
        ctx.bits, ctx.backend, ctx.has_bias = bits, backend, bias is not None
        return backend.forward(x, codes, tables, bias, bits)

    @staticmethod
    def backward(ctx, grad_out):
        x, codes, tables = ctx.saved_tensors
        need_x, _, need_tables, need_bias = ctx.needs_input_grad[:4]
        grad_x, grad_tables = ctx.backend.backward(grad_out, x, codes, tables, ctx.bits, need_x, need_tables)
        if grad_tables is not None:
            grad_tables = grad_tables.to(tables.dtype)
        grad_bias = grad_out.sum(0) if (ctx.has_bias and need_bias) else None
        return grad_x, None, grad_tables, grad_bias, None, None


def lut_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    tables: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    backend: KernelBackend | None = None,
) -> torch.Tensor:
    """Apply the LUT linear to ``x [..., in]``; returns ``[..., out]`` in ``x.dtype``."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if backend is None:
        backend = select_backend(describe_problem(x2, codes, tables, bits))
    y = LUTLinearFunction.apply(x2, codes, tables, bias, bits, backend)
    return y.reshape(*lead, y.shape[-1])


def lut_linear_table_sets(
    x: torch.Tensor,
    codes: torch.Tensor,
    table_sets: torch.Tensor,
    slots: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    backend: KernelBackend | None = None,
) -> torch.Tensor:
    """Inference over many table sets sharing ``codes``: row ``m`` of ``x [M, in]`` uses ``table_sets[slots[m]]``.

    This is multi-tenant serving's one LUT matmul per layer: the codes are read once for all tenants.
    """
    if backend is None:
        backend = select_backend(describe_problem(x, codes, table_sets[0], bits))
    forward = getattr(backend, "forward_table_sets", None) or reference_table_sets
    return forward(x, codes, table_sets, slots, bias, bits)
