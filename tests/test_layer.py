import copy
import itertools

import pytest
import torch
from torch import nn

from spallm_plugins.config import SketchConfig
from spallm_plugins.format import unpack_codes
from spallm_plugins.sketch import sketch_layer


def sketched(linear, config, **kwargs):
    return sketch_layer(linear, config, **kwargs)[0]


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("gpr", [1, 4])
def test_from_linear_stores_codes_and_tables(bits, gpr):
    torch.manual_seed(0)
    linear = nn.Linear(64, 24, bias=True)
    layer = sketched(linear, SketchConfig(bits=bits, groups_per_row=gpr))
    assert layer.codes.dtype == torch.uint8 and layer.codes.shape == (24, 64 * bits // 8)
    assert layer.tables.shape == (24, gpr, 1 << bits) and layer.tables.dtype == torch.float16
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["tables", "bias"]
    assert set(layer.state_dict()) == {"codes", "tables", "bias"}
    w = layer.dequantize(torch.float32)
    codes = unpack_codes(layer.codes, bits).long()
    group = 64 // gpr
    cols = torch.arange(64)
    expected = layer.tables.float()[torch.arange(24)[:, None], (cols // group)[None, :], codes]
    torch.testing.assert_close(w, expected)
    x = torch.randn(5, 64)
    torch.testing.assert_close(layer(x), x @ w.T + linear.bias, atol=1e-5, rtol=1e-5)
    # more bits -> closer to the dense weight
    rel = (w - linear.weight).norm() / linear.weight.norm()
    assert rel < {2: 0.6, 3: 0.35, 4: 0.2}[bits]


def test_error_falls_with_more_groups():
    torch.manual_seed(0)
    linear = nn.Linear(256, 32)
    errs = [
        (sketched(linear, SketchConfig(bits=2, groups_per_row=g)).dequantize(torch.float32) - linear.weight).norm()
        for g in (1, 2, 4, 8)
    ]
    assert all(b < a for a, b in itertools.pairwise(errs))


def test_training_moves_only_the_tables():
    torch.manual_seed(0)
    layer = sketched(nn.Linear(32, 8), SketchConfig(table_dtype="float32"))
    # codes are a frozen uint8 Parameter (so FSDP2 / ZeRO-3 shard them), never trained
    assert [(n, p.requires_grad) for n, p in layer.named_parameters()] == [
        ("tables", True),
        ("bias", True),
        ("codes", False),
    ]
    assert list(layer.state_dict()) == ["tables", "bias", "codes"]  # format v1's keys, in the old order
    layer.bias.requires_grad_(False)  # what a table fine-tune does (PEFT marks only spallm_tables trainable)
    codes, tables, bias = layer.codes.clone(), layer.tables.detach().clone(), layer.bias.detach().clone()
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    x, target = torch.randn(16, 32), torch.randn(16, 8)
    losses = []
    for _ in range(5):
        loss = (layer(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert not torch.equal(layer.tables, tables)
    assert layer.bias.grad is None and torch.equal(layer.bias, bias)
    assert torch.equal(layer.codes, codes)


def test_from_result_takes_the_tensors_over_without_a_copy():
    torch.manual_seed(0)
    linear = nn.Linear(32, 8)
    layer, result = sketch_layer(linear, SketchConfig(bits=3, groups_per_row=2))
    assert layer.codes.data_ptr() == result.codes.data_ptr()
    assert layer.tables.data_ptr() == result.tables.data_ptr()
    assert layer.bias.dtype == linear.bias.dtype and layer.bias.data_ptr() != linear.bias.data_ptr()
    assert (layer.in_features, layer.out_features, layer.bits, layer.groups_per_row) == (32, 8, 3, 2)
    assert not hasattr(layer, "sketch_result")


def test_groups_not_dividing_width_is_a_value_error():
    with pytest.raises(ValueError, match="groups_per_row=3 does not divide in_features=64"):
        sketched(nn.Linear(64, 8), SketchConfig(groups_per_row=3), name="proj")


def test_to_linear_is_exact():
    torch.manual_seed(0)
    layer = sketched(nn.Linear(32, 8), SketchConfig(table_dtype="float32"))
    x = torch.randn(3, 32)
    torch.testing.assert_close(layer.to_linear()(x), layer(x))


def test_requires_grad_true_on_a_model_leaves_codes_frozen():
    """``model.requires_grad_(True)`` (and PEFT's modules_to_save, which calls it) works on a model holding
    sketched layers, also after a loader put a plain uint8 Parameter in place, and trains no codes."""
    torch.manual_seed(0)
    model = nn.Sequential(sketched(nn.Linear(32, 8), SketchConfig(table_dtype="float32")), nn.ReLU())
    layer = model[0]
    layer.codes = nn.Parameter(layer.codes.detach().clone(), requires_grad=False)  # what transformers' loader sets
    for m in (model, copy.deepcopy(model)):
        m.requires_grad_(True)
        assert [n for n, p in m.named_parameters() if p.requires_grad] == ["0.tables", "0.bias"]
        assert m[0].codes.dtype == torch.uint8 and not m[0].codes.requires_grad
    codes = layer.codes.clone()
    model(torch.randn(4, 32)).sum().backward()
    assert layer.codes.grad is None and layer.tables.grad is not None
    assert torch.equal(layer.codes, codes)
    model.load_state_dict(model.state_dict(), assign=True)
    model.requires_grad_(True)
    assert not layer.codes.requires_grad and layer.state_dict()["codes"].dtype == torch.uint8
