"""The streaming sketcher: memory set by one decoder block, never by the model.

The model is built on the meta device from ``config.json`` (no weights). The source checkpoint's
safetensors are read tensor by tensor, in their stored dtype, only when needed:

* calibrated: the embedding alone runs the calibration tokens up to the first block (its inputs are
  kept, ``[nsamples, seqlen, hidden]`` in float32); then, block by block, that block's tensors are
  read (computed in float32), its linears sketched with Hessians from the inputs, the inputs run
  through the *sketched* block to become the next block's, and the block written as its own shard
  and returned to the meta device. Data-free: the same per block, without activations.
* everything outside the blocks (embeddings, final norm, ``lm_head``) is copied through one tensor
  at a time, in the dense dtype, each as its own shard.

Shards and progress go to ``OUT/.spallm-partial`` (``progress.json``, written last, is the commit
point of a block), so ``resume`` continues a killed run and gives the same bytes. The final folder
(shards linked from the partial folder, index, config, tokenizer, report) is assembled under a
temporary name, validated, and renamed onto ``OUT``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import SketchConfig
from .format import (
    SAFETENSORS_INDEX,
    CheckpointError,
    atomic_path,
    read_file_headers,
    read_json,
    safetensors_files,
    write_json,
)
from .layer import SketchedLinear
from .sketch.blocks import find_blocks
from .sketch.calibration import fingerprint
from .sketch.driver import sketch_blocks
from .sketch.memory import DEFAULT_MAX_MEMORY, WORKSPACE_BYTES_PER_WEIGHT
from .sketch.progress import PARTIAL_DIR, ProgressStore
from .validate import validate_checkpoint

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


class TensorSource:
    """The tensors of a safetensors checkpoint folder, read one at a time by name.

    Every shard's header is checked up front (the index against the shards, truncation), so a damaged
    source fails before any work, with the file and tensor named. ``on_read(name)`` is called after
    each read (tests use it to prove the memory bound).
    """

    def __init__(self, folder: str | os.PathLike, on_read: Callable[[str], None] | None = None):
        self.folder = Path(folder)
        self.files = safetensors_files(self.folder)
        if not self.files:
            raise CheckpointError(f"{self.folder}: no safetensors weights (model.safetensors or an index)")
        self.headers = read_file_headers(self.files)
        index = self.folder / SAFETENSORS_INDEX
        if index.is_file():
            for name, file in read_json(index)["weight_map"].items():
                header = self.headers.get(name)
                if header is None or header.file.name != file:
                    raise CheckpointError(f"{index}: lists tensor {name} in {file}, which does not hold it")
        self.on_read = on_read

    def read(self, name: str, like: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor ``name`` in its stored dtype; ``like`` (a skeleton parameter) is checked against it."""
        from safetensors import SafetensorError, safe_open

        header = self.headers.get(name)
        if header is None:
            raise CheckpointError(f"{self.folder}: no tensor {name} in the checkpoint (the architecture needs it)")
        if like is not None:
            if tuple(header.shape) != tuple(like.shape):
                raise CheckpointError(
                    f"{header.file}: tensor {name} has shape {list(header.shape)}, the model's config needs "
                    f"{list(like.shape)}"
                )
            if like.is_floating_point() and header.dtype not in FLOAT_DTYPES:
                raise CheckpointError(
                    f"{header.file}: tensor {name} has dtype {header.dtype}, expected a float dtype "
                    f"({', '.join(FLOAT_DTYPES)})"
                )
        try:
            with safe_open(str(header.file), framework="pt") as fh:
                tensor = fh.get_tensor(name)
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{header.file}: cannot read tensor {name} ({err})") from None
        if self.on_read is not None:
            self.on_read(name)
        return tensor


def meta_skeleton(source: str | os.PathLike) -> nn.Module:
    """The model of ``source/config.json`` with parameters on the meta device and real buffers (rotary
    frequencies), in float32; no weights are read and no remote code is run."""
    import transformers
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config_file = Path(source) / "config.json"
    model_type = read_json(config_file).get("model_type")
    if not model_type:
        raise ValueError(f"{config_file}: no model_type; cannot tell the architecture")
    try:
        config = AutoConfig.from_pretrained(str(source), local_files_only=True)
    except ValueError:
        raise ValueError(
            f"{config_file}: unsupported architecture {model_type!r} (transformers {transformers.__version__} does "
            "not know it; remote code is not run)"
        ) from None
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.use_cache = False
    return model.eval()


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[attr] = value


def _to_meta(module: nn.Module) -> None:
    """Return a finished part of the model to the meta device: its parameters (a sketched layer's codes
    included) and its persistent buffers, everything it wrote to its shard, so no block outlives its write."""
    for sub in module.modules():
        for key, param in sub._parameters.items():
            if param is not None:
                sub._parameters[key] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False)
        for key, buffer in sub._buffers.items():
            if buffer is not None and key not in sub._non_persistent_buffers_set:
                sub._buffers[key] = torch.empty_like(buffer, device="meta")


