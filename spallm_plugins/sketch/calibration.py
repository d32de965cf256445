"""Calibration data: text from a file, JSON rows, or a local ``datasets`` folder, packed into sequences."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch


class CalibrationError(ValueError):
    """The calibration source is missing, unreadable, or holds too few tokens."""


ROW_FIELDS = ("instruction", "input", "output")
MIN_DISTINCT_TOKENS = 8  # fewer: the Hessians would describe a few repeated tokens, not the model's inputs


def read_utf8(path: Path) -> str:
    """The text of ``path`` (UTF-8, a BOM allowed); an undecodable byte is named with its offset, not a codec trace."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        offset = err.start + len(data) - len(err.object)  # the decoder's offsets start after a BOM
        raise CalibrationError(
            f"{path}: not UTF-8 text: byte 0x{data[offset]:02x} at offset {offset} cannot be decoded "
            f"({err.reason}); text files are read as UTF-8 (ASCII included, a BOM allowed): convert it first, "
            f"e.g. iconv -f latin1 -t utf-8"
        ) from None


def _row_text(row: object, where: str) -> str:
    if isinstance(row, str):
        return row
    if not isinstance(row, dict):
        raise CalibrationError(f"{where}: expected a JSON object or string, got {type(row).__name__}")
    if isinstance(row.get("text"), str):
        return row["text"]
    parts = [str(row[k]) for k in ROW_FIELDS if row.get(k)]
    if not parts:
        raise CalibrationError(f"{where}: a row has neither 'text' nor any of {list(ROW_FIELDS)}")
    return "\n".join(parts)


def read_documents(source: str | os.PathLike) -> list[str]:
    """Documents from a ``.txt`` file (one document), ``.json`` (a list of rows), ``.jsonl`` (a row per
    line), or a folder saved by ``datasets.Dataset.save_to_disk`` (its ``text`` or instruction columns).

    Rows are ``{"text": ...}`` or instruction/input/output rows (as in the llm-adapters sets), joined
    by newlines.
    """
    path = Path(source)
    if path.is_dir():
        try:
            from datasets import load_from_disk
        except ImportError:
            raise CalibrationError(f"{path}: reading a datasets folder needs `pip install datasets`") from None
        dataset = load_from_disk(str(path))
        if hasattr(dataset, "keys") and not hasattr(dataset, "column_names"):  # a DatasetDict
            dataset = dataset[next(iter(dataset.keys()))]
        return [_row_text(row, str(path)) for row in dataset]
    if not path.is_file():
        raise CalibrationError(f"{path}: no such calibration file or folder")
    text = read_utf8(path)
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(_row_text(json.loads(line), f"{path}:{number}"))
                except json.JSONDecodeError as err:
                    raise CalibrationError(f"{path}:{number}: invalid JSON ({err})") from None
        return rows
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise CalibrationError(f"{path}: invalid JSON ({err})") from None
        if not isinstance(data, list):
            raise CalibrationError(f"{path}: expected a JSON list of rows")
        return [_row_text(row, str(path)) for row in data]
    return [text]


def calibration_batch(source: str | os.PathLike, tokenizer, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``[nsamples, seqlen]`` token ids: documents shuffled (seeded), tokenised, joined by eos, and
    cut into consecutive sequences. Raises :class:`CalibrationError` when there are too few tokens.
    """
    if nsamples < 1 or seqlen < 2:
        raise CalibrationError(f"nsamples={nsamples} and seqlen={seqlen}: need at least 1 sample of 2 tokens")
    documents = read_documents(source)
    if not any(document.strip() for document in documents):
        raise CalibrationError(f"{source}: the calibration text is empty (nothing but whitespace); give real text")
    order = torch.randperm(len(documents), generator=torch.Generator().manual_seed(seed)).tolist()
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    needed = nsamples * seqlen
    stream: list[int] = []
    for i in order:
        stream += tokenizer(documents[i], add_special_tokens=False)["input_ids"] + separator
        if len(stream) >= needed:
            break
    if len(stream) < needed:
        raise CalibrationError(
            f"{source}: {len(stream)} tokens, but nsamples={nsamples} x seqlen={seqlen} needs {needed}; "
            "use more text, or fewer or shorter samples"
        )
    distinct = len(set(stream[:needed]) - set(separator))
    if distinct < MIN_DISTINCT_TOKENS:
        raise CalibrationError(
            f"{source}: the calibration text has only {distinct} distinct token(s) in its {needed} tokens, at least "
            f"{MIN_DISTINCT_TOKENS} are needed; the sketch would fit a few repeated tokens: give real, varied text"
        )
    return torch.tensor(stream[:needed], dtype=torch.long).view(nsamples, seqlen)


def fingerprint(ids: torch.Tensor) -> str:
    """A short digest of the calibration tokens (resume refuses a different calibration set)."""
    return hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]
