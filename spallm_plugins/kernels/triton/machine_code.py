"""Machine-code checks of the decode kernels, on a CPU: compile for sm90a, read the SASS of the K loop.

Triton compiles for a GPU it does not have (``triton.compile(ASTSource(...), target=GPUTarget("cuda",
90, 32))``, its bundled ptxas), and its bundled ``cuobjdump`` prints the cubin's SASS (``-sass``) and
resources (``-res-usage``: registers, stack, local memory). From the SASS:

- **the main loop** is found by its backward branch: a ``BRA`` whose target address is below its own.
  Each such branch closes a loop spanning ``[target, branch]``; loops that contain another are outer
  loops (a group loop around the K loop), so the main loop is the largest innermost one;
- **SASS per weight** = the loop's instructions / the weights one thread handles per pass. A pass is
  ``weights_per_thread`` weights times the unroll factor, read from the bits the loop loads against
  ``loaded_bits``, what one Triton iteration loads per thread (codes and inputs); where that ratio
  is not a whole number the count is reported as unreliable (``None``);
- **traffic** in the loop: ``SHFL`` (warp shuffles), ``BAR`` (barriers), ``STS`` (shared-memory stores);
- **load widths**: every ``LDG``'s width in bits (``.U8`` = 8, none = 32, ``.64``, ``.128``);
- **local memory**: ``STL``/``LDL`` anywhere, and ``STACK``/``LOCAL`` from ``-res-usage``.

No measurement lives here; the thresholds are in ``tests/test_kernels_sass.py`` and the numbers are
printed by ``spallm bench kernels --sass``.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .tiles import MAX_REGISTERS

INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
DIVISIBLE = ("N", "K", "stride_xm", "stride_cn", "stride_tn")  # layer widths and strides: multiples of 16
LOAD_WIDTH = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "64": 64, "128": 128}


@dataclass(frozen=True)
class LoopReport:
    """What the machine-code checks read from one compiled kernel."""

    kernel: str
    config: dict
    registers: int
    local_bytes: int
    loop_instructions: int
    sass_per_weight: float | None
    shuffles: int
    barriers: int
    shared_stores: int
    load_widths: dict
    spill_instructions: int

    def as_dict(self) -> dict:
        return asdict(self)


def toolchain_refusal() -> str:
    """Why sm90 machine code cannot be made here ("" when it can): triton with its NVIDIA backend,
    ptxas and cuobjdump (all in the triton wheel)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except ImportError as err:
        return f"triton's NVIDIA backend is missing ({err})"
    if not cuobjdump_path().is_file():
        return f"triton's bundled cuobjdump is missing ({cuobjdump_path()})"
    return ""


def cuobjdump_path() -> Path:
    import triton.backends.nvidia as nvidia

    return Path(nvidia.__file__).parent / "bin" / "cuobjdump"


