"""Perplexity and short generations, for comparing a model with its sketch; lm-eval tasks on local data."""

from __future__ import annotations

import math
import os
import tempfile
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch


def sample_text() -> str:
    """The English text shipped with the package (original prose, written for this project)."""
    return files("spallm_plugins").joinpath("data/sample_text.txt").read_text(encoding="utf-8")


def read_text(path: str | Path | None) -> str:
    """The held-out text: the bundled sample (``None``), a text file, or the rows of a ``.json`` /
    ``.jsonl`` file (as calibration reads them: ``text`` or instruction/input/output), one blank line
    between rows."""
    if path is None:
        return sample_text()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such text file")
    from .sketch.calibration import read_documents, read_utf8

    text = "\n\n".join(read_documents(path)) if path.suffix in (".json", ".jsonl") else read_utf8(path)
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


# ------------------------------------------------------------------------------------------------
# lm-evaluation-harness on local data (the ``lm-eval`` extra)

TASKS_FOLDER = "lm_eval_tasks"  # package data: task YAMLs over llm-adapters rows, data paths relative to --data
HARNESS_INSTALL = "pip install 'spallm-plugins[lm-eval]'"


class HarnessUnavailableError(RuntimeError):
    """lm-evaluation-harness (``lm_eval``) is not installed."""


def local_tasks() -> dict[str, dict[str, str]]:
    """The packaged lm-eval tasks: ``{task name: {split: data file relative to the data folder}}``."""
    import yaml

    found = {}
    for entry in sorted(files("spallm_plugins").joinpath(TASKS_FOLDER).iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            config = yaml.safe_load(entry.read_text(encoding="utf-8"))
            found[config["task"]] = dict(config["dataset_kwargs"]["data_files"])
    return found


def check_local_tasks(data_dir: str | os.PathLike, tasks: list[str]) -> None:
    """``tasks`` are packaged tasks and their data files exist under ``data_dir`` (else one clear error)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{data_dir}: no such data folder (expected the llm-adapters dataset folder)")
    known = local_tasks()
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; the local tasks are {', '.join(known)}")
    for task in tasks:
        for relative in known[task].values():
            if not (data_dir / relative).is_file():
                raise FileNotFoundError(
                    f"{data_dir / relative}: no such file (task {task} reads {relative} under --data)"
                )


def write_local_tasks(data_dir: str | os.PathLike, out_dir: str | os.PathLike, tasks: list[str]) -> Path:
    """Copy the packaged task YAMLs into ``out_dir`` with their data files under ``data_dir`` (absolute).

    ``out_dir`` is then an lm-eval ``include_path``. Checks ``tasks`` first (:func:`check_local_tasks`).
    """
    import yaml

    check_local_tasks(data_dir, tasks)
    data_dir, out_dir = Path(data_dir).resolve(), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for entry in files("spallm_plugins").joinpath(TASKS_FOLDER).iterdir():
        if not entry.is_file():
            continue
        text = entry.read_text(encoding="utf-8")
        if entry.name.endswith(".yaml"):
            config = yaml.safe_load(text)
            data_files = config["dataset_kwargs"]["data_files"]
            config["dataset_kwargs"]["data_files"] = {split: str(data_dir / f) for split, f in data_files.items()}
            text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
        (out_dir / entry.name).write_text(text, encoding="utf-8")
    return out_dir


def _is_sketched_folder(path: Path) -> bool:
    from .config import QUANT_METHOD
    from .format import read_json

    config = path / "config.json"
    return config.is_file() and (read_json(config).get("quantization_config") or {}).get("quant_method") == QUANT_METHOD


def harness_evaluate(
    model_dir: str | os.PathLike,
    tasks: list[str],
    data_dir: str | os.PathLike,
    *,
    adapter: str | os.PathLike | None = None,
    limit: int | None = None,
    batch_size: int | str = 1,
    device: str | None = None,
) -> dict[str, Any]:
    """Score a model folder (dense or sketched, optionally with a PEFT ``adapter``) on local lm-eval tasks.

    Loads the model through lm-eval's own ``hf`` model (``HFLM``: ``from_pretrained``, then
    ``PeftModel.from_pretrained``), as ``lm_eval --model hf`` does, and runs ``lm_eval.simple_evaluate``
    with the packaged task YAMLs reading ``data_dir``. Returns the harness's results dictionary.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise HarnessUnavailableError(f"lm-evaluation-harness is not installed ({err}); {HARNESS_INSTALL}") from None
    from .convert import sketched_layers
    from .format import CheckpointError
    from .hooks import register_host
    from .validate import validate_checkpoint

    model_dir = Path(model_dir)
    sketched = _is_sketched_folder(model_dir)
    if sketched:
        validate_checkpoint(model_dir, check_values=False)
        if not register_host("transformers"):
            raise CheckpointError(f"{model_dir}: no installed integration registers spallm with transformers")
    if adapter is not None:
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{adapter}: no adapter_config.json (expected a PEFT adapter folder)")
        register_host("peft")
    with tempfile.TemporaryDirectory(prefix="spallm-lm-eval-") as tmp:
        include = write_local_tasks(data_dir, tmp, tasks)
        lm = HFLM(
            pretrained=str(model_dir),
            peft=None if adapter is None else str(adapter),
            batch_size=batch_size,
            device=device or ("cuda" if torch.cuda.is_available() else "cpu"),
        )
        if sketched and not sketched_layers(lm.model):
            raise CheckpointError(f"{model_dir}: loaded without SketchedLinear layers; spallm is not registered")
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks),
            limit=limit,
            task_manager=TaskManager(include_path=str(include), include_defaults=False),
            log_samples=False,
        )
    return results


def harness_table(results: dict[str, Any]) -> str:
    """The harness's own Markdown table of ``results`` (and of its groups, when there are any)."""
    from lm_eval.utils import make_table

    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table


def harness_json(results: dict[str, Any]) -> str:
    """``results`` as JSON text (the harness's own handling of values JSON cannot hold)."""
    import json

    from lm_eval.utils import handle_non_serializable

    return json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n"
