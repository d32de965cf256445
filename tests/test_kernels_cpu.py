"""The compiled CPU kernels (``spallm_plugins.kernels.cpu``) against the PyTorch reference.

Every instruction set this CPU runs is built and tested (AVX-512, AVX2, portable C), so a machine with
AVX-512 also tests the paths a machine without it would take. Shapes cover group sizes that are not a
multiple of the vector width (the scalar tails) and row counts that are not a multiple of the 4-row block.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from conftest import needs

from spallm_plugins.format import pack_codes
from spallm_plugins.hooks import select_backend
from spallm_plugins.kernels import LUTProblem, reference
from spallm_plugins.kernels.cpu import GEMV_MAX_ROWS, CPUBackend, library
from spallm_plugins.ops import describe_problem, lut_linear

ISAS = library.host_isas()
SHAPES = [(48, 144, 4), (37, 96, 3), (16, 576, 1), (9, 24, 3)]  # (out, in, gpr): group sizes 36, 32, 576, 8


def random_layer(out_features, in_features, gpr, bits, table_dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (out_features, in_features), generator=generator)
    tables = torch.randn(out_features, gpr, 1 << bits, generator=generator).to(table_dtype)
    return pack_codes(codes, bits), tables


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("table_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_lut_linear_matches_the_reference(isa, bits, table_dtype):
    for out_features, in_features, gpr in SHAPES:
        codes, tables = random_layer(out_features, in_features, gpr, bits, table_dtype)
        bias = torch.randn(out_features)
        weight = library.dequantize(codes, tables, bits, isa)
        assert torch.equal(weight, reference.dequantize(codes, tables, bits, torch.float32))
        for rows in (1, 3, 4, 6, 9):
            x = torch.randn(rows, in_features, dtype=torch.float64)
            expected = x @ weight.double().T + bias.double()
            got = library.lut_linear(x.float(), codes, tables, bias, bits, isa)
            torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)
            unbiased = library.lut_linear(x.float(), codes, tables, None, bits, isa)
            torch.testing.assert_close(unbiased.double(), expected - bias.double(), rtol=1e-5, atol=1e-4)


def test_the_built_library_reports_the_instruction_set_it_was_built_for():
    for isa in ISAS:
        assert library.library(isa).spallm_isa().decode() == isa


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [2, GEMV_MAX_ROWS + 5])  # the LUT GEMM, and dequantize + dense matmul
def test_the_backend_through_autograd_matches_the_reference(dtype, rows):
    """Against the reference in float32 (the CPU kernels accumulate in float32 whatever x's dtype)."""
    codes, tables = random_layer(24, 64, 2, 4, torch.float32, seed=1)
    bias, x = torch.randn(24), torch.randn(rows, 64)
    results = []
    for backend, leaf_dtype in ((CPUBackend(), dtype), (reference.ReferenceBackend(), torch.float32)):
        leaves = [t.detach().to(leaf_dtype).requires_grad_(True) for t in (x, bias)]
        table_leaf = tables.detach().clone().requires_grad_(True)
        y = lut_linear(leaves[0], codes, table_leaf, leaves[1], 4, backend=backend)
        assert y.dtype == leaf_dtype
        grads = torch.autograd.grad((y.float() ** 2).sum(), (leaves[0], table_leaf, leaves[1]))
        results.append((y, *grads))
    relative = 1e-5 if dtype == torch.float32 else 2e-2
    for got, expected in zip(*results, strict=True):
        atol = relative * expected.abs().max().item()
        torch.testing.assert_close(got.float(), expected, rtol=relative, atol=atol)


def test_table_sets_match_the_reference():
    codes, _ = random_layer(24, 64, 2, 4, torch.float16, seed=2)
    table_sets = torch.randn(3, 24, 2, 16).half()
    bias = torch.randn(24)
    for slots in ([2, 0, 2, 1, 0], [1, 1, 1], [5, -1, 0]):  # out of range is clamped, as the kernels do
        slots = torch.tensor(slots)
        x = torch.randn(slots.shape[0], 64)
        got = CPUBackend().forward_table_sets(x, codes, table_sets, slots, bias, 4)
        expected = reference.lut_linear_table_sets(x, codes, table_sets, slots, bias, 4)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match=r"slots has shape \[2\], expected \[3\]"):
        CPUBackend().forward_table_sets(torch.randn(3, 64), codes, table_sets, torch.tensor([0, 1]), None, 4)


def test_the_cpu_backend_is_chosen_on_a_cpu_and_refuses_what_it_cannot_run():
    codes, tables = random_layer(8, 32, 2, 4, torch.float16)
    assert select_backend(describe_problem(torch.randn(1, 32), codes, tables, 4)).name == "cpu"
    backend = CPUBackend()
    problem = LUTProblem("cpu", torch.float32, torch.float16, 4, 32, 8, 2, rows=1)
    assert backend.can_implement(problem) == (True, "")
    refusals = {
        "runs on the CPU, not cuda": LUTProblem("cuda", torch.float32, torch.float16, 4, 32, 8, 2, rows=1),
        "activations in torch.float64": LUTProblem("cpu", torch.float64, torch.float16, 4, 32, 8, 2, rows=1),
        "no kernel for 8-bit codes": LUTProblem("cpu", torch.float32, torch.float16, 8, 32, 8, 2, rows=1),
        "not a multiple of groups_per_row 3": LUTProblem("cpu", torch.float32, torch.float16, 4, 32, 8, 3, rows=1),
        "tables in torch.float64": LUTProblem("cpu", torch.float32, torch.float64, 4, 32, 8, 2, rows=1),
    }
    for reason, refused in refusals.items():
        ok, why = backend.can_implement(refused)
        assert not ok and reason in why


