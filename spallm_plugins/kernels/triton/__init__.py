"""Triton kernels for the LUT linear: GEMV (decode; over code words with a register lookup where the
codes were prepared so, else byte-wise for 2/4-bit codes at 1-4 rows),
dequantize for cuBLAS (prefill and training above 16 rows, and the table gradient's binning), fused
matmul and backward (layers whose dense W would be too large to materialise), and the
multi-table-set matmul (multi-tenant serving). ``tiles.py`` holds the dispatch rules.

Importing this package does not import triton; the kernels load on first use. Each kernel file holds
one kernel and its launcher; ``ops.py`` exposes them as ``torch.library`` custom ops
(``torch.ops.spallm.*``) so torch.compile, CUDA graphs and vLLM's compiled models can call them.
``layout.py`` is the codes layout the kernels read (3-bit: bit planes) and the load-time repack into
it, :meth:`TritonBackend.prepare_weights`.
"""

from __future__ import annotations

import importlib.util

import torch

from .. import LUTProblem
from .layout import chunk_units, code_columns, code_words, format_v1_codes, kernel_codes
from .tiles import table_grad_block_k

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_BITS = (2, 3, 4)  # 3-bit codes are read from bit planes (layout.kernel_codes)
# bf16 tiles need sm80 (Ampere); fp16 and fp32 compile from sm70 (Volta) on.
MIN_CAPABILITY = {torch.float16: 70, torch.float32: 70, torch.bfloat16: 80}
MAX_INDEX = 2**31 - 1  # the kernels compute element offsets in int32


def capability_refusal(capability: tuple[int, int], dtype: torch.dtype) -> str:
    """Why a CUDA device of compute capability ``(major, minor)`` cannot run the kernels in ``dtype``
    ("" when it can). Separate from the device query so the rule is testable without a GPU."""
    need = MIN_CAPABILITY[dtype]
    have = capability[0] * 10 + capability[1]
    if have >= need:
        return ""
    return (
        f"{str(dtype).removeprefix('torch.')} kernels need compute capability {need // 10}.{need % 10} (sm{need}) "
        f"or newer; this GPU is {capability[0]}.{capability[1]} (sm{have})"
    )


def cuda_capability() -> tuple[int, int] | None:
    """The current CUDA device's compute capability, or None without CUDA (a problem described for
    CUDA on a CPU-only host is judged on everything but the device)."""
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


def shape_refusal(problem: LUTProblem) -> str:
    """Why the kernels cannot tile ``problem``'s shape ("" when they can)."""
    if problem.groups_per_row < 1 or problem.in_features % problem.groups_per_row:
        return f"in_features {problem.in_features} is not a multiple of groups_per_row {problem.groups_per_row}"
    if problem.in_features * problem.bits % 8:
        return f"in_features {problem.in_features} does not fill whole bytes of {problem.bits}-bit codes"
    largest = problem.rows * max(problem.in_features, problem.out_features)
    if largest > MAX_INDEX:
        return f"{problem.rows} rows make a {largest}-element operand; the kernels index in int32 (< 2**31)"
    group_size = problem.in_features // problem.groups_per_row
    if problem.needs_grad and not table_grad_block_k(group_size):
        return f"group size {group_size} has no power-of-two divisor >= 16 (table-gradient tiles)"
    return ""


def words_refusal(bits: int, codes: torch.Tensor, groups_per_row: int) -> str:
    """Why ``codes`` cannot take the code-word layout ("" when they can): its chunks must tile a table group."""
    if codes.dim() == 4:
        return ""
    in_features = code_columns(codes, bits) if bits in SUPPORTED_BITS else 0
    if not in_features or in_features % groups_per_row or not chunk_units(bits, in_features // groups_per_row):
        return f"{bits}-bit codes of {in_features} columns in {groups_per_row} groups do not tile into code words"
    return ""


class TritonBackend:
    """The CUDA kernels; refuses (with a reason) whatever they cannot run."""

    name = "triton"
    priority = 10
    min_capability = min(MIN_CAPABILITY.values())

    def can_implement(self, problem: LUTProblem) -> tuple[bool, str]:
        if importlib.util.find_spec("triton") is None:
            return False, "triton is not installed (pip install 'spallm-plugins[triton]')"
        if problem.device_type != "cuda":
            return False, f"runs on CUDA, not {problem.device_type} (CPU tests use TRITON_INTERPRET=1)"
        if problem.bits not in SUPPORTED_BITS:
            return False, f"no kernel for {problem.bits}-bit codes (2, 3 and 4 have one)"
        if problem.dtype not in SUPPORTED_DTYPES:
            return False, f"activations in {problem.dtype} (supported: float16, bfloat16, float32)"
        capability = cuda_capability()
        reason = (capability_refusal(capability, problem.dtype) if capability else "") or shape_refusal(problem)
        return not reason, reason

    def prepare_weights(self, codes, tables, bits):
        """Codes as int32 code words ``[planes, chunks, KW, out]`` (:func:`~.layout.code_words`), the
        layout of the decode kernel (:mod:`.lut_gemv_words`), where a chunk of them tiles a table group
        (:func:`words_refusal`); otherwise 2/4-bit format v1 as stored and 3-bit bit planes (the same
        bytes, no straddling codes). Tables unchanged. Every method here accepts every layout: the
        kernels above the decode range unpack code words on each call (:func:`~.layout.kernel_codes`),
        so tables that require grad (a layer that trains; ``ops.prepared_codes`` prepares under
        ``no_grad``, so grad mode cannot tell) keep the byte layouts, which the backward reads as they are;
        so does a call traced by torch.compile, which would repack on every run (vLLM compiles with the
        prepared tensors as inputs)."""
        trains = tables is not None and tables.requires_grad
        if tables is None or trains or torch.compiler.is_compiling() or words_refusal(bits, codes, tables.shape[1]):
            return kernel_codes(codes, bits).contiguous(), tables
        return code_words(codes, bits, tables.shape[1]), tables

    def restore_weights(self, codes, tables, bits):
        """Exact inverse of :meth:`prepare_weights`: the format-v1 tensors (to save, or to dequantize)."""
        return format_v1_codes(codes, bits), tables

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
