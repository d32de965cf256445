"""Calibrated sketching of a whole model, block by block (sequential, as GPTQ), resumable.

For each decoder block in order: run the calibration activations through it with hooks that
accumulate ``H = 2/n * sum(x x^T)`` for every target linear (one Hessian per distinct input, so
q/k/v and gate/up share theirs, factored once), sketch those linears, then run the activations through the
*sketched* block to get the next block's inputs. Only one block needs to be on the compute device.

Progress is persisted under ``<out>/.spallm-partial/`` after every block: the block's codes and
tables, the next block's inputs, and ``progress.json`` (written last, atomically: the commit
point). ``resume=True`` continues after the last committed block and gives a result identical to
an uninterrupted run with the same config and calibration tokens.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import SketchConfig
from ..convert import resolve_targets, set_submodule
from ..format import atomic_path, write_json
from ..layer import SketchedLinear
from .calibration import CalibrationError, fingerprint
from .gptq import PreparedHessian, prepare_hessian
from .model import sketch_layer

PARTIAL_DIR = ".spallm-partial"
PROGRESS_FILE = "progress.json"


class ResumeError(ValueError):
    """Saved progress that cannot be continued (another config, other calibration data, damaged files)."""


class _StopForward(Exception):
    pass


def find_blocks(model: nn.Module, targets: dict[str, nn.Linear]) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` of decoder blocks that holds every target linear."""
    best: tuple[str, nn.ModuleList, int] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module):
            inside = sum(1 for t in targets if t.startswith(name + "."))
            if inside and (best is None or inside > best[2]):
                best = (name, module, inside)
    if best is None or best[2] != len(targets):
        outside = sorted(t for t in targets if best is None or not t.startswith(best[0] + "."))
        raise ValueError(
            f"calibrated sketching needs every target linear inside the decoder blocks; outside: {outside[:3]} "
            "(exclude them with modules_to_not_convert)"
        )
    return best[0], best[1]


