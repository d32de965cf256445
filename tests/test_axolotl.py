"""``adapter: spallm`` through Axolotl's own CLI (nox session ``axolotl``; skipped where Axolotl is absent)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import needs, run_python, sketched_default_model, tiny_llama, tiny_tokenizer

needs("axolotl", "nox -s axolotl installs it")

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "axolotl" / "smollm2-cpu-quickstart.yml"
AXOLOTL_ENV = {"AXOLOTL_DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
ROWS = [
    {"instruction": f"What is the capital of {c}?", "input": "", "output": f"SpaLLM says: {cap} is the capital of {c}."}
    for c, cap in [("France", "Paris"), ("Spain", "Madrid"), ("Japan", "Tokyo"), ("Egypt", "Cairo"),
                   ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Norway", "Oslo"), ("Chile", "Santiago")]
]  # fmt: skip


def axolotl(*args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "axolotl.cli.main", *args], cwd=cwd, capture_output=True, text=True,
        input=stdin, timeout=1200,
        env={**os.environ, **AXOLOTL_ENV, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"},
    )  # fmt: skip
    if proc.returncode != 0:
        raise AssertionError(
            f"axolotl {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-5000:]}\n{proc.stderr[-8000:]}"
        )
    return proc


@pytest.fixture(scope="module")
def sketched_smollm2(tmp_path_factory) -> Path:
    """SmolLM2 at groups_per_row 1, the base the vLLM session sketches too: nox shares it between sessions."""
    return sketched_default_model(tmp_path_factory, groups_per_row=1)


def write_config(workdir: Path, base: Path, **overrides) -> Path:
    """The CPU recipe, pointed at this test's base model, data and output folders."""
    cfg = yaml.safe_load(RECIPE.read_text())
    (workdir / "instructions.json").write_text(json.dumps(ROWS))
    cfg.update(
        base_model=str(base), datasets=[{"path": str(workdir / "instructions.json"), "type": "alpaca", "ds_type": "json"}],
        dataset_prepared_path=str(workdir / "prepared"), output_dir=str(workdir / "out"), max_steps=8,
        save_steps=4, sequence_len=64, micro_batch_size=2, spallm={**cfg["spallm"], "groups_per_row": 1},
    )  # fmt: skip
    cfg.update(overrides)
    path = workdir / "config.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def losses(output: str) -> list[float]:
    found = []
    for line in output.splitlines():
        if "'loss':" in line or '"loss":' in line:
            try:
                found.append(float(line.split("loss")[1].split(",")[0].strip("'\": ")))
            except ValueError:
                continue
    return found


FRESH_LOAD = """
import sys, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from peft import PeftModel
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sys.argv[1]), sys.argv[2])
ids = torch.arange(1, 25).view(2, 12) * 37
with torch.no_grad():
    save_file({"logits": model(ids).logits}, sys.argv[3])
"""


