import errno
import json
from pathlib import Path

import pytest
import torch
from conftest import rewrite_tensor, shard_of
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from spallm_plugins.format import (
    CheckpointError,
    OutputSpaceError,
    atomic_path,
    pack_codes,
    read_tensors,
    safetensors_files,
    unpack_codes,
    write_json,
    write_tensors,
)
from spallm_plugins.validate import validate_checkpoint


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from([2, 3, 4]),
    rows=st.integers(1, 5),
    units=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_unpack_round_trip(bits, rows, units, seed):
    cols = units * (8 if bits == 3 else 8 // bits)
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, cols), generator=g, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (rows, cols * bits // 8)
    assert torch.equal(unpack_codes(packed, bits), codes)


def test_documented_bit_order():
    # 4-bit: column 2j in the low nibble, 2j+1 in the high nibble
    assert pack_codes(torch.tensor([[0x1, 0x2, 0xF, 0x0]]), 4).tolist() == [[0x21, 0x0F]]
    # 2-bit: column 4j+i in bits 2i..2i+1
    assert pack_codes(torch.tensor([[1, 2, 3, 0]]), 2).tolist() == [[1 | 2 << 2 | 3 << 4]]
    # 3-bit: eight codes in a little-endian 24-bit word, column i in bits 3i..3i+2
    codes = [1, 2, 3, 4, 5, 6, 7, 0]
    word = sum(c << (3 * i) for i, c in enumerate(codes))
    assert pack_codes(torch.tensor([codes]), 3).tolist() == [[word & 0xFF, (word >> 8) & 0xFF, word >> 16]]


def test_code_out_of_range_is_refused():
    with pytest.raises(ValueError, match=r"layer\.codes: code 16 is out of range for 4-bit"):
        pack_codes(torch.tensor([[0, 16]]), 4, name="layer.codes")
    with pytest.raises(ValueError, match="code 4 is out of range for 2-bit"):
        pack_codes(torch.tensor([[4, 0, 0, 0]]), 2)
    with pytest.raises(ValueError, match="integer tensor"):
        pack_codes(torch.zeros(1, 2), 4)


def test_sharded_write_and_read(tmp_path):
    tensors = {f"layer{i}.tables": torch.randn(8, 2, 16).half() for i in range(5)}
    files = write_tensors(tmp_path, tensors, max_shard_bytes=600)
    assert len(files) > 1
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert len(safetensors_files(tmp_path)) == len(files)
    back = read_tensors(tmp_path)
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert torch.equal(back[k], v)


def test_atomic_file_write_keeps_old_content_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "model.safetensors"
    save_file({"a": torch.ones(3)}, str(target))
    before = target.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", disk_full)
    with pytest.raises(OutputSpaceError, match=f"{target}: no space left on the device while writing it"):
        write_tensors(tmp_path, {"a": torch.zeros(3)})
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_atomic_directory_swap(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_path(dest, is_dir=True) as tmp:
        (tmp / "new.txt").write_text("partial")
        raise RuntimeError("killed")
    assert [p.name for p in dest.iterdir()] == ["old.txt"]
    with atomic_path(dest, is_dir=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in dest.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _rewrite_config(folder: Path, **changes):
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"].update(changes)
    write_json(cfg_path, cfg)


def _rewrite_tensor(folder: Path, name: str, value: torch.Tensor):
    def change(tensors):
        assert name in tensors
        tensors[name] = value

    rewrite_tensor(folder, name, change)


def test_validate_accepts_a_fresh_sketch(sketched_dir):
    config, prefixes = validate_checkpoint(sketched_dir)
    assert config.bits == 4 and config.groups_per_row == 2
    assert len(prefixes) == 2 * 7


def test_validate_rejects_wrong_format_version(sketched_dir):
    _rewrite_config(sketched_dir, format_version=2)
    with pytest.raises(CheckpointError, match=r"config.json: quantization_config.format_version=2"):
        validate_checkpoint(sketched_dir)


def test_validate_rejects_unknown_key(sketched_dir):
    _rewrite_config(sketched_dir, group_size=128)
    with pytest.raises(CheckpointError, match=r"unknown key\(s\) \['group_size'\]"):
        validate_checkpoint(sketched_dir)


def test_validate_rejects_codes_shape_mismatch(sketched_dir):
    name = "model.layers.0.mlp.down_proj.codes"
    _rewrite_tensor(sketched_dir, name, torch.zeros(64, 32, dtype=torch.uint8))
    with pytest.raises(
        CheckpointError, match=rf"{name} has shape \[64, 32\], expected \[64, 64\] from the model config"
    ):
        validate_checkpoint(sketched_dir)


def test_validate_rejects_tables_shape_mismatch(sketched_dir):
    name = "model.layers.1.self_attn.q_proj.tables"
    _rewrite_tensor(sketched_dir, name, torch.zeros(64, 2, 8, dtype=torch.float16))
    with pytest.raises(CheckpointError, match=rf"{name} has shape \[64, 2, 8\], expected \[64, 2, 16\]"):
        validate_checkpoint(sketched_dir)


def test_validate_rejects_codes_that_are_not_packed_uint8(sketched_dir):
    name = "model.layers.0.self_attn.k_proj.codes"
    _rewrite_tensor(sketched_dir, name, torch.full((32, 32), 300, dtype=torch.int16))
    with pytest.raises(CheckpointError, match=rf"{name} has dtype int16, expected uint8"):
        validate_checkpoint(sketched_dir)


def test_validate_rejects_groups_not_dividing_in_features(sketched_dir):
    _rewrite_config(sketched_dir, groups_per_row=3)
    with pytest.raises(CheckpointError, match=r"down_proj: groups_per_row=3 does not divide in_features=128"):
        validate_checkpoint(sketched_dir)


def test_validate_rejects_folder_without_config(tmp_path):
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        validate_checkpoint(tmp_path)


def test_validate_rejects_truncated_file(sketched_dir):
    f = shard_of(sketched_dir, "model.layers.0.mlp.up_proj.codes")
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        validate_checkpoint(sketched_dir)


def test_validate_rejects_non_finite_tables_naming_the_tensor(sketched_dir):
    name = "model.layers.1.mlp.up_proj.tables"
    tables = torch.zeros(128, 2, 16, dtype=torch.float16)
    tables[3, 1, 7] = float("nan")
    _rewrite_tensor(sketched_dir, name, tables)
    with pytest.raises(CheckpointError, match=rf"tensor {name} holds 1 non-finite value"):
        validate_checkpoint(sketched_dir)


def test_validate_rejects_a_bias_that_is_not_float(tmp_path, sketched_dir):
    name = "model.layers.0.self_attn.q_proj.bias"
    rewrite_tensor(sketched_dir, name, lambda tensors: tensors.update({name: torch.zeros(64, dtype=torch.int32)}))
    with pytest.raises(CheckpointError, match=rf"tensor {name} has dtype int32, expected a float dtype"):
        validate_checkpoint(sketched_dir)


def _drop_quantization_config(folder: Path) -> None:
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["quantization_config"]
    write_json(cfg_path, cfg)


def test_every_entry_point_refuses_sketched_tensors_without_a_spallm_config(tmp_path, sketched_dir, dense_dir):
    from conftest import run_cli

    from spallm_plugins.merge import merge_adapter
    from spallm_plugins.models import load_model
    from spallm_plugins.pipeline import load_any

    _drop_quantization_config(sketched_dir)
    expected = r"config.json: no quantization_config, but the weights store sketched tensors \(e.g. model\.layers"
    with pytest.raises(CheckpointError, match=expected):
        load_any(sketched_dir)
    with pytest.raises(CheckpointError, match=expected):
        load_model(sketched_dir)
    with pytest.raises(CheckpointError, match=expected):
        merge_adapter(sketched_dir, tmp_path / "no-adapter-needed", tmp_path / "out")  # checked before the adapter
    proc = run_cli("eval", str(sketched_dir), "--seqlen", "16", "--max-windows", "1", check=False)
    assert proc.returncode == 2 and "no quantization_config, but the weights store sketched tensors" in proc.stderr
    assert load_model(dense_dir)[0] is not None  # a dense folder is still fine


def test_serve_refuses_sketched_tensors_without_a_spallm_config(sketched_dir):
    from spallm_plugins.integrations.vllm.serve import main

    _drop_quantization_config(sketched_dir)
    with pytest.raises(CheckpointError, match="no quantization_config, but the weights store sketched tensors"):
        main(["--port", "8000", str(sketched_dir)])


def test_serve_finds_the_model_after_options(sketched_dir):
    from spallm_plugins.integrations.vllm.serve import served_model, with_table_set_targets

    for argv in (["--port", "8000", str(sketched_dir), "--enable-lora"], [str(sketched_dir), "--enable-lora"],
                 ["--enable-lora", "--model", str(sketched_dir)], [f"--model={sketched_dir}", "--enable-lora"]):  # fmt: skip
        assert served_model(argv) == str(sketched_dir), argv
        added = with_table_set_targets(argv)
        assert added[len(argv)] == "--lora-target-modules"
        assert sorted(added[len(argv) + 1 :]) == sorted(
            ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        )
    assert served_model(["--tokenizer", str(sketched_dir), "--port", "8000"]) is None
