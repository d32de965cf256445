import gc

import pytest
import torch

import spallm_plugins.kernels.reference as reference
import spallm_plugins.ops as ops
from spallm_plugins.format import pack_codes
from spallm_plugins.kernels.reference import dequantize, lut_linear_backward, table_grad, used_slots
from spallm_plugins.kernels.reference import lut_linear_table_sets as reference_table_sets
from spallm_plugins.ops import lut_linear, lut_linear_table_sets


def random_problem(out_f=6, in_f=16, gpr=2, bits=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (out_f, in_f), generator=g)
    tables = torch.randn(out_f, gpr, 1 << bits, generator=g, dtype=dtype)
    return codes, pack_codes(codes, bits), tables


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("gpr", [1, 2, 4])
def test_dequantize_matches_the_definition(bits, gpr):
    codes, packed, tables = random_problem(in_f=32, gpr=gpr, bits=bits)
    w = dequantize(packed, tables, bits)
    group = 32 // gpr
    for r in range(codes.shape[0]):
        for c in range(codes.shape[1]):
            assert w[r, c] == tables[r, c // group, codes[r, c]]


def test_forward_is_x_times_w_transposed_plus_bias():
    _codes, packed, tables = random_problem()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    bias = torch.randn(6, dtype=torch.float64)
    w = dequantize(packed, tables, 4)
    y = lut_linear(x, packed, tables, bias, 4)
    assert y.shape == (3, 5, 6)
    torch.testing.assert_close(y, x @ w.T + bias)


def test_gradcheck_float64():
    _, packed, tables = random_problem(out_f=5, in_f=8, gpr=2)
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    tables.requires_grad_(True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, t, b: lut_linear(x, packed, t, b, 4), (x, tables, bias))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_table_grad_is_the_gradient_of_the_gather(bits):
    codes, packed, tables = random_problem(out_f=7, in_f=24, gpr=3, bits=bits)
    tables.requires_grad_(True)
    x = torch.randn(9, 24, dtype=torch.float64)
    flat = codes.view(7 * 3, 8)
    w = tables.reshape(21, -1).gather(1, flat).view(7, 24)  # differentiable definition
    (x @ w.T).pow(2).sum().backward()
    expected = tables.grad.clone()
    tables.grad = None
    lut_linear(x, packed, tables, None, bits).pow(2).sum().backward()
    torch.testing.assert_close(tables.grad, expected)


def test_table_grad_reduces_into_bins():
    codes = torch.tensor([[0, 1, 1, 0, 2, 2, 2, 3]])
    grad_w = torch.arange(8.0).view(1, 8)
    g = table_grad(grad_w, pack_codes(codes, 2), 2, groups_per_row=2)
    # group 0 = columns 0..3 (codes 0,1,1,0), group 1 = columns 4..7 (codes 2,2,2,3)
    assert g.tolist() == [[[0 + 3, 1 + 2, 0, 0], [0, 0, 4 + 5 + 6, 7]]]


def test_lower_precision_inputs_compute_in_input_dtype():
    _, packed, tables = random_problem(dtype=torch.float16)
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    assert lut_linear(x, packed, tables, None, 4).dtype == torch.bfloat16


@pytest.mark.parametrize("graph_safe", [False, True])
def test_table_sets_forward_uses_each_rows_own_table_set(graph_safe):
    _codes, packed, tables = random_problem(out_f=6, in_f=16, gpr=2)
    sets = torch.stack([tables, tables * 2 - 1, torch.randn_like(tables)])
    x = torch.randn(7, 16, dtype=torch.float64)
    bias = torch.randn(6, dtype=torch.float64)
    slots = torch.tensor([2, 0, 0, 1, 2, 1, 0])
    y = reference_table_sets(x, packed, sets, slots, bias, 4, graph_safe=graph_safe)
    for m, s in enumerate(slots.tolist()):
        w = dequantize(packed, sets[s], 4)
        torch.testing.assert_close(y[m], x[m] @ w.T + bias)


def test_table_sets_forward_refuses_a_slot_per_row_mismatch():
    _codes, packed, tables = random_problem()
    with pytest.raises(ValueError, match=r"slots has shape \[2\], expected \[3\]"):
        lut_linear_table_sets(torch.randn(3, 16, dtype=torch.float64), packed, tables[None], torch.zeros(2), None, 4)


def per_row(x, packed, sets, slots, bias, bits=4):
    """The definition: each row through its own (clamped) table set."""
    clamped = slots.clamp(0, sets.shape[0] - 1).tolist()
    return torch.stack([x[m] @ dequantize(packed, sets[s], bits).T + bias for m, s in enumerate(clamped)])


@pytest.mark.parametrize("graph_safe", [False, True])
@pytest.mark.parametrize(
    "slots",
    [
        [3, 0, 3, 3, 1, 0, 9],  # repeated, unsorted, 2 and 4 unused, 9 stale (clamped to 4)
        [4, 4, 4],  # one tenant, not the first set
        [1, -2],  # fewer rows than sets; -2 clamped to 0
    ],
)
def test_table_sets_with_repeated_unsorted_and_unused_slots(graph_safe, slots):
    _codes, packed, tables = random_problem(out_f=6, in_f=16, gpr=2)
    g = torch.Generator().manual_seed(3)
    sets = torch.randn((5, *tables.shape), generator=g, dtype=torch.float64)
    slots = torch.tensor(slots)
    x = torch.randn(len(slots), 16, dtype=torch.float64)
    bias = torch.randn(6, dtype=torch.float64)
    y = reference_table_sets(x, packed, sets, slots, bias, 4, graph_safe=graph_safe)
    torch.testing.assert_close(y, per_row(x, packed, sets, slots, bias))


def test_used_slots_are_the_distinct_slots_then_padding():
    assert used_slots(torch.tensor([3, 0, 3, 3, 1, 0]), 5).tolist() == [0, 1, 3, 5, 5]
    assert used_slots(torch.tensor([2, 2]), 8).tolist() == [2, 8]  # min(M, S) entries
    assert used_slots(torch.tensor([0, 1, 2, 3, 0, 1]), 4).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize(("slots", "products"), [([5, 5, 1], 3), ([7, 2], 2), ([0, 1, 0, 1, 0, 1, 0, 1, 0, 1], 8)])
def test_graph_safe_table_sets_compute_at_most_one_product_per_row_or_set(monkeypatch, slots, products):
    """min(M, S) LUT products (the used slots, then padding), not one per loaded set."""
    _codes, packed, tables = random_problem(out_f=6, in_f=16, gpr=2)
    sets = torch.randn((8, *tables.shape), dtype=torch.float64)
    slots = torch.tensor(slots)
    x = torch.randn(len(slots), 16, dtype=torch.float64)
    bias = torch.randn(6, dtype=torch.float64)
    calls = []
    original = reference.dequantize
    monkeypatch.setattr(reference, "dequantize", lambda *a, **k: calls.append(1) or original(*a, **k))
    y = reference_table_sets(x, packed, sets, slots, bias, 4, graph_safe=True)
    assert len(calls) == products
    torch.testing.assert_close(y, per_row(x, packed, sets, slots, bias))


def test_graph_safe_table_sets_need_no_host_sync():
    """Meta tensors have shapes but no values: any ``.item()``, ``.tolist()``, ``unique`` or
    ``nonzero`` would raise. What runs here can be captured in a CUDA graph."""
    _codes, packed, tables = random_problem(out_f=6, in_f=16, gpr=2)
    meta = dict(device="meta")
    sets = torch.empty((4, *tables.shape), dtype=torch.float32, **meta)
    slots, x = torch.empty(3, dtype=torch.int64, **meta), torch.empty(3, 16, **meta)
    y = reference_table_sets(x, packed.to("meta"), sets, slots, torch.empty(6, **meta), 4, graph_safe=True)
    assert y.shape == (3, 6) and y.device.type == "meta"


class Reversing:
    """A backend with a load-time repack (codes reversed along each row) that counts its repacks."""

    name, priority, min_capability = "reversing", 0, 0

    def __init__(self, table_sets=True):
        self.repacks = 0
        if not table_sets:
            self.forward_table_sets = None

    def can_implement(self, problem):
        return True, ""

    def prepare_weights(self, codes, tables, bits):
        self.repacks += 1
        return codes.flip(1).contiguous(), tables

    def forward(self, x, codes, tables, bias, bits):
        return reference.lut_linear(x, codes.flip(1), tables, bias, bits)

    def forward_table_sets(self, x, codes, table_sets, slots, bias, bits):
        return reference_table_sets(x, codes.flip(1), table_sets, slots, bias, bits)

    def backward(self, grad_out, x, codes, tables, bits, need_input_grad, need_tables_grad):
        return lut_linear_backward(grad_out, x, codes.flip(1), tables, bits, need_input_grad, need_tables_grad)


def test_the_op_repacks_codes_once_per_codes_tensor_and_version():
    _codes, packed, tables = random_problem(out_f=6, in_f=16, gpr=2)
    stored = packed.clone()
    backend = Reversing()
    x = torch.randn(3, 16, dtype=torch.float64)
    tables.requires_grad_(True)
    for _ in range(3):  # training steps: the tables change, the codes do not
        y = lut_linear(x, packed, tables, None, 4, backend=backend)
        torch.testing.assert_close(y, x @ dequantize(packed, tables.detach(), 4).T)
        y.sum().backward()
        with torch.no_grad():
            tables -= 0.1 * tables.grad
        tables.grad = None
    assert backend.repacks == 1 and torch.equal(packed, stored)  # the caller's codes stay format v1
    sets = torch.stack([tables.detach(), -tables.detach()])
    got = lut_linear_table_sets(x, packed, sets, torch.tensor([1, 0, 1]), None, 4, backend=backend)
    assert backend.repacks == 1
    torch.testing.assert_close(got, per_row(x, packed, sets, torch.tensor([1, 0, 1]), 0.0))

    new_codes = pack_codes(torch.randint(0, 16, (6, 16)), 4)
    with torch.no_grad():
        packed.copy_(new_codes)  # e.g. load_state_dict into the buffer: a new version
    y = lut_linear(x, packed, tables, None, 4, backend=backend)
    assert backend.repacks == 2
    torch.testing.assert_close(y, x @ dequantize(new_codes, tables, 4).T)


def test_a_layout_prepared_under_inference_mode_serves_training_later():
    _codes, packed, tables = random_problem(out_f=6, in_f=16, gpr=2)
    backend = Reversing()
    x = torch.randn(3, 16, dtype=torch.float64)
    with torch.inference_mode():
        lut_linear(x, packed, tables, None, 4, backend=backend)
    tables.requires_grad_(True)
    lut_linear(x, packed, tables, None, 4, backend=backend).pow(2).sum().backward()
    assert backend.repacks == 1 and tables.grad is not None


def test_prepared_codes_die_with_their_codes_tensor():
    _codes, packed, tables = random_problem(out_f=6, in_f=16, gpr=2)
    gc.collect()
    before = len(ops._PREPARED)
    lut_linear(torch.randn(2, 16, dtype=torch.float64), packed, tables, None, 4, backend=Reversing())
    assert len(ops._PREPARED) == before + 1 and packed in ops._PREPARED
    del packed
    gc.collect()
    assert len(ops._PREPARED) == before
    _codes, packed, tables = random_problem(out_f=6, in_f=16, gpr=2)
    lut_linear(torch.randn(2, 16, dtype=torch.float64), packed, tables, None, 4, backend=reference.ReferenceBackend())
    assert next(iter(ops._PREPARED[packed].values()))[1] is None  # an identity step keeps no copy


def test_table_sets_fall_back_to_the_reference_on_format_v1_codes():
    """A backend without a table-set forward: the reference reads the stored codes, not its layout."""
    _codes, packed, tables = random_problem(out_f=6, in_f=16, gpr=2)
    sets, slots = torch.stack([tables, 2 * tables]), torch.tensor([1, 1, 0])
    x = torch.randn(3, 16, dtype=torch.float64)
    got = lut_linear_table_sets(x, packed, sets, slots, None, 4, backend=Reversing(table_sets=False))
    torch.testing.assert_close(got, per_row(x, packed, sets, slots, 0.0))
