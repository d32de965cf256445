"""Build and load the CPU LUT kernels (``lut_cpu.c``): compiled once per machine with the system's C
compiler and OpenMP, cached, called through ctypes.

The library is compiled for the best instruction set the CPU has (AVX-512, AVX2, or portable C) on
first use, into ``$SPALLM_KERNEL_CACHE`` (default ``~/.cache/spallm/kernels``), named by a hash of the
source, the flags and the compiler, and written atomically (each process compiles to its own temporary
file, then renames), so tensor-parallel ranks that start together do not see half a file.
``SPALLM_CPU_KERNEL`` overrides the choice: ``avx512``, ``avx2``, ``portable``, or ``off``.
OpenMP: the library links ``libgomp.so.1``, which resolves to the copy torch has already loaded, so
torch's ops and these kernels share one thread pool (no two pools spinning on 2 cores).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

import torch

ISA_FLAGS = {
    "avx512": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma", "-mf16c"),
    "avx2": ("-mavx2", "-mfma", "-mf16c"),
    "portable": (),
}
BASE_FLAGS = ("-O3", "-fPIC", "-shared", "-fopenmp", "-std=gnu11")
TABLE_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
CHOICES = (*ISA_FLAGS, "auto", "off")

_LOADED: dict[str, ctypes.CDLL | str] = {}  # isa -> library, or why it cannot be had


@functools.cache
def host_isas() -> tuple[str, ...]:
    """The instruction sets this CPU runs, best first (torch's own CPU capability probe; asked once, as
    every kernel call resolves its library through it)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ("portable",)
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        return ("avx512", "avx2", "portable")
    if capability.startswith("AVX2"):
        return ("avx2", "portable")
    return ("portable",)


