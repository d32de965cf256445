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
def perplexity(
    model,
    tokenizer,
    text: str,
    seqlen: int = 256,
    max_windows: int | None = None,
    *,
    progress: bool = False,
    desc: str = "perplexity",
) -> float:
    """Perplexity over consecutive non-overlapping windows of ``seqlen`` tokens (the last may be shorter).

    Every token after the first of each window is predicted once; the result is
    ``exp(mean negative log-likelihood)`` over all of them. With ``progress`` a bar over the windows,
    labelled ``desc``, is drawn on stderr.
    """
    if seqlen < 2:
        raise ValueError(f"seqlen={seqlen}: a window needs at least 2 tokens (one to predict from, one predicted)")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows={max_windows}: expected at least 1 window (or None for all of the text)")
    from tqdm.auto import tqdm

    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    if ids.numel() < 2:
        raise ValueError(f"the text has {ids.numel()} token(s); perplexity needs at least 2")
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    windows = [ids[i : i + seqlen] for i in range(0, ids.numel(), seqlen)]
    windows = [w for w in windows if w.numel() >= 2][:max_windows]
    for window in tqdm(windows, desc=desc, unit="window", disable=not progress):
        window = window.unsqueeze(0).to(device)
        logits = model(window).logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum").item()
        count += window.shape[1] - 1
    return math.exp(nll / count)


def _token_progress(max_new_tokens: int, desc: str):
    """A ``transformers`` streamer that advances a tqdm bar (stderr) by one per generated token."""
    from tqdm.auto import tqdm
    from transformers.generation.streamers import BaseStreamer

    class TokenProgress(BaseStreamer):
        def __init__(self) -> None:
            self.bar = tqdm(total=max_new_tokens, desc=desc, unit="token")
            self.prompt_seen = False

        def put(self, value: torch.Tensor) -> None:
            if not self.prompt_seen:  # generate() first hands over the prompt
                self.prompt_seen = True
                return
            self.bar.update(1)

        def end(self) -> None:
            self.bar.close()

    return TokenProgress()


@torch.no_grad()
def generate_answer(
    model, tokenizer, question: str, max_new_tokens: int = 40, *, progress: bool = False, desc: str = "generating"
) -> str:
    """Greedy answer to ``question``, through the chat template when the tokenizer has one.

    With ``progress`` a bar over the new tokens, labelled ``desc``, is drawn on stderr (the answer is the same).
    """
    if tokenizer.chat_template:
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    else:
        inputs = tokenizer(question, return_tensors="pt")
    streamer = _token_progress(max_new_tokens, desc) if progress else None
    out = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        streamer=streamer,
    )
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
