"""transformers integration, through the real library: load, sketch-on-load, save, fresh processes."""

import json

import pytest
import torch
from conftest import rewrite_tensor, run_python, tiny_llama
from transformers import AutoModelForCausalLM

from spallm_plugins.config import SketchConfig
from spallm_plugins.convert import NoTargetsError, sketched_layers
from spallm_plugins.format import CheckpointError, OutputError, OutputSpaceError
from spallm_plugins.integrations.transformers import SpaLLMQuantConfig, register
from spallm_plugins.layer import SketchedLinear
from spallm_plugins.pipeline import save_sketched_model, sketch_to_folder
from spallm_plugins.sketch import sketch_model
from spallm_plugins.validate import validate_checkpoint

register()
IDS = torch.arange(24).view(2, 12) % 30


def test_sketched_checkpoint_loads_with_sketched_layers_and_equal_logits(dense_dir, sketched_dir):
    dense = AutoModelForCausalLM.from_pretrained(dense_dir)
    reference = dense
    sketch_model(reference, SketchConfig(bits=4, groups_per_row=2))
    loaded = AutoModelForCausalLM.from_pretrained(sketched_dir)
    layers = sketched_layers(loaded)
    assert len(layers) == 14
    layer = loaded.model.layers[1].mlp.down_proj
    assert isinstance(layer, SketchedLinear)
    assert layer.codes.dtype == torch.uint8 and layer.tables.dtype == torch.float16
    assert isinstance(loaded.lm_head, torch.nn.Linear)
    assert loaded.config.quantization_config.bits == 4
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, reference(IDS).logits, atol=0, rtol=0)


def test_sketch_on_load_from_dense_folder(dense_dir):
    qc = SpaLLMQuantConfig(bits=3, groups_per_row=4)
    model = AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=qc)
    layers = sketched_layers(model)
    assert len(layers) == 14 and all(m.bits == 3 and m.groups_per_row == 4 for m in layers.values())
    manual = AutoModelForCausalLM.from_pretrained(dense_dir)
    sketch_model(manual, SketchConfig(bits=3, groups_per_row=4))
    for name, layer in layers.items():
        assert torch.equal(layer.codes, manual.get_submodule(name).codes)
        assert torch.equal(layer.tables, manual.get_submodule(name).tables)


def test_sketch_on_load_of_a_model_larger_than_memory_is_refused_up_front(dense_dir, monkeypatch):
    from spallm_plugins.integrations.transformers import quantizer

    dense_bytes = sum(p.numel() * 4 for p in tiny_llama().parameters())
    monkeypatch.setattr(quantizer, "available_memory_bytes", lambda: dense_bytes - 1)  # a machine just too small
    with pytest.raises(ValueError, match=rf"spallm sketch {dense_dir} --out SKETCHED_DIR") as err:
        AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=SpaLLMQuantConfig(bits=4))
    assert "needs the whole dense model in memory" in str(err.value)
    monkeypatch.setattr(quantizer, "available_memory_bytes", lambda: dense_bytes)  # just enough
    model = AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=SpaLLMQuantConfig(bits=4))
    assert len(sketched_layers(model)) == 14


def test_save_pretrained_round_trip_in_a_fresh_process(tmp_path, dense_dir):
    qc = SpaLLMQuantConfig(bits=4, groups_per_row=4)
    model = AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=qc)
    model.save_pretrained(tmp_path / "saved")
    validate_checkpoint(tmp_path / "saved")
    saved_cfg = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved_cfg["quantization_config"] == SketchConfig(bits=4, groups_per_row=4).to_quantization_config()
    with torch.no_grad():
        expected = model(IDS).logits
    from safetensors.torch import save_file

    save_file({"logits": expected}, tmp_path / "expected.safetensors")
    code = """
import sys, torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from spallm_plugins.integrations.transformers import register
register()
m = AutoModelForCausalLM.from_pretrained(sys.argv[1])
ids = torch.arange(24).view(2, 12) % 30
with torch.no_grad():
    got = m(ids).logits
expected = load_file(sys.argv[2])["logits"]
assert torch.equal(got, expected), (got - expected).abs().max()
print("IDENTICAL")
"""
    assert "IDENTICAL" in run_python(code, str(tmp_path / "saved"), str(tmp_path / "expected.safetensors")).stdout


def test_wrong_format_version_fails_at_load(sketched_dir):
    cfg_path = sketched_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"]["format_version"] = 99
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="format_version=99 is not supported"):
        AutoModelForCausalLM.from_pretrained(sketched_dir)