@torch.no_grad()
def input_stages(
    block: nn.Module, local: dict[str, nn.Linear], hidden: torch.Tensor, kwargs: dict[str, Any]
) -> list[list[str]]:
    """The linears of ``local`` grouped by shared input, in the order the block's forward reaches them.

    Found with one forward of one calibration batch; a linear that forward never reaches goes into
    a last stage of its own (its capture then runs the full forward and reports it if never reached).
    """
    order: list[tuple[str, tuple]] = []
    inputs: list[torch.Tensor] = []

    def hook_for(name: str):
        def hook(module, args, output):
            x = args[0]
            inputs.append(x)  # held, so that an equal data_ptr really is the same tensor
            order.append((name, (x.data_ptr(), tuple(x.shape), tuple(x.stride()))))

        return hook

    handles = [module.register_forward_hook(hook_for(name)) for name, module in local.items()]
    try:
        block(hidden, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    stages: dict[tuple, list[str]] = {}
    for name, key in order:
        if not any(name in stage for stage in stages.values()):
            stages.setdefault(key, []).append(name)
    grouped = list(stages.values())
    unseen = [name for name in local if not any(name in stage for stage in grouped)]
    return grouped + ([unseen] if unseen else [])


class HessianCollector:
    """Forward hooks that accumulate ``sum(x x^T)`` once per distinct input tensor of a forward call.

    With ``stop_when_reached``, the forward is stopped (``_StopForward``, caught by the caller) once
    every collected module has seen its input in a batch: nothing after them is needed.
    """

    def __init__(self, modules: dict[str, nn.Linear], block_index: int, stop_when_reached: bool = False):
        self.modules, self.block_index, self.stop_when_reached = modules, block_index, stop_when_reached
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.owner: dict[str, str] = {}
        self._seen: dict[tuple, tuple[str, torch.Tensor]] = {}
        self._reached: set[str] = set()
        self._scaled: set[str] = set()
        self._handles: list = []

    def __enter__(self) -> HessianCollector:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()

    def new_batch(self) -> None:
        self._seen = {}
        self._reached = set()

    def _hook(self, name: str):
        def hook(module, args, output):
            self._reached.add(name)
            self._collect(name, args[0])
            if self.stop_when_reached and len(self._reached) == len(self.modules):
                raise _StopForward

        return hook

    def _collect(self, name: str, x: torch.Tensor) -> None:
        key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
        seen = self._seen.get(key)
        if seen is not None:
            self.owner.setdefault(name, seen[0])
            return
        # holding the tensor until the next batch keeps its memory from being reused, so an
        # equal data_ptr really means "the same input" (q/k/v, gate/up)
        self._seen[key] = (name, x)
        self.owner.setdefault(name, name)
        x2 = x.detach().reshape(-1, x.shape[-1]).float()
        if not torch.isfinite(x2).all():
            raise CalibrationError(
                f"block {self.block_index}, {name}: calibration activations contain NaN or inf "
                "(try float32, or other calibration text)"
            )
        if name in self._scaled:
            raise RuntimeError(
                f"block {self.block_index}, {name}: its Hessian was already read; collect before reading"
            )
        if name not in self.sums:
            self.sums[name] = torch.zeros(x2.shape[1], x2.shape[1], dtype=torch.float32, device=x2.device)
            self.counts[name] = 0
        self.sums[name].addmm_(x2.T, x2)
        self.counts[name] += x2.shape[0]

    def hessian(self, name: str) -> torch.Tensor:
        """``2 / n * sum(x x^T)`` of ``name``'s input: the collected sum, scaled in place.

        No copy is made (a 70B down_proj's is 3.3 GB): from the first call on the sum *is* the
        Hessian, one tensor for every layer that reads the same input, and collecting more into it
        is refused.
        """
        owner = self.owner.get(name)
        if owner is None:
            raise CalibrationError(
                f"block {self.block_index}, {name}: the calibration forward never reached this layer"
            )
        if owner not in self._scaled:
            self.sums[owner].mul_(2.0 / self.counts[owner])
            self._scaled.add(owner)
        return self.sums[owner]

    def release(self, name: str) -> None:
        """Drop the Hessian of ``name``'s input (and of every layer sharing it) once nothing reads it."""
        owner = self.owner.get(name)
        if owner is not None:
            self.sums.pop(owner, None)


def _move_outside_blocks(model: nn.Module, blocks_name: str, device: torch.device) -> None:
    for name, module in model.named_modules():
        if name == blocks_name or name.startswith(blocks_name + "."):
            continue
        if not any(True for _ in module.children()):
            module.to(device)


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    blocks: nn.ModuleList,
    ids: torch.Tensor,
    batch_size: int,
    device: torch.device,
    into: SpilledActivations | None = None,
) -> tuple[Sequence[torch.Tensor], list[dict[str, Any]]]:
    """Inputs (hidden states and keyword arguments) of the first block, per calibration batch.

    The hidden states are appended to ``into`` (files, one batch in memory at a time) when given.
    """
    hidden: Any = [] if into is None else into
    kwargs_list: list[dict[str, Any]] = []

    def hook(module, args, kwargs):
        hidden.append(args[0] if args else kwargs.pop("hidden_states"))
        kwargs_list.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in ids.split(batch_size):
            try:
                model(batch.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return hidden, kwargs_list


def _block_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _rel(name: str, prefix: str) -> str:
    return name[len(prefix) + 1 :]


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


def setting_difference(saved: Any, new: Any) -> str:
    """The first setting that differs, with the saved and the new value (a config: its first differing field)."""
    if isinstance(saved, dict) and isinstance(new, dict):
        key = next(k for k in sorted({*saved, *new}, key=str) if saved.get(k) != new.get(k))
        return f"{key} was {saved.get(key)!r}, this run has {new.get(key)!r}"
    return f"it was {saved!r}, this run has {new!r}"


class ProgressStore:
    """Reads and writes ``<out>/.spallm-partial``; every file is written atomically."""

    def __init__(self, directory: Path | None, config: SketchConfig, calib_fingerprint: str):
        self.dir = directory
        self.identity = {"config": config.to_dict(), "calibration_fingerprint": calib_fingerprint}

    def load(self) -> dict[str, Any] | None:
        if self.dir is None or not (self.dir / PROGRESS_FILE).is_file():
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

    def block_file(self, index: int) -> Path:
        return self.dir / f"block_{index:05d}.safetensors"

    def hidden_file(self, next_block: int) -> Path:
        return self.dir / f"inputs_{next_block:05d}.safetensors"

    def save(self, index: int, block_tensors: dict[str, torch.Tensor], hidden: torch.Tensor, report: dict) -> None:
        if self.dir is None:
            return
        from safetensors.torch import save_file

        self.dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.block_file(index)) as tmp:
            save_file({k: v.contiguous().cpu() for k, v in block_tensors.items()}, str(tmp))
        with atomic_path(self.hidden_file(index + 1)) as tmp:
            save_file({"hidden": hidden.contiguous().cpu()}, str(tmp), metadata={"next_block": str(index + 1)})
        write_json(self.dir / PROGRESS_FILE, {**self.identity, "finished_blocks": index + 1, "report": report})
        self.hidden_file(index).unlink(missing_ok=True)  # superseded once progress.json is committed

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

    def block_tensors(self, index: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        try:
            return load_file(str(self.block_file(index)))
        except Exception as err:
            raise ResumeError(
                f"{self.block_file(index)}: cannot read ({err}); remove {self.dir} to start over"
            ) from None


def _glibc() -> Any | None:
    """The C library when it is glibc (it has ``malloc_trim``), else None."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim  # noqa: B018  (only glibc has it)
    except (OSError, AttributeError):
        return None
    return libc


def release_freed_memory() -> None:
    """Give the memory a finished block freed back to the system (glibc's ``malloc_trim``), so the next
    block does not grow on top of a fragmented heap: glibc raises its mmap threshold after a large free,
    so later block-sized allocations land in the heap, where freed holes stay resident. No-op elsewhere."""
    import ctypes
    import gc

    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim(0)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
SKETCH_MMAP_THRESHOLD = 1 << 20


def fix_mmap_threshold(threshold: int = SKETCH_MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes for this process (``mallopt``), unless the
    user set one (``MALLOC_MMAP_THRESHOLD_``). Returns whether it was set.

    glibc's threshold is dynamic: each freed mmapped chunk raises it to that chunk's size (up to 32 MiB),
    so after the first few blocks a sketch's medium temporaries (row chunks, k-means passes, per-layer
    activations) are carved from the heap, where the holes they leave stay resident and the peak
    creeps up block after block. Fixed, every allocation of at least ``threshold`` is its own mapping,
    returned to the system when freed. Process-wide, so only processes that do nothing but sketch call
    it (``spallm sketch``, the ``bench scale`` children), not the library."""
    import ctypes
    import os

    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))


