"""Format v1 of sketched checkpoints: code packing, tensor names, sharded safetensors, validation.

Packing (along the input dimension, row-major, little-endian bit order inside each byte/word):

* 4-bit: two codes per byte; column ``2j`` in bits 0-3, column ``2j+1`` in bits 4-7.
* 2-bit: four codes per byte; column ``4j+i`` in bits ``2i..2i+1``.
* 3-bit: eight codes per three bytes; the three bytes form a little-endian 24-bit word and column
  ``8j+i`` sits in bits ``3i..3i+2`` of word ``j``.

So ``codes`` has shape ``[out_features, in_features * bits // 8]``, and ``in_features`` is recovered
from it exactly (format v1 requires ``in_features`` to be a multiple of ``8 // bits``, or of 8 for
3-bit). Only safetensors and JSON are written; every write goes to a temporary name first and is
renamed into place, so a killed or failed write leaves the destination as it was.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import torch

from .config import (
    FORMAT_VERSION,
    QUANT_METHOD,
    TABLE_DTYPES,
    SketchConfig,
    SketchConfigError,
    packing_unit,
    unpacked_width,
)

CODES_SUFFIX = ".codes"
TABLES_SUFFIX = ".tables"
BIAS_SUFFIX = ".bias"
SAFETENSORS_INDEX = "model.safetensors.index.json"

# adapters (PEFT method "spallm"): table sets, and codes when their base was dense
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_KEY_PREFIX = "base_model.model."
ADAPTER_TABLES_SUFFIX = ".spallm_tables"
ADAPTER_CODES_SUFFIX = ".spallm_codes"


class CheckpointError(ValueError):
    """A checkpoint on disk is not a valid SpaLLM format-v1 checkpoint; the message says where and why."""


class AdapterBaseMismatchError(ValueError):
    """An adapter's table sets belong to other codes (or sketch settings) than the model it is put on."""


