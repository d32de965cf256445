import math

import torch
from conftest import sample_words, tiny_llama, tiny_tokenizer

from spallm_plugins.evaluate import perplexity, sample_text


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