def test_a_shape_that_does_not_match_the_codes_is_refused_before_any_pointer_is_read():
    codes, tables = random_layer(8, 32, 2, 4, torch.float32)
    with pytest.raises(ValueError, match=r"codes: expected uint8 \[8, 32\], got torch.uint8 \[8, 16\]"):
        library.lut_linear(torch.randn(1, 64), codes, tables, None, 4)
    with pytest.raises(ValueError, match=r"tables: expected \[out, groups_per_row, 16\]"):
        library.lut_linear(torch.randn(1, 32), codes, tables[..., :8], None, 4)
    with pytest.raises(ValueError, match=r"bias: expected float32 \[8\]"):
        library.lut_linear(torch.randn(1, 32), codes, tables, torch.randn(9), 4)
    with pytest.raises(ValueError, match="x: expected a 2-D float32 tensor"):
        library.lut_linear(torch.randn(1, 32, dtype=torch.float64), codes, tables, None, 4)


def test_the_custom_ops_pass_torch_library_opcheck():
    from spallm_plugins.kernels.cpu import ops

    codes, tables = random_layer(8, 32, 2, 4, torch.float16)
    for rows, dtype in ((3, torch.float32), (GEMV_MAX_ROWS + 1, torch.bfloat16)):
        x = torch.randn(rows, 32, dtype=dtype)
        torch.library.opcheck(ops.lut_linear_cpu, (x, codes, tables, torch.randn(8, dtype=dtype), 4))
    torch.library.opcheck(ops.dequantize_cpu, (codes, tables, 4))


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env})


def test_the_kernels_are_built_once_into_the_cache_and_a_failed_build_leaves_the_reference(tmp_path):
    probe = (
        "from spallm_plugins.kernels.cpu import library\n"
        "from spallm_plugins.hooks import select_backend\n"
        "from spallm_plugins.kernels import LUTProblem\n"
        "import torch\n"
        "print(library.unavailable_reason() or 'built')\n"
        "print(select_backend(LUTProblem('cpu', torch.float32, torch.float16, 4, 32, 8, 2, rows=1)).name)\n"
    )
    cache = tmp_path / "cache"
    first = _run(probe, SPALLM_KERNEL_CACHE=str(cache), SPALLM_CPU_KERNEL="portable")
    assert first.stdout.split() == ["built", "cpu"], first.stderr
    (built,) = cache.glob("lut_cpu-portable-*.so")
    stamp = built.stat().st_mtime_ns
    again = _run(probe, SPALLM_KERNEL_CACHE=str(cache), SPALLM_CPU_KERNEL="portable")
    assert again.stdout.split() == ["built", "cpu"], again.stderr
    assert built.stat().st_mtime_ns == stamp and not list(cache.glob(".build-*"))
    broken = _run(probe, SPALLM_KERNEL_CACHE=str(tmp_path / "other"), SPALLM_CPU_KERNEL="portable", CC="false")
    lines = broken.stdout.splitlines()
    assert "failed to build lut_cpu-portable-" in lines[0] and lines[1] == "reference", broken.stderr
    off = _run(probe, SPALLM_CPU_KERNEL="off")
    assert off.stdout.splitlines() == ["turned off by SPALLM_CPU_KERNEL=off", "reference"], off.stderr
    wrong = _run(probe, SPALLM_CPU_KERNEL="sse9")
    assert "SPALLM_CPU_KERNEL='sse9': expected one of avx512, avx2, portable, auto, off" in wrong.stdout


def test_the_cpu_kernel_bench_times_both_paths_and_checks_the_result(tmp_path):
    import json

    from spallm_plugins.bench.kernels import run_cpu_kernel_bench

    run_cpu_kernel_bench(shapes=[(8, 32)], rows=[1, GEMV_MAX_ROWS + 1], out_dir=tmp_path / "bench", log=lambda _: None)
    data = json.loads((tmp_path / "bench" / "kernels.json").read_text())
    assert (data["device"], data["isa"], data["gemv_max_rows"]) == ("cpu", library.requested_isa(), GEMV_MAX_ROWS)
    rows = data["rows"]
    assert [(r["N"], r["K"], r["M"], r["backend_path"]) for r in rows] == [
        (8, 32, 1, "lut_gemm"),
        (8, 32, GEMV_MAX_ROWS + 1, "dequant_matmul"),
    ]
    for row in rows:
        assert row["max_abs_error_vs_dense"] < 1e-5
        assert all(
            row[key] > 0 for key in ("lut_gemm_us", "dequant_matmul_us", "backend_us", "dense_us", "reference_us")
        )
        if importlib.util.find_spec("bitsandbytes") is not None:
            assert row["qlora_rank"] == 13 and row["qlora_us"] > 0  # 8 * 4 * 16 table values ~ 13 * (8 + 32)


def test_the_qlora_layer_of_the_bench_is_nf4_plus_its_lora_tower():
    needs("bitsandbytes", "the QLoRA column needs the peers extra")
    from spallm_plugins.bench.kernels import QLoRALayer, matched_lora_rank

    assert matched_lora_rank(4096, 4096, 4, 4) == 32 and matched_lora_rank(8, 32, 4, 4) == 13
    dense = torch.randn(64, 128)
    layer = QLoRALayer(dense, 4)
    x = torch.randn(3, 128)
    tower = (x @ layer.lora_a.T) @ layer.lora_b.T
    nf4 = layer(x) - tower
    assert layer.lora_a.shape == (4, 128) and layer.lora_b.shape == (64, 4)
    relative = (nf4 - x @ dense.T).norm() / (x @ dense.T).norm()
    assert 0 < relative < 0.2  # 4-bit: close to the dense product, not equal to it