def pack_codes(codes: torch.Tensor, bits: int, name: str = "codes") -> torch.Tensor:
    """Pack integer codes ``[rows, in]`` (values ``0..2**bits-1``) into uint8 ``[rows, in*bits//8]``."""
    if codes.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D tensor of codes, got shape {tuple(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"{name}: expected an integer tensor of codes, got {codes.dtype}")
    rows, cols = codes.shape
    group, _ = packing_unit(bits)
    if cols % group:
        raise ValueError(f"{name}: {cols} columns cannot be packed at {bits} bits (need a multiple of {group})")
    low, high = (int(v) for v in codes.aminmax()) if codes.numel() else (0, 0)
    if low < 0 or high >= (1 << bits):
        bad = high if high >= (1 << bits) else low
        raise ValueError(f"{name}: code {bad} is out of range for {bits}-bit codes (expected 0..{(1 << bits) - 1})")
    c = codes.to(torch.int32)
    if bits == 3:
        c = c.view(rows, cols // 8, 8)
        shifts = torch.arange(0, 24, 3, device=c.device, dtype=torch.int32)
        word = (c << shifts).sum(-1, dtype=torch.int32)
        out = torch.stack([(word >> s) & 0xFF for s in (0, 8, 16)], dim=-1)
        return out.reshape(rows, cols * 3 // 8).to(torch.uint8)
    c = c.view(rows, cols // group, group)
    shifts = torch.arange(0, 8, bits, device=c.device, dtype=torch.int32)
    return (c << shifts).sum(-1, dtype=torch.int32).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 ``[rows, in*bits//8]`` to uint8 codes ``[rows, in]``."""
    rows, cols = packed.shape
    mask = (1 << bits) - 1
    if bits == 3:
        p = packed.to(torch.int32)
        b = p.view(rows, cols // 3, 3)
        word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
        shifts = torch.arange(0, 24, 3, device=p.device, dtype=torch.int32)
        return ((word.unsqueeze(-1) >> shifts) & mask).reshape(rows, cols * 8 // 3).to(torch.uint8)
    # uint8 shifts, one per position in the byte: about 5x faster on a CPU than widening to int32
    fields = [(packed >> shift) & mask for shift in range(0, 8, bits)]
    return torch.stack(fields, dim=-1).reshape(rows, cols * 8 // bits)


# --------------------------------------------------------------------------------------------
# atomic file and directory writes


TEMPORARY_MARK = ".tmp-"  # .{name}.tmp-{pid}-{random}: a folder or file being written
REPLACED_MARK = ".old-"  # .{name}.old-{pid}-{random}: the previous content, removed once the new one is in place


class OutputError(ValueError):
    """An output location cannot be written without losing data, or at all; the message names the path."""


class OutputSpaceError(OutputError):
    """The device ran out of space while an output was written (nothing partial is left at the destination)."""


def output_path(dest: str | os.PathLike) -> Path:
    """``dest`` as an absolute path with ``.`` and ``..`` folded, so ``--out .`` has a name and a parent."""
    return Path(os.path.abspath(os.path.expanduser(os.fspath(dest))))


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def is_disk_full(err: BaseException) -> bool:
    """True for "no space left" from the OS or from safetensors (which reports it as its own error type)."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return type(err).__name__ == "SafetensorError" and "No space left" in str(err)


def _space_error(dest: Path) -> OutputSpaceError:
    try:
        free = f"{shutil.disk_usage(dest.parent).free / (1 << 20):.1f} MiB free now"
    except OSError:
        free = "free space unknown"
    return OutputSpaceError(
        f"{dest}: no space left on the device while writing it ({free}); nothing partial was left there: "
        "free some space or choose another location, then run again (a calibrated sketch continues with --resume)"
    )


def _apply_umask(folder: Path) -> None:
    """Give a folder written by libraries that use private temporaries (0600 files) the umask's modes."""
    mask = current_umask()
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~mask)


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``dest``; on success rename it onto ``dest``, on error delete it.

    For directories the previous ``dest`` is moved aside first and removed only after the new one is
    in place, so at every instant ``dest`` is either the complete old or the complete new content
    (a kill between the two renames leaves the old content under ``.NAME.old-*``, which the next
    :func:`spallm_plugins.outputs.remove_stale_temporaries` puts back). Temporaries carry the writer's
    pid, so a later run can tell a killed writer's leftovers from a live one's. The result gets the
    permissions the umask allows (as ``mkdir`` would), not ``mkdtemp``'s private 0700.
    """
    dest = output_path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{dest.name}{TEMPORARY_MARK}{os.getpid()}-"
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=dest.parent))
        os.chmod(tmp, 0o777 & ~current_umask())
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=dest.parent)
        os.close(fd)
        tmp = Path(name)
        os.chmod(tmp, 0o666 & ~current_umask())
    try:
        yield tmp
        if is_dir:
            _apply_umask(tmp)
            old = None
            if dest.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{dest.name}{REPLACED_MARK}{os.getpid()}-", dir=dest.parent))
                os.rmdir(old)
                os.replace(dest, old)
            os.replace(tmp, dest)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        else:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, dest)
    except BaseException as err:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        if is_disk_full(err):
            raise _space_error(dest) from err
        raise


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file; invalid JSON is a :class:`CheckpointError` naming the file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: invalid JSON ({err})") from None


def write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_tensors(
    directory: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    *,
    prefix: str = "model",
    max_shard_bytes: int = 4 << 30,
    metadata: dict[str, str] | None = None,
) -> list[str]:
    """Write ``tensors`` as safetensors shards (plus an index when more than one) into ``directory``.

    Each file is written atomically. Returns the file names written.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    meta = {"format": "pt", **(metadata or {})}
    if len(shards) == 1:
        files = [f"{prefix}.safetensors"]
    else:
        files = [f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for fname, shard in zip(files, shards, strict=True):
        with atomic_path(directory / fname) as tmp:
            save_file(shard, str(tmp), metadata=meta)
    if len(files) > 1:
        weight_map = {name: fname for fname, shard in zip(files, shards, strict=True) for name in shard}
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        write_json(
            directory / f"{prefix}.safetensors.index.json",
            {"metadata": {"total_size": total}, "weight_map": weight_map},
        )
    return files


def safetensors_files(directory: str | os.PathLike, prefix: str = "model") -> list[Path]:
    """The safetensors files of a checkpoint folder, via its index when it has one."""
    directory = Path(directory)
    index = directory / f"{prefix}.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index}: not a valid safetensors index ({err})") from None
        files = sorted({directory / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index}: lists shard(s) that do not exist: {missing}")
        return files
    single = directory / f"{prefix}.safetensors"
    if single.is_file():
        return [single]
    return sorted(directory.glob(f"{prefix}*.safetensors"))


def refuse_pickle_weights(directory: str | os.PathLike) -> None:
    """A folder whose weights are only ``pytorch_model*.bin`` pickles: refused before anything reads them.

    spallm reads safetensors only (a pickle can run code, and ``weights_only`` loads fail with a raw
    trace); the message gives the one-time conversion.
    """
    directory = Path(directory)
    pickles = sorted(directory.glob("pytorch_model*.bin"))
    if not pickles or safetensors_files(directory):
        return
    raise CheckpointError(
        f"{pickles[0]}: a pickle checkpoint (.bin); spallm reads safetensors weights only and never unpickles. "
        f'If you trust the file, convert the folder once: python -c "from transformers import '
        f"AutoModelForCausalLM as M; M.from_pretrained('{directory}').save_pretrained('{directory}-safetensors')\""
    )


def read_tensors(
    directory: str | os.PathLike, prefix: str = "model", device: str = "cpu", names: Collection[str] | None = None
) -> dict[str, torch.Tensor]:
    """Read the tensors of a (possibly sharded) safetensors checkpoint: every one, or only ``names``."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in safetensors_files(directory, prefix):
        try:
            if names is None:
                out.update(load_file(str(f), device=device))
                continue
            with safe_open(str(f), framework="pt", device=device) as fh:
                out.update({n: fh.get_tensor(n) for n in fh.keys() if n in names})
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{f}: cannot read safetensors file ({err})") from None
    return out


class _TensorHeader:
    """Shape and dtype of a stored tensor, read from the safetensors header without loading data."""

    def __init__(self, shape: tuple[int, ...], dtype: str, file: Path):
        self.shape, self.dtype, self.file = shape, dtype, file


_ST_DTYPES = {"U8": "uint8", "I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64", "F16": "float16",
              "BF16": "bfloat16", "F32": "float32", "F64": "float64", "BOOL": "bool"}  # fmt: skip


def read_headers(directory: str | os.PathLike, prefix: str = "model") -> dict[str, _TensorHeader]:
    return read_file_headers(safetensors_files(directory, prefix))


def read_file_headers(files: list[str | os.PathLike]) -> dict[str, _TensorHeader]:
    """Tensor shapes and dtypes of safetensors files, from their JSON headers alone."""
    headers: dict[str, _TensorHeader] = {}
    for f in map(Path, files):
        try:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                if n <= 0 or n > 100_000_000 or n + 8 > f.stat().st_size:
                    raise ValueError("header length out of range")
                header = json.loads(fh.read(n))
        except (ValueError, OSError) as err:
            raise CheckpointError(f"{f}: not a valid safetensors file ({err})") from None
        data_end = max((info["data_offsets"][1] for k, info in header.items() if k != "__metadata__"), default=0)
        if 8 + n + data_end > f.stat().st_size:
            raise CheckpointError(
                f"{f}: truncated safetensors file ({f.stat().st_size} bytes, its header needs {8 + n + data_end})"
            )
        for name, info in header.items():
            if name == "__metadata__":
                continue
            headers[name] = _TensorHeader(tuple(info["shape"]), _ST_DTYPES.get(info["dtype"], info["dtype"]), f)
    return headers


def load_quantization_config(directory: str | os.PathLike) -> SketchConfig:
    """Read and validate ``config.json["quantization_config"]`` of a sketched checkpoint folder."""
    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    if not cfg_path.is_file():
        raise CheckpointError(f"{directory}: no config.json (expected a Hugging Face model folder)")
    qc = read_json(cfg_path).get("quantization_config")
    if qc is None:
        raise CheckpointError(f"{cfg_path}: no quantization_config (not a sketched checkpoint)")
    if qc.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(
            f"{cfg_path}: quantization_config.quant_method={qc.get('quant_method')!r}, expected {QUANT_METHOD!r}"
        )
    if qc.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{cfg_path}: quantization_config.format_version={qc.get('format_version')!r}; "
            f"this spallm-plugins reads format_version {FORMAT_VERSION}"
        )
    try:
        return SketchConfig.from_dict(qc, where=f"{cfg_path} quantization_config")
    except SketchConfigError as err:
        raise CheckpointError(str(err)) from None


def validate_sketched_tensors(
    shapes: dict[str, tuple[tuple[int, ...], str]], config: SketchConfig, where: str
) -> list[str]:
    """Check codes/tables pairs given ``name -> (shape, dtype)``; return the sketched module prefixes."""
    prefixes = sorted(n[: -len(CODES_SUFFIX)] for n in shapes if n.endswith(CODES_SUFFIX))
    table_prefixes = {n[: -len(TABLES_SUFFIX)] for n in shapes if n.endswith(TABLES_SUFFIX)}
    for orphan in sorted(table_prefixes - set(prefixes)):
        raise CheckpointError(f"{where}: tensor {orphan}{TABLES_SUFFIX} has no matching {orphan}{CODES_SUFFIX}")
    for p in prefixes:
        codes_name, tables_name = p + CODES_SUFFIX, p + TABLES_SUFFIX
        cshape, cdtype = shapes[codes_name]
        if cdtype != "uint8":
            raise CheckpointError(f"{where}: tensor {codes_name} has dtype {cdtype}, expected uint8 packed codes")
        if len(cshape) != 2:
            raise CheckpointError(
                f"{where}: tensor {codes_name} has shape {list(cshape)}, expected [out_features, packed]"
            )
        out_features, packed = cshape
        if (packed * 8) % config.bits:
            raise CheckpointError(
                f"{where}: tensor {codes_name} width {packed} is not a whole number of {config.bits}-bit codes"
            )
        in_features = unpacked_width(packed, config.bits)
        if in_features % config.groups_per_row:
            raise CheckpointError(
                f"{where}: {p}: groups_per_row={config.groups_per_row} does not divide in_features={in_features}"
            )
        if tables_name not in shapes:
            raise CheckpointError(f"{where}: tensor {codes_name} has no matching {tables_name}")
        tshape, tdtype = shapes[tables_name]
        expected = (out_features, config.groups_per_row, config.num_codes)
        if tuple(tshape) != expected:
            raise CheckpointError(
                f"{where}: tensor {tables_name} has shape {list(tshape)}, expected {list(expected)} "
                f"(out_features, groups_per_row={config.groups_per_row}, 2**bits={config.num_codes})"
            )
        if tdtype not in TABLE_DTYPES:
            raise CheckpointError(f"{where}: tensor {tables_name} has dtype {tdtype}, expected one of {TABLE_DTYPES}")
        bias_name = p + BIAS_SUFFIX
        if bias_name in shapes:
            bshape, bdtype = shapes[bias_name]
            if tuple(bshape) != (out_features,):
                raise CheckpointError(
                    f"{where}: tensor {bias_name} has shape {list(bshape)}, expected [{out_features}]"
                )
            if bdtype not in TABLE_DTYPES:
                raise CheckpointError(
                    f"{where}: tensor {bias_name} has dtype {bdtype}, expected a float dtype ({', '.join(TABLE_DTYPES)})"
                )
    return prefixes


def check_finite_tables(directory: str | os.PathLike, prefixes: Collection[str], prefix: str = "model") -> None:
    """Refuse tables holding NaN or infinity (a damaged or diverged checkpoint), naming the tensor.

    Reads only the ``P.tables`` tensors (a few MB even for 70B models), never the codes.
    """
    names = {p + TABLES_SUFFIX for p in prefixes}
    for name, tensor in read_tensors(directory, prefix, names=names).items():
        if not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(
                f"{directory}: tensor {name} holds {bad} non-finite value(s) (NaN or inf); "
                "the checkpoint is damaged or its fine-tune diverged"
            )


def validate_checkpoint_files(
    directory: str | os.PathLike, *, check_values: bool = True
) -> tuple[SketchConfig, list[str]]:
    """Validate a sketched checkpoint folder from its files alone (no model, no transformers).

    Checks format version and config keys, that every ``P.codes`` is packed uint8 with a matching
    ``P.tables`` of shape ``[out, groups_per_row, 2**bits]``, group divisibility, bias shapes and
    dtypes, and (``check_values``) that every table value is finite. Returns the config and the
    sketched module prefixes; raises :class:`CheckpointError` naming the file and tensor otherwise.
    Checks against the model's architecture are in :mod:`spallm_plugins.validate`.
    """
    config = load_quantization_config(directory)
    headers = read_headers(directory)
    if not headers:
        raise CheckpointError(f"{directory}: no safetensors weights found")
    shapes = {n: (h.shape, h.dtype) for n, h in headers.items()}
    prefixes = validate_sketched_tensors(shapes, config, str(directory))
    if not prefixes:
        raise CheckpointError(f"{directory}: quantization_config says spallm but no '*.codes' tensors are stored")
    if check_values:
        check_finite_tables(directory, prefixes)
    return config, prefixes


def stored_sketch_tensors(directory: str | os.PathLike, prefix: str = "model") -> list[str]:
    """Names of ``P.codes`` / ``P.tables`` tensors in a folder's safetensors files (headers only)."""
    return sorted(n for n in read_headers(directory, prefix) if n.endswith(CODES_SUFFIX) or n.endswith(TABLES_SUFFIX))


def refuse_sketch_without_config(directory: str | os.PathLike) -> None:
    """A folder storing sketched tensors whose ``config.json`` lacks a SpaLLM ``quantization_config``.

    transformers would load it as a dense model with random weights and only warn; every spallm
    entry point calls this first and refuses such a folder, naming a tensor.
    """
    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not cfg_path.is_file() or not safetensors_files(directory):
        return
    quant = read_json(cfg_path).get("quantization_config") or {}
    if quant.get("quant_method") == QUANT_METHOD:
        return
    found = stored_sketch_tensors(directory)
    if found:
        what = f"quant_method={quant.get('quant_method')!r}" if quant else "no quantization_config"
        raise CheckpointError(
            f"{cfg_path}: {what}, but the weights store sketched tensors (e.g. {found[0]}); loaded as a dense "
            "model they would be random weights. Restore the SpaLLM quantization_config (quant_method: "
            '"spallm", bits, groups_per_row, ...) written by `spallm sketch`'
        )


# --------------------------------------------------------------------------------------------
# adapters: table sets saved by the PEFT method, read without PEFT


def read_adapter(
    adapter_dir: str | os.PathLike,
) -> tuple[dict[str, Any], SketchConfig, dict[str, dict[str, torch.Tensor]]]:
    """``(adapter_config, sketch settings, {module: {"tables": t, "codes": c?}})`` of a saved adapter."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    cfg_path, weights = adapter_dir / ADAPTER_CONFIG_NAME, adapter_dir / ADAPTER_WEIGHTS_NAME
    for path in (cfg_path, weights):
        if not path.is_file():
            raise CheckpointError(f"{adapter_dir}: no {path.name} (expected a saved SpaLLM adapter folder)")
    cfg = read_json(cfg_path)
    if cfg.get("peft_type") != "SPALLM":
        raise CheckpointError(f"{cfg_path}: peft_type={cfg.get('peft_type')!r}, expected 'SPALLM'")
    fields = {k: cfg[k] for k in SketchConfig.field_names() if k in cfg and k != "target_modules"}
    try:
        sketch = SketchConfig.from_dict(fields, where=str(cfg_path))
    except SketchConfigError as err:
        raise CheckpointError(str(err)) from None
    read_file_headers([weights])  # names a truncated or malformed file before loading it
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in load_file(str(weights)).items():
        key = name.removeprefix(ADAPTER_KEY_PREFIX)
        for suffix, kind in ((ADAPTER_TABLES_SUFFIX, "tables"), (ADAPTER_CODES_SUFFIX, "codes")):
            if key.endswith(suffix):
                modules.setdefault(key[: -len(suffix)], {})[kind] = tensor
    for module, parts in modules.items():
        if "tables" not in parts:
            raise CheckpointError(f"{weights}: codes for {module} but no {ADAPTER_TABLES_SUFFIX} tensor")
        want = (parts["tables"].shape[0], sketch.groups_per_row, sketch.num_codes)
        if tuple(parts["tables"].shape) != want or not parts["tables"].is_floating_point():
            raise CheckpointError(
                f"{weights}: tensor {ADAPTER_KEY_PREFIX}{module}{ADAPTER_TABLES_SUFFIX} is {parts['tables'].dtype} "
                f"{list(parts['tables'].shape)}, expected a float tensor of shape {list(want)}"
            )
        if not torch.isfinite(parts["tables"]).all():
            raise CheckpointError(
                f"{weights}: tensor {ADAPTER_KEY_PREFIX}{module}{ADAPTER_TABLES_SUFFIX} holds non-finite values "
                "(NaN or inf); the fine-tune diverged or the file is damaged"
            )
    if not modules:
        raise CheckpointError(f"{weights}: no {ADAPTER_TABLES_SUFFIX} tensors")
    return cfg, sketch, modules


# --------------------------------------------------------------------------------------------
# identity of a set of codes (adapters name the codes they were trained on)

FINGERPRINT_PREFIX = "sha256:"


def codes_fingerprint(named_codes: dict[str, torch.Tensor]) -> str:
    """A digest of packed codes by module name: equal only for the same layers with the same codes.

    A table set means nothing on other codes, so an adapter records the fingerprint of the codes it
    was trained on and refuses a base whose codes differ. Names are included (sorted), so the same
    codes under other module names also differ.
    """
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(named_codes):
        codes = named_codes[name]
        if codes.dtype != torch.uint8:
            raise CheckpointError(f"codes of {name} have dtype {codes.dtype}, expected torch.uint8")
        digest.update(f"{name}:{list(codes.shape)};".encode())
        digest.update(codes.detach().contiguous().cpu().numpy())  # buffer protocol: no copy
    return FINGERPRINT_PREFIX + digest.hexdigest()


def check_codes_fingerprint(
    adapter_config: dict[str, Any], base_named_codes: dict[str, torch.Tensor] | str, *, adapter: str, base: str
) -> None:
    """The one policy for putting a table set on a base: its recorded codes fingerprint must match.

    ``base_named_codes``: the base's codes of the adapted layers (or their fingerprint, when cached).
    An adapter without ``base_codes_fingerprint`` is refused everywhere (PEFT, merge, vLLM): its
    tables cannot be checked against codes, and on other codes they are silent garbage.
    """
    expected = adapter_config.get("base_codes_fingerprint")
    if not expected:
        raise AdapterBaseMismatchError(
            f"{adapter}: adapter_config.json has no base_codes_fingerprint, so the codes it was trained on cannot "
            f"be checked against {base}. If it was trained on that base, record its fingerprint with "
            f"`spallm fingerprint {adapter} --base BASE_DIR` (re-saves adapter_config.json)"
        )
    actual = base_named_codes if isinstance(base_named_codes, str) else codes_fingerprint(base_named_codes)
    if actual != expected:
        raise AdapterBaseMismatchError(
            f"{adapter}: trained on codes with fingerprint {expected[:19]}..., but {base} has other codes "
            f"({actual[:19]}...): use the base it was trained on "
            f"({adapter_config.get('base_model_name_or_path')})"
        )