def peak_memory() -> dict[str, int]:
    """Peak resident memory of this process so far (and peak CUDA memory when a GPU is in use), in bytes."""
    import resource

    peak = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated())
    return peak


def _block_loss(block, hidden, kwargs_list, targets) -> float:
    total = 0.0
    for h, kw, target in zip(hidden, kwargs_list, targets):
        total += float((_block_output(block(h, **kw)) - target).pow(2).sum())
    return total


def tune_block_tables(
    block: nn.Module,
    layers: dict[str, SketchedLinear],
    hidden: Sequence[torch.Tensor],
    kwargs_list: list[dict[str, Any]],
    targets: Sequence[torch.Tensor],
    steps: int,
    lr: float,
) -> dict[str, float]:
    """Tune the tables of a sketched block so that its outputs match the dense block's (``targets``) on
    the same inputs: Adam on the block's mean squared output error, one calibration batch per step.

    Each layer was sketched to its own output error; this fits the block as a whole (the layers'
    errors interact through the attention and the gated MLP), as AQLM's block fine-tuning does for
    its codebooks. Tables train in float32 and are stored back in their dtype; the block keeps the
    tuned tables only if its output error over all batches went down.
    """
    with torch.no_grad():
        before = _block_loss(block, hidden, kwargs_list, targets)
    stored = {name: layer.tables.detach().clone() for name, layer in layers.items()}
    for layer in layers.values():
        layer.tables = nn.Parameter(layer.tables.detach().float(), requires_grad=True)
    optimizer = torch.optim.Adam([layer.tables for layer in layers.values()], lr=lr)
    with torch.enable_grad():
        for step in range(steps):
            batch = step % len(hidden)
            output = _block_output(block(hidden[batch], **kwargs_list[batch]))
            loss = torch.nn.functional.mse_loss(output, targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    del optimizer
    with torch.no_grad():
        for name, layer in layers.items():
            layer.tables = nn.Parameter(layer.tables.detach().to(stored[name].dtype), requires_grad=True)
        after = _block_loss(block, hidden, kwargs_list, targets)
        if not after < before:
            for name, layer in layers.items():
                layer.tables = nn.Parameter(stored[name], requires_grad=True)
    return {"loss_before": before, "loss_after": after, "kept": after < before}


@torch.no_grad()
def sketch_block(
    block: nn.Module,
    index: int,
    prefix: str,
    local: dict[str, nn.Linear],
    hidden: list[torch.Tensor],
    kwargs_list: list[dict[str, Any]],
    config: SketchConfig,
    report: dict[str, Any],
    timings: dict[str, float],
    bar=None,
    max_memory: int | None = None,
    outputs: SpilledActivations | None = None,
) -> tuple[dict[str, torch.Tensor], Sequence[torch.Tensor]]:
    """Sketch the linears ``local`` (names relative to ``block``) of one decoder block with calibration.

    Captures their Hessians from ``hidden`` (the block's inputs, per batch), replaces them in ``block``
    by ``SketchedLinear`` layers, and returns the sketched tensors (full names under ``prefix``) and the
    block's outputs through the *sketched* block: the next block's inputs (appended to ``outputs``
    when given, else a list). ``report`` and ``timings`` are updated in place.

    With ``config.true_sequential`` the linears are sketched in stages of one shared input each, in
    forward order (q/k/v, then o_proj, then gate/up, then down_proj for a Llama block), and each
    stage's Hessian is captured through the already sketched stages before it, so that a layer
    compensates the errors of the layers that feed it (GPTQ's ``true-sequential``). A stage's
    capture stops the forward as soon as the stage's last linear has seen its input.

    With ``config.tune_steps`` the dense block's outputs are kept (or spilled beside ``outputs``) before
    its linears are replaced, and the sketched block's tables are then tuned against them
    (:func:`tune_block_tables`) before its outputs go on to the next block.
    """
    t0 = time.perf_counter()
    stages = input_stages(block, local, hidden[0], kwargs_list[0]) if config.true_sequential else [list(local)]
    dense_outputs: Any = None
    tune_seconds = 0.0
    if config.tune_steps:  # the targets of the table tuning: the dense block's outputs (spilled with the rest)
        dense_start = time.perf_counter()
        dense_outputs = [] if outputs is None else outputs.emptied("targets")
        for h, kw in zip(hidden, kwargs_list):
            dense_outputs.append(_block_output(block(h, **kw)))
        tune_seconds = time.perf_counter() - dense_start
    block_tensors: dict[str, torch.Tensor] = {}
    hessian_seconds = 0.0
    for stage in stages:
        stage_start = time.perf_counter()
        with HessianCollector({n: local[n] for n in stage}, index, stop_when_reached=True) as collector:
            for h, kw in zip(hidden, kwargs_list):
                collector.new_batch()
                try:
                    block(h, **kw)
                except _StopForward:
                    pass
        hessian_seconds += time.perf_counter() - stage_start
        prepared: dict[str, PreparedHessian] = {}  # per distinct input, while a layer reading it is left
        readers = {owner: [n for n in stage if collector.owner.get(n) == owner] for owner in collector.sums}
        for rel_name in stage:
            linear = local[rel_name]
            name = f"{prefix}.{rel_name}"
            if bar is not None:
                bar.set_postfix_str(rel_name)
            layer_start = time.perf_counter()
            owner = collector.owner.get(rel_name)
            hessian: torch.Tensor | PreparedHessian | None = prepared.get(owner)
            if hessian is None:
                hessian = collector.hessian(rel_name)  # raises for a layer the forward never reached
                if config.method == "gptq":  # factored once for all the layers that read this input
                    together = ", ".join(f"{prefix}.{n}" for n in readers[owner])
                    hessian = prepare_hessian(
                        hessian.to(linear.weight.device), config.damping, together, config.act_order, overwrite=True
                    )
                    prepared[owner] = hessian
            if readers[owner][-1] == rel_name:
                prepared.pop(owner, None)
                collector.release(rel_name)
            layer, result = sketch_layer(linear, config, hessian=hessian, name=name, max_memory=max_memory)
            del hessian
            set_submodule(block, rel_name, layer)
            block_tensors[f"{name}.codes"] = layer.codes
            block_tensors[f"{name}.tables"] = layer.tables.detach()
            if layer.bias is not None:
                block_tensors[f"{name}.bias"] = layer.bias.detach()
            report["layers"][name] = {
                "loss": result.loss,
                "loss_before_refit": result.loss_before_refit,
                "refit_rows": result.refit_rows,
                "rows": linear.out_features,
                "damping": result.damping,
                "seconds": round(time.perf_counter() - layer_start, 4),
            }
        del collector
    t1 = t0 + hessian_seconds
    tuning: dict[str, Any] = {}
    if dense_outputs is not None:
        tune_start = time.perf_counter()
        sketched = {rel: block.get_submodule(rel) for rel in local}
        tuning = tune_block_tables(
            block, sketched, hidden, kwargs_list, dense_outputs, config.tune_steps, config.tune_lr
        )
        for rel, layer in sketched.items():
            block_tensors[f"{prefix}.{rel}.tables"] = layer.tables.detach()
        del dense_outputs
        tune_seconds += time.perf_counter() - tune_start
        tuning["seconds"] = round(tune_seconds, 3)  # the dense block's forward included
        timings["tune"] = timings.get("tune", 0.0) + tune_seconds
    t2 = time.perf_counter()
    next_hidden: Any = [] if outputs is None else outputs
    for h, kw in zip(hidden, kwargs_list):
        next_hidden.append(_block_output(block(h, **kw)))
    hidden = next_hidden
    t3 = time.perf_counter()
    timings["hessian"] += t1 - t0
    timings["sketch"] += t2 - t1 - tune_seconds
    timings["propagate"] += t3 - t2
    block_report = {"index": index, "seconds": round(t3 - t0, 3), **peak_memory()}
    report["blocks"].append({**block_report, "tuning": tuning} if tuning else block_report)
    return block_tensors, hidden


@torch.no_grad()
def sketch_model_calibrated(
    model: nn.Module,
    config: SketchConfig,
    calibration_ids: torch.Tensor,
    *,
    partial_dir: str | Path | None = None,
    resume: bool = False,
    device: str | torch.device = "cpu",
    offload: bool = False,
    batch_size: int = 8,
    progress: bool = False,
    on_block_done: Callable[[int], None] | None = None,
    max_memory: int | None = None,
) -> dict[str, Any]:
    """Sketch every target linear of ``model`` in place with calibration; return the report.

    ``offload`` keeps blocks on the CPU except the one being sketched. ``on_block_done(i)`` is
    called after block ``i`` is committed (progress reporting; tests use it to simulate a kill).
    """
    from tqdm.auto import tqdm

    device = torch.device(device)
    targets = resolve_targets(model, config)
    blocks_name, blocks = find_blocks(model, targets)
    store = ProgressStore(Path(partial_dir) if partial_dir else None, config, fingerprint(calibration_ids))
    saved = store.load() if resume else None
    if not resume and store.dir is not None and store.dir.exists():
        import shutil

        shutil.rmtree(store.dir)
    finished = saved["finished_blocks"] if saved else 0
    report: dict[str, Any] = saved["report"] if saved else {"layers": {}, "blocks": [], "seconds": {}}
    timings = {"capture": 0.0, "hessian": 0.0, "sketch": 0.0, "propagate": 0.0}

    use_cache = getattr(model.config, "use_cache", None)
    if use_cache is not None:
        model.config.use_cache = False
    if offload:
        _move_outside_blocks(model, blocks_name, device)
    else:
        model.to(device)

    start = time.perf_counter()
    hidden, kwargs_list = capture_block_inputs(model, blocks, calibration_ids, batch_size, device)
    if finished:
        saved_hidden = store.hidden(finished).to(device)
        hidden = list(saved_hidden.split([h.shape[0] for h in hidden]))
    timings["capture"] += time.perf_counter() - start

    for index in range(finished):
        tensors = store.block_tensors(index)
        for name, linear in targets.items():
            if name.startswith(f"{blocks_name}.{index}."):
                layer = SketchedLinear.empty_like(linear, config, device="cpu" if offload else device)
                layer.codes.copy_(tensors[f"{name}.codes"])
                layer.tables.copy_(tensors[f"{name}.tables"])
                if layer.bias is not None:  # the stored bias keeps the model's dtype, as in an uninterrupted run
                    layer.bias = nn.Parameter(tensors[f"{name}.bias"].to(layer.codes.device))
                set_submodule(model, name, layer)

    bar = tqdm(total=len(blocks), initial=finished, desc="sketching blocks", unit="block", disable=not progress)
    for index in range(finished, len(blocks)):
        block = blocks[index]
        prefix = f"{blocks_name}.{index}"
        block.to(device)
        names = [name for name in targets if name.startswith(prefix + ".")]
        local = {_rel(name, prefix): targets.pop(name) for name in names}  # the replaced linears die with `local`
        block_tensors, hidden = sketch_block(block, index, prefix, local, hidden, kwargs_list, config, report,
                                             timings, bar=bar, max_memory=max_memory)  # fmt: skip
        if offload:
            block.to("cpu")
        store.save(index, block_tensors, torch.cat(hidden), report)
        del local, block_tensors
        release_freed_memory()
        bar.update(1)
        if on_block_done is not None:
            on_block_done(index)
    bar.close()
    if use_cache is not None:
        model.config.use_cache = use_cache
    report["seconds"] = {k: round(v, 3) for k, v in timings.items()}  # this process only
    report["resumed_from_block"] = finished
    return report
