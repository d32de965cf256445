"""Triton kernels against the PyTorch reference.

Without CUDA they run under the Triton interpreter (``TRITON_INTERPRET=1``, set here before the
kernels are imported; about 2 ms per program instance), so shapes are small and tiles large.
GPU tests (compiled, autotuned, larger shapes) are marked ``gpu`` and skipped without CUDA.
"""

import importlib
import os
import pkgutil

import pytest
import torch
from conftest import needs

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
needs("triton", "pip install '.[triton]' (nox -s tests installs it)")

from spallm_plugins.format import pack_codes  # noqa: E402
from spallm_plugins.kernels import LUTProblem  # noqa: E402
from spallm_plugins.kernels.reference import lut_linear, lut_linear_backward, lut_linear_table_sets  # noqa: E402
from spallm_plugins.kernels.triton import TritonBackend  # noqa: E402
from spallm_plugins.kernels.triton import lut_gemv as gemv_module  # noqa: E402
from spallm_plugins.kernels.triton import lut_gemv_bytes as gemv_bytes_module  # noqa: E402
from spallm_plugins.kernels.triton import lut_matmul as matmul_module  # noqa: E402
from spallm_plugins.kernels.triton import lut_table_sets as table_sets_module  # noqa: E402
from spallm_plugins.kernels.triton.dequantize import lut_dequantize  # noqa: E402
from spallm_plugins.kernels.triton.lut_backward import bin_weight_grad, lut_grad_input, lut_grad_tables  # noqa: E402
from spallm_plugins.kernels.triton.lut_gemv import lut_gemv  # noqa: E402
from spallm_plugins.kernels.triton.lut_gemv_bytes import lut_gemv_bytes  # noqa: E402
from spallm_plugins.kernels.triton.lut_matmul import lut_matmul  # noqa: E402
from spallm_plugins.kernels.triton.lut_table_sets import lut_table_sets  # noqa: E402
from spallm_plugins.kernels.triton.tiles import DEQUANTIZE_MAX_BYTES, dequantized_path, m_bucket  # noqa: E402

BITS = [4, 2, 3]  # 3-bit: bit planes (prepared), the kernels' own layout

DEVICE = "cuda" if HAS_CUDA else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # relative to max |reference|


