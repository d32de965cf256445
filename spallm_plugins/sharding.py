"""Sharded training (FSDP2 ``fully_shard``, DeepSpeed ZeRO-3): format v1 in and out of a model whose codes
and tables are sharded.

``SketchedLinear.codes`` is a frozen uint8 ``Parameter``, so FSDP2 (and DeepSpeed ZeRO-3) shard it
like any parameter: ``Shard(0)``, cut into the same row ranges as the layer's tables
(``docs/design-sharding.md``). What sharding changes is the state dict: FSDP2 makes ``state_dict()``
return each rank's ``DTensor`` shard, which is not format v1 and would be saved as such by
``save_pretrained``. The hooks here make a sharded layer read and write format v1 (full tensors,
uint8 codes) as an unsharded one does:

- ``state_dict()`` gathers each ``DTensor`` into a full CPU tensor. This is collective: every rank
  calls ``state_dict()`` (as ``save_pretrained`` and ``get_model_state_dict`` already require).
  Inside :func:`local_state_dict` the shards are kept (for ``torch.distributed.checkpoint``).
- ``load_state_dict(full)`` cuts each full tensor into this rank's shard locally (no communication).
- A tensor that is one rank's shard, or a sharded state dict loaded into an unsharded layer, is a
  ``ValueError`` naming the key instead of a size mismatch or silently wrong rows.

ZeRO-3 partitions every parameter itself (``param.ds_tensor``) and leaves an empty placeholder in
``param.data``, so without these hooks ``state_dict()`` would hold empty tensors. The same hooks gather
a partitioned parameter (``deepspeed.zero.GatheredParameters``, collective) on save and load a full
tensor into its partitions; parameters DeepSpeed has already gathered (its own loaders gather before
calling ``load_state_dict``) are left to the default copy.

The core registers the hooks on ``SketchedLinear``; integrations register them on their own layers
(PEFT's ``SpaLLMLayer`` for ``spallm_tables``) through :func:`register_sharding_hooks`.
``torch.distributed`` is imported only when a sharded tensor can exist.
"""

from __future__ import annotations

import contextlib
import math
import sys
import threading
import types
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["check_deepspeed_config", "check_sharded", "is_sharded", "local_state_dict", "register_sharding_hooks"]

_LOCAL = threading.local()
SHARDED_ATTRIBUTE = "_spallm_sharded_names"  # the parameter names (or child prefixes) a module's hooks convert
ALIGNED_ATTRIBUTE = "_spallm_aligned_names"  # more parameters check_sharded compares with those


def _dtensor_type() -> type | None:
    """``DTensor``, or None when ``torch.distributed.tensor`` was never imported (then none can exist)."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def is_sharded(tensor: torch.Tensor | None) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (what FSDP2 makes of a parameter it shards)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(tensor, cls)


@contextlib.contextmanager
def local_state_dict() -> Iterator[None]:
    """Keep ``state_dict()`` sharded (``DTensor`` values) inside this block.

    For ``torch.distributed.checkpoint`` (DCP), which saves each rank's shards itself and reshards on
    load: gathering full tensors there would cost every rank the whole model's memory.
    """
    depth = getattr(_LOCAL, "depth", 0)
    _LOCAL.depth = depth + 1
    try:
        yield
    finally:
        _LOCAL.depth = depth


def _keeping_shards() -> bool:
    return getattr(_LOCAL, "depth", 0) > 0


def _owned(module: nn.Module, key: str, prefix: str) -> str | None:
    """The name of ``key`` inside ``module`` when it is one of the tensors its hooks convert."""
    if not key.startswith(prefix):
        return None
    rest = key[len(prefix) :]
    for name in getattr(module, SHARDED_ATTRIBUTE, ()):
        if rest == name or rest.startswith(name + "."):
            return rest
    return None


def _zero3_partitioned(param: torch.Tensor) -> bool:
    """Whether ``param`` is a DeepSpeed ZeRO-3 parameter whose data is partitioned away right now."""
    if not hasattr(param, "ds_id"):
        return False
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return param.ds_status == ZeroParamStatus.NOT_AVAILABLE


def _zero3_owned(module: nn.Module, prefix: str) -> dict[str, nn.Parameter]:
    """The ZeRO-3 parameters among ``module``'s converted tensors, by state-dict key."""
    if "deepspeed" not in sys.modules:
        return {}
    return {
        prefix + name: param
        for name, param in module.named_parameters()
        if hasattr(param, "ds_id") and _owned(module, prefix + name, prefix) is not None
    }


