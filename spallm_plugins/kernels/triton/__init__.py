"""Triton kernels for the LUT linear: fused matmul (prefill/training), GEMV (decode),
fused backward, and the multi-table-set matmul (multi-tenant serving).

Importing this package does not import triton; the kernels load on first use. Each kernel file holds
one kernel and its launcher; ``ops.py`` exposes them as ``torch.library`` custom ops
(``torch.ops.spallm.*``) so torch.compile, CUDA graphs and vLLM's compiled models can call them.
"""

from __future__ import annotations

import importlib.util

import torch

from .. import LUTProblem
from .tiles import table_grad_block_k

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class TritonBackend:
    """The CUDA kernels; refuses (with a reason) whatever they cannot run."""

    name = "triton"
    priority = 10

    def can_implement(self, problem: LUTProblem) -> tuple[bool, str]:
        if importlib.util.find_spec("triton") is None:
            return False, "triton is not installed (pip install 'spallm-plugins[triton]')"
        if problem.device_type != "cuda":
            return False, f"runs on CUDA, not {problem.device_type} (CPU tests use TRITON_INTERPRET=1)"
        if problem.bits not in (2, 4):
            return False, f"no kernel for {problem.bits}-bit codes (2 and 4 have one)"
        if problem.dtype not in SUPPORTED_DTYPES:
            return False, f"activations in {problem.dtype} (supported: float16, bfloat16, float32)"
        group_size = problem.in_features // problem.groups_per_row
        if problem.needs_grad and not table_grad_block_k(group_size):
            return False, f"group size {group_size} has no power-of-two divisor >= 16 (table-gradient tiles)"
        return True, ""

    def forward(self, x, codes, tables, bias, bits):
        from . import ops  # noqa: F401  (registers torch.ops.spallm.*)

        return torch.ops.spallm.lut_linear(x, codes, tables, bias, bits)

    def forward_table_sets(self, x, codes, table_sets, slots, bias, bits):
        from . import ops  # noqa: F401

        return torch.ops.spallm.lut_linear_table_sets(x, codes, table_sets, slots, bias, bits)

    def backward(self, grad_out, x, codes, tables, bits, need_input_grad, need_tables_grad):
        from . import ops  # noqa: F401

        grad_x = torch.ops.spallm.lut_grad_input(grad_out, codes, tables, bits) if need_input_grad else None
        grad_tables = None
        if need_tables_grad:
            deterministic = torch.are_deterministic_algorithms_enabled()
            grad_tables = torch.ops.spallm.lut_grad_tables(grad_out, x, codes, tables.shape[1], bits, deterministic)
        return grad_x, grad_tables
