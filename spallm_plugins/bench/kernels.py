"""``spallm bench kernels``: the Triton kernels against cuBLAS fp16 and dequantize-then-matmul (CUDA).

For Llama-7B/8B shapes and M in {1, 4, 16, 64, 256, 1024, 4096}, side by side in one run:
the LUT kernel (GEMV for M <= 16, tiled matmul otherwise), ``torch.matmul`` in fp16 on a dense
weight, and the reference path (gather W in fp16, then matmul); achieved GB/s of the LUT kernel
(codes + tables + activations once) and its fraction of the device's peak bandwidth; and one
training layer's forward + backward (LUT, fused table gradient) against dense fp16 forward +
backward. Writes ``kernels.json`` (and ``kernels.png`` with matplotlib).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from . import BenchUnavailableError

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336)]  # (out N, in K)
ROWS = [1, 4, 16, 64, 256, 1024, 4096]
PEAK_GBPS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0, "L40S": 864.0, "A10": 600.0, "4090": 1008.0}


def peak_bandwidth_gbps(name: str) -> float | None:
    for key, value in PEAK_GBPS.items():
        if key in name:
            return value
    return None


def _time_ms(fn, warmup: int = 10, reps: int = 50) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=reps))


def run_kernel_bench(
    shapes=SHAPES, rows=ROWS, bits: int = 4, groups_per_row: int = 4, out_dir: str | Path = "bench-kernels", log=print,
    *, overwrite: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Time the kernels (CUDA only) and write ``kernels.json`` into ``out_dir`` (new or empty unless ``overwrite``)."""
    from ..outputs import prepare_output_dir

    if not torch.cuda.is_available():
        raise BenchUnavailableError(
            "spallm bench kernels needs a CUDA GPU (the kernels' CPU tests run under TRITON_INTERPRET=1)"
        )
    out_dir = prepare_output_dir(out_dir, overwrite=overwrite)
    from ..format import pack_codes
    from ..kernels.reference import dequantize
    from ..kernels.triton import ops  # noqa: F401
    from ..kernels.triton.lut_gemv import gemv_bytes
    from ..ops import lut_linear

    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    peak = peak_bandwidth_gbps(name)
    results: dict[str, Any] = {"device": name, "peak_gbps": peak, "bits": bits, "groups_per_row": groups_per_row,
                               "rows": []}  # fmt: skip
    torch.manual_seed(0)
    for n, k in shapes:
        codes = pack_codes(torch.randint(0, 1 << bits, (n, k), device=device), bits)
        tables = torch.randn(n, groups_per_row, 1 << bits, device=device, dtype=torch.float16) * 0.02
        dense = dequantize(codes, tables, bits, torch.float16)
        for m in rows:
            x = torch.randn(m, k, device=device, dtype=torch.float16)
            t_lut = _time_ms(lambda: torch.ops.spallm.lut_linear(x, codes, tables, None, bits))  # noqa: B023
            t_cublas = _time_ms(lambda: x @ dense.T)  # noqa: B023
            t_deq = _time_ms(lambda: x @ dequantize(codes, tables, bits, torch.float16).T)  # noqa: B023
            moved = gemv_bytes(m, n, k, groups_per_row, bits)
            gbps = moved / (t_lut * 1e-3) / 1e9
            row = {"N": n, "K": k, "M": m, "lut_ms": t_lut, "cublas_fp16_ms": t_cublas, "dequant_matmul_ms": t_deq,
                   "speedup_vs_cublas": t_cublas / t_lut, "speedup_vs_dequant": t_deq / t_lut,
                   "bytes_moved": moved, "achieved_gbps": gbps,
                   "fraction_of_peak": gbps / peak if peak else None}  # fmt: skip
            results["rows"].append(row)
            log(f"N={n:<6} K={k:<6} M={m:<5} lut {t_lut:.4f} ms  cuBLAS {t_cublas:.4f} ms  "
                f"x{row['speedup_vs_cublas']:.2f}  deq+mm x{row['speedup_vs_dequant']:.2f}  {gbps:.0f} GB/s")  # fmt: skip
        x = torch.randn(2048, k, device=device, dtype=torch.float16, requires_grad=True)
        t_param = tables.clone().requires_grad_(True)
        w_param = dense.clone().requires_grad_(True)
        grad = torch.randn(2048, n, device=device, dtype=torch.float16)
        t_train = _time_ms(lambda: lut_linear(x, codes, t_param, None, bits).backward(grad))  # noqa: B023
        t_dense = _time_ms(lambda: (x @ w_param.T).backward(grad))  # noqa: B023
        results.setdefault("training", []).append({"N": n, "K": k, "M": 2048, "lut_fwd_bwd_ms": t_train,
                                                   "dense_fwd_bwd_ms": t_dense, "ratio": t_train / t_dense})  # fmt: skip
        log(f"train N={n} K={k}: lut fwd+bwd {t_train:.3f} ms vs dense {t_dense:.3f} ms (x{t_train / t_dense:.2f})")
    from ..format import write_json

    write_json(out_dir / "kernels.json", results)
    return results