def _materialize(module: nn.Module, prefix: str, source: TensorSource, dtype: torch.dtype, device) -> None:
    """Read the parameters of ``module`` (checkpoint names under ``prefix``) into it as ``dtype``."""
    for name, param in list(module.named_parameters()):
        full = f"{prefix}.{name}" if prefix else name
        _set_tensor(module, name, source.read(full, like=param).to(device=device, dtype=dtype))


def _block_shard(block: nn.Module, prefix: str, dense_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Everything a sketched block stores: codes and tables as they are, the rest in the dense dtype."""
    sketched = {name for name, m in block.named_modules() if isinstance(m, SketchedLinear)}
    tensors = {}
    for name, tensor in block.state_dict(keep_vars=True).items():
        module_name, _, attr = name.rpartition(".")
        keep = module_name in sketched and attr in ("codes", "tables")
        tensors[f"{prefix}.{name}"] = tensor.detach() if keep else tensor.detach().to(dense_dtype)
    return tensors


def _outside_tensors(model: nn.Module, blocks_name: str) -> list[tuple[str, torch.Tensor]]:
    """Parameters and persistent buffers outside the decoder blocks, as ``save_pretrained`` names them."""
    tied = set(getattr(model, "_tied_weights_keys", None) or ()) if model.config.tie_word_embeddings else set()
    return [
        (name, tensor)
        for name, tensor in model.state_dict(keep_vars=True).items()
        if not name.startswith(blocks_name + ".") and name not in tied
    ]


def sketch_memory(
    model,
    targets: dict,
    nsamples: int,
    seqlen: int,
    max_memory: int | None = None,
    dense_bytes: int = 2,
    device: str = "cpu",
) -> dict[str, int]:
    """Bytes the streaming sketcher holds at its peak for ``model`` (built on the meta device).

    The terms of ``README``'s table: one decoder block in float32, the workspace of its largest
    linear (bounded by ``max_memory``), the Hessian matrices of the widest input (calibrated: the
    collected sum, scaled in place into the Hessian, and the damped copy factored in its own memory:
    two ``[in, in]`` float32; on CUDA up to two more, the copies cuSOLVER's ``cholesky_inverse`` makes),
    the calibration activations (inputs and outputs of a block, float32; zero with
    ``--offload-activations``) and the largest tensor outside the blocks (copied through once).
    """
    blocks_name, blocks = find_blocks(model, targets)
    block_params = max(sum(p.numel() for p in block.parameters()) for block in blocks)
    inside = [m for name, m in targets.items() if name.startswith(blocks_name + ".")]
    widest = max(m.in_features for m in inside)
    largest = max(m.in_features * m.out_features for m in inside)
    budget = DEFAULT_MAX_MEMORY if max_memory is None else max_memory
    outside = [p.numel() for name, p in model.named_parameters() if not name.startswith(blocks_name + ".")]
    hidden = model.config.hidden_size
    hessian_matrices = 2 if torch.device(device).type == "cpu" else 4
    return {
        "block_float32_bytes": 4 * block_params,
        "workspace_bytes": min(budget, largest * WORKSPACE_BYTES_PER_WEIGHT) + 100 * (1 << 20),
        "hessian_bytes": hessian_matrices * 4 * widest * widest if nsamples else 0,
        "activation_bytes": 2 * nsamples * seqlen * hidden * 4,
        "largest_outside_bytes": max(outside, default=0) * dense_bytes,
    }


def _buffers_to(model: nn.Module, device: torch.device) -> None:
    for module in model.modules():
        for key, buf in module._buffers.items():
            if buf is not None and buf.device.type != "meta":
                module._buffers[key] = buf.to(device)


class StreamedCheckpoint:
    """The block host of a checkpoint folder streamed into a sketched one (:class:`~.sketch.driver.BlockHost`).

    Weights come from ``reader`` into the meta skeleton ``model`` one block at a time, in float32;
    a sketched block goes out as its own shard in the progress store (the rest in ``dense``) and back
    to the meta device. Everything outside the blocks is copied through first, one tensor a shard.
    """

    def __init__(self, model: nn.Module, reader: TensorSource, dense: torch.dtype, device: torch.device):
        self.model, self.reader, self.dense, self.device = model, reader, dense, device
        self.store: ProgressStore | None = None

    def start(self, blocks_name: str, store: ProgressStore | None, state: dict[str, Any]) -> None:
        self.store, self.blocks_name = store, blocks_name
        if not state.get("outside"):
            outside = _outside_tensors(self.model, blocks_name)
            for i, (name, like) in enumerate(outside):
                store.write_shard("outside", i, {name: self.reader.read(name, like=like).to(self.dense)})
            state["outside"] = [name for name, _ in outside]
            store.commit(state)
        self.outside = state["outside"]

    @contextlib.contextmanager
    def embeddings(self):
        embeddings = self.model.get_input_embeddings()
        embed_name = next(n for n, m in self.model.named_modules() if m is embeddings)
        _materialize(embeddings, embed_name, self.reader, torch.float32, self.device)
        try:
            yield
        finally:
            _to_meta(embeddings)

    def load(self, block: nn.Module, prefix: str) -> None:
        _materialize(block, prefix, self.reader, torch.float32, self.device)

    def keep(self, index: int, block: nn.Module, prefix: str) -> None:
        self.store.write_shard("block", index, _block_shard(block, prefix, self.dense))
        _to_meta(block)

    def finish(self) -> None:
        pass

    def shards(self) -> list[Path]:
        """The partial folder's shards in the order of the output: outside the blocks, then block by block."""
        blocks = len(self.model.get_submodule(self.blocks_name))
        return [self.store.shard("outside", i) for i in range(len(self.outside))] + [
            self.store.shard("block", i) for i in range(blocks)
        ]


def sketch_streaming(
    source: str | os.PathLike,
    out_dir: Path,
    config: SketchConfig,
    *,
    skeleton: nn.Module | None = None,
    dense_dtype: str,
    calibration_ids: torch.Tensor | None = None,
    resume: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = False,
    batch_size: int = 8,
    on_block_done: Callable[[int], None] | None = None,
    on_read: Callable[[str, nn.Module], None] | None = None,
    finish: Callable[[Path, dict[str, Any]], None] | None = None,
    max_memory: int | None = None,
    offload_activations: bool = False,
) -> dict[str, Any]:
    """Sketch the checkpoint folder ``source`` into ``out_dir`` block by block; return the report.

    ``calibration_ids`` (``[nsamples, seqlen]``) select the calibrated method; without them the sketch
    is data-free. ``skeleton`` is :func:`meta_skeleton` of ``source`` when the caller already built it.
    ``finish(tmp, report)`` writes the extra files of the output (tokenizer, report) into
    the temporary folder before it is validated and renamed onto ``out_dir``. ``on_read(name, model)``
    is called after each tensor read from the source (tests use it to check the memory bound).
    ``max_memory`` bounds the workspace of sketching one linear (bytes, :mod:`.sketch.memory`).
    ``offload_activations`` keeps the calibration activations in files under the partial folder,
    one batch in memory at a time, instead of all of them in memory (same result).
    """
    device = torch.device(device)
    source = Path(source)
    model = skeleton if skeleton is not None else meta_skeleton(source)
    reader = TensorSource(source, on_read=None if on_read is None else (lambda name: on_read(name, model)))
    _buffers_to(model, device)
    identity: dict[str, Any] = {"config": config.to_dict(), "dense_dtype": dense_dtype, "source": str(source)}
    if calibration_ids is not None:
        identity["calibration_fingerprint"] = fingerprint(calibration_ids)
    store = ProgressStore(out_dir / PARTIAL_DIR, identity)
    host = StreamedCheckpoint(model, reader, getattr(torch, dense_dtype), device)
    report = sketch_blocks(host, config, calibration_ids=calibration_ids, store=store, resume=resume, device=device,
                           batch_size=batch_size, progress=progress, max_memory=max_memory,
                           offload_activations=offload_activations, on_block_done=on_block_done)  # fmt: skip
    _assemble(model, source, out_dir, config, dense_dtype, host.shards(), lambda tmp: finish and finish(tmp, report))
    return report


def _assemble(model, source: Path, out_dir: Path, config: SketchConfig, dense_dtype: str, shards, finish) -> None:
    """Link the shards into a temporary folder with index and config, validate it, rename it onto ``out_dir``."""
    from safetensors import safe_open

    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    total = 0
    for shard, name in zip(shards, names, strict=True):
        with safe_open(str(shard), framework="pt") as fh:
            for key in fh.keys():
                weight_map[key] = name
        total += shard.stat().st_size
    with atomic_path(out_dir, is_dir=True) as tmp:
        for shard, name in zip(shards, names, strict=True):
            try:
                os.link(shard, tmp / name)  # the partial folder stays intact until the rename
            except OSError:
                shutil.copyfile(shard, tmp / name)
        write_json(tmp / SAFETENSORS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
        model.config.quantization_config = config.to_quantization_config()
        model.config.dtype = getattr(torch, dense_dtype)
        model.config.use_cache = read_json(source / "config.json").get("use_cache", True)
        model.config.save_pretrained(tmp)
        if model.can_generate() and (source / "generation_config.json").is_file():
            shutil.copyfile(source / "generation_config.json", tmp / "generation_config.json")
        finish(tmp)
        validate_checkpoint(tmp)
