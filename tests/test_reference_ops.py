import pytest
import torch

from spallm_plugins.format import pack_codes
from spallm_plugins.kernels.reference import dequantize, table_grad
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
