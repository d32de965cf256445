"""The one Python call for the main job, calibration from texts / datasets / the Hub, and calibrated sketch-on-load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import WORDS, cli, needs, sample_words, tiny_tokenizer
from safetensors.torch import load_file

from spallm_plugins.config import SketchConfigError
from spallm_plugins.format import CODES_SUFFIX, TABLES_SUFFIX, safetensors_files
from spallm_plugins.sketch.calibration import CalibrationError, load_calibration

TEXTS = [sample_words(300, seed=i) for i in range(60)]  # 18,000 words: the default 64 x 256 tokens


def sketched_tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for file in safetensors_files(folder):
        out.update({k: v for k, v in load_file(str(file)).items() if k.endswith((CODES_SUFFIX, TABLES_SUFFIX))})
    return out


def assert_same_sketch(a: dict, b: dict) -> None:
    assert set(a) == set(b) and a, sorted(set(a) ^ set(b))
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def test_the_root_exports_the_main_call_and_its_defaults_are_the_cli_s(tmp_path, dense_dir):
    import spallm_plugins

    calib = tmp_path / "calib.json"
    calib.write_text(json.dumps(TEXTS))
    result = spallm_plugins.sketch_pretrained(dense_dir, tmp_path / "py", calibration=TEXTS, groups_per_row=2,
                                              progress=False)  # fmt: skip
    cli("sketch", str(dense_dir), "--out", str(tmp_path / "cli"), "--calib", str(calib), "--gpr", "2", "--quiet")
    assert result.path == tmp_path / "py" and Path(result) == result.path
    assert result.config.method == "gptq" and (result.config.nsamples, result.config.seqlen) == (64, 256)
    cli_config = json.loads((tmp_path / "cli" / "config.json").read_text())["quantization_config"]
    assert {k: v for k, v in cli_config.items() if k not in ("quant_method", "calibration")} == {
        k: v for k, v in result.config.to_dict().items() if k != "calibration"
    }
    assert_same_sketch(sketched_tensors(result.path), sketched_tensors(tmp_path / "cli"))
    assert cli_config["calibration"].startswith("file:calib.json?sha256=")
    assert result.config.calibration.startswith(f"texts:{len(TEXTS)}?sha256=")
    assert str(tmp_path) not in (result.path / "config.json").read_text()  # no local path is recorded
    model, tokenizer = result.load()
    assert tokenizer is not None and torch.isfinite(model(torch.tensor([[5, 6, 7]])).logits).all()


def test_an_unknown_setting_names_the_fields(tmp_path, dense_dir):
    from spallm_plugins import sketch_pretrained

    with pytest.raises(SketchConfigError, match=r"unknown setting\(s\) \['group_per_row'\]; SketchConfig fields"):
        sketch_pretrained(dense_dir, tmp_path / "out", group_per_row=4)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("texts", [[], ["  ", "\n\t"]], ids=["empty", "whitespace"])
def test_empty_texts_are_refused_before_any_output(tmp_path, dense_dir, texts):
    from spallm_plugins import sketch_pretrained

    with pytest.raises(CalibrationError, match=r"calibration texts \(\d\): the calibration text is empty"):
        sketch_pretrained(dense_dir, tmp_path / "out", calibration=texts, progress=False)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_calibration_from_a_dataset_its_splits_and_columns():
    needs("datasets", "pip install datasets")
    from datasets import Dataset, DatasetDict

    rows = Dataset.from_dict({"content": TEXTS[:3], "id": [1, 2, 3]})
    got = load_calibration(rows, column="content")
    assert got.documents == TEXTS[:3]
    assert got.record.startswith("dataset:") and "column=content" in got.record and "fingerprint=" in got.record
    with pytest.raises(CalibrationError, match=r"no column 'text'; its columns are content, id"):
        load_calibration(rows, column="text")
    with pytest.raises(CalibrationError, match=r"no 'text' column .* its columns are content, id"):
        load_calibration(rows)
    splits = DatasetDict({"train": Dataset.from_dict({"text": TEXTS[:2]}), "test": Dataset.from_dict({"text": ["x"]})})
    assert load_calibration(splits).documents == TEXTS[:2]
    assert load_calibration(splits, split="test").documents == ["x"]
    with pytest.raises(CalibrationError, match=r"no split 'dev'; its splits are train, test"):
        load_calibration(splits, split="dev")
    assert load_calibration(TEXTS[:2]).record == load_calibration(list(TEXTS[:2])).record
    assert load_calibration(TEXTS[:2]).record != load_calibration(TEXTS[1:3]).record


REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """A Hugging Face cache made by hand, holding the dataset ``org/calib`` at one commit, used offline."""
    cache = tmp_path / "hub"
    repo = cache / "datasets--org--calib"
    data = repo / "snapshots" / REVISION / "data"
    data.mkdir(parents=True)
    (data / "train.jsonl").write_text("".join(json.dumps({"body": t, "n": i}) + "\n" for i, t in enumerate(TEXTS)))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_calibration_from_a_hub_dataset_in_an_offline_cache(hub_cache):
    needs("datasets", "pip install datasets")
    got = load_calibration("hf://datasets/org/calib?column=body")
    assert got.documents == TEXTS
    assert got.record == f"hf://datasets/org/calib@{REVISION}?split=train&column=body"
    assert load_calibration(f"hf://datasets/org/calib@{REVISION}?column=body").documents == TEXTS
    with pytest.raises(CalibrationError, match=r"no column 'text'; its columns are body, n$"):
        load_calibration("hf://datasets/org/calib?column=text")
    with pytest.raises(CalibrationError, match=r"^dataset org/missing@main: .*not in the Hugging Face cache .*OFFLINE"):
        load_calibration("hf://datasets/org/missing")
    with pytest.raises(CalibrationError, match=r"^dataset org/calib@v9: .*holds main -> 0123456 for it, not 'v9'"):
        load_calibration("hf://datasets/org/calib@v9?column=body")
    with pytest.raises(CalibrationError, match=r"unknown option\(s\) \['colum'\]; the syntax is hf://datasets/"):
        load_calibration("hf://datasets/org/calib?colum=body")


def test_sketch_on_load_with_calibration_makes_the_bytes_of_the_sketch_call(tmp_path, dense_dir):
    from transformers import AutoModelForCausalLM

    from spallm_plugins import SpaLLMQuantConfig, sketch_pretrained
    from spallm_plugins.integrations.transformers import register

    register()
    config = SpaLLMQuantConfig(bits=4, groups_per_row=2, dataset=TEXTS, tokenizer=tiny_tokenizer(WORDS))
    model = AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=config, dtype=torch.float32)
    model.save_pretrained(tmp_path / "on-load")
    result = sketch_pretrained(dense_dir, tmp_path / "call", calibration=TEXTS, groups_per_row=2, progress=False)
    assert_same_sketch(sketched_tensors(tmp_path / "on-load"), sketched_tensors(result.path))
    saved = json.loads((tmp_path / "on-load" / "config.json").read_text())["quantization_config"]
    assert saved["calibration"] == result.config.calibration and saved["method"] == "gptq"
    assert "dataset" not in saved and "tokenizer" not in saved
