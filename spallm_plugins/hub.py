"""Hugging Face Hub ids as model and adapter references: resolved to a cached snapshot folder.

``org/name`` (when no local path of that name exists) is fetched with ``huggingface_hub.snapshot_download``
into the user's Hugging Face cache, as ``from_pretrained`` would, but only the files spallm reads:
safetensors weights, configs, tokenizer and generation files, adapter files and the model card. Pickle
weights (``*.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``) are never downloaded, so nothing is ever unpickled,
and a repo that holds only those is refused. ``HF_HUB_OFFLINE``, ``HF_HUB_CACHE`` and ``HF_HOME`` are
read when a reference is resolved (not when the package is imported), so they work as users expect.
Everything else reads the returned folder as a local one; :func:`hub_origin` tells, for such a folder,
which repo and commit it came from (for model cards and reports).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from urllib.parse import parse_qsl

from .format import CheckpointError

# what a model or adapter folder needs (top-level names; transformers reads nothing else for a causal LM)
MODEL_FILES = (
    "model*.safetensors",
    "model*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "adapter_config.json",
    "adapter_model.safetensors",
    "sketch_report.json",
    "README.md",
)
# ``spallm info`` works from config.json alone: no weights are fetched for it
CONFIG_FILES = ("config.json",)
PICKLE_FILES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
# ``org/name``: Hub ids have exactly one slash; a local path that does not exist is also tried as one
REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]*[A-Za-z0-9_]")
CACHE_FOLDER = re.compile(r"models--(?P<repo>.+)")
COMMIT = re.compile(r"[0-9a-f]{40}")
HUB_DATASET_PREFIX = "hf://datasets/"
HUB_DATASET_SYNTAX = "hf://datasets/ORG/NAME[@REVISION][?config=C&split=S&column=COL&data_files=GLOB]"
HUB_DATASET_KEYS = ("config", "split", "column", "data_files")


class ModelNotFoundError(FileNotFoundError):
    """A model reference that is neither a local folder, a GGUF file, the embedded default, nor a Hub id
    that is cached or can be fetched."""


@dataclass(frozen=True)
class HubOrigin:
    """Where a resolved snapshot folder came from: ``repo_id`` at ``commit`` (40 hex digits)."""

    repo_id: str
    commit: str

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.commit}"


def looks_like_repo_id(ref: str | os.PathLike) -> bool:
    """Whether ``ref`` has the shape of a Hub model id (``org/name``, no ``--`` or ``..``)."""
    text = os.fspath(ref)
    return bool(REPO_ID.fullmatch(text)) and "--" not in text and ".." not in text and not text.endswith(".gguf")


def parse_dataset_ref(spec: str) -> tuple[str, str | None, dict[str, str]]:
    """``(repo id, revision or None, options)`` of ``hf://datasets/ORG/NAME[@REV][?options]``; a ValueError
    naming the syntax for anything else."""
    rest, _, query = spec.removeprefix(HUB_DATASET_PREFIX).partition("?")
    repo_id, _, revision = rest.partition("@")
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(options) - set(HUB_DATASET_KEYS))
    if repo_id.count("/") > 1 or not repo_id.strip("/") or unknown:
        why = f"unknown option(s) {unknown}" if unknown else "expected a dataset id"
        raise ValueError(f"{spec}: {why}; the syntax is {HUB_DATASET_SYNTAX}")
    return repo_id, revision or None, options


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, from the environment now: ``HF_HUB_CACHE``, else ``HF_HOME/hub``
    (``HF_HOME`` defaulting to ``$XDG_CACHE_HOME/huggingface``, else ``~/.cache/huggingface``)."""
    env = os.environ
    explicit = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(explicit)).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or Path.home() / ".cache", "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as set now, or as huggingface_hub read it at import."""
    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    if flag.strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def hub_origin(path: str | os.PathLike) -> HubOrigin | None:
    """For a folder in the hub cache layout (``models--org--name/snapshots/<commit>``), its repo and
    commit; ``None`` for any other folder."""
    path = Path(path)
    repo = CACHE_FOLDER.fullmatch(path.parent.parent.name)
    if path.parent.name != "snapshots" or not COMMIT.fullmatch(path.name) or repo is None:
        return None
    return HubOrigin(repo["repo"].replace("--", "/"), path.name)


def hub_record(path: str | os.PathLike, revision: str | None = None) -> dict[str, str] | None:
    """``{"repo_id", "revision" (as asked, default main), "commit"}`` of a resolved snapshot folder, for reports
    (``sketch_report.json``'s ``source_hub``, ``merge_report.json``'s ``base_hub`` / ``adapter_hub``)."""
    origin = hub_origin(path)
    if origin is None:
        return None
    return {"repo_id": origin.repo_id, "revision": revision or "main", "commit": origin.commit}


def _cached_revisions(repo_folder: Path) -> str:
    """``main -> 0123abc, v1 -> ...`` for a repo folder of the cache (what a user could ask for instead)."""
    refs = sorted(p for p in (repo_folder / "refs").rglob("*") if p.is_file()) if repo_folder.is_dir() else []
    names = [f"{p.relative_to(repo_folder / 'refs').as_posix()} -> {p.read_text().strip()[:7]}" for p in refs]
    snapshots = repo_folder / "snapshots"
    names += [s.name[:7] for s in sorted(snapshots.iterdir())] if snapshots.is_dir() and not names else []
    return ", ".join(names) or "nothing"


