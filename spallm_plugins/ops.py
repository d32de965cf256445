"""The LUT linear as an autograd function, dispatched to the best kernel backend that can run it."""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils.weak import WeakIdKeyDictionary

from .hooks import select_backend
from .kernels import KernelBackend, LUTProblem, prepare_weights
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


# codes tensor -> {(backend type, backend name, bits): (stamp, prepared codes)}; entries die with the codes tensor
_PREPARED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _stamp(codes: torch.Tensor) -> tuple | None:
    """What must not change for a prepared layout to stay valid: the storage, the shape and the
    in-place version (``copy_``, ``load_state_dict``); None where there is none to read (an inference
    tensor has no version, a fake or meta tensor no storage): then nothing is cached."""
    if codes.is_meta or isinstance(codes, FakeTensor):
        return None
    try:
        return codes._version, codes.data_ptr(), tuple(codes.shape), tuple(codes.stride()), codes.device
    except (RuntimeError, NotImplementedError):
        return None


def prepared_codes(
    backend: object, codes: torch.Tensor, tables: torch.Tensor, bits: int, cache: bool = True
) -> torch.Tensor:
    """``codes`` in the layout ``backend`` reads: its load-time step (:func:`~spallm_plugins.kernels.prepare_weights`,
    e.g. the Triton backend's 3-bit bit planes), done once per codes tensor and reused while that tensor
    lives unchanged, so a layer keeps its format-v1 ``codes`` (``state_dict()`` is format v1) and
    repacks once per backend. Only the codes are prepared: tables reach the backend as they are, since
    they train (a backend whose ``prepare_weights`` changes tables must be driven through its
    prepared tensors directly, as vLLM does). A repacked layout costs one more copy of the codes while
    it lives (3-bit on the Triton backend: 3 bits per weight); the 2/4-bit layouts are the stored codes.

    ``cache=False`` prepares for this call only: for a sharded layer (FSDP2), whose codes are gathered
    into a persistent unsharded parameter, a cached layout would pin a full copy of every layer on every
    rank, undoing the sharding (:func:`spallm_plugins.sharding.check_sharded` turns it off).
    """
    if getattr(backend, "prepare_weights", None) is None:
        return codes
    if torch.compiler.is_compiling():  # traced into the graph; a Python cache would not survive tracing
        return prepare_weights(backend, codes, tables, bits)[0]
    if not cache:
        with torch.no_grad():
            return prepare_weights(backend, codes, tables, bits)[0]
    stamp = _stamp(codes)
    key = (type(backend), getattr(backend, "name", ""), bits)
    entries = _PREPARED.get(codes) if stamp is not None else None
    if entries is not None and key in entries and entries[key][0] == stamp:
        kept = entries[key][1]
        return codes if kept is None else kept
    with torch.inference_mode(False), torch.no_grad():  # a cached layout must be usable by autograd later
        prepared = prepare_weights(backend, codes, tables, bits)[0]
    if stamp is None:
        return prepared
    if prepared is not codes and prepared.untyped_storage().data_ptr() == codes.untyped_storage().data_ptr():
        return prepared  # a view of the codes would keep its key alive: made again on each call (views are cheap)
    if entries is None:
        entries = _PREPARED[codes] = {}
    entries[key] = (stamp, None if prepared is codes else prepared)  # None: the stored layout, no copy
    return prepared


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
    cache: bool = True,
) -> torch.Tensor:
    """Apply the LUT linear to ``x [..., in]``; returns ``[..., out]`` in ``x.dtype``.

    ``cache``: keep the backend's prepared codes layout for the next call (see :func:`prepared_codes`).
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if backend is None:
        backend = select_backend(describe_problem(x2, codes, tables, bits))
    prepared = prepared_codes(backend, codes, tables, bits, cache)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x2, tables, bias)):
        y = LUTLinearFunction.apply(x2, prepared, tables, bias, bits, backend)
    else:  # inference: no autograd node to build (a few microseconds per layer per token)
        y = backend.forward(x2, prepared, tables, bias, bits)
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
    forward = getattr(backend, "forward_table_sets", None)
    if forward is None:  # the reference reads format v1
        return reference_table_sets(x, codes, table_sets, slots, bias, bits)
    return forward(x, prepared_codes(backend, codes, table_sets[0], bits), table_sets, slots, bias, bits)