def _gather_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: dict) -> None:
    """``state_dict`` post hook: each ``DTensor`` or ZeRO-3 partitioned parameter of ``module`` becomes
    the full tensor (format v1)."""
    if _keeping_shards():
        return
    zero3 = {key: param for key, param in _zero3_owned(module, prefix).items() if key in state_dict}
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(zero3.values())):  # collective: every rank gathers
            for key, param in zero3.items():
                state_dict[key] = param.detach().cpu().clone()
        _disable_prepared_cache(module)
    if _dtensor_type() is None:
        return
    for key in list(state_dict):
        value = state_dict[key]
        if is_sharded(value) and _owned(module, key, prefix) is not None:
            # full_tensor() keeps the dtype (uint8 codes stay uint8); on the CPU, so a whole model's
            # state dict never sits in accelerator memory
            state_dict[key] = value.full_tensor().detach().cpu()
    _disable_prepared_cache(module)


def _world_size_guess(rows: int, full_rows: int) -> int | str:
    """The smallest world size N >= 2 for which FSDP2 (``torch.chunk`` of dim 0) gives some rank ``rows``."""
    for n in range(2, full_rows + 1):
        chunk = math.ceil(full_rows / n)
        if rows in (chunk, full_rows - chunk * (full_rows // chunk)):
            return n
    return "?"


def _shard_error(key: str, value: torch.Tensor, full_rows: int) -> ValueError:
    rows = value.shape[0]
    world = _world_size_guess(rows, full_rows)
    return ValueError(
        f"{key}: {rows} rows where this layer has {full_rows}: it is one rank's shard (world size {world}?), not "
        "format v1; save with state_dict() / save_pretrained() called on every rank of the sharded model "
        "(spallm_plugins.sharding gathers full tensors), or with get_model_state_dict(full_state_dict=True)"
    )


def _distribute_hook(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: dict,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """``load_state_dict`` pre hook: a full (format v1) tensor loads into a sharded parameter as this
    rank's shard; shards and sharded state dicts that cannot be meant are refused by name."""
    _load_zero3(module, state_dict, prefix)
    for key in list(state_dict):
        name = _owned(module, key, prefix)
        if name is None:
            continue
        if _dtensor_type() is not None:
            _fsdp_to_sharded(module.get_submodule(name.rpartition(".")[0]))
        try:
            param = module.get_parameter(name)
        except AttributeError:
            continue  # not a parameter here (e.g. a buffer): the default loader reports it
        value = state_dict[key]
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            continue
        if is_sharded(param) and not is_sharded(value):
            full = tuple(param.shape)
            if tuple(value.shape) == full:
                from torch.distributed.tensor import distribute_tensor

                # src_data_rank=None: every rank holds the full tensor and keeps its own chunk, no communication
                state_dict[key] = distribute_tensor(
                    value.detach().to(device=param.device, dtype=param.dtype),
                    param.device_mesh,
                    param.placements,
                    src_data_rank=None,
                )
            elif value.dim() == len(full) and tuple(value.shape[1:]) == full[1:] and value.shape[0] < full[0]:
                raise _shard_error(key, value, full[0])
        elif is_sharded(value) and not is_sharded(param):
            raise ValueError(
                f"{key}: the state dict comes from a sharded model (a DTensor {value.placements} of shape "
                f"{list(value.shape)}) but this layer is not sharded; gather it first (state_dict() on every rank "
                "of the sharded model gives format v1, unless inside sharding.local_state_dict()), or shard this "
                "model the same way before loading"
            )
        elif not is_sharded(param) and not param.is_meta:
            full = tuple(param.shape)
            if value.dim() == len(full) and tuple(value.shape[1:]) == full[1:] and 0 < value.shape[0] < full[0]:
                raise _shard_error(key, value, full[0])
    _disable_prepared_cache(module)


def _load_zero3(module: nn.Module, state_dict: dict[str, Any], prefix: str) -> None:
    """Copy each full tensor meant for a partitioned ZeRO-3 parameter into its partitions (gathered,
    written, partitioned again: collective, as DeepSpeed's own loading is), and leave the default loader
    the empty placeholder to copy onto itself."""
    owned = {key: param for key, param in _zero3_owned(module, prefix).items() if key in state_dict}
    for key, param in owned.items():
        value = state_dict[key]
        if isinstance(value, torch.Tensor) and tuple(value.shape) != tuple(param.ds_shape):
            raise ValueError(
                f"{key}: shape {list(value.shape)} where this layer has {list(param.ds_shape)}; a ZeRO-3 model loads "
                "format v1 (full tensors: state_dict() called on every rank, or the consolidated 16-bit state dict)"
            )
    partitioned = {key: param for key, param in owned.items() if _zero3_partitioned(param)}
    if not partitioned:
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(partitioned.values()), modifier_rank=0):
        with torch.no_grad():
            for key, param in partitioned.items():
                param.data.copy_(state_dict[key].to(param.dtype))
    for key, param in partitioned.items():
        state_dict[key] = param.detach()


def _fsdp_to_sharded(owner: nn.Module) -> None:
    """Run FSDP2's own load pre hook on ``owner`` now (idempotent: it re-registers the sharded
    parameters). FSDP2 registers it at ``fully_shard``, after ours, and while a module is unsharded
    (the root after a forward) its parameters are plain tensors: we would see no DTensor and the copy
    would then fail with ``aten.copy_.default got mixed torch.Tensor and DTensor``."""
    for wrapped in list(owner._load_state_dict_pre_hooks.values()):
        hook = getattr(wrapped, "hook", wrapped)
        if getattr(hook, "__name__", "") == "to_sharded_hook" and getattr(hook, "__module__", "").startswith(
            "torch.distributed.fsdp"
        ):
            hook()


def register_sharding_hooks(module: nn.Module, names: tuple[str, ...], aligned: tuple[str, ...] = ()) -> None:
    """Make ``module``'s tensors ``names`` (parameter names, or child prefixes such as ``"spallm_tables"``)
    save as full format-v1 tensors when sharded and load full tensors into their shards.

    ``aligned``: more parameters (converted by their own module's hooks) that :func:`check_sharded`
    requires to be sharded like these, e.g. the base layer's codes an adapter's tables index.
    Called once per module (by ``SketchedLinear.__init__``; PEFT's ``SpaLLMLayer`` by the integration).
    """
    first = getattr(module, SHARDED_ATTRIBUTE, None) is None
    setattr(module, SHARDED_ATTRIBUTE, tuple(dict.fromkeys((*getattr(module, SHARDED_ATTRIBUTE, ()), *names))))
    setattr(module, ALIGNED_ATTRIBUTE, tuple(dict.fromkeys((*getattr(module, ALIGNED_ATTRIBUTE, ()), *aligned))))
    if first:
        module.register_state_dict_post_hook(_gather_hook)
        module.register_load_state_dict_pre_hook(_distribute_hook)


def _placement(module: nn.Module, name: str) -> tuple[Any, ...] | None:
    """``(mesh, placements)`` of a sharded parameter, None for an unsharded one."""
    param = module.get_parameter(name)
    if not is_sharded(param):
        return None
    return param.device_mesh, tuple(param.placements)


def _layout(placement: tuple[Any, ...] | None) -> str:
    return "unsharded" if placement is None else f"{list(placement[1])} on {placement[0]}"


def _row_tensors(module: nn.Module) -> list[str]:
    """The parameters of ``module`` whose rows must be sharded together: codes and every table set."""
    names = []
    for name in getattr(module, SHARDED_ATTRIBUTE, ()):
        if _has_parameter(module, name):
            names.append(name)
        elif isinstance(child := getattr(module, name, None), nn.Module):  # a child prefix: all its parameters
            names += [f"{name}.{n}" for n, _ in child.named_parameters()]
    names += [n for n in getattr(module, ALIGNED_ATTRIBUTE, ()) if _has_parameter(module, n)]
    return [n for n in names if n.rsplit(".", 1)[-1] != "bias"]


def _has_parameter(module: nn.Module, name: str) -> bool:
    try:
        module.get_parameter(name)
    except AttributeError:
        return False
    return True


def _disable_prepared_cache(module: nn.Module) -> None:
    """A sharded layer's codes are all-gathered into an unsharded parameter (FSDP2 keeps it, ZeRO-3
    frees it): caching its backend layout (``ops.prepared_codes``) would pin one more full copy of
    every layer on every rank."""
    if hasattr(module, "cache_prepared") and any(
        is_sharded(p) or hasattr(p, "ds_id") for p in module.parameters(recurse=True)
    ):
        module.cache_prepared = False


def check_sharded(model: nn.Module) -> None:
    """Refuse SpaLLM layers whose codes and tables are sharded differently; mark the sharded ones.

    Codes and tables of one layer must both be ``Shard(0)`` on the same mesh (FSDP2's default: the
    same row ranges) or both unsharded. Anything else is a configuration mistake that still runs:
    codes left out of sharding (``ignored_params``, accelerate's ``ignored_modules``) replicate most
    of the model's bytes on every rank, and another placement breaks the row alignment the memo relies
    on. Sharded layers stop caching their backend's codes layout (:func:`_disable_prepared_cache`), and
    their sharded codes stay frozen under ``requires_grad_(True)`` (:func:`_keep_frozen`). Call it once after ``fully_shard`` (nothing calls it for you yet; the save and load hooks turn the
    cache off lazily).
    """
    for module_name, module in model.named_modules():
        names = _row_tensors(module)
        if not names:
            continue
        layouts = {name: _placement(module, name) for name in names}
        distinct = {(None if p is None else (id(p[0]), p[1])) for p in layouts.values()}
        where = module_name or type(module).__name__
        if len(distinct) > 1:
            shown = ", ".join(f"{name} {_layout(p)}" for name, p in layouts.items())
            raise ValueError(
                f"codes and tables of {where} are sharded differently ({shown}): shard them all on dim 0 "
                "(fully_shard's default) on one mesh, or none of them"
            )
        placement = next(iter(layouts.values()))
        if placement is None:
            _disable_prepared_cache(module)  # a ZeRO-3 layer (partitioned by DeepSpeed, not a DTensor)
            continue
        from torch.distributed.tensor import Shard

        if placement[1] != (Shard(0),):
            raise ValueError(
                f"codes and tables of {where} are sharded as {list(placement[1])}: SpaLLM layers are sharded by rows, "
                "Shard(0) (fully_shard's default); drop the shard_placement_fn for them"
            )
        rows = module.get_parameter(names[0]).shape[0]
        if rows < placement[0].size():
            warnings.warn(
                f"{where} has {rows} rows for {placement[0].size()} ranks: some ranks hold none of it",
                UserWarning,
                stacklevel=2,
            )
        _disable_prepared_cache(module)
        for name in names:
            _keep_frozen(module.get_parameter(name))


def _no_grad_requires_grad_(self: torch.Tensor, requires_grad: bool = True) -> torch.Tensor:
    return self


def _keep_frozen(param: torch.Tensor) -> None:
    """FSDP2 puts its own ``nn.Parameter(DTensor)`` in place of each parameter, so sharded codes lose
    ``FrozenCodes``' no-op ``requires_grad_`` and ``model.requires_grad_(True)`` would raise on them again:
    the sharded object gets that method itself (FSDP2 keeps the object for the model's life)."""
    if is_sharded(param) and not param.is_floating_point():
        param.requires_grad_ = types.MethodType(_no_grad_requires_grad_, param)


# DeepSpeed ZeRO options that break SpaLLM's frozen uint8 codes, and why
ZERO3_REFUSED = {
    "zero_quantized_nontrainable_weights": "ZeRO++ would quantize the frozen parameters, and the codes are "
    "already k-bit indices (uint8): quantizing them changes which table value each weight reads",
    "stage3_use_all_reduce_for_fetch_params": "its coalesced fetch requires one dtype per bucket and fails on the "
    "uint8 codes beside float tables (RuntimeError: expected there to be only one unique element ...)",
}


def check_deepspeed_config(config: dict[str, Any] | None, source: str = "the DeepSpeed config") -> None:
    """Refuse the ZeRO options SpaLLM layers cannot train under (:data:`ZERO3_REFUSED`), naming
    ``source`` (the file or argument the config came from) and the key.

    Called by the trainer integrations before training starts, so a run fails in seconds instead of
    after loading a large model (or, for ZeRO++ quantization, training on corrupted codes).
    """
    zero = (config or {}).get("zero_optimization") or {}
    for key, why in ZERO3_REFUSED.items():
        value = zero.get(key)
        if value is True or (isinstance(value, str) and value.lower() == "true"):
            raise ValueError(f"{source}: zero_optimization.{key} is true: {why}; set it to false for SpaLLM models")


# -------------------------------------------------------------------------------------------------
# memory model (``spallm info --world-size N``)

ADAM_BYTES_PER_TABLE_VALUE = 4 + 4 + 8  # PEFT's float32 table copy, its gradient, Adam's two moments


def rows_on_rank(rows: int, world_size: int, rank: int = 0) -> int:
    """Rows of a ``Shard(0)`` parameter that ``rank`` holds under FSDP2 (``torch.chunk`` of dim 0):
    ``ceil(rows / N)`` on the leading ranks, fewer or none on the last."""
    chunk = math.ceil(rows / world_size)
    return max(0, min(chunk, rows - rank * chunk))


def _sharded_numel(shape: tuple[int, ...], world_size: int, rank: int) -> int:
    if not shape:
        return 1
    return rows_on_rank(shape[0], world_size, rank) * math.prod(shape[1:])


def sharded_memory(
    model: nn.Module,
    targets: dict[str, nn.Module],
    config: Any,
    world_size: int,
    dense_bytes: int,
    blocks_name: str | None = None,
    rank: int = 0,
) -> dict[str, int]:
    """Bytes one rank (rank 0, the largest) holds when ``model`` sketched with ``config`` is sharded with
    FSDP2 over ``world_size`` ranks, ``fully_shard`` per decoder block (``blocks_name``) and at the root.

    ``model`` is the dense (meta) model and ``targets`` its linears to sketch; ``config`` a
    :class:`~spallm_plugins.config.SketchConfig`. Every parameter is cut by rows: codes and tables
    ``rows_on_rank(out)`` rows each, the dense rest ``rows_on_rank(dim 0)`` rows; buffers stay whole.
    Training the tables (PEFT ``spallm``, Adam) adds per sharded table value a float32 copy, its
    gradient and two Adam moments; FSDP2 gathers a block's full parameters for its forward and
    backward, the next one's ahead (prefetch), and keeps the root's (outside the blocks) gathered.
    Activations are not counted.
    """
    from .config import packed_width

    table_bytes = torch.empty((), dtype=config.torch_table_dtype()).element_size()
    num_codes = config.num_codes
    sketched_weights = {id(m.weight) for m in targets.values()}
    codes = tables = table_values = dense = 0
    full: dict[str, int] = {}  # unsharded bytes per FSDP unit (block index, or "" for the root)
    full_train: dict[str, int] = {}  # the unit's float32 adapter tables and their gradients, unsharded

    def unit(name: str) -> str:
        if blocks_name and name.startswith(blocks_name + "."):
            return name[len(blocks_name) + 1 :].split(".", 1)[0]
        return ""

    for name, linear in targets.items():
        out_f, in_f = linear.out_features, linear.in_features
        rows = rows_on_rank(out_f, world_size, rank)
        codes += rows * packed_width(in_f, config.bits)
        tables += rows * config.groups_per_row * num_codes * table_bytes
        table_values += rows * config.groups_per_row * num_codes
        key = unit(name)
        full[key] = full.get(key, 0) + out_f * (
            packed_width(in_f, config.bits) + config.groups_per_row * num_codes * table_bytes
        )
        full_train[key] = full_train.get(key, 0) + 8 * out_f * config.groups_per_row * num_codes
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen or id(param) in sketched_weights:
            continue
        seen.add(id(param))
        dense += _sharded_numel(tuple(param.shape), world_size, rank) * dense_bytes
        key = unit(name)
        full[key] = full.get(key, 0) + param.numel() * dense_bytes
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    persistent = codes + tables + dense + buffers
    blocks = [k for k in full if k]
    largest = max((full[k] for k in blocks), default=0)
    largest_train = max((full[k] + full_train.get(k, 0) for k in blocks), default=0)
    prefetch = 2 if len(blocks) > 1 else 1
    optimizer = table_values * ADAM_BYTES_PER_TABLE_VALUE
    gathered = full.get("", 0) + prefetch * largest_train
    return {
        "world_size": world_size,
        "codes_bytes": codes,
        "tables_bytes": tables,
        "dense_bytes": dense,
        "buffer_bytes": buffers,
        "persistent_bytes": persistent,
        "inference_gathered_bytes": full.get("", 0) + prefetch * largest,
        "optimizer_bytes": optimizer,
        "training_gathered_bytes": gathered,
        "training_peak_bytes": persistent + optimizer + gathered,
    }