def compile_cubin(kernel, signature: dict, constexprs: dict, num_warps: int, maxnreg: int | None = None) -> bytes:
    """``kernel`` (a ``@triton.jit`` function) compiled for sm90a: the cubin. Pointers and the integer
    arguments named in :data:`DIVISIBLE` are marked 16-divisible, as Triton's launcher specialises them
    at run time for the layer shapes that matter (widths that are multiples of 16, aligned tensors)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    full = {**signature, **dict.fromkeys(constexprs, "constexpr")}
    divisible = [name for name, kind in signature.items() if kind.startswith("*") or name in DIVISIBLE]
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    source = ASTSource(kernel, full, {(kernel.arg_names.index(k),): v for k, v in constexprs.items()}, attrs)
    options = {"num_warps": num_warps, **({"maxnreg": maxnreg} if maxnreg else {})}
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    return compiled.asm["cubin"]


def disassemble(cubin: bytes) -> tuple[str, str]:
    """``(cuobjdump -sass, cuobjdump -res-usage)`` of a cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        run = [str(cuobjdump_path())]
        sass = subprocess.run([*run, "-sass", str(path)], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([*run, "-res-usage", str(path)], capture_output=True, text=True, check=True).stdout
    return sass, usage


def instructions(sass: str) -> list[tuple[int, str, str]]:
    """``(address, opcode, operands)`` of every SASS instruction, in order."""
    return [(int(a, 16), op, args.strip()) for a, _, op, args in INSTRUCTION.findall(sass)]


def main_loop(program: list[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
    """The instructions of the largest innermost loop (see the module docstring); [] without a loop."""
    loops = []
    for address, opcode, operands in program:
        target = re.match(r"(0x[0-9a-f]+)", operands)
        if opcode.startswith("BRA") and target and int(target.group(1), 16) < address:
            loops.append((int(target.group(1), 16), address))
    innermost = [(s, e) for s, e in loops if not any(s <= s2 and e2 <= e and (s2, e2) != (s, e) for s2, e2 in loops)]
    if not innermost:
        return []
    start, end = max(innermost, key=lambda span: span[1] - span[0])
    return [ins for ins in program if start <= ins[0] <= end]


def load_width(opcode: str) -> int:
    """Bits one ``LDG`` moves per thread."""
    suffixes = opcode.split(".")[1:]
    return next((LOAD_WIDTH[s] for s in suffixes if s in LOAD_WIDTH), 32)


def analyse(kernel, signature: dict, constexprs: dict, num_warps: int, weights_per_thread: int,
            loaded_bits: int | None = None, maxnreg: int | None = None) -> LoopReport:  # fmt: skip
    """Compile ``kernel`` and read its loop. ``weights_per_thread``: weights one thread handles per
    iteration; ``loaded_bits``: global-load bits per thread per iteration (None: assume no unrolling)."""
    sass, usage = disassemble(compile_cubin(kernel, signature, constexprs, num_warps, maxnreg))
    program = instructions(sass)
    loop = main_loop(program)
    opcodes = [op for _, op, _ in loop]
    widths: dict[int, int] = {}
    for op in opcodes:
        if op.startswith("LDG"):
            widths[load_width(op)] = widths.get(load_width(op), 0) + 1
    unroll = 1.0 if loaded_bits is None else sum(w * n for w, n in widths.items()) / loaded_bits
    resources = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", usage))
    return LoopReport(
        kernel=kernel.__name__,
        config={**constexprs, "num_warps": num_warps, "maxnreg": maxnreg},
        registers=int(resources.get("REG", 0)),
        local_bytes=int(resources.get("STACK", 0)) + int(resources.get("LOCAL", 0)),
        loop_instructions=len(loop),
        sass_per_weight=round(len(loop) / (weights_per_thread * unroll), 2)
        if loop and unroll == int(unroll) >= 1
        else None,
        shuffles=sum(op.startswith("SHFL") for op in opcodes),
        barriers=sum(op.startswith("BAR") for op in opcodes),
        shared_stores=sum(op.startswith("STS") for op in opcodes),
        load_widths=dict(sorted(widths.items())),
        spill_instructions=sum(op.startswith(("STL", "LDL")) for _, op, _ in program),
    )


# The limits the decode kernels are held to on sm90a: SASS per weight at M = 1 by bits, tiles.MAX_REGISTERS
# registers, and no local memory.
MAX_SASS_PER_WEIGHT = {4: 6.0, 3: 8.0, 2: 6.0}


def violations(report: LoopReport, bits: int) -> list[str]:
    """The limits ``report`` breaks, one line each ([] when it meets them all)."""
    found = []
    per_weight = report.sass_per_weight
    if per_weight is None or per_weight > MAX_SASS_PER_WEIGHT[bits]:
        found.append(f"{per_weight} SASS per weight in the loop (limit {MAX_SASS_PER_WEIGHT[bits]} at {bits} bits)")
    for what, count in (("SHFL", report.shuffles), ("BAR", report.barriers), ("STS", report.shared_stores)):
        if count:
            found.append(f"{count} {what} in the loop")
    narrow = {w: n for w, n in report.load_widths.items() if w < 32}
    if narrow:
        found.append(f"global loads narrower than 32 bits in the loop: {narrow} (bits: count)")
    if report.registers > MAX_REGISTERS:
        found.append(f"{report.registers} registers (limit {MAX_REGISTERS})")
    if report.local_bytes or report.spill_instructions:
        found.append(f"local memory: {report.local_bytes} bytes, {report.spill_instructions} STL/LDL")
    return found


def sass_table(bits_list=(4, 3, 2), dtypes=("bf16", "fp16")) -> list[dict]:
    """:func:`decode_reports` as JSON-ready rows, each with its ``violations`` (``spallm bench kernels --sass``),
    then the prefill matmul's (:func:`prefill_report`; its loop holds the ``tl.dot`` and the shared-memory
    traffic of its B operand, so only local memory counts against it)."""
    rows = []
    for report in decode_reports(bits_list, dtypes):
        bits = report.config["BITS"]
        rows.append({**report.as_dict(), "violations": violations(report, bits)})
    for report in (prefill_report(bits, dtype) for bits in bits_list for dtype in dtypes):
        spills = report.local_bytes or report.spill_instructions
        rows.append({**report.as_dict(), "violations": [f"local memory: {report.local_bytes} bytes"] if spills else []})
    return rows


BYTES_SIGNATURE = dict(x_ptr="*bf16", codes_ptr="*u8", tables_ptr="*bf16", out_ptr="*fp32", M="i32", N="i32",
                        K="i32", M_BUCKET="i32", stride_xm="i32", stride_cn="i32", stride_tn="i32")  # fmt: skip


def words_report(config, bits: int, dtype: str = "bf16", group_size: int = 1024) -> LoopReport:
    """:mod:`.lut_gemv_words` at one autotuning ``config`` (a ``triton.Config``), M = 1."""
    from .layout import UNIT_CODES, UNIT_WORDS, chunk_units
    from .lut_gemv_words import lut_gemv_words_kernel

    kw = chunk_units(bits, group_size)
    signature = dict(x_ptr=f"*{dtype}", words_ptr="*i32", tables_ptr="*i32", slots_ptr="*i64", out_ptr="*fp32",
                     M="i32", N="i32", K="i32", M_BUCKET="i32", S="i32", stride_xm="i32", stride_ts="i32",
                     stride_tn="i32", SPLIT_K="i32")  # fmt: skip
    constexprs = dict(HAS_SLOTS=False, GROUP_SIZE=group_size, BITS=bits, KW=kw, FP16=dtype == "fp16", EMULATE=False,
                      BLOCK_N=config.kwargs["BLOCK_N"])  # fmt: skip
    threads = 32 * config.num_warps
    rows = config.kwargs["BLOCK_N"] // threads
    weights = rows * kw * UNIT_CODES[bits]
    loaded = rows * kw * 32 * UNIT_WORDS[bits] + kw * UNIT_CODES[bits] * 16  # codes + inputs
    report = analyse(lut_gemv_words_kernel, signature, constexprs, config.num_warps, weights, loaded, config.maxnreg)
    return replace(report, config={**report.config, "SPLIT_K": config.kwargs["SPLIT_K"], "dtype": dtype})


def bytes_report(config, dtype: str = "bf16", group_size: int = 1024) -> LoopReport:
    """Today's byte-wise decode kernel (:mod:`.lut_gemv_bytes`) at one ``config``, 4-bit, M = 1."""
    from .lut_gemv_bytes import lut_gemv_bytes_kernel

    signature = {**BYTES_SIGNATURE, "x_ptr": f"*{dtype}", "tables_ptr": f"*{dtype}"}
    constexprs = dict(GROUP_SIZE=group_size, BITS=4, NUM_CODES=16, BLOCK_M=1, **config.kwargs)
    weights = config.kwargs["BLOCK_N"] * config.kwargs["BLOCK_KB"] * 2 // (32 * config.num_warps)
    report = analyse(lut_gemv_bytes_kernel, signature, constexprs, config.num_warps, weights, None, config.maxnreg)
    return replace(report, config={**report.config, "dtype": dtype})


def prefill_report(bits: int, dtype: str = "bf16", group_size: int = 1024) -> LoopReport:
    """The fused prefill matmul over code words (:mod:`.lut_matmul_words`) at its default block; SASS per
    weight counts the B tile's weights a thread makes per iteration (the ``tl.dot`` is in the loop too)."""
    from .layout import UNIT_CODES, chunk_units
    from .lut_matmul_words import BLOCK, lut_matmul_words_kernel

    kw = chunk_units(bits, group_size)
    block_m, block_n, warps = BLOCK
    signature = dict(x_ptr=f"*{dtype}", words_ptr="*i32", tables_ptr="*i32", out_ptr=f"*{dtype}", M="i32", N="i32",
                     K="i32", stride_xm="i32", stride_om="i32", stride_tn="i32")  # fmt: skip
    constexprs = dict(GROUP_SIZE=group_size, BITS=bits, KW=kw, FP16=dtype == "fp16", EMULATE=False,
                      PRECISION="tf32", UPCAST=False, BLOCK_M=block_m, BLOCK_N=block_n)  # fmt: skip
    weights = block_n * kw * UNIT_CODES[bits] // (32 * warps)
    report = analyse(lut_matmul_words_kernel, signature, constexprs, warps, weights)
    return replace(report, config={**report.config, "dtype": dtype})


def decode_reports(bits_list=(4, 3, 2), dtypes=("bf16",), old: bool = True) -> list[LoopReport]:
    """Every autotuning config of the code-word decode kernel (and, with ``old``, of the byte-wise one)."""
    from .lut_gemv_bytes import CONFIGS as BYTES_CONFIGS
    from .lut_gemv_words import CONFIGS

    compiled: dict[tuple, LoopReport] = {}  # configs that differ only in run-time arguments share a binary
    reports = []
    for bits in bits_list:
        for dtype in dtypes:
            for c in CONFIGS:
                key = (bits, dtype, c.kwargs["BLOCK_N"], c.num_warps, c.maxnreg)
                if key not in compiled:
                    compiled[key] = words_report(c, bits, dtype)
                reports.append(replace(compiled[key], config={**compiled[key].config, "SPLIT_K": c.kwargs["SPLIT_K"]}))
    if old:
        reports += [bytes_report(c, dtype) for dtype in dtypes for c in BYTES_CONFIGS]
    return reports
