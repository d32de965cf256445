"""Calibration data: texts, a ``datasets`` dataset, a Hub dataset, or a file, packed into token sequences.

Whatever the source, a sketch records it as a string that names it without a local path: a Hub dataset by id,
commit, config, split and column; a file by name and sha256; texts by count and sha256 (see :func:`load_calibration`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import torch

from ..hub import HUB_DATASET_PREFIX, HUB_DATASET_SYNTAX, parse_dataset_ref


class CalibrationError(ValueError):
    """The calibration source is missing, unreadable, or holds too few tokens."""


ROW_FIELDS = ("instruction", "input", "output")
MIN_DISTINCT_TOKENS = 8  # fewer: the Hessians would describe a few repeated tokens, not the model's inputs
# what a Hub dataset's snapshot may hold: data files and the card that declares its configs; no loading scripts
HUB_DATA_PATTERNS = (
    "*.parquet",
    "*.json",
    "*.jsonl",
    "*.json.gz",
    "*.jsonl.gz",
    "*.csv",
    "*.txt",
    "*.arrow",
    "README.md",
)


@dataclass(frozen=True)
class CalibrationTexts:
    """Documents to calibrate on; ``record`` is what a checkpoint keeps of them, ``name`` how errors name them."""

    documents: list[str]
    record: str
    name: str


def read_utf8(path: Path, data: bytes | None = None) -> str:
    """The text of ``path`` (UTF-8, a BOM allowed), or of its ``data`` already read; an undecodable byte is named
    with its offset, not a codec trace."""
    data = path.read_bytes() if data is None else data
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


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _is_dataset(source: object) -> bool:
    return type(source).__module__.split(".")[0] == "datasets"


def load_calibration(source: Any, *, column: str | None = None, split: str | None = None) -> CalibrationTexts:
    """The calibration documents of ``source`` and the record a sketch keeps of them.

    ``source`` is a list of strings; a ``datasets.Dataset`` or ``DatasetDict`` (``split``, default ``train``);
    a Hub dataset ``hf://datasets/ORG/NAME[@REVISION][?config=C&split=S&column=COL&data_files=GLOB]`` (only its
    data files are downloaded, honouring ``HF_HUB_OFFLINE`` and the cache; no loading script runs); a ``.txt``,
    ``.json``/``.jsonl`` file of rows or a ``datasets`` folder. A dataset's text is its ``column`` (default
    ``text``, else instruction/input/output rows joined by newlines).
    """
    if isinstance(source, CalibrationTexts):
        return source
    if isinstance(source, (list, tuple)):
        return _from_texts(list(source))
    if _is_dataset(source):
        name = getattr(getattr(source, "info", None), "dataset_name", None) or "in-memory"
        return _from_dataset(source, column, split, name=f"dataset {name}", record_name=f"dataset:{name}")
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if text.startswith(HUB_DATASET_PREFIX):
            return _from_hub(text, column, split)
        return _from_path(Path(text), column, split)
    raise CalibrationError(
        f"calibration: expected texts (a list of strings), a datasets.Dataset, a file or folder, or "
        f"{HUB_DATASET_SYNTAX}; got {type(source).__name__}"
    )


def _from_texts(texts: list[Any]) -> CalibrationTexts:
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise CalibrationError(f"calibration texts: item {bad} is a {type(texts[bad]).__name__}, expected a string")
    digest = _sha256(json.dumps(texts, ensure_ascii=False).encode())
    return CalibrationTexts(texts, f"texts:{len(texts)}?sha256={digest}", f"calibration texts ({len(texts)})")


def _from_dataset(dataset: Any, column: str | None, split: str | None, *, name: str, record_name: str, **extra: str):
    if not hasattr(dataset, "column_names") or isinstance(dataset.column_names, dict):  # a DatasetDict
        splits = list(dataset.keys())
        split = split or ("train" if "train" in splits else splits[0] if len(splits) == 1 else None)
        if split not in splits:
            raise CalibrationError(f"{name}: no split {split!r}; its splits are {', '.join(splits)} (choose one)")
        dataset = dataset[split]
    columns = list(dataset.column_names)
    if column is not None and column not in columns:
        raise CalibrationError(f"{name}: no column {column!r}; its columns are {', '.join(columns)}")
    if column is None and "text" in columns:
        column = "text"
    if column is not None:
        documents = [value if isinstance(value, str) else str(value) for value in dataset[column]]
    elif any(field in columns for field in ROW_FIELDS):
        documents = [_row_text(row, name) for row in dataset]
    else:
        raise CalibrationError(
            f"{name}: no 'text' column and none of {', '.join(ROW_FIELDS)}; name the text column (column=...); "
            f"its columns are {', '.join(columns)}"
        )
    fields = {**extra, **({"split": split} if split else {}), **({"column": column} if column else {})}
    fingerprint = getattr(dataset, "_fingerprint", None)
    if fingerprint and not record_name.startswith(HUB_DATASET_PREFIX):
        fields["fingerprint"] = fingerprint
    query = urlencode(fields, safe="/*")
    return CalibrationTexts(documents, record_name + (f"?{query}" if query else ""), name)


def _from_path(path: Path, column: str | None, split: str | None) -> CalibrationTexts:
    if path.is_dir():
        try:
            from datasets import load_from_disk
        except ImportError:
            raise CalibrationError(
                f"{path}: reading a datasets folder needs the datasets package: pip install 'spallm-plugins[datasets]'"
            ) from None
        dataset = load_from_disk(str(path))
        return _from_dataset(dataset, column, split, name=str(path), record_name=f"dataset:{path.name}")
    if not path.is_file():
        hint = (
            f" (a Hub dataset is named {HUB_DATASET_SYNTAX})" if "/" in str(path) and not path.parent.exists() else ""
        )
        raise CalibrationError(f"{path}: no such calibration file or folder{hint}")
    if column is not None:
        raise CalibrationError(f"{path}: column={column!r} applies to datasets; a file's rows are read by their fields")
    data = path.read_bytes()  # read once: parsed and hashed
    return CalibrationTexts(read_documents(path, data), f"file:{path.name}?sha256={_sha256(data)}", str(path))


def parse_hub_dataset(spec: str) -> tuple[str, str | None, dict[str, str]]:
    """``(repo id, revision or None, options)`` of a ``hf://datasets/...`` calibration source."""
    try:
        return parse_dataset_ref(spec)
    except ValueError as err:
        raise CalibrationError(str(err)) from None