def problem(m, n, k, gpr, bits, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = pack_codes(torch.randint(0, 1 << bits, (n, k), generator=g), bits).to(DEVICE)
    tables = torch.randn(n, gpr, 1 << bits, generator=g).to(dtype).to(DEVICE)
    x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
    bias = torch.randn(n, generator=g).to(dtype).to(DEVICE)
    return x, codes, tables, bias


def prepared(codes, bits):
    """The codes as the backend's load-time step leaves them (3-bit: bit planes; 2/4-bit: as stored)."""
    got, _ = TritonBackend().prepare_weights(codes, None, bits)
    assert got.dim() == (3 if bits == 3 else 2)
    return got


def assert_matches(got, reference, dtype):
    reference = reference.float()
    scale = reference.abs().max().clamp_min(1.0)
    err = (got.float() - reference).abs().max()
    assert err <= TOL[dtype] * scale, f"max error {err:.3g} vs allowed {TOL[dtype] * scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("gpr", [1, 2, 4])
def test_lut_matmul_matches_reference(dtype, bits, gpr):
    x, codes, tables, bias = problem(33, 40, 128, gpr, bits, dtype)  # M, N not multiples of the tile
    got = lut_matmul(x, prepared(codes, bits), tables, bias, bits, block=(32, 32, 32))
    assert got.dtype == dtype and got.shape == (33, 40)
    assert_matches(got, lut_linear(x.float(), codes, tables.float(), bias.float(), bits), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(("m", "split"), [(1, 1), (3, 2), (5, 3), (16, 2)])
def test_lut_gemv_matches_reference(dtype, bits, m, split):
    """Rows 1 and 3 (a padded row) on the CUDA-core path, 5 and 16 through ``tl.dot``; tables staged."""
    x, codes, tables, bias = problem(m, 37, 192, 3, bits, dtype)  # 192 / 3 groups = 64, K-split edges
    got = lut_gemv(x, prepared(codes, bits), tables, bias, bits, block=(32, 64, split))
    assert_matches(got, lut_linear(x.float(), codes, tables.float(), bias.float(), bits), dtype)


@pytest.mark.parametrize("staged", [True, False])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(
    ("gpr", "k", "m", "dtype"),
    [(1, 64, 2, torch.float16), (8, 256, 1, torch.bfloat16), (3, 120, 7, torch.float32)],  # 120 / 3 = 40: tiles
)  # straddle groups and gather even when staged
def test_gemv_tables_staged_or_gathered(staged, bits, gpr, k, m, dtype):
    x, codes, tables, bias = problem(m, 37, k, gpr, bits, dtype, seed=gpr)
    got = lut_gemv(x, prepared(codes, bits), tables, bias, bits, block=(32, 32, 2), staged=staged)
    assert_matches(got, lut_linear(x.float(), codes, tables.float(), bias.float(), bits), dtype)


def table_sets_want(x, codes, sets, slots, bias, bits):
    """Row by row through its own (clamped) slot: the simplest reference."""
    clamped = slots.clamp(0, sets.shape[0] - 1).tolist()
    bias = None if bias is None else bias.float()
    return torch.cat(
        [lut_linear(x[m : m + 1].float(), codes, sets[s].float(), bias, bits) for m, s in enumerate(clamped)]
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", BITS)
def test_lut_table_sets_matches_reference(dtype, bits):
    """Mixed tiles (several slots per tile), one-slot tiles, and stale out-of-range slots (clamped);
    21 rows: sorted by slot before tiling."""
    x, codes, tables, bias = problem(21, 40, 128, 2, bits, dtype)
    g = torch.Generator().manual_seed(1)
    sets = torch.stack([tables, *(torch.randn(tables.shape, generator=g).to(dtype).to(DEVICE) for _ in range(2))])
    slots = torch.tensor([0, 2, 2, 1, 0, 1, 1, 2, 0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 7, -3], device=DEVICE)
    got = lut_table_sets(x, prepared(codes, bits), sets, slots, bias, bits, block=(8, 32, 32))
    assert_matches(got, table_sets_want(x, codes, sets, slots, bias, bits), dtype)
    if dtype == torch.float32:  # float16 table sets under float32 activations, as vLLM serves them
        got = lut_table_sets(x, codes, sets.half(), slots, bias, bits, block=(8, 32, 32))
        assert got.dtype == torch.float32
        want = lut_table_sets(x, codes, sets.half().float(), slots, bias, bits, block=(8, 32, 32))
        assert_matches(got, want, dtype)


@pytest.mark.parametrize("sort", [False, True])
def test_table_sets_tiles_visit_only_the_slots_their_rows_use(sort):
    """Slots repeated, unsorted, out of range, and unused ones (2 and 4) filled with NaN: a tile that
    read an unused slot, even with all its rows masked, would turn its whole output NaN. Sorted or
    not (decode batches are not), the result comes back in the original row order."""
    x, codes, tables, bias = problem(12, 24, 64, 2, 3, torch.float32)
    g = torch.Generator().manual_seed(2)
    sets = torch.randn((6, *tables.shape), generator=g).to(DEVICE)
    sets[2] = sets[4] = float("nan")
    slots = torch.tensor([5, 0, 3, 3, 0, 1, 5, 1, 3, 0, 9, 3], device=DEVICE)  # 9: stale, clamped to 5
    got = lut_table_sets(x, prepared(codes, 3), sets, slots, bias, 3, block=(4, 32, 32), sort=sort)
    assert not got.isnan().any()
    assert_matches(got, table_sets_want(x, codes, sets, slots, bias, 3), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize(("m", "gpr", "split"), [(1, 3, 2), (3, 3, 3), (4, 1, 1)])
def test_byte_wise_gemv_matches_reference(dtype, bits, m, gpr, split):
    """Whole code bytes per load, each field looked up in turn; N off the 16-row tile, 64-wide groups
    crossing K tiles and splits."""
    x, codes, tables, bias = problem(m, 37, 192, gpr, bits, dtype)
    got = lut_gemv_bytes(x, codes, tables, bias, bits, block=(16, 16, split))
    assert got.dtype == dtype and got.shape == (m, 37)
    assert_matches(got, lut_linear(x.float(), codes, tables.float(), bias.float(), bits), dtype)


def test_byte_wise_gemv_takes_only_decode_rows_of_2_or_4_bit_codes():
    x, codes, tables, _ = problem(5, 8, 64, 1, 4, torch.float32)
    with pytest.raises(ValueError, match="M <= 4"):
        lut_gemv_bytes(x, codes, tables, None, 4)
    x, codes, tables, _ = problem(1, 8, 64, 1, 3, torch.float32)
    with pytest.raises(ValueError, match="2- or 4-bit"):
        lut_gemv_bytes(x, prepared(codes, 3), tables, None, 3)


def test_gemv_refuses_prefill_sizes():
    x, codes, tables, _ = problem(17, 8, 64, 1, 4, torch.float32)
    with pytest.raises(ValueError, match="M <= 16"):
        lut_gemv(x, codes, tables, None, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", BITS)
def test_grad_input_matches_reference(dtype, bits):
    x, codes, tables, _ = problem(20, 40, 128, 2, bits, dtype)
    grad = torch.randn(20, 40).to(dtype).to(DEVICE)
    expected, _ = lut_linear_backward(grad.float(), x.float(), codes, tables.float(), bits, True, False)
    assert_matches(lut_grad_input(grad, prepared(codes, bits), tables, bits, block=(32, 32, 64)), expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("gpr", [1, 2, 4, 8])
def test_fused_table_grad_matches_reference(dtype, bits, gpr):
    """Binned code by code (no one-hot); gpr 8: 16-column groups, one 16-wide K tile each."""
    x, codes, tables, _ = problem(24, 36, 128, gpr, bits, dtype)
    grad = torch.randn(24, 36).to(dtype).to(DEVICE)
    _, expected = lut_linear_backward(grad.float(), x.float(), codes, tables.float(), bits, False, True)
    planes = prepared(codes, bits)
    atomic = lut_grad_tables(grad, x, planes, gpr, bits, deterministic=False, block=(32, 32))
    assert atomic.dtype == torch.float32 and atomic.shape == (36, gpr, 1 << bits)
    assert_matches(atomic, expected, dtype)
    first = lut_grad_tables(grad, x, planes, gpr, bits, deterministic=True, block=(32, 32))
    again = lut_grad_tables(grad, x, planes, gpr, bits, deterministic=True, block=(32, 32))
    assert torch.equal(first, again)
    assert_matches(first, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("gpr", [1, 3])
def test_dequantize_matches_reference(dtype, bits, gpr):
    from spallm_plugins.kernels.reference import dequantize

    _, codes, tables, _ = problem(1, 40, 192, gpr, bits, dtype)  # N, K off the (32, 64) tile grid; 64-wide groups
    got = lut_dequantize(prepared(codes, bits), tables, bits, dtype, block=(32, 128 * bits // 8 if bits != 3 else 128))
    assert got.dtype == dtype and got.shape == (40, 192)
    assert torch.equal(got, dequantize(codes, tables, bits, dtype))
    assert torch.equal(lut_dequantize(prepared(codes, bits), tables, bits, dtype), got)  # the default tile


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(("k", "gpr"), [(128, 1), (128, 8), (192, 4)])
def test_bin_weight_grad_sums_each_code_s_weights(bits, k, gpr):
    """grad_tables[n, g, j] = sum of grad_W[n, c] over the columns c of group g whose code is j; 192 / 4 = 48-wide
    groups end inside a 64-wide K tile (the mask stops at the group's end)."""
    from spallm_plugins.format import unpack_codes

    _, codes, _, _ = problem(1, 36, k, gpr, bits, torch.float32)
    grad_w = torch.randn(36, k, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    values = unpack_codes(codes.cpu(), bits).long()
    group = torch.arange(k) // (k // gpr)
    expected = torch.zeros(36, gpr, 1 << bits)
    expected.view(36, -1).scatter_add_(1, group * (1 << bits) + values, grad_w.cpu())
    expected = expected.to(DEVICE)
    got = bin_weight_grad(grad_w, prepared(codes, bits), gpr, bits, block=(32, 64))
    assert got.dtype == torch.float32 and got.shape == (36, gpr, 1 << bits)
    assert_matches(got, expected, torch.float32)
    assert torch.equal(got, bin_weight_grad(grad_w, prepared(codes, bits), gpr, bits, block=(32, 64)))


def test_rows_above_the_gemv_range_dequantize_unless_w_is_too_large():
    assert not dequantized_path(16, 4096, 4096, 2)
    assert dequantized_path(17, 4096, 4096, 2) and dequantized_path(4096, 28672, 8192, 2)
    assert not dequantized_path(4096, DEQUANTIZE_MAX_BYTES // 4096 + 1, 2048, 2)


SM90_COMPILE = """
import json, re, subprocess, sys, tempfile
from pathlib import Path
import importlib
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

module, name, signature, constexprs, num_warps = json.loads(sys.argv[1])
kernel = getattr(importlib.import_module(module), name)
signature = {**signature, **dict.fromkeys(constexprs, "constexpr")}
source = ASTSource(kernel, signature, {(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
with tempfile.TemporaryDirectory() as tmp:
    ptx = Path(tmp) / "kernel.ptx"
    ptx.write_text(compiled.asm["ptx"])
    log = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", str(ptx), "-o", str(ptx) + ".o"],
                         capture_output=True, text=True, check=True).stderr
print(json.dumps({"rank3": re.findall(r"tensor<\\d+x\\d+x\\d+x", compiled.asm["ttir"]),
                  "mma": "mma" in compiled.asm["ttgir"],
                  "spill_bytes": sum(int(b) for b in re.findall(r"(\\d+) bytes spill stores", log))}))
"""


def compile_for_sm90(module, name, signature, constexprs, num_warps=4) -> dict:
    """Kernel ``module.name`` compiled for an H100/H200 (sm90) without a GPU, by triton's bundled ptxas,
    in a child process (this one runs the interpreter): its 3-D tensor types in Triton IR, whether it
    uses tensor cores, and the bytes ptxas spills. The interpreter never lowers to GPU layouts, so
    this is where a tile or layout the GPU cannot take, or register pressure, shows up on CPU."""
    import json

    from conftest import run_python

    args = json.dumps([module, name, signature, constexprs, num_warps])
    proc = run_python(SM90_COMPILE, args, env={"TRITON_INTERPRET": "0"})
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(HAS_CUDA, reason="the GPU run compiles and runs the kernels for real")
@pytest.mark.parametrize(("block_m", "bits"), [(1, 4), (4, 3), (16, 2)])
def test_gemv_compiles_for_sm90_without_3d_intermediates(block_m, bits):
    """No ``[M, BLOCK_N, BLOCK_K]`` product on either path (rows on CUDA cores, or ``tl.dot``)."""
    signature = {
        "x_ptr": "*fp16",
        "codes_ptr": "*u8",
        "tables_ptr": "*fp16",
        "out_ptr": "*fp32",
        "M": "i32",
        "N": "i32",
        "K": "i32",
        "M_BUCKET": "i32",
        "stride_xm": "i32",
        "stride_cn": "i32",
        "stride_tn": "i32",
    }
    constexprs = dict(GROUP_SIZE=256, BITS=bits, NUM_CODES=1 << bits, PRECISION="tf32", UPCAST=False,
                      BLOCK_M=block_m, BLOCK_N=32, BLOCK_K=32, SPLIT_K=2, STAGED=True)  # fmt: skip
    got = compile_for_sm90("spallm_plugins.kernels.triton.lut_gemv", "lut_gemv_kernel", signature, constexprs)
    assert got["rank3"] == [] and got["mma"] == (block_m >= 16)


@pytest.mark.skipif(HAS_CUDA, reason="the GPU run compiles and runs the kernels for real")
def test_table_grad_bins_without_a_one_hot_and_without_spilling_on_sm90():
    """4-bit codes on the 64 x 64 tile the backend launches: the one-hot this replaced was a 3-D
    ``[64, 64, 16]`` tensor and spilled 4 KB per thread on sm90; the code-by-code binning fits."""
    signature = {
        "g_ptr": "*fp16",
        "x_ptr": "*fp16",
        "codes_ptr": "*u8",
        "out_ptr": "*fp32",
        "M": "i32",
        "N": "i32",
        "K": "i32",
        "stride_gm": "i32",
        "stride_xm": "i32",
        "stride_cn": "i32",
    }
    constexprs = dict(GROUP_SIZE=1024, BITS=4, NUM_CODES=16, GROUPS=4, DETERMINISTIC=False, PRECISION="tf32",
                      UPCAST=False, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64)  # fmt: skip
    got = compile_for_sm90("spallm_plugins.kernels.triton.lut_backward", "lut_grad_tables_kernel", signature,
                           constexprs)  # fmt: skip
    assert got["rank3"] == [] and got["mma"] and got["spill_bytes"] == 0


def test_backend_explains_what_it_cannot_run(monkeypatch):
    import spallm_plugins.kernels.triton as triton_backend

    monkeypatch.setattr(triton_backend, "cuda_capability", lambda: (9, 0))
    backend = TritonBackend()
    ok, reason = backend.can_implement(LUTProblem("cpu", torch.float16, torch.float16, 4, 4096, 4096, 1, 1))
    assert not ok and "runs on CUDA, not cpu" in reason
    assert backend.can_implement(LUTProblem("cuda", torch.float16, torch.float16, 3, 4096, 4096, 1, 1, True))[0]
    ok, reason = backend.can_implement(LUTProblem("cuda", torch.float16, torch.float16, 8, 4096, 4096, 1, 1))
    assert not ok and "no kernel for 8-bit codes (2, 3 and 4 have one)" in reason
    ok, reason = backend.can_implement(LUTProblem("cuda", torch.float16, torch.float16, 3, 4100, 4096, 1, 1))
    assert not ok and "does not fill whole bytes of 3-bit codes" in reason
    ok, reason = backend.can_implement(LUTProblem("cuda", torch.float64, torch.float16, 4, 4096, 4096, 1, 1))
    assert not ok and "activations in torch.float64" in reason
    ok, reason = backend.can_implement(LUTProblem("cuda", torch.float16, torch.float16, 4, 120, 64, 3, 32, True))
    assert not ok and "group size 40" in reason
    ok, reason = backend.can_implement(LUTProblem("cuda", torch.float16, torch.float16, 4, 4096, 64, 3, 32))
    assert not ok and "not a multiple of groups_per_row 3" in reason
    assert backend.can_implement(LUTProblem("cuda", torch.bfloat16, torch.float16, 4, 4096, 4096, 4, 256, True))[0]

    monkeypatch.setattr(triton_backend, "cuda_capability", lambda: (7, 5))
    ok, reason = backend.can_implement(LUTProblem("cuda", torch.bfloat16, torch.float16, 4, 4096, 4096, 4, 256))
    assert not ok and "bfloat16 kernels need compute capability 8.0 (sm80)" in reason and "7.5 (sm75)" in reason
    assert backend.can_implement(LUTProblem("cuda", torch.float16, torch.float16, 4, 4096, 4096, 4, 256))[0]
    monkeypatch.setattr(triton_backend, "cuda_capability", lambda: (6, 1))
    ok, reason = backend.can_implement(LUTProblem("cuda", torch.float32, torch.float16, 4, 4096, 4096, 4, 256))
    assert not ok and "float32 kernels need compute capability 7.0 (sm70)" in reason
    ok, reason = backend.can_implement(LUTProblem("cpu", torch.bfloat16, torch.float16, 4, 4096, 4096, 4, 256))
    assert not ok and "runs on CUDA, not cpu" in reason  # the device is only asked about CUDA problems


def autotuners():
    """Every ``triton.autotune`` object defined in a module of the Triton kernel package."""
    from triton.runtime.autotuner import Autotuner

    package = importlib.import_module("spallm_plugins.kernels.triton")
    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, value in vars(module).items():
            if isinstance(value, Autotuner):
                found[f"{info.name}.{name}"] = value
    return found


def test_autotuned_kernels_key_on_the_row_bucket_never_on_m():
    tuners = autotuners()
    assert set(tuners) == {"lut_gemv._autotuned", "lut_gemv_bytes._autotuned", "lut_gemv_words._autotuned",
                           "lut_matmul._autotuned", "lut_table_sets._autotuned"}  # fmt: skip
    for name, tuner in tuners.items():
        assert "M" not in tuner.keys, name
        assert "M_BUCKET" in tuner.keys and set(tuner.keys) <= set(tuner.arg_names), name


def launch_matmul(m, bits):
    x, codes, tables, bias = problem(m, 24, 64, 2, bits, torch.float32)
    return matmul_module.lut_matmul(x, codes, tables, bias, bits), lut_linear(x, codes, tables, bias, bits)


def launch_gemv(m, bits):
    x, codes, tables, bias = problem(m, 24, 64, 2, bits, torch.float32)
    return gemv_module.lut_gemv(x, codes, tables, bias, bits), lut_linear(x, codes, tables, bias, bits)


def launch_gemv_bytes(m, bits):
    x, codes, tables, bias = problem(m, 24, 64, 2, bits, torch.float32)
    return gemv_bytes_module.lut_gemv_bytes(x, codes, tables, bias, bits), lut_linear(x, codes, tables, bias, bits)


def launch_table_sets(m, bits):
    x, codes, tables, bias = problem(m, 24, 64, 2, bits, torch.float32)
    sets, slots = torch.stack([tables, -tables]), torch.arange(m, device=DEVICE) % 2
    got = table_sets_module.lut_table_sets(x, codes, sets, slots, bias, bits)
    return got, lut_linear_table_sets(x, codes, sets, slots, bias, bits)


@pytest.mark.parametrize(
    ("module", "launch", "same_bucket", "next_bucket"),
    [
        (matmul_module, launch_matmul, (20, 40), 70),
        (gemv_module, launch_gemv, (2, 4), 5),
        (gemv_bytes_module, launch_gemv_bytes, (2, 4), 1),
        (table_sets_module, launch_table_sets, (20, 40), 70),
    ],
)
def test_autotune_benchmarks_once_per_row_bucket(monkeypatch, module, launch, same_bucket, next_bucket):
    """The real autotuner (its benchmark timer faked: the interpreter has none) tunes a new M only
    when it opens a new bucket, and the tuned launch still matches the reference."""
    timed = []
    monkeypatch.setattr(module, "interpreting", lambda: False)
    monkeypatch.setattr(module._autotuned, "cache", {})
    monkeypatch.setitem(module._autotuned.__dict__, "do_bench", lambda call, quantiles: timed.append(1) or [1.0] * 3)
    for m in same_bucket:
        got, want = launch(m, 4)
        assert_matches(got, want, torch.float32)
    assert len(module._autotuned.cache) == 1 and len(timed) == len(module.CONFIGS)
    assert next(iter(module._autotuned.cache))[0] == m_bucket(same_bucket[0])
    launch(next_bucket, 4)
    assert len(module._autotuned.cache) == 2 and len(timed) == 2 * len(module.CONFIGS)


def strided(t, dim=-1):
    """A non-contiguous view equal to ``t``: every other element of a twice-as-wide buffer along ``dim``."""
    shape = list(t.shape)
    shape[dim] *= 2
    wide = torch.zeros(shape, dtype=t.dtype, device=t.device)
    index = [slice(None)] * t.dim()
    index[dim] = slice(None, None, 2)
    wide[tuple(index)] = t
    view = wide[tuple(index)]
    assert not view.is_contiguous() and torch.equal(view, t)
    return view


@pytest.mark.parametrize("bits", BITS)
def test_launchers_read_non_contiguous_inputs(bits):
    """Views with other strides than their shape implies (a transposed or sliced tables, x, codes,
    bias, slots): each launcher must hand the kernel the strides of the tensor it hands it."""
    x, codes, tables, bias = problem(20, 24, 128, 2, bits, torch.float32)
    x_t = x.t().contiguous().t()
    tables_t = tables.transpose(0, 1).contiguous().transpose(0, 1)
    assert not x_t.is_contiguous() and not tables_t.is_contiguous()
    args = (strided(codes), tables_t, strided(bias), bits)
    assert_matches(lut_matmul(x_t, *args, block=(32, 32, 32)), lut_linear(x, codes, tables, bias, bits), torch.float32)
    want = lut_linear(x[:5], codes, tables, bias, bits)
    assert_matches(lut_gemv(strided(x[:5]), *args, block=(32, 64, 2)), want, torch.float32)
    sets = torch.stack([tables, tables.flip(0)])
    slots = torch.arange(20, device=DEVICE) % 2
    got = lut_table_sets(x_t, strided(codes), sets.transpose(1, 2).contiguous().transpose(1, 2), strided(slots),
                         strided(bias), bits, block=(16, 32, 32))  # fmt: skip
    assert_matches(got, lut_linear_table_sets(x, codes, sets, slots, bias, bits), torch.float32)
    grad = torch.randn(20, 24).to(DEVICE)
    gx, gt = lut_linear_backward(grad, x, codes, tables, bits, True, True)
    assert_matches(lut_grad_input(grad.t().contiguous().t(), strided(codes), tables_t, bits, block=(32, 32, 64)), gx,
                   torch.float32)  # fmt: skip
    got = lut_grad_tables(strided(grad), x_t, strided(codes), 2, bits, deterministic=True, block=(32, 32))
    assert_matches(got, gt, torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("m", [1, 7, 64, 300])
def test_autotuned_kernels_through_the_op_on_gpu(m, bits):
    from spallm_plugins.ops import lut_linear as dispatched

    x, codes, tables, bias = problem(m, 1000, 1024, 4, bits, torch.float16)
    x.requires_grad_(True)
    tables.requires_grad_(True)
    y = dispatched(x, codes, tables, bias, bits)
    assert_matches(y, lut_linear(x.float(), codes, tables.float(), bias.float(), bits), torch.float16)
    grad = torch.randn_like(y)
    y.backward(grad)
    gx, gt = lut_linear_backward(grad.float(), x.detach().float(), codes, tables.detach().float(), bits, True, True)
    assert_matches(x.grad, gx, torch.float16)
    assert_matches(tables.grad, gt, torch.float16)


def test_custom_ops_are_registered_with_fake_implementations():
    from spallm_plugins.kernels.triton import ops  # noqa: F401

    x, codes, tables, bias = problem(20, 24, 64, 2, 4, torch.float32)
    y = torch.ops.spallm.lut_linear(x, codes, tables, bias, 4)
    assert_matches(y, lut_linear(x, codes, tables, bias, 4), torch.float32)
    y_decode = torch.ops.spallm.lut_linear(x[:3], codes, tables, None, 4)
    assert_matches(y_decode, lut_linear(x[:3], codes, tables, None, 4), torch.float32)
    grad = torch.randn(20, 24).to(DEVICE)
    gx, gt = lut_linear_backward(grad, x, codes, tables, 4, True, True)
    assert_matches(torch.ops.spallm.lut_grad_input(grad, codes, tables, 4), gx, torch.float32)
    assert_matches(torch.ops.spallm.lut_grad_tables(grad, x, codes, 2, 4, True), gt, torch.float32)
    torch.library.opcheck(torch.ops.spallm.lut_linear.default, (x, codes, tables, bias, 4),
                          test_utils=("test_schema", "test_faketensor"))  # fmt: skip
    torch.library.opcheck(torch.ops.spallm.lut_grad_tables.default, (grad, x, codes, 2, 4, True),
                          test_utils=("test_schema", "test_faketensor"))  # fmt: skip
    sets = torch.stack([tables, tables.flip(0)])
    slots = torch.arange(20, device=DEVICE) % 2
    got = torch.ops.spallm.lut_linear_table_sets(x, codes, sets, slots, bias, 4)
    assert_matches(got, lut_linear_table_sets(x, codes, sets, slots, bias, 4), torch.float32)
    torch.library.opcheck(torch.ops.spallm.lut_linear_table_sets.default, (x, codes, sets, slots, bias, 4),
                          test_utils=("test_schema", "test_faketensor"))  # fmt: skip
    _, codes3, tables3, _ = problem(20, 24, 64, 2, 3, torch.float32)  # 3-bit bit planes: K from their last dim
    torch.library.opcheck(torch.ops.spallm.lut_grad_input.default, (grad, prepared(codes3, 3), tables3, 3),
                          test_utils=("test_faketensor",))  # fmt: skip


@pytest.mark.parametrize(("deterministic", "bits"), [(False, 4), (True, 4), (False, 3)])
def test_triton_backend_through_the_autograd_op(deterministic, bits):
    """The op hands the backend its prepared codes (3-bit: bit planes, repacked once) and format v1 stays in the layer."""
    from spallm_plugins.ops import lut_linear as dispatched

    x, codes, tables, bias = problem(24, 20, 64, 2, bits, torch.float32)
    stored = codes.clone()
    x.requires_grad_(True)
    tables.requires_grad_(True)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        y = dispatched(x, codes, tables, bias, bits, backend=TritonBackend())
        grad = torch.randn_like(y)
        y.backward(grad)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(codes, stored)
    assert_matches(y, lut_linear(x.detach(), codes, tables.detach(), bias, bits), torch.float32)
    gx, gt = lut_linear_backward(grad, x.detach(), codes, tables.detach(), bits, True, True)
    assert_matches(x.grad, gx, torch.float32)
    assert_matches(tables.grad, gt, torch.float32)