def test_codes_shape_mismatch_fails_at_load_naming_the_tensor(sketched_dir):
    name = "model.layers.0.self_attn.o_proj.codes"
    rewrite_tensor(sketched_dir, name, lambda tensors: tensors.update({name: torch.zeros(64, 16, dtype=torch.uint8)}))
    with pytest.raises(
        CheckpointError, match=r"model.layers.0.self_attn.o_proj.codes has shape \[64, 16\], expected \[64, 32\]"
    ):
        AutoModelForCausalLM.from_pretrained(sketched_dir)


def test_unsupported_architecture_without_linear_layers(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(NoTargetsError, match="no linear layers to sketch in this gpt2 model"):
        sketch_to_folder(tmp_path / "gpt2", tmp_path / "out", SketchConfig(), progress=False)
    assert not (tmp_path / "out").exists()


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, sketched_dir, monkeypatch):
    before = {p.name: p.read_bytes() for p in sketched_dir.iterdir()}
    model = tiny_llama(seed=1)
    sketch_model(model, SketchConfig(bits=2))

    def killed(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(model), "save_pretrained", killed)
    with pytest.raises(OutputError, match="already exists and is not empty"):
        save_sketched_model(model, None, sketched_dir, SketchConfig(bits=2))
    with pytest.raises(OutputSpaceError, match=f"{sketched_dir}: no space left on the device"):
        save_sketched_model(model, None, sketched_dir, SketchConfig(bits=2), overwrite=True)
    assert {p.name: p.read_bytes() for p in sketched_dir.iterdir()} == before
    assert sorted(p.name for p in sketched_dir.parent.iterdir()) == ["dense", "sketched"]


def test_dequantize_gives_back_a_dense_model(sketched_dir):
    model = AutoModelForCausalLM.from_pretrained(sketched_dir)
    with torch.no_grad():
        expected = model(IDS).logits
    dense = model.dequantize(dtype=torch.float32)
    assert not sketched_layers(dense)
    with torch.no_grad():
        torch.testing.assert_close(dense(IDS).logits, expected, atol=1e-5, rtol=1e-5)


def test_tables_keep_their_dtype_when_the_model_loads_in_bfloat16(sketched_dir):
    model = AutoModelForCausalLM.from_pretrained(sketched_dir, dtype=torch.bfloat16)
    layer = model.model.layers[0].self_attn.v_proj
    assert layer.tables.dtype == torch.float16 and layer.codes.dtype == torch.uint8
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    reference = AutoModelForCausalLM.from_pretrained(sketched_dir)
    with torch.no_grad():
        torch.testing.assert_close(layer.dequantize(), reference.model.layers[0].self_attn.v_proj.dequantize())
        assert model(IDS).logits.dtype == torch.bfloat16


def test_non_finite_tables_fail_at_load_naming_the_tensor(sketched_dir):
    name = "model.layers.0.mlp.gate_proj.tables"
    rewrite_tensor(sketched_dir, name, lambda tensors: tensors[name].__setitem__((5, 0, 2), float("inf")))
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.0\.mlp\.gate_proj\.tables holds non-finite"):
        AutoModelForCausalLM.from_pretrained(sketched_dir)


def test_quant_config_fields_set_or_updated_are_the_ones_reported():
    config = SpaLLMQuantConfig(bits=4, groups_per_row=2)
    config.groups_per_row = 4
    assert config.sketch.groups_per_row == 4 and config.to_dict()["groups_per_row"] == 4
    unused = config.update(bits=3, not_a_field=1)
    assert unused == {"not_a_field": 1}
    assert config.to_dict()["bits"] == 3 and config.bits == 3
    with pytest.raises(ValueError, match=r"SketchConfig.bits=7 is invalid"):
        config.bits = 7
    assert config.to_dict()["bits"] == 3  # a refused value changes nothing


def test_device_map_offloading_is_refused_up_front(dense_dir):
    device_map = {"model.embed_tokens": 0, "model.layers": "cpu", "model.norm": "disk", "lm_head": 0}
    with pytest.raises(ValueError, match=r"spallm: device_map offloads .* to disk; SpaLLM layers cannot be offloaded"):
        AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=SpaLLMQuantConfig(), device_map=device_map)
    model = AutoModelForCausalLM.from_pretrained(
        dense_dir, quantization_config=SpaLLMQuantConfig(), device_map={"": "cpu"}
    )
    assert sketched_layers(model)
