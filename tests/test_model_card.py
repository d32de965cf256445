"""Model cards (#37): every folder ``spallm sketch`` and ``spallm merge`` write carries a ``README.md`` whose Hub
front matter parses and whose numbers are the files' own; a Hub cache source becomes ``base_model``; no path of
this machine appears in it."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import cli, save_adapter, tiny_llama, tiny_tokenizer

SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


def read_card(folder: Path) -> tuple[dict, str]:
    """The front matter (parsed) and the body of ``folder/README.md``."""
    text = (folder / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    meta, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(meta), body


def hub_cache_copy(folder: Path, root: Path, repo_id: str) -> Path:
    """``folder`` copied where the Hugging Face cache keeps a snapshot of ``repo_id``."""
    snapshot = root / "hub" / f"models--{repo_id.replace('/', '--')}" / "snapshots" / SNAPSHOT
    shutil.copytree(folder, snapshot)
    return snapshot


def expected_bits_per_weight(sketched: Path, dense: Path) -> float:
    """Code and table bytes of ``sketched`` over the weights of the same layers in ``dense``, from the headers."""
    from safetensors import safe_open

    def shapes(folder: Path) -> dict[str, tuple[list[int], str]]:
        found = {}
        for file in folder.glob("*.safetensors"):
            with safe_open(str(file), framework="pt") as fh:
                for name in fh.keys():
                    piece = fh.get_slice(name)
                    found[name] = (piece.get_shape(), piece.get_dtype())
        return found

    stored, original = shapes(sketched), shapes(dense)
    itemsize = {"U8": 1, "F16": 2, "BF16": 2, "F32": 4}
    nbytes = sum(itemsize[dtype] * math.prod(shape) for name, (shape, dtype) in stored.items()
                 if name.endswith((".codes", ".tables")))  # fmt: skip
    layers = [name.removesuffix(".codes") for name in stored if name.endswith(".codes")]
    return 8 * nbytes / sum(math.prod(original[layer + ".weight"][0]) for layer in layers)


def no_machine_path(text: str, *paths: Path) -> None:
    for path in paths:
        assert str(path) not in text and str(path.resolve()) not in text
    assert not re.search(r"(^|[\s`(])/(tmp|home|root|work|var)/", text)


def test_a_sketch_writes_a_card_whose_front_matter_parses_and_whose_numbers_are_the_files(tmp_path, dense_dir):
    import json

    out = tmp_path / "tiny-spallm"
    cli("sketch", str(dense_dir), "--out", str(out), "--bits", "4", "--gpr", "2", "--quiet")
    meta, body = read_card(out)
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert "base_model" not in meta  # a plain local folder: no Hub id to link
    assert meta["library_name"] == "transformers"
    assert meta["tags"][:3] == ["spallm", "sketched", f"{quant['bits']}-bit"] and "data-free" in meta["tags"]
    assert "datasets" not in meta
    assert "sketched from a local folder `dense`" in body
    bits_per_weight = float(re.search(r"\*\*([0-9.]+) bits per sketched weight\*\*", body).group(1))
    assert bits_per_weight == pytest.approx(expected_bits_per_weight(out, dense_dir), abs=1e-3)
    report = json.loads((out / "sketch_report.json").read_text())
    assert (
        f"| groups_per_row | {quant['groups_per_row']} |" in body
        and f"| table_dtype | {quant['table_dtype']} |" in body
    )
    assert f"({len(report['layers'])} linears)" in body
    for snippet in ('from_pretrained("tiny-spallm")', "get_peft_model(", "PeftModel.from_pretrained(",
                    "base_model: tiny-spallm", "adapter: spallm", "vllm serve tiny-spallm --quantization spallm"):  # fmt: skip
        assert snippet in body
    no_machine_path(body, tmp_path, dense_dir)
    assert "## Quality" not in body  # no perplexity was measured


def test_a_hub_cache_source_becomes_base_model_and_a_measured_perplexity_is_shown(tmp_path, dense_dir):
    from spallm_plugins.card import refresh_sketch_card
    from spallm_plugins.config import SketchConfig
    from spallm_plugins.pipeline import sketch_to_folder

    source = hub_cache_copy(dense_dir, tmp_path, "some-org/tiny-llama")
    out = tmp_path / "out"
    sketch_to_folder(source, out, SketchConfig(bits=4, groups_per_row=1), progress=False)
    meta, body = read_card(out)
    assert meta["base_model"] == "some-org/tiny-llama" and meta["base_model_relation"] == "quantized"
    assert SNAPSHOT[:12] in body
    no_machine_path((out / "README.md").read_text(), tmp_path, source)
    refresh_sketch_card(out, perplexity={"sketched": 31.25, "original": 27.5, "text": "a sample", "seqlen": 64})
    meta_after, body_after = read_card(out)
    assert (
        meta_after == meta
        and "Perplexity on a sample (windows of 64 tokens): **31.25**; the original: 27.50" in body_after
    )
    assert not list(tmp_path.glob(".out.*"))  # rewritten atomically, no temporary left


def test_a_model_sketched_in_memory_gets_a_card_naming_its_hub_source(tmp_path):
    from spallm_plugins.config import SketchConfig
    from spallm_plugins.pipeline import save_sketched_model
    from spallm_plugins.sketch import sketch_model

    model = tiny_llama()
    model.config._name_or_path = "some-org/tiny-llama"  # what from_pretrained("some-org/tiny-llama") records
    config = SketchConfig(bits=2, groups_per_row=2)
    sketch_model(model, config, progress=False)
    save_sketched_model(model, tiny_tokenizer(), tmp_path / "mem", config)
    meta, body = read_card(tmp_path / "mem")
    assert meta["base_model"] == "some-org/tiny-llama" and "2-bit" in meta["tags"]
    assert "| bits | 2 |" in body


def test_calibration_from_a_hub_dataset_is_listed_and_a_file_is_named_without_its_path():
    from spallm_plugins.card import card_metadata, describe_calibration, parse_hub_dataset
    from spallm_plugins.config import SketchConfig

    record = "hf://datasets/some-org/texts@v1?config=en&split=train&column=body"
    assert parse_hub_dataset(record) == {"id": "some-org/texts", "revision": "v1", "config": "en", "split": "train",
                                         "column": "body"}  # fmt: skip
    calibrated = SketchConfig(method="gptq", calibration=record, nsamples=4, seqlen=16)
    meta = yaml.safe_load(card_metadata(calibrated, ["some-org/model"], "quantized").strip().strip("-"))
    assert meta["datasets"] == ["some-org/texts"] and "calibrated" in meta["tags"]
    local = calibrated.replace(calibration="/home/someone/data/calib.jsonl")
    meta = yaml.safe_load(card_metadata(local, [], "quantized").strip().strip("-"))
    assert "datasets" not in meta and "base_model" not in meta
    assert describe_calibration(local.calibration) == "calib.jsonl"
    assert parse_hub_dataset("hf://models/some-org/model") is None


@pytest.fixture
def adapter_dir(tmp_path, sketched_dir):
    return save_adapter(sketched_dir, tmp_path / "math-adapter")


def test_a_merge_writes_its_own_card_with_relation_merge_naming_base_and_adapter(tmp_path, sketched_dir, adapter_dir):
    from spallm_plugins.validate import validate_checkpoint

    base = hub_cache_copy(sketched_dir, tmp_path, "some-org/tiny-spallm")
    out = tmp_path / "merged"
    cli("merge", str(base), str(adapter_dir), "--out", str(out))
    meta, body = read_card(out)
    assert meta["base_model"] == "some-org/tiny-spallm" and meta["base_model_relation"] == "merge"
    assert "`math-adapter`" in body and "some-org/tiny-spallm" in body and "codes are the base's" in body
    assert "sketched from a local folder" not in body  # the base's own card is not copied
    no_machine_path((out / "README.md").read_text(), tmp_path, base, adapter_dir)
    validate_checkpoint(out)  # the extra README.md is part of a valid checkpoint