def requested_isa() -> str:
    """``SPALLM_CPU_KERNEL`` resolved against the host: an ISA name, or ``off``."""
    choice = os.environ.get("SPALLM_CPU_KERNEL", "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"SPALLM_CPU_KERNEL={choice!r}: expected one of {', '.join(CHOICES)}")
    return host_isas()[0] if choice == "auto" else choice


def cache_dir() -> Path:
    if os.environ.get("SPALLM_KERNEL_CACHE"):
        return Path(os.environ["SPALLM_KERNEL_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "spallm" / "kernels"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def _build(isa: str) -> ctypes.CDLL:
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    source = resources.files(__package__).joinpath("lut_cpu.c").read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    flags = (*BASE_FLAGS, *ISA_FLAGS[isa])
    key = hashlib.sha256(source + "\0".join((version, *flags)).encode()).hexdigest()[:16]
    folder = cache_dir()
    target = folder / f"lut_cpu-{isa}-{key}.so"
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".build-") as work:
            src = Path(work) / "lut_cpu.c"
            src.write_bytes(source)
            built = Path(work) / target.name
            done = subprocess.run(
                [compiler, *flags, str(src), "-o", str(built)], capture_output=True, text=True, check=False
            )
            if done.returncode:
                raise RuntimeError(f"{compiler} failed to build {target.name}: {done.stderr.strip()[-2000:]}")
            os.replace(built, target)
    library = ctypes.CDLL(str(target))
    pointer, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    library.spallm_isa.restype = ctypes.c_char_p
    library.spallm_lut_linear.argtypes = [
        pointer,
        i64,
        i64,
        pointer,
        i64,
        i32,
        pointer,
        i32,
        i64,
        pointer,
        pointer,
        i32,
    ]
    library.spallm_lut_linear.restype = i32
    library.spallm_lut_dequantize.argtypes = [pointer, i64, i64, i32, pointer, i32, i64, pointer, i32]
    library.spallm_lut_dequantize.restype = i32
    if library.spallm_isa().decode() != isa:
        raise RuntimeError(f"{target} was built for {library.spallm_isa().decode()}, not {isa}")
    return library


def library(isa: str | None = None) -> ctypes.CDLL:
    """The compiled kernels for ``isa`` (default: :func:`requested_isa`); raises RuntimeError with the
    reason when they cannot be had (no compiler, a failed build, ``SPALLM_CPU_KERNEL=off``)."""
    isa = isa or requested_isa()
    if isa == "off":
        raise RuntimeError("turned off by SPALLM_CPU_KERNEL=off")
    if isa not in ISA_FLAGS:
        raise ValueError(f"unknown instruction set {isa!r}: expected one of {', '.join(ISA_FLAGS)}")
    if isa not in host_isas():
        raise RuntimeError(f"this CPU does not run {isa} (it runs {', '.join(host_isas())})")
    if isa not in _LOADED:
        try:
            _LOADED[isa] = _build(isa)
        except (OSError, RuntimeError) as error:
            _LOADED[isa] = str(error)
    loaded = _LOADED[isa]
    if isinstance(loaded, str):
        raise RuntimeError(loaded)
    return loaded


def unavailable_reason() -> str:
    """Why the CPU kernels cannot run here ("" when they can); builds them on first call."""
    try:
        library()
    except (RuntimeError, ValueError) as error:
        return str(error)
    return ""


def _check(codes: torch.Tensor, tables: torch.Tensor, bits: int, in_features: int) -> None:
    """The C code trusts its pointers: every shape is checked here, against the format-v1 layout."""
    if bits not in (2, 3, 4):
        raise ValueError(f"no CPU kernel for {bits}-bit codes (2, 3 and 4 have one)")
    if tables.dim() != 3 or tables.shape[2] != 1 << bits:
        raise ValueError(f"tables: expected [out, groups_per_row, {1 << bits}], got {list(tables.shape)}")
    if tables.dtype not in TABLE_DTYPES:
        raise ValueError(f"tables: dtype {tables.dtype} (expected float32, float16 or bfloat16)")
    out_features, groups = tables.shape[:2]
    if in_features % groups or in_features * bits % 8:
        raise ValueError(f"in_features {in_features}: not a multiple of groups_per_row {groups} in whole bytes")
    expected = (out_features, in_features * bits // 8)
    if codes.dtype != torch.uint8 or tuple(codes.shape) != expected:
        raise ValueError(f"codes: expected uint8 {list(expected)}, got {codes.dtype} {list(codes.shape)}")
    if codes.device.type != "cpu" or tables.device.type != "cpu":
        raise ValueError(f"the CPU kernels read CPU tensors, got codes on {codes.device}, tables on {tables.device}")


def lut_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    tables: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    isa: str | None = None,
) -> torch.Tensor:
    """``x [M, in]`` (float32) -> ``[M, out]`` float32: the LUT GEMM, codes read once per call."""
    _check(codes, tables, bits, x.shape[-1])
    if x.dim() != 2 or x.dtype != torch.float32:
        raise ValueError(f"x: expected a 2-D float32 tensor, got {x.dtype} {list(x.shape)}")
    out_features = tables.shape[0]
    if bias is not None and (bias.shape != (out_features,) or bias.dtype != torch.float32):
        raise ValueError(f"bias: expected float32 [{out_features}], got {bias.dtype} {list(bias.shape)}")
    x, codes, tables = x.contiguous(), codes.contiguous(), tables.contiguous()
    bias = None if bias is None else bias.contiguous()
    y = torch.empty(x.shape[0], out_features, dtype=torch.float32)
    if x.shape[0] == 0:
        return y
    status = library(isa).spallm_lut_linear(
        x.data_ptr(), x.shape[0], x.shape[1], codes.data_ptr(), out_features, bits,
        tables.data_ptr(), TABLE_DTYPES[tables.dtype], tables.shape[1],
        None if bias is None else bias.data_ptr(), y.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if status:
        raise MemoryError("spallm_lut_linear could not allocate its per-thread code buffer")
    return y


def dequantize(codes: torch.Tensor, tables: torch.Tensor, bits: int, isa: str | None = None) -> torch.Tensor:
    """The dense weight ``[out, in]`` in float32, gathered in one pass (for many rows of x, and backward)."""
    in_features = codes.shape[-1] * 8 // bits
    _check(codes, tables, bits, in_features)
    codes, tables = codes.contiguous(), tables.contiguous()
    weight = torch.empty(tables.shape[0], in_features, dtype=torch.float32)
    status = library(isa).spallm_lut_dequantize(
        codes.data_ptr(), tables.shape[0], in_features, bits, tables.data_ptr(), TABLE_DTYPES[tables.dtype],
        tables.shape[1], weight.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if status:
        raise MemoryError("spallm_lut_dequantize could not allocate its per-thread code buffer")
    return weight
