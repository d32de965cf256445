"""The decode kernel over code words (:mod:`spallm_plugins.kernels.triton.lut_gemv_words`) and its layout.

Without CUDA the kernel runs under the Triton interpreter with PRMT emulated in integer operations
(inline asm does not interpret); the emulation is held to PTX's definition of ``prmt.b32`` here, and
the compiled kernel's machine code is checked in ``test_kernels_sass.py``.
"""

import os

import numpy as np
import pytest
import torch
from conftest import needs

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
needs("triton", "pip install '.[triton]' (nox -s tests installs it)")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from spallm_plugins.format import pack_codes  # noqa: E402
from spallm_plugins.kernels.reference import lut_linear  # noqa: E402
from spallm_plugins.kernels.triton import TritonBackend  # noqa: E402
from spallm_plugins.kernels.triton.layout import (  # noqa: E402
    chunk_units,
    code_columns,
    code_words,
    format_v1_codes,
    kernel_codes,
)
from spallm_plugins.kernels.triton.lut_gemv_words import lut_gemv_words, prmt_emulated  # noqa: E402
from spallm_plugins.kernels.triton.lut_matmul_words import chunk_permutation, lut_matmul_words  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # relative to max |reference|


def problem(m, n, k, gpr, bits, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = pack_codes(torch.randint(0, 1 << bits, (n, k), generator=g), bits)
    tables = torch.randn(n, gpr, 1 << bits, generator=g).to(dtype)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    return x.to(DEVICE), codes.to(DEVICE), tables.to(DEVICE), bias.to(DEVICE)


def assert_matches(got, x, codes, tables, bias, bits, dtype):
    reference = lut_linear(x.float(), codes, tables.float(), None if bias is None else bias.float(), bits)
    scale = reference.abs().max().clamp_min(1.0)
    err = (got.float() - reference).abs().max()
    assert err <= TOL[dtype] * scale, f"max error {err:.3g} vs allowed {TOL[dtype] * scale:.3g}"


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("gpr", [1, 2, 4, 8])
def test_code_words_restore_exactly_and_unpack_to_the_other_layouts(bits, gpr):
    codes = pack_codes(torch.randint(0, 1 << bits, (5, 512)), bits)
    words = code_words(codes, bits, gpr)
    kw = chunk_units(bits, 512 // gpr)
    assert words.dtype == torch.int32 and words.shape == (
        3 if bits == 3 else 1,
        512 // (kw * (32 // bits if bits != 3 else 32)),
        kw,
        5,
    )
    assert words.numel() * 4 == codes.numel()  # the same bits, nothing padded
    assert torch.equal(format_v1_codes(words, bits), codes) and code_columns(words, bits) == 512
    assert torch.equal(kernel_codes(words, bits), kernel_codes(codes, bits))


def test_code_word_values_sit_where_the_prmt_selectors_want_them():
    """4-bit, KW = 4: unit j of chunk c holds column c*32 + v*4 + j in bits 4v."""
    fields = torch.randint(0, 16, (3, 64))
    words = code_words(pack_codes(fields, 4), 4, 1)
    assert words.shape == (1, 2, 4, 3)
    c, j, n = 1, 2, 1
    word = int(words[0, c, j, n]) & 0xFFFFFFFF
    assert [(word >> (4 * v)) & 15 for v in range(8)] == [int(fields[n, c * 32 + v * 4 + j]) for v in range(8)]


def test_code_words_refuse_groups_no_chunk_tiles():
    assert chunk_units(4, 20) == 0 and chunk_units(4, 40) == 1 and chunk_units(3, 64) == 2 and chunk_units(2, 1376) == 2
    with pytest.raises(ValueError, match="do not split into chunks"):
        code_words(pack_codes(torch.zeros(2, 120, dtype=torch.long), 4), 4, 6)
    codes = pack_codes(torch.zeros(2, 120, dtype=torch.long), 4)
    assert TritonBackend().prepare_weights(codes, torch.zeros(2, 6, 16), 4)[0] is codes  # format v1 kept
    assert TritonBackend().prepare_weights(codes, None, 4)[0] is codes


def prmt_reference(a: np.ndarray, b: np.ndarray, s: np.ndarray) -> np.ndarray:
    """PTX ISA ``prmt.b32`` default mode: byte i = byte ``s[4i:4i+3]`` of ``{b, a}``; if ``s[4i+3]``,
    that byte's sign bit replicated."""
    source = (b.astype(np.uint64) << np.uint64(32)) | a.astype(np.uint32).astype(np.uint64)
    out = np.zeros(a.shape, dtype=np.uint64)
    for i in range(4):
        nibble = (s.astype(np.uint32) >> np.uint32(4 * i)) & np.uint32(15)
        byte = (source >> ((nibble & np.uint32(7)).astype(np.uint64) * np.uint64(8))) & np.uint64(255)
        byte = np.where(nibble >= 8, np.where(byte >= 128, 255, 0), byte).astype(np.uint64)
        out |= byte << np.uint64(8 * i)
    return out.astype(np.uint32).view(np.int32)


@triton.jit
def _prmt_kernel(a_ptr, b_ptr, s_ptr, out_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    a, b, s = tl.load(a_ptr + offs), tl.load(b_ptr + offs), tl.load(s_ptr + offs)
    tl.store(out_ptr + offs, prmt_emulated(a, b, s))


@pytest.mark.skipif(HAS_CUDA, reason="the emulation is the interpreter's PRMT")
def test_prmt_emulation_is_ptx_prmt():
    g = torch.Generator().manual_seed(0)
    a, b, s = (torch.randint(-(2**31), 2**31, (256,), generator=g, dtype=torch.int64).to(torch.int32) for _ in range(3))
    out = torch.empty_like(a)
    _prmt_kernel[(1,)](a, b, s, out, BLOCK=256)
    assert np.array_equal(out.numpy(), prmt_reference(a.numpy(), b.numpy(), s.numpy()))


@pytest.mark.parametrize(
    ("bits", "gpr", "dtype", "m", "split"),
    [
        (4, 1, torch.bfloat16, 1, 1),
        (4, 8, torch.float16, 2, 3),
        (3, 2, torch.bfloat16, 1, 3),
        (3, 8, torch.float16, 1, 2),
        (2, 4, torch.float16, 3, 2),
        (2, 8, torch.bfloat16, 1, 3),
    ],
)
def test_words_gemv_matches_reference(bits, gpr, dtype, m, split):
    """N = 37 off the 32-row tile (masked rows); splits that cross table groups; KW 4, 2 and 1."""
    x, codes, tables, bias = problem(m, 37, 256 if bits == 3 else 128, gpr, bits, dtype, seed=bits * 10 + gpr)
    words, _ = TritonBackend().prepare_weights(codes, tables, bits)
    assert words.dim() == 4
    got = lut_gemv_words(x, words, tables, bias, bits, block=(32, split, 1))
    assert got.dtype == dtype and got.shape == (m, 37)
    assert_matches(got, x, codes, tables, bias, bits, dtype)


def test_words_gemv_refuses_fp32_and_mismatched_words():
    x, codes, tables, _ = problem(1, 8, 64, 1, 4, torch.bfloat16)
    words = code_words(codes, 4, 1)
    with pytest.raises(ValueError, match="fp16/bf16"):
        lut_gemv_words(x.float(), words, tables, None, 4)
    with pytest.raises(ValueError, match="covering 64 columns"):
        lut_gemv_words(x, words, tables, None, 2)


@pytest.mark.parametrize(("m", "dtype"), [(1, torch.bfloat16), (17, torch.float16), (2, torch.float32)])
def test_the_op_runs_code_words_on_every_path(m, dtype):
    """``torch.ops.spallm.lut_linear`` on prepared code words: the words GEMV at M = 1, dequantize from
    the words + matmul at M = 17, unpacked for the byte-wise GEMV in fp32; tables in fp32 are cast to
    x's dtype, as the reference does."""
    from spallm_plugins.kernels.triton import ops  # noqa: F401

    x, codes, tables, bias = problem(m, 24, 64, 2, 4, dtype, seed=m)
    words, _ = TritonBackend().prepare_weights(codes, tables.float(), 4)
    got = torch.ops.spallm.lut_linear(x, words, tables.float(), bias, 4)
    assert got.dtype == dtype
    tolerance_dtype = torch.float16 if dtype == torch.float32 else dtype
    assert_matches(got, x, codes, tables, bias, 4, tolerance_dtype)


@pytest.mark.parametrize(("bits", "gpr"), [(4, 2), (3, 8), (2, 1)])
def test_dequantize_from_code_words_is_exact(bits, gpr):
    """Prefill's W straight from the decode layout (N = 37: masked rows), equal to the reference's."""
    from spallm_plugins.kernels.reference import dequantize
    from spallm_plugins.kernels.triton.dequantize import lut_dequantize

    _, codes, tables, _ = problem(1, 37, 256, gpr, bits, torch.bfloat16, seed=bits)
    words, _ = TritonBackend().prepare_weights(codes, tables, bits)
    got = lut_dequantize(words, tables, bits, torch.bfloat16)
    assert torch.equal(got, dequantize(codes, tables, bits, torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="compiled and autotuned on a GPU")
@pytest.mark.parametrize("bits", [4, 3, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_words_gemv_autotuned_on_the_gpu(bits, dtype):
    """The inline-asm PRMT path (the interpreter emulates it), autotuned, at a layer shape, M = 1, 4, 16."""
    for m in (1, 4, 16):
        x, codes, tables, bias = problem(m, 4096 + 37, 2048, 4, bits, dtype, seed=m)
        words, _ = TritonBackend().prepare_weights(codes, tables, bits)
        assert_matches(lut_gemv_words(x, words, tables, bias, bits), x, codes, tables, bias, bits, dtype)


def test_table_sets_over_code_words_read_each_rows_set():
    """Three tenants and a stale slot (clamped) in one decode batch, through the op."""
    from spallm_plugins.kernels.reference import lut_linear_table_sets
    from spallm_plugins.kernels.triton import ops  # noqa: F401

    x, codes, tables, bias = problem(3, 37, 64, 2, 3, torch.bfloat16, seed=5)
    g = torch.Generator().manual_seed(6)
    sets = torch.randn((3, *tables.shape), generator=g).to(torch.bfloat16).to(DEVICE)
    slots = torch.tensor([2, 7, 1], device=DEVICE)
    words, _ = TritonBackend().prepare_weights(codes, tables, 3)
    got = torch.ops.spallm.lut_linear_table_sets(x, words, sets, slots, bias, 3)
    want = lut_linear_table_sets(x.float(), codes, sets.float(), slots, bias.float(), 3)
    scale = want.abs().max().clamp_min(1.0)
    assert (got.float() - want).abs().max() <= TOL[torch.bfloat16] * scale


def test_tables_that_train_keep_the_byte_layout():
    """Tables that require grad keep format v1, which the backward reads without unpacking, also when
    prepared under ``no_grad`` (as ``ops.prepared_codes`` does); frozen tables (vLLM) get code words."""
    codes = pack_codes(torch.randint(0, 16, (4, 64)), 4)
    tables = torch.randn(4, 1, 16, requires_grad=True)
    with torch.no_grad():
        assert TritonBackend().prepare_weights(codes, tables, 4)[0] is codes
    assert TritonBackend().prepare_weights(codes, tables.detach(), 4)[0].dim() == 4


@pytest.mark.parametrize(
    ("bits", "gpr", "dtype", "m"),
    [(4, 2, torch.bfloat16, 20), (3, 1, torch.float16, 17), (2, 8, torch.bfloat16, 18)],
)
def test_prefill_matmul_over_code_words_matches_reference(bits, gpr, dtype, m):
    """The B tile joined from the lookup's value slots against x's permuted columns; M and N off the tile."""
    x, codes, tables, bias = problem(m, 40, 256 if bits == 3 else 128, gpr, bits, dtype, seed=bits)
    words, _ = TritonBackend().prepare_weights(codes, tables, bits)
    got = lut_matmul_words(x, words, tables, bias, bits)
    assert got.dtype == dtype and got.shape == (m, 40)
    assert_matches(got, x, codes, tables, bias, bits, dtype)


def test_chunk_permutation_reverses_the_slot_bits():
    """4-bit, KW = 4: tile position j * 8 + bitreverse3(v) holds column v * 4 + j of each 32-column chunk."""
    perm = chunk_permutation(64, 4, 4, "cpu")
    assert sorted(perm.tolist()) == list(range(64))
    assert perm[1].item() == 4 * 4 and perm[4].item() == 1 * 4 and perm[8 + 6].item() == 3 * 4 + 1
    assert perm[32].item() == 32