def _not_found(repo_id: str, revision: str, err: Exception, offline: bool, repo_type: str) -> ModelNotFoundError:
    """The one line for an id that is neither cached nor reachable: the id, the revision, what was tried."""
    from huggingface_hub import errors
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    incomplete = getattr(errors, "IncompleteSnapshotError", ())  # huggingface_hub >= 1.x

    cache = hub_cache_dir()
    repo_folder = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    if repo_folder.is_dir():
        cached = f"the Hugging Face cache ({cache}) holds {_cached_revisions(repo_folder)} for it, not {revision!r}"
    else:
        cached = f"not in the Hugging Face cache ({cache}; set HF_HOME or HF_HUB_CACHE to use another)"
    if incomplete and isinstance(err, incomplete):
        cached = f"the cached snapshot in {cache} misses files ({str(err).split(': ', 1)[-1].split('. ')[0]})"
    cause = err.__cause__ or err
    if offline:
        asked = "HF_HUB_OFFLINE=1, so the Hub was not asked (unset it to download)"
    elif isinstance(err, GatedRepoError):
        asked = "the Hub says the repo is gated: accept its terms on huggingface.co and log in (hf auth login)"
    elif isinstance(err, RevisionNotFoundError):
        asked = f"the Hub has no revision {revision!r} in it (a branch, tag or commit of the repo)"
    elif isinstance(err, RepositoryNotFoundError):
        asked = "the Hub has no such repo, or it is private and no token was given (HF_TOKEN or hf auth login)"
    else:
        reason = " ".join(str(cause).split())[:200]
        asked = f"the Hub could not be reached ({type(cause).__name__}: {reason})"
    return ModelNotFoundError(f"{repo_id}@{revision}: no local folder of that name; {cached}; {asked}")


def _refuse_pickle_only(folder: Path, repo_id: str, revision: str, commit: str) -> None:
    """A repo whose weights are only pickles (``pytorch_model.bin``...): refused, naming it, before any read.

    The names come from the snapshot folder and, where huggingface_hub cached it, the repo's file listing
    (the pickles themselves were never downloaded)."""
    names = {p.name for p in folder.iterdir()}
    try:
        from huggingface_hub import get_cached_repo_tree

        names |= {f.path for f in get_cached_repo_tree(repo_id, revision=commit, cache_dir=hub_cache_dir())}
    except Exception:  # older huggingface_hub, or no listing cached (offline): the folder's names must do
        pass
    if any(fnmatch(n, "*.safetensors") for n in names):
        return
    pickles = sorted(n for n in names if "/" not in n and any(fnmatch(n, p) for p in PICKLE_FILES))
    if not pickles:
        raise CheckpointError(
            f"{repo_id}@{revision}: the repo holds no safetensors weights (model*.safetensors or "
            f"adapter_model.safetensors; snapshot {folder})"
        )
    raise CheckpointError(
        f"{repo_id}@{revision}: the repo holds only pickle weights ({', '.join(pickles)}); spallm downloads "
        "safetensors only and never unpickles. "
        f'If you trust it, convert it once: python -c "from transformers import AutoModelForCausalLM as M; '
        f"M.from_pretrained('{repo_id}', revision='{revision}').save_pretrained('{repo_id.split('/')[-1]}-safetensors')\" "
        "and pass that folder"
    )


def _network_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client errors huggingface_hub may let through: its client is httpx (1.x), httpx2 (2.x) or requests."""
    import importlib

    found = []
    for module, name in (("httpx", "HTTPError"), ("httpx2", "HTTPError"), ("requests", "RequestException")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def download_snapshot(
    repo_id: str,
    revision: str | None = None,
    *,
    files: tuple[str, ...] = MODEL_FILES,
    need_weights: bool = True,
    repo_type: str = "model",
) -> Path:
    """The cached snapshot folder of ``repo_id`` (a ``repo_type`` repo: model or dataset) at ``revision``
    (default: the repo's main branch), fetching only ``files`` (patterns) unless offline. Raises :class:`ModelNotFoundError` (one line) when it is neither
    cached nor reachable, and ``CheckpointError`` for a repo without safetensors weights (``need_weights``)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as err:
        raise ModelNotFoundError(
            f"{repo_id}: a Hub id needs huggingface_hub ({err}); pip install huggingface_hub"
        ) from None
    asked = revision or "main"
    offline = hub_offline()
    try:
        folder = snapshot_download(
            repo_id, repo_type=repo_type, revision=asked, cache_dir=hub_cache_dir(), allow_patterns=list(files),
            ignore_patterns=list(PICKLE_FILES), local_files_only=offline,
        )  # fmt: skip
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, *_network_errors()) as err:
        if isinstance(err, OSError) and err.filename:
            raise  # the cache's file system (full, read-only): the CLI names the path
        raise _not_found(repo_id, asked, err, offline, repo_type) from None
    folder = Path(folder)
    if need_weights:
        _refuse_pickle_only(folder, repo_id, asked, folder.name)
    return folder


def resolve_hub_ref(
    ref: str | os.PathLike, revision: str | None = None, *, files: tuple[str, ...] = MODEL_FILES, need_weights=True
) -> Path | None:
    """``ref`` as a Hub snapshot folder when it is a Hub id and no local path; ``None`` when it is not one.

    A ``revision`` given with a local path is an error (it would be silently ignored otherwise)."""
    if Path(ref).exists() and revision is not None:
        raise ValueError(f"{ref}: --revision {revision} applies to Hugging Face Hub ids (org/name), not local paths")
    if Path(ref).exists() or not looks_like_repo_id(ref):
        return None
    return download_snapshot(os.fspath(ref), revision, files=files, need_weights=need_weights)
