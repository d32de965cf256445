"""``spallm bench kernels``: the Triton kernels against cuBLAS and dequantize-then-matmul (CUDA);
with ``--device cpu``, the compiled CPU kernels against torch's dense matmul and the reference.

For Llama-7B/8B shapes and M in {1, 4, 16, 64, 256, 1024, 4096}, side by side in one run:
the LUT kernel (GEMV for M <= 16, tiled matmul otherwise), ``torch.matmul`` on a dense weight
(cuBLAS, fp16 by default), and the reference path (gather W, then matmul); achieved GB/s of the
LUT kernel (codes + tables + activations read once, output written once) and its fraction of the
device's peak bandwidth; and one training layer's forward + backward (LUT, fused table gradient)
against dense forward + backward. Writes ``kernels.json``.

The pieces (:func:`random_layer`, :func:`time_layer`, :func:`time_training`, the timers) are shared
with the device check of a lent GPU (``tests/gpu/device_check.py``).
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import BenchUnavailableError

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336)]  # (out N, in K)
ROWS = [1, 4, 16, 64, 256, 1024, 4096]
H200_HBM_GBPS = 4800.0  # the GPU this project is tested on (DESIGN.md); peak HBM bandwidth by device name:
PEAK_GBPS = {"H200": H200_HBM_GBPS, "H100": 3350.0, "A100": 2039.0, "L40S": 864.0, "A10": 600.0, "4090": 1008.0}
TRAINING_ROWS = 2048

Timer = Callable[[Callable[[], Any]], float]  # microseconds per call


def peak_bandwidth_gbps(name: str) -> float | None:
    for key, value in PEAK_GBPS.items():
        if key in name:
            return value
    return None


def time_us(fn: Callable[[], Any], warmup_ms: int = 10, rep_ms: int = 50) -> float:
    """Microseconds per call of ``fn`` on the GPU (``triton.testing.do_bench``: CUDA events, L2 flushed)."""
    import triton.testing

    return 1e3 * float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms))


def wall_time_us(fn: Callable[[], Any], reps: int = 1) -> float:
    """Microseconds per call by the wall clock, after one warm-up call (CPU and the Triton interpreter)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return 1e6 * (time.perf_counter() - start) / reps


