import math

import pytest
import torch
from conftest import sample_words, tiny_llama, tiny_tokenizer

from spallm_plugins.evaluate import generate_answer, perplexity, read_text, sample_text


def test_perplexity_is_exp_of_mean_token_nll_over_windows():
    model, tok = tiny_llama(), tiny_tokenizer()
    text = sample_words(50)
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, ids.numel(), 16):
            w = ids[start : start + 16]
            if w.numel() < 2:
                continue
            logp = model(w[None]).logits[0, :-1].log_softmax(-1)
            nll -= logp.gather(1, w[1:, None]).sum().item()
            count += w.numel() - 1
    assert math.isclose(perplexity(model, tok, text, seqlen=16), math.exp(nll / count), rel_tol=1e-5)


def test_bundled_sample_text_is_installed():
    text = sample_text()
    assert len(text.split()) > 500 and "bicycle" in text


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"seqlen": 0}, "seqlen=0"),
        ({"seqlen": -5}, "seqlen=-5"),
        ({"seqlen": 1}, "seqlen=1"),
        ({"max_windows": 0}, "max_windows=0"),
        ({"max_windows": -2}, "max_windows=-2"),
    ],
)
def test_perplexity_rejects_windows_that_predict_nothing(kwargs, named):
    with pytest.raises(ValueError, match=named):
        perplexity(tiny_llama(), tiny_tokenizer(), sample_words(50), **kwargs)


def test_perplexity_progress_bar_goes_to_stderr_only_when_asked(capsys):
    model, tok = tiny_llama(), tiny_tokenizer()
    text = sample_words(50)
    quiet = perplexity(model, tok, text, seqlen=16)
    assert capsys.readouterr().err == ""
    loud = perplexity(model, tok, text, seqlen=16, progress=True, desc="perplexity tiny")
    captured = capsys.readouterr()
    assert loud == quiet and captured.out == ""
    assert "perplexity tiny" in captured.err and "4/4" in captured.err and "window" in captured.err


def test_generate_answer_progress_counts_new_tokens_and_keeps_the_greedy_answer(capsys):
    model, tok = tiny_llama(), tiny_tokenizer()
    quiet = generate_answer(model, tok, "the bicycle", max_new_tokens=6)
    assert capsys.readouterr().err == ""
    loud = generate_answer(model, tok, "the bicycle", max_new_tokens=6, progress=True)
    captured = capsys.readouterr()
    assert loud == quiet and quiet
    assert "generating" in captured.err and "6/6" in captured.err and "token" in captured.err


def test_held_out_text_reads_plain_files_and_json_rows_and_names_what_is_wrong(tmp_path):
    import json

    rows = [{"instruction": "Add 2 and 3.", "input": "", "output": "2 + 3 = 5.", "answer": "5"}, {"text": "Plain."}]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "plain.txt").write_text('[{"text": "not parsed"}]')
    expected = "Add 2 and 3.\n2 + 3 = 5.\n\nPlain."
    assert read_text(tmp_path / "rows.json") == read_text(tmp_path / "rows.jsonl") == expected
    assert read_text(tmp_path / "plain.txt") == '[{"text": "not parsed"}]'
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match=r"bad\.json: invalid JSON"):
        read_text(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match=r"missing\.json"):
        read_text(tmp_path / "missing.json")
