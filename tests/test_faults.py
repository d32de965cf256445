"""Faults a user meets (#35): a kill between the renames of --overwrite, two runs on one folder, Ctrl-C,
unreadable inputs. Each test failed before its fix."""

from __future__ import annotations

import pytest


@pytest.fixture
def adapter_dir(tmp_path, sketched_dir):
    """A saved SpaLLM adapter (perturbed tables) on ``sketched_dir``."""
    pytest.importorskip("peft")
    from peft import get_peft_model

    from spallm_plugins.integrations.peft import SpaLLMConfig
    from spallm_plugins.pipeline import load_sketched

    base, _ = load_sketched(sketched_dir)
    path = tmp_path / "adapter"
    get_peft_model(base, SpaLLMConfig(task_type="CAUSAL_LM", init_weights=False)).save_pretrained(path)
    return path


def test_a_restored_output_counts_as_non_empty_and_is_not_overwritten(tmp_path, sketched_dir, adapter_dir):
    from spallm_plugins.format import OutputError
    from spallm_plugins.merge import merge_adapter

    out = tmp_path / "MO"
    merge_adapter(sketched_dir, adapter_dir, out)
    (out / "user_note.txt").write_text("mine")
    out.rename(tmp_path / ".MO.old-999999-x")  # killed between the two renames of --overwrite
    with pytest.raises(OutputError, match="already exists and is not empty"):
        merge_adapter(sketched_dir, adapter_dir, out)
    assert (out / "user_note.txt").read_text() == "mine"
    assert not list(tmp_path.glob(".MO.*"))
