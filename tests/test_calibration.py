import json

import pytest
import torch
from conftest import sample_words, tiny_tokenizer

from spallm_plugins.sketch.calibration import CalibrationError, calibration_batch, read_documents


def test_reads_text_json_and_jsonl_rows(tmp_path):
    (tmp_path / "a.txt").write_text("the wheel")
    rows = [{"instruction": "ride", "input": "", "output": "the bicycle"}, {"text": "a chain"}]
    (tmp_path / "b.json").write_text(json.dumps(rows))
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert read_documents(tmp_path / "a.txt") == ["the wheel"]
    assert read_documents(tmp_path / "b.json") == ["ride\nthe bicycle", "a chain"]
    assert read_documents(tmp_path / "c.jsonl") == ["ride\nthe bicycle", "a chain"]


def test_bad_rows_and_missing_files_name_the_place(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"oops": 1}\n')
    with pytest.raises(CalibrationError, match=r"bad.jsonl:2: a row has neither 'text'"):
        read_documents(tmp_path / "bad.jsonl")
    with pytest.raises(CalibrationError, match="no such calibration file"):
        read_documents(tmp_path / "missing.txt")


def test_packs_seeded_sequences(tmp_path):
    rows = [{"text": sample_words(40, seed=i)} for i in range(30)]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    tok = tiny_tokenizer()
    a = calibration_batch(tmp_path / "rows.json", tok, nsamples=8, seqlen=32, seed=1)
    b = calibration_batch(tmp_path / "rows.json", tok, nsamples=8, seqlen=32, seed=1)
    c = calibration_batch(tmp_path / "rows.json", tok, nsamples=8, seqlen=32, seed=2)
    assert a.shape == (8, 32) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a == tok.eos_token_id).any()  # documents are joined by eos


def test_too_few_tokens_is_a_clear_error(tmp_path):
    (tmp_path / "short.txt").write_text(sample_words(50))
    with pytest.raises(CalibrationError, match=r"short.txt: 5\d tokens, but nsamples=4 x seqlen=64 needs 256"):
        calibration_batch(tmp_path / "short.txt", tiny_tokenizer(), nsamples=4, seqlen=64)
