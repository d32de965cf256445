"""Perplexity and short generations, for comparing a model with its sketch."""

from __future__ import annotations

import math
from importlib.resources import files
from pathlib import Path

import torch


def sample_text() -> str:
    """The English text shipped with the package (original prose, written for this project)."""
    return files("spallm_plugins").joinpath("data/sample_text.txt").read_text(encoding="utf-8")


def read_text(path: str | Path | None) -> str:
    if path is None:
        return sample_text()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such text file")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"{path}: the text file is empty")
    return text


@torch.no_grad()
def perplexity(model, tokenizer, text: str, seqlen: int = 256, max_windows: int | None = None) -> float:
    """Perplexity over consecutive non-overlapping windows of ``seqlen`` tokens (the last may be shorter).

    Every token after the first of each window is predicted once; the result is
    ``exp(mean negative log-likelihood)`` over all of them.
    """
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    if ids.numel() < 2:
        raise ValueError(f"the text has {ids.numel()} token(s); perplexity needs at least 2")
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    windows = [ids[i : i + seqlen] for i in range(0, ids.numel(), seqlen)]
    windows = [w for w in windows if w.numel() >= 2][:max_windows]
    for window in windows:
        window = window.unsqueeze(0).to(device)
        logits = model(window).logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum").item()
        count += window.shape[1] - 1
    return math.exp(nll / count)


@torch.no_grad()
def generate_answer(model, tokenizer, question: str, max_new_tokens: int = 40) -> str:
    """Greedy answer to ``question``, through the chat template when the tokenizer has one."""
    if tokenizer.chat_template:
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    else:
        inputs = tokenizer(question, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
