"""Tuning and capability rules of the Triton backend that need neither triton nor a GPU."""

import pytest
import torch

from spallm_plugins.format import pack_codes, unpack_codes
from spallm_plugins.kernels import LUTProblem, backend_min_capability, prepare_weights, restore_weights
from spallm_plugins.kernels.reference import ReferenceBackend
from spallm_plugins.kernels.triton import TritonBackend, capability_refusal, shape_refusal
from spallm_plugins.kernels.triton.layout import code_columns, format_v1_codes, kernel_codes
from spallm_plugins.kernels.triton.tiles import AUTOTUNE_KEY, m_bucket


def test_row_buckets_have_the_documented_boundaries():
    edges = {1: (0, 1), 2: (2, 4), 5: (5, 16), 17: (17, 64), 65: (65, 256), 257: (257, 10**6)}
    for bucket, (first, last) in edges.items():
        assert m_bucket(first) == m_bucket(last) == bucket
        assert bucket == 1 or m_bucket(first - 1) < bucket


def test_row_bucket_refuses_negative_counts():
    with pytest.raises(ValueError, match="row count"):
        m_bucket(-1)


def test_autotune_key_is_the_bucket_and_the_layer_shape():
    assert AUTOTUNE_KEY == ["M_BUCKET", "N", "K", "GROUP_SIZE", "BITS"]


@pytest.mark.parametrize(
    ("capability", "dtype", "refused"),
    [
        ((7, 0), torch.float16, False),
        ((7, 5), torch.float32, False),
        ((6, 1), torch.float16, True),
        ((7, 5), torch.bfloat16, True),
        ((8, 0), torch.bfloat16, False),
        ((9, 0), torch.bfloat16, False),
    ],
)
def test_capability_rule_per_dtype(capability, dtype, refused):
    reason = capability_refusal(capability, dtype)
    assert bool(reason) == refused
    if refused:
        need = "8.0 (sm80)" if dtype == torch.bfloat16 else "7.0 (sm70)"
        have = f"{capability[0]}.{capability[1]}"
        assert f"need compute capability {need}" in reason and f"this GPU is {have}" in reason


def lut_problem(**changes):
    fields = dict(device_type="cuda", dtype=torch.float16, table_dtype=torch.float16, bits=4, in_features=256,
                  out_features=128, groups_per_row=2, rows=8)  # fmt: skip
    return LUTProblem(**{**fields, **changes})


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        (dict(groups_per_row=3), "in_features 256 is not a multiple of groups_per_row 3"),
        (dict(bits=2, in_features=6, groups_per_row=1), "does not fill whole bytes of 2-bit codes"),
        (dict(rows=2**20, in_features=4096), "index in int32"),
        (dict(rows=2**20, out_features=4096), "index in int32"),
        (dict(in_features=120, groups_per_row=3, needs_grad=True), "group size 40"),
    ],
)
def test_shape_refusals_say_why(changes, reason):
    assert reason in shape_refusal(lut_problem(**changes))


def test_tileable_shapes_pass():
    assert shape_refusal(lut_problem()) == ""
    assert shape_refusal(lut_problem(in_features=120, groups_per_row=3)) == ""  # forward needs no pow-2 group
    assert shape_refusal(lut_problem(rows=2**19 - 1, in_features=4096)) == ""  # just under 2**31 elements
    assert "index in int32" in shape_refusal(lut_problem(rows=2**19, in_features=4096))


def test_backends_declare_their_minimum_capability():
    assert ReferenceBackend().min_capability == 0
    assert TritonBackend().min_capability == 70
    assert backend_min_capability(TritonBackend()) == 70
    assert backend_min_capability(object()) == 0  # a backend written before the attribute


def test_prepare_weights_is_the_identity_until_a_backend_repacks():
    codes = torch.zeros(4, 8, dtype=torch.uint8)
    tables = torch.randn(4, 1, 16)
    for backend in (ReferenceBackend(), object()):
        got_codes, got_tables = prepare_weights(backend, codes, tables, 4)
        assert got_codes is codes and got_tables is tables
    words, got_tables = prepare_weights(TritonBackend(), codes, tables, 4)  # the decode kernel's code words
    assert words.dtype == torch.int32 and words.dim() == 4 and got_tables is tables
    assert torch.equal(restore_weights(TritonBackend(), words, tables, 4)[0], codes)

    class Repacking:
        def prepare_weights(self, codes, tables, bits):
            return codes.flip(0), tables.half()

    got_codes, got_tables = prepare_weights(Repacking(), codes, tables, 4)
    assert torch.equal(got_codes, codes.flip(0)) and got_tables.dtype == torch.float16


@pytest.mark.parametrize(("out_features", "in_features"), [(1, 8), (7, 24), (13, 200), (3, 1000), (0, 16)])
def test_3bit_repack_is_bit_planes_and_its_inverse_is_exact(out_features, in_features):
    g = torch.Generator().manual_seed(out_features * 1000 + in_features)
    codes = torch.randint(0, 8, (out_features, in_features), generator=g)
    stored = pack_codes(codes, 3)
    tables = torch.randn(out_features, 1, 8)
    planes, got_tables = prepare_weights(TritonBackend(), stored, tables, 3)
    assert got_tables is tables and planes.dtype == torch.uint8 and planes.is_contiguous()
    assert planes.shape == (out_features, 3, in_features // 8) and planes.numel() == stored.numel()
    flat = planes.reshape(out_features, 3 * in_features // 8)
    assert torch.equal(flat[:, : in_features // 4], pack_codes(codes & 3, 2))  # low bits: 2-bit format v1
    high = (flat[:, in_features // 4 :, None] >> torch.arange(8, dtype=torch.uint8)) & 1
    assert torch.equal(high.reshape(out_features, in_features), (codes >> 2).to(torch.uint8))
    restored, _ = restore_weights(TritonBackend(), planes, tables, 3)
    assert restored.shape == stored.shape and torch.equal(restored, stored)
    assert torch.equal(unpack_codes(format_v1_codes(planes, 3), 3), codes.to(torch.uint8))
    assert code_columns(planes, 3) == code_columns(stored, 3) == in_features
    assert kernel_codes(planes, 3) is planes  # already prepared: unchanged


def test_repack_needs_no_host_sync():
    """Shapes only (meta tensors have no values): the repack can run inside a CUDA graph."""
    planes = kernel_codes(torch.empty(5, 24 * 3 // 8, dtype=torch.uint8, device="meta"), 3)
    assert planes.shape == (5, 3, 3) and planes.device.type == "meta"


@pytest.mark.parametrize("bits", [2, 4])
def test_2_and_4_bit_codes_keep_format_v1(bits):
    codes = pack_codes(torch.randint(0, 1 << bits, (5, 32)), bits)
    for backend in (TritonBackend(), ReferenceBackend(), object()):
        assert restore_weights(backend, *prepare_weights(backend, codes, None, bits), bits)[0] is codes
    assert code_columns(codes, bits) == 32


def test_repack_refuses_what_is_not_3bit_format_v1():
    with pytest.raises(ValueError, match="format-v1 uint8"):
        kernel_codes(torch.zeros(4, 7, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="bit planes"):
        format_v1_codes(torch.zeros(4, 2, 3, dtype=torch.uint8), 3)
