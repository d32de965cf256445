"""The CPU kernels for the LUT linear (C with AVX-512 / AVX2 / portable paths, OpenMP; ``lut_cpu.c``).

Decode (up to :data:`.ops.GEMV_MAX_ROWS` rows of x) runs the LUT GEMM, which reads each code once and never
builds the dense weight; more rows (prefill, training) dequantize in one pass and run torch's dense
matmul. Table gradients stay on the reference (a scatter-add). The library is compiled on first use
(:mod:`.library`); where it cannot be (no compiler), ``can_implement`` refuses with the reason and the
reference runs.
"""

from __future__ import annotations

import torch

from .. import LUTProblem
from ..reference import checked_slots, per_slot
from ..reference import lut_linear_backward as reference_backward
from .library import TABLE_DTYPES, unavailable_reason
from .ops import GEMV_MAX_ROWS, linear_rows

__all__ = ["GEMV_MAX_ROWS", "SUPPORTED_DTYPES", "CPUBackend"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_PLAIN = (torch.Tensor, torch.nn.Parameter)


class CPUBackend:
    """The compiled CPU kernels; refuses (with a reason) what they cannot run."""

    name = "cpu"
    priority = 5
    min_capability = 0

    def can_implement(self, problem: LUTProblem) -> tuple[bool, str]:
        if problem.device_type != "cpu":
            return False, f"runs on the CPU, not {problem.device_type}"
        if problem.bits not in (2, 3, 4):
            return False, f"no kernel for {problem.bits}-bit codes (2, 3 and 4 have one)"
        if problem.dtype not in SUPPORTED_DTYPES:
            return False, f"activations in {problem.dtype} (supported: float32, bfloat16, float16)"
        if problem.table_dtype not in TABLE_DTYPES:
            return False, f"tables in {problem.table_dtype} (supported: float32, float16, bfloat16)"
        if problem.groups_per_row < 1 or problem.in_features % problem.groups_per_row:
            return (
                False,
                f"in_features {problem.in_features} is not a multiple of groups_per_row {problem.groups_per_row}",
            )
        if problem.in_features * problem.bits % 8:
            return False, f"in_features {problem.in_features} does not fill whole bytes of {problem.bits}-bit codes"
        reason = unavailable_reason()
        return not reason, reason

    # No prepare_weights: the kernels read format v1 as stored (each row's codes unpacked as they go),
    # so ops.lut_linear skips its per-call layout cache.

    def forward(self, x, codes, tables, bias, bits):
        """Through the custom op where torch traces (torch.compile, fake or other tensor subclasses); plain
        tensors in eager mode call its body directly: the op's dispatch cost about 30 us a call, as much
        as the kernel itself on SmolLM2's 576 x 576 layers."""
        if torch.compiler.is_compiling() or not all(type(t) in _PLAIN for t in (x, codes, tables)):
            return torch.ops.spallm.lut_linear_cpu(x, codes, tables, bias, bits)
        return linear_rows(x, codes, tables, bias, bits)

    def forward_table_sets(self, x, codes, table_sets, slots, bias, bits):
        """One :meth:`forward` per table set in use, on that set's rows (the slots are read on the host,
        as the reference's CPU path does)."""
        slots = checked_slots(x, slots, table_sets.shape[0])
        return per_slot(x, slots, lambda rows, slot: self.forward(rows, codes, table_sets[slot], bias, bits))

    def backward(self, grad_out, x, codes, tables, bits, need_input_grad, need_tables_grad):
        grad_x = None
        if need_input_grad:
            grad_x = (grad_out.float() @ torch.ops.spallm.dequantize_cpu(codes, tables, bits)).to(grad_out.dtype)
        _, grad_tables = reference_backward(grad_out, x, codes, tables, bits, False, need_tables_grad)
        return grad_x, grad_tables