def _dataset_snapshot(repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    """The local snapshot of a Hub dataset's data files (downloaded unless cached or offline)."""
    from ..hub import ModelNotFoundError, download_snapshot

    try:
        return download_snapshot(repo_id, revision, files=tuple(patterns), need_weights=False, repo_type="dataset")
    except ModelNotFoundError as err:
        raise CalibrationError(f"dataset {err}") from None


def _from_hub(spec: str, column: str | None, split: str | None) -> CalibrationTexts:
    repo_id, revision, options = parse_hub_dataset(spec)
    column = column or options.get("column")
    split = split or options.get("split") or "train"
    data_files = options.get("data_files")
    patterns = [data_files, "README.md"] if data_files else list(HUB_DATA_PATTERNS)
    folder = _dataset_snapshot(repo_id, revision, patterns)
    try:
        from datasets import load_dataset
    except ImportError:
        raise CalibrationError(
            f"{spec}: a Hub dataset needs the datasets package: pip install 'spallm-plugins[datasets]'"
        ) from None
    try:
        dataset = load_dataset(str(folder), name=options.get("config"), data_files=data_files, split=split)
    except (ValueError, FileNotFoundError) as err:
        raise CalibrationError(
            f"{spec}: cannot read split {split!r} of {repo_id} ({str(err).splitlines()[0]})"
        ) from None
    extra = {k: v for k, v in (("config", options.get("config")), ("data_files", data_files)) if v}
    record = f"{HUB_DATASET_PREFIX}{repo_id}@{folder.name}"
    return _from_dataset(dataset, column, split, name=f"{HUB_DATASET_PREFIX}{repo_id}", record_name=record, **extra)


def read_documents(source: str | os.PathLike, data: bytes | None = None) -> list[str]:
    """Documents from a ``.txt`` file (one document), ``.json`` (a list of rows), ``.jsonl`` (a row per
    line), or a folder saved by ``datasets.Dataset.save_to_disk`` (its ``text`` or instruction columns).

    Rows are ``{"text": ...}`` or instruction/input/output rows (as in the llm-adapters sets), joined
    by newlines. ``data``: the file's bytes when the caller already read them.
    """
    path = Path(source)
    if path.is_dir():
        return load_calibration(path).documents
    if not path.is_file():
        raise CalibrationError(f"{path}: no such calibration file or folder")
    text = read_utf8(path, data)
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


def calibration_batch(source: Any, tokenizer, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``[nsamples, seqlen]`` token ids from any source :func:`load_calibration` reads: documents shuffled
    (seeded), tokenised, joined by eos, and cut into consecutive sequences. Raises :class:`CalibrationError`
    when there are too few tokens.
    """
    if nsamples < 1 or seqlen < 2:
        raise CalibrationError(f"nsamples={nsamples} and seqlen={seqlen}: need at least 1 sample of 2 tokens")
    texts = load_calibration(source)
    documents, where = texts.documents, texts.name
    if not any(document.strip() for document in documents):
        raise CalibrationError(f"{where}: the calibration text is empty (nothing but whitespace); give real text")
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
            f"{where}: {len(stream)} tokens, but nsamples={nsamples} x seqlen={seqlen} needs {needed}; "
            "use more text, or fewer or shorter samples"
        )
    distinct = len(set(stream[:needed]) - set(separator))
    if distinct < MIN_DISTINCT_TOKENS:
        raise CalibrationError(
            f"{where}: the calibration text has only {distinct} distinct token(s) in its {needed} tokens, at least "
            f"{MIN_DISTINCT_TOKENS} are needed; the sketch would fit a few repeated tokens: give real, varied text"
        )
    return torch.tensor(stream[:needed], dtype=torch.long).view(nsamples, seqlen)


def fingerprint(ids: torch.Tensor) -> str:
    """A short digest of the calibration tokens (resume refuses a different calibration set)."""
    return hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]
