"""``<out>/.spallm-partial``: what a block-by-block sketch has finished, so that a killed run resumes.

One shard per finished block (and per dense tensor outside the blocks), the next block's inputs
(or the calibration activations in files, :class:`SpilledActivations`), and ``progress.json``,
written last and atomically: the commit point of a block. It records the run's identity (config,
calibration fingerprint, dense dtype, source); a resume with another identity is refused, naming
the first setting that differs.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..format import atomic_path, write_json

PARTIAL_DIR = ".spallm-partial"
PROGRESS_FILE = "progress.json"


class ResumeError(ValueError):
    """Saved progress that cannot be continued (another config, other calibration data, damaged files)."""


def setting_difference(saved: Any, new: Any) -> str:
    """The first setting that differs, with the saved and the new value (a config: its first differing field)."""
    if isinstance(saved, dict) and isinstance(new, dict):
        key = next(k for k in sorted({*saved, *new}, key=str) if saved.get(k) != new.get(k))
        return f"{key} was {saved.get(key)!r}, this run has {new.get(key)!r}"
    return f"it was {saved!r}, this run has {new!r}"


class ProgressStore:
    """Reads and writes the partial folder ``directory``; every file is written atomically.

    ``identity`` is what a resumed run must share with the saved one; it is written into every commit.
    """

    def __init__(self, directory: Path, identity: dict[str, Any]):
        self.dir, self.identity = directory, identity

    def begin(self, resume: bool) -> dict[str, Any] | None:
        """The saved state to continue from (``resume``), else ``None`` after removing any earlier progress."""
        if resume:
            return self.load()
        if self.dir.exists():
            shutil.rmtree(self.dir)
        return None

    def load(self) -> dict[str, Any] | None:
        if not (self.dir / PROGRESS_FILE).is_file():
            return None
        try:
            progress = json.loads((self.dir / PROGRESS_FILE).read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ResumeError(f"{self.dir / PROGRESS_FILE}: damaged ({err}); remove {self.dir} to start over") from None
        for key, value in self.identity.items():
            if progress.get(key) != value:
                raise ResumeError(
                    f"{self.dir}: saved progress was made with a different {key.replace('_', ' ')}: "
                    f"{setting_difference(progress.get(key), value)}; resume with the saved setting, or remove "
                    f"{self.dir} or run without --resume to start over"
                )
        return progress

    def shard(self, kind: str, index: int) -> Path:
        return self.dir / f"{kind}_{index:05d}.safetensors"

    def write_shard(self, kind: str, index: int, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        self.dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.shard(kind, index)) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                      metadata={"format": "pt"})  # fmt: skip

    def hidden_file(self, next_block: int) -> Path:
        return self.dir / f"inputs_{next_block:05d}.safetensors"

    def write_inputs(self, next_block: int, hidden: torch.Tensor) -> None:
        from safetensors.torch import save_file

        with atomic_path(self.hidden_file(next_block)) as tmp:
            save_file({"hidden": hidden.contiguous().cpu()}, str(tmp), metadata={"next_block": str(next_block)})

    def hidden(self, finished: int) -> torch.Tensor:
        from safetensors import safe_open

        path = self.hidden_file(finished)
        try:
            with safe_open(str(path), framework="pt") as f:
                if f.metadata().get("next_block") != str(finished):
                    raise ResumeError(f"{path}: holds inputs of another block than progress.json says")
                return f.get_tensor("hidden")
        except (OSError, ValueError) as err:
            if isinstance(err, ResumeError):
                raise
            raise ResumeError(
                f"{path}: cannot read saved activations ({err}); remove {self.dir} to start over"
            ) from None

    def commit(self, state: dict[str, Any]) -> None:
        write_json(self.dir / PROGRESS_FILE, {**self.identity, **state})


class SpilledActivations:
    """Calibration activations in files, one per batch (``--offload-activations``).

    Behaves as the list of per-batch hidden states that the driver otherwise keeps in memory
    (``len``, indexing, iteration, ``append``), but holds one batch in memory at a time: what a
    model with large ``nsamples x seqlen x hidden`` needs when those do not fit beside a block.
    ``tag`` names the set; the streaming sketcher alternates two sets, a block's inputs and its
    outputs.
    """

    def __init__(self, directory: Path, tag: str, device: torch.device, sizes: Sequence[int] = ()):
        self.directory, self.tag, self.device = directory, tag, torch.device(device)
        self.sizes = list(sizes)

    def path(self, index: int) -> Path:
        return self.directory / f"activations_{self.tag}_{index:05d}.safetensors"

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, index: int) -> torch.Tensor:
        from safetensors.torch import load_file

        if not 0 <= index < len(self.sizes):
            raise IndexError(index)
        path = self.path(index)
        try:
            hidden = load_file(str(path))["hidden"]
        except Exception as err:
            raise ResumeError(f"{path}: cannot read spilled activations ({err}); remove {self.directory}") from None
        if hidden.shape[0] != self.sizes[index]:
            raise ResumeError(f"{path}: holds {hidden.shape[0]} sequences, expected {self.sizes[index]}")
        return hidden.to(self.device)

    def append(self, hidden: torch.Tensor) -> None:
        from safetensors.torch import save_file

        self.directory.mkdir(parents=True, exist_ok=True)
        index = len(self.sizes)
        with atomic_path(self.path(index)) as tmp:
            save_file({"hidden": hidden.detach().contiguous().cpu()}, str(tmp))
        self.sizes.append(hidden.shape[0])

    def emptied(self, tag: str) -> SpilledActivations:
        """A new, empty set under ``tag`` in the same folder (its old files are overwritten as batches come)."""
        return SpilledActivations(self.directory, tag, self.device)