def test_train_saves_a_peft_adapter_that_loads_in_a_fresh_process(tmp_path, sketched_smollm2):
    config = write_config(tmp_path, sketched_smollm2, max_steps=8, save_steps=100)
    proc = axolotl("train", str(config), cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert "trainable table values" in log
    assert "SpaLLMShardingCallback checks" in log  # add_callbacks_post_trainer ran
    curve = losses(log)
    assert len(curve) >= 4 and min(curve[-3:]) < curve[0]
    out = tmp_path / "out"
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "SPALLM"
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        assert all(k.endswith(".spallm_tables") for k in f.keys())
    run_python(FRESH_LOAD, str(sketched_smollm2), str(out), str(tmp_path / "fresh.safetensors"))
    from peft import PeftModel

    from spallm_plugins.pipeline import load_sketched

    base, _ = load_sketched(sketched_smollm2)
    model = PeftModel.from_pretrained(base, out)
    with torch.no_grad():
        expected = model(torch.arange(1, 25).view(2, 12) * 37).logits
    assert torch.equal(load_file(tmp_path / "fresh.safetensors")["logits"], expected)


def test_merge_lora_gives_a_sketched_checkpoint_equal_to_adapter_on_base(tmp_path, sketched_smollm2):
    config = write_config(tmp_path, sketched_smollm2, max_steps=3, save_steps=100)
    axolotl("train", str(config), cwd=tmp_path)
    axolotl("merge-lora", str(config), "--lora-model-dir", str(tmp_path / "out"), cwd=tmp_path)
    merged = tmp_path / "out" / "merged"
    from peft import PeftModel

    from spallm_plugins.pipeline import load_sketched
    from spallm_plugins.validate import validate_checkpoint

    validate_checkpoint(merged)
    ids = torch.arange(1, 25).view(2, 12) * 37
    base, _ = load_sketched(sketched_smollm2)
    with torch.no_grad():
        expected = PeftModel.from_pretrained(base, tmp_path / "out")(ids).logits
        got = load_sketched(merged)[0](ids).logits
    assert torch.equal(got, expected)


def _tables(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def test_resume_from_a_mid_run_checkpoint_gives_the_uninterrupted_tables(tmp_path, sketched_smollm2):
    import shutil

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    straight.mkdir()
    resumed.mkdir()
    config = write_config(straight, sketched_smollm2, max_steps=6, save_steps=3)
    axolotl("train", str(config), cwd=straight)
    assert (straight / "out" / "checkpoint-3" / "adapter_model.safetensors").is_file()
    config2 = write_config(resumed, sketched_smollm2, max_steps=6, save_steps=3)
    shutil.copytree(straight / "out" / "checkpoint-3", resumed / "out" / "checkpoint-3")
    proc = axolotl(
        "train", str(config2), "--resume-from-checkpoint", str(resumed / "out" / "checkpoint-3"), cwd=resumed
    )
    state = json.loads((resumed / "out" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and len(losses(proc.stdout + proc.stderr)) == 3  # steps 4, 5, 6 only
    a, b = _tables(straight / "out"), _tables(resumed / "out")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_inference_answers_a_prompt_from_stdin(tmp_path, sketched_smollm2):
    config = write_config(tmp_path, sketched_smollm2, max_steps=2, save_steps=100)
    axolotl("train", str(config), cwd=tmp_path)
    proc = axolotl("inference", str(config), "--lora-model-dir", str(tmp_path / "out"), cwd=tmp_path,
                   stdin="What is the capital of France?")  # fmt: skip
    prompt = "What is the capital of France?"
    out = proc.stdout + proc.stderr
    assert "spallm: loading tables from" in out and prompt in proc.stdout, proc.stdout[-3000:]
    # Axolotl samples, and 2 training steps can make the model end its turn at once: the answer is
    # whatever it generated up to its end-of-turn token (possibly nothing), but generation must finish.
    answer = proc.stdout.rsplit(prompt, 1)[1].split("=" * 20, 1)[0].strip()
    assert answer.endswith("<|im_end|>") or len(answer) > 3, proc.stdout[-3000:]


def test_deepspeed_options_that_break_codes_are_refused_when_the_config_is_read(tmp_path, sketched_smollm2):
    zero3 = tmp_path / "zero3.json"
    zero3.write_text(json.dumps({"zero_optimization": {"stage": 3, "zero_quantized_nontrainable_weights": True}}))
    config = write_config(tmp_path, sketched_smollm2, deepspeed=str(zero3))
    with pytest.raises(AssertionError) as failed:
        axolotl("train", str(config), cwd=tmp_path)
    message = str(failed.value)
    assert f"{zero3}: zero_optimization.zero_quantized_nontrainable_weights is true" in message, message[-3000:]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # refused before training


VALIDATE_RECIPES = """
import json, sys, yaml
from pathlib import Path
from axolotl.cli.config import prepare_plugins
from axolotl.utils.config import validate_config
from axolotl.utils.dict import DictDefault
from spallm_plugins.integrations.axolotl import plugin
root = Path(sys.argv[1])
seen = {}
for recipe in sorted((root / "configs" / "axolotl").glob("*.yml")):
    cfg = DictDefault(yaml.safe_load(recipe.read_text()))
    if cfg.deepspeed:
        cfg.deepspeed = str(root / cfg.deepspeed)
    plugin.sketch_dense_base = lambda cfg: None  # the Hub bases are not sketched here: only the schema is checked
    prepare_plugins(cfg)  # SpaLLMPlugin.register: the DeepSpeed refusals
    gpus = {"bf16": True, "fp8": False, "n_gpu": 2, "n_node": 1, "compute_capability": "sm_90"}
    out = validate_config(cfg, capabilities=gpus, env_capabilities={"torch_version": "2.7.0"})
    seen[recipe.name] = {"adapter": out.adapter, "fsdp_version": out.fsdp_version, "deepspeed": bool(out.deepspeed)}
print("RECIPES", json.dumps(seen))
"""


def test_every_recipe_passes_axolotls_own_validation():
    """The GPU recipes (paper settings, FSDP2, ZeRO-3) are not trained here; Axolotl's schema checks them,
    as for 2 GPUs, with the plugin registered."""
    root = Path(__file__).resolve().parents[1]
    proc = run_python(VALIDATE_RECIPES, str(root), env=AXOLOTL_ENV)
    seen = json.loads(proc.stdout.split("RECIPES ", 1)[1])
    assert {"llama3-8b-fsdp2.yml", "llama3-8b-zero3.yml", "smollm2-cpu-quickstart.yml"} <= set(seen)
    assert all(r["adapter"] == "spallm" for r in seen.values())
    assert seen["llama3-8b-fsdp2.yml"]["fsdp_version"] == 2
    assert seen["llama3-8b-zero3.yml"]["deepspeed"]


def test_one_file_recipe_sketches_a_dense_base_once_then_trains_and_refuses_other_settings(tmp_path):
    from axolotl.utils.dict import DictDefault

    from spallm_plugins.format import CheckpointError
    from spallm_plugins.integrations.axolotl.plugin import sketch_dense_base
    from spallm_plugins.validate import validate_checkpoint

    dense = tmp_path / "dense"
    tiny_llama().save_pretrained(dense)
    tiny_tokenizer().save_pretrained(dense)
    sketch_dir = tmp_path / "base-sketch"
    spallm = {"bits": 4, "groups_per_row": 2, "sketch_dir": str(sketch_dir)}
    config = write_config(tmp_path, dense, max_steps=4, save_steps=100, spallm=spallm, sequence_len=128)
    proc = axolotl("train", str(config), cwd=tmp_path)
    assert f"{dense} is dense: made its 4-bit sketch (2 groups per row) {sketch_dir}" in proc.stdout + proc.stderr
    validate_checkpoint(sketch_dir)
    with open(tmp_path / "out" / "adapter_model.safetensors", "rb") as fh:
        header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
    assert header and all(k.endswith(".spallm_tables") for k in header if k != "__metadata__")
    # what Axolotl's next command with the same YAML (merge-lora, inference, a resumed train) does when it reads it
    made = (sketch_dir / "config.json").stat().st_mtime_ns
    again = DictDefault(yaml.safe_load(config.read_text()))
    sketch_dense_base(again)
    assert again.base_model == str(sketch_dir) and (sketch_dir / "config.json").stat().st_mtime_ns == made
    other = DictDefault(yaml.safe_load(config.read_text()))
    other["spallm"] = {**spallm, "groups_per_row": 4}
    with pytest.raises(
        CheckpointError, match=rf"{sketch_dir}: holds another sketch \(groups_per_row was 2, this run has 4\)"
    ):
        sketch_dense_base(other)