def random_layer(
    n: int, k: int, bits: int, groups_per_row: int, dtype: torch.dtype, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed random ``codes [n, k*bits/8]`` and ``tables [n, gpr, 2**bits]`` (values ~ N(0, 0.02)) on ``device``."""
    from ..format import pack_codes

    codes = pack_codes(torch.randint(0, 1 << bits, (n, k), device=device), bits)
    tables = (torch.randn(n, groups_per_row, 1 << bits, device=device) * 0.02).to(dtype)
    return codes, tables


def time_layer(
    codes: torch.Tensor,
    tables: torch.Tensor,
    dense: torch.Tensor,
    bits: int,
    m: int,
    *,
    timer: Timer = time_us,
    peak_gbps: float | None = None,
) -> dict[str, Any]:
    """One row of the table: ``x [m, K]`` through the LUT kernel on format-v1 codes, cuBLAS on ``dense [N, K]``,
    and dequantize-then-matmul, in ``dense.dtype``; bytes moved by the LUT kernel and its GB/s. On CUDA, at
    decode rows, also the code-word GEMV on the codes as ``TritonBackend.prepare_weights`` lays them out
    (``words_us``: what a prepared layer runs, and three table sets mixed: :func:`time_words`)."""
    from ..kernels.reference import dequantize
    from ..kernels.triton import ops  # noqa: F401  (registers torch.ops.spallm.*)
    from ..kernels.triton.lut_gemv import gemv_bytes

    n, k = dense.shape
    x = torch.randn(m, k, device=dense.device, dtype=dense.dtype)
    t_lut = timer(lambda: torch.ops.spallm.lut_linear(x, codes, tables, None, bits))
    t_cublas = timer(lambda: x @ dense.T)
    t_deq = timer(lambda: x @ dequantize(codes, tables, bits, dense.dtype).T)
    moved = gemv_bytes(m, n, k, tables.shape[1], bits, table_bytes=tables.element_size(), act_bytes=x.element_size())
    gbps = moved / (t_lut * 1e-6) / 1e9
    words = time_words(x, codes, tables, bits, timer)
    t_words = words["words_us"]
    return {"N": n, "K": k, "M": m, "lut_us": t_lut, "cublas_us": t_cublas, "dequant_matmul_us": t_deq, **words,
            "words_speedup_vs_cublas": t_cublas / t_words if t_words else None,
            "words_matmul_speedup_vs_cublas": t_cublas / words["words_matmul_us"] if words["words_matmul_us"] else None,
            "words_gbps": moved / (t_words * 1e-6) / 1e9 if t_words else None,
            "speedup_vs_cublas": t_cublas / t_lut, "speedup_vs_dequant": t_deq / t_lut,
            "bytes_moved": moved, "achieved_gbps": gbps,
            "fraction_of_peak": gbps / peak_gbps if peak_gbps else None}  # fmt: skip


PREFILL_WORDS_MAX_ROWS = 1024  # the fused prefill matmul is timed from 17 up to this many rows (prefill)


def time_words(x: torch.Tensor, codes: torch.Tensor, tables: torch.Tensor, bits: int, timer: Timer) -> dict[str, Any]:
    """Microseconds of the code-word decode GEMV on ``x`` (``words_us``) and, from 3 rows, of three table
    sets mixed in the batch (``words_three_sets_us``, row ``m`` through set ``m % 3``); above the decode
    rows, up to :data:`PREFILL_WORDS_MAX_ROWS`, of the fused prefill matmul over code words
    (``words_matmul_us``, not dispatched yet). None where one does not run: off CUDA (the interpreter's
    timing means nothing), in fp32, or where the layout does not tile the groups."""
    from ..kernels.triton import TritonBackend
    from ..kernels.triton.lut_gemv_words import WORDS_DTYPES
    from ..kernels.triton.lut_matmul_words import lut_matmul_words
    from ..kernels.triton.tiles import GEMV_MAX_ROWS

    times: dict[str, Any] = {"words_us": None, "words_three_sets_us": None, "words_matmul_us": None}
    if x.device.type != "cuda" or x.dtype not in WORDS_DTYPES or x.shape[0] > PREFILL_WORDS_MAX_ROWS:
        return times
    words, _ = TritonBackend().prepare_weights(codes, tables, bits)
    if words.dim() != 4:
        return times
    if x.shape[0] > GEMV_MAX_ROWS:
        times["words_matmul_us"] = timer(lambda: lut_matmul_words(x, words, tables, None, bits))
        return times
    times["words_us"] = timer(lambda: torch.ops.spallm.lut_linear(x, words, tables, None, bits))
    if x.shape[0] >= 3:
        sets = torch.stack([tables, tables.flip(0), tables * 0.5])
        slots = torch.arange(x.shape[0], device=x.device) % 3
        times["words_three_sets_us"] = timer(
            lambda: torch.ops.spallm.lut_linear_table_sets(x, words, sets, slots, None, bits)
        )
    return times


def time_training(
    codes: torch.Tensor, tables: torch.Tensor, dense: torch.Tensor, bits: int, m: int, *, timer: Timer = time_us
) -> dict[str, Any]:
    """One training layer at ``m`` rows: LUT forward + backward (input and table gradients) against
    dense forward + backward (input and weight gradients), in ``dense.dtype``."""
    from ..ops import lut_linear

    n, k = dense.shape
    x = torch.randn(m, k, device=dense.device, dtype=dense.dtype, requires_grad=True)
    t_param = tables.clone().requires_grad_(True)
    w_param = dense.clone().requires_grad_(True)
    grad = torch.randn(m, n, device=dense.device, dtype=dense.dtype)
    t_train = timer(lambda: lut_linear(x, codes, t_param, None, bits).backward(grad))
    t_dense = timer(lambda: (x @ w_param.T).backward(grad))
    return {"N": n, "K": k, "M": m, "lut_fwd_bwd_us": t_train, "dense_fwd_bwd_us": t_dense, "ratio": t_train / t_dense}


def describe_row(row: dict[str, Any]) -> str:
    words, matmul = row.get("words_us"), row.get("words_matmul_us")
    words_text = f"  words {words:7.1f} us x{row['words_speedup_vs_cublas']:.2f}" if words else ""
    words_text += f"  words matmul {matmul:7.1f} us x{row['words_matmul_speedup_vs_cublas']:.2f}" if matmul else ""
    return (f"N={row['N']:<6} K={row['K']:<6} M={row['M']:<5} lut {row['lut_us']:9.1f} us  "
            f"cuBLAS {row['cublas_us']:9.1f} us  x{row['speedup_vs_cublas']:.2f}  "
            f"deq+mm x{row['speedup_vs_dequant']:.2f}  {row['achieved_gbps']:.0f} GB/s{words_text}")  # fmt: skip


def run_kernel_bench(
    shapes=SHAPES, rows=ROWS, bits: int = 4, groups_per_row: int = 4, out_dir: str | Path = "bench-kernels", log=print,
    *, overwrite: bool = False, dtype: torch.dtype = torch.float16,
) -> dict[str, Any]:  # fmt: skip
    """Time the kernels (CUDA only) and write ``kernels.json`` into ``out_dir`` (new or empty unless ``overwrite``)."""
    from ..outputs import prepare_output_dir

    if not torch.cuda.is_available():
        raise BenchUnavailableError(
            "spallm bench kernels needs a CUDA GPU (the kernels' CPU tests run under TRITON_INTERPRET=1)"
        )
    out_dir = prepare_output_dir(out_dir, overwrite=overwrite)
    from ..kernels.reference import dequantize

    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    peak = peak_bandwidth_gbps(name)
    results: dict[str, Any] = {"device": name, "peak_gbps": peak, "bits": bits, "groups_per_row": groups_per_row,
                               "dtype": str(dtype).removeprefix("torch."), "rows": [], "training": []}  # fmt: skip
    torch.manual_seed(0)
    for n, k in shapes:
        codes, tables = random_layer(n, k, bits, groups_per_row, dtype, device)
        dense = dequantize(codes, tables, bits, dtype)
        for m in rows:
            row = time_layer(codes, tables, dense, bits, m, peak_gbps=peak)
            results["rows"].append(row)
            log(describe_row(row))
        train = time_training(codes, tables, dense, bits, TRAINING_ROWS)
        results["training"].append(train)
        log(f"train N={n} K={k}: lut fwd+bwd {train['lut_fwd_bwd_us']:.0f} us vs dense "
            f"{train['dense_fwd_bwd_us']:.0f} us (x{train['ratio']:.2f})")  # fmt: skip
    from ..format import write_json

    write_json(out_dir / "kernels.json", results)
    return results


CPU_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (4096, 4096), (11008, 4096), (4096, 11008)]
CPU_ROWS = [1, 4, 8, 16, 32, 64, 256]


def timed_us(fn: Callable[[], Any], budget_s: float = 0.3) -> float:
    """Median microseconds per call by the wall clock over as many calls as fit ``budget_s`` (3 to 200),
    after a warm-up call."""
    fn()
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    samples = []
    for _ in range(max(3, min(200, int(budget_s / max(once, 1e-6))))):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return 1e6 * sorted(samples)[len(samples) // 2]


class QLoRALayer:
    """QLoRA's linear at inference, unmerged: bitsandbytes NF4 (blocks of 64, double quant) of ``dense``,
    plus a LoRA tower of ``rank`` (the rank whose trainable count matches the tables)."""

    def __init__(self, dense: torch.Tensor, rank: int):
        import bitsandbytes
        import bitsandbytes.functional as bnb_functional

        self.rank = rank
        self.matmul_4bit = bitsandbytes.matmul_4bit
        self.weight, self.state = bnb_functional.quantize_4bit(dense, blocksize=64, compress_statistics=True,
                                                               quant_type="nf4")  # fmt: skip
        self.lora_a = torch.randn(rank, dense.shape[1]) * 0.01
        self.lora_b = torch.randn(dense.shape[0], rank) * 0.01

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul_4bit(x, self.weight.t(), quant_state=self.state) + (x @ self.lora_a.T) @ self.lora_b.T


def matched_lora_rank(n: int, k: int, bits: int, groups_per_row: int) -> int:
    """The LoRA rank whose ``r * (n + k)`` trainable values are closest to the layer's ``n * gpr * 2**bits`` table values."""
    return max(1, round(n * groups_per_row * (1 << bits) / (n + k)))


def time_cpu_layer(
    codes: torch.Tensor, tables: torch.Tensor, dense: torch.Tensor, bits: int, m: int, qlora: QLoRALayer | None = None
) -> dict[str, Any]:
    """One row of the CPU table: ``x [m, K]`` float32 through the LUT GEMM, dequantize + matmul, the
    backend's choice between them, torch's dense matmul, the reference (int64 gather + matmul), and,
    given ``qlora``, QLoRA's unmerged linear (bitsandbytes NF4 + LoRA)."""
    from ..kernels import reference
    from ..kernels.cpu import GEMV_MAX_ROWS, CPUBackend, library

    n, k = dense.shape
    x = torch.randn(m, k)
    backend = CPUBackend()
    lut = library.lut_linear(x, codes, tables, None, bits)
    row = {
        "N": n, "K": k, "M": m,
        "lut_gemm_us": timed_us(lambda: library.lut_linear(x, codes, tables, None, bits)),
        "dequant_matmul_us": timed_us(lambda: x @ library.dequantize(codes, tables, bits).T),
        "backend_us": timed_us(lambda: backend.forward(x, codes, tables, None, bits)),
        "backend_path": "lut_gemm" if m <= GEMV_MAX_ROWS else "dequant_matmul",
        "dense_us": timed_us(lambda: x @ dense.T),
        "reference_us": timed_us(lambda: reference.lut_linear(x, codes, tables, None, bits), budget_s=0.1),
        "max_abs_error_vs_dense": float((lut - x @ dense.T).abs().max()),
    }  # fmt: skip
    if qlora is not None:
        row["qlora_rank"] = qlora.rank
        row["qlora_us"] = timed_us(lambda: qlora(x))
        row["speedup_vs_qlora"] = row["qlora_us"] / row["backend_us"]
    row["speedup_vs_dense"] = row["dense_us"] / row["backend_us"]
    row["speedup_vs_reference"] = row["reference_us"] / row["backend_us"]
    return row


def run_cpu_kernel_bench(
    shapes=CPU_SHAPES, rows=CPU_ROWS, bits: int = 4, groups_per_row: int = 4, out_dir: str | Path = "bench-kernels",
    log=print, *, overwrite: bool = False, table_dtype: torch.dtype = torch.float16,
) -> dict[str, Any]:  # fmt: skip
    """Time the CPU kernels (float32 activations, ``table_dtype`` tables) and write ``kernels.json``."""
    from ..kernels.cpu import GEMV_MAX_ROWS, library
    from ..kernels.reference import dequantize
    from ..outputs import prepare_output_dir

    reason = library.unavailable_reason()
    if reason:
        raise BenchUnavailableError(f"the CPU kernels cannot run here: {reason}")
    out_dir = prepare_output_dir(out_dir, overwrite=overwrite)
    results: dict[str, Any] = {"device": "cpu", "isa": library.requested_isa(), "threads": torch.get_num_threads(),
                               "bits": bits, "groups_per_row": groups_per_row, "gemv_max_rows": GEMV_MAX_ROWS,
                               "table_dtype": str(table_dtype).removeprefix("torch."), "rows": []}  # fmt: skip
    has_bnb = importlib.util.find_spec("bitsandbytes") is not None
    results["qlora"] = (
        "bitsandbytes NF4 + LoRA" if has_bnb else "bitsandbytes is not installed (pip install '.[peers]')"
    )
    torch.manual_seed(0)
    for n, k in shapes:
        codes, tables = random_layer(n, k, bits, groups_per_row, table_dtype, "cpu")
        dense = dequantize(codes, tables, bits, torch.float32)
        qlora = QLoRALayer(dense, matched_lora_rank(n, k, bits, groups_per_row)) if has_bnb else None
        for m in rows:
            row = time_cpu_layer(codes, tables, dense, bits, m, qlora)
            results["rows"].append(row)
            versus = f"  qlora {row['qlora_us']:9.1f}" if qlora is not None else ""
            log(f"N={n:<6} K={k:<6} M={m:<4} lut {row['lut_gemm_us']:9.1f} us  deq+mm {row['dequant_matmul_us']:9.1f}"
                f"  dense {row['dense_us']:9.1f}  reference {row['reference_us']:9.1f}{versus}"
                f"  backend x{row['speedup_vs_dense']:.2f} vs dense")  # fmt: skip
    from ..format import write_json

    write_json(out_dir / "kernels.json", results)
    return results
