"""The transformers Trainer on a SpaLLM adapter with DeepSpeed ZeRO-3 (its CPU accelerator, one
process) and with accelerate's FSDP2 (2 processes on gloo), and the refusals of
:mod:`spallm_plugins.sharding` for DeepSpeed options that break codes.

accelerate selects FSDP only for accelerator devices: on CPU it ignores the Trainer's FSDP plugin and
falls back to DDP. The FSDP2 test therefore makes that one switch itself (``tests/trainer_helpers.py``);
everything after it, the model's preparation (``fully_shard`` per decoder layer), the Trainer's FSDP
checkpoints and their resumption, and the adapter's save, is accelerate's and the Trainer's own code.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import needs, run_python

from spallm_plugins.sharding import ZERO3_REFUSED, check_deepspeed_config

pytestmark = pytest.mark.slow  # scheduled first under pytest-xdist (conftest.py)


@pytest.mark.parametrize("key", sorted(ZERO3_REFUSED))
@pytest.mark.parametrize("value", [True, "true"])
def test_deepspeed_options_that_break_codes_are_refused_by_name(key, value):
    config = {"zero_optimization": {"stage": 3, key: value}}
    with pytest.raises(ValueError, match=rf"^ds_z3\.json: zero_optimization\.{key} is true: .*set it to false"):
        check_deepspeed_config(config, "ds_z3.json")


def test_deepspeed_configs_without_them_pass():
    for config in (None, {}, {"zero_optimization": {"stage": 3, **dict.fromkeys(ZERO3_REFUSED, False)}}):
        check_deepspeed_config(config)


ZERO3_RECIPE = str(Path(__file__).resolve().parents[1] / "configs" / "deepspeed" / "zero3.json")
TRAIN_ZERO3 = r"""
import json, os, sys
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                  DS_ACCELERATOR="cpu")
import atexit
import torch
atexit.register(lambda: torch.distributed.is_initialized() and torch.distributed.destroy_process_group())
from peft import get_peft_model
from safetensors.torch import load_file
from trainer_helpers import saved_adapter, sketched_tiny_llama as base
from transformers import Trainer, TrainingArguments
from spallm_plugins.integrations.peft import SpaLLMConfig
from spallm_plugins.integrations.transformers.trainer import SpaLLMShardingCallback

zero3 = json.loads(open(sys.argv[4]).read())  # the shipped recipe, configs/deepspeed/zero3.json
zero3["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even the tiny model's parameters
if sys.argv[1] == "refused":
    zero3["zero_optimization"]["zero_quantized_nontrainable_weights"] = True
ids = torch.randint(4, 30, (16, 12), generator=torch.Generator().manual_seed(3))
rows = [{"input_ids": r, "labels": r} for r in ids]
out = {}
folder = sys.argv[3]
args = TrainingArguments(output_dir=folder, per_device_train_batch_size=4, max_steps=4, learning_rate=0.05,
                         logging_steps=1, report_to=[], use_cpu=True, save_strategy="steps", save_steps=2,
                         deepspeed=zero3)
torch.manual_seed(0)
model = get_peft_model(base(), SpaLLMConfig(task_type="CAUSAL_LM", init_weights=False))
try:
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[SpaLLMShardingCallback()])
except ValueError as err:
    print("REFUSED", err)
    sys.exit(0)
if sys.argv[1] == "resume":  # a fresh process: accelerate allows one DeepSpeed Accelerator per process
    trainer.train(resume_from_checkpoint=folder + "/checkpoint-2")
    trainer.save_model(folder + "/resumed")
    again, saved = (load_file(f"{folder}/{name}/adapter_model.safetensors") for name in ("resumed", "adapter"))
    out["resumed_max_diff"] = max((again[k] - v).abs().max().item() for k, v in saved.items())
    print("RESULT", json.dumps(out))
    sys.exit(0)
trainer.train()
codes = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.codes
out["partitioned"] = hasattr(codes, "ds_id")
out["losses"] = [log["loss"] for log in trainer.state.log_history if "loss" in log]
trainer.save_model(folder + "/adapter")
out.update(saved_adapter(folder + "/adapter"))

print("RESULT", json.dumps(out))
"""


TRAIN_FSDP2 = r"""
import json, os, sys
import torch
from peft import get_peft_model
from trainer_helpers import CPUFSDPTrainer, saved_adapter, sketched_tiny_llama as base
from transformers import TrainingArguments
from spallm_plugins.integrations.peft import SpaLLMConfig
from spallm_plugins.integrations.transformers.trainer import SpaLLMShardingCallback
from spallm_plugins.sharding import is_sharded

mode, folder = sys.argv[1], sys.argv[2]
rank = int(os.environ["RANK"])
torch.set_num_threads(1)
ids = torch.randint(4, 30, (16, 12), generator=torch.Generator().manual_seed(3))
rows = [{"input_ids": r, "labels": r} for r in ids]
args = TrainingArguments(output_dir=folder, per_device_train_batch_size=2, max_steps=4, learning_rate=0.05,
                         logging_steps=1, report_to=[], use_cpu=True, save_strategy="steps", save_steps=2,
                         fsdp=True, fsdp_config={"fsdp_version": 2, "reshard_after_forward": True,
                                                 "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})
torch.manual_seed(0)
model = get_peft_model(base(), SpaLLMConfig(task_type="CAUSAL_LM", init_weights=False))
trainer = CPUFSDPTrainer(model=model, args=args, train_dataset=rows, callbacks=[SpaLLMShardingCallback()])
out = {}
if mode == "resume":
    trainer.train(resume_from_checkpoint=folder + "/checkpoint-2")
    trainer.save_model(folder + "/resumed")
else:
    trainer.train()
    codes = {n: p for n, p in trainer.model.named_parameters() if n.endswith(".codes")}
    out["codes_sharded"] = bool(codes) and all(is_sharded(p) for p in codes.values())
    out["codes_local_bytes"] = sum(p.to_local().nbytes for p in codes.values() if is_sharded(p))
    out["codes_full_bytes"] = sum(p.numel() * p.element_size() for p in codes.values())
    out["losses"] = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    trainer.save_model(folder + "/adapter")
    if rank == 0:
        out.update(saved_adapter(folder + "/adapter"))
with open(f"{folder}/{mode}-rank{rank}.json", "w") as f:
    json.dump(out, f)
# Leave together: a rank that exits while the other still saves can abort in gloo's threads at shutdown.
torch.distributed.barrier()
torch.distributed.destroy_process_group()
"""


def _torchrun(script: Path, *args: str, cwd: str) -> None:
    import subprocess
    import sys

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", _port()]
    proc = subprocess.run([*command, str(script), *args], capture_output=True, text=True, timeout=600, cwd=cwd)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def test_trainer_with_accelerate_fsdp2_on_two_ranks_shards_codes_saves_a_normal_adapter_and_resumes(tmp_path):
    needs("peft")
    tests = Path(__file__).parent
    script = tmp_path / "train_fsdp2.py"
    script.write_text(f"import sys; sys.path.insert(0, {str(tests)!r})\n" + TRAIN_FSDP2)
    folder = tmp_path / "run"
    _torchrun(script, "trained", str(folder), cwd=str(tests))
    ranks = [json.loads((folder / f"trained-rank{r}.json").read_text()) for r in range(2)]
    for seen in ranks:
        assert seen["codes_sharded"], "accelerate's FSDP2 left the base layers' codes unsharded"
        assert 2 * seen["codes_local_bytes"] == seen["codes_full_bytes"]  # the tiny Llama's rows are even
        assert seen["losses"] == ranks[0]["losses"]  # the loss the Trainer logs is the global one
    losses = ranks[0]["losses"]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    result = ranks[0]
    assert result["saved"] and all(k.endswith(".spallm_tables") for k in result["saved"])
    assert result["saved"] == result["expected"]  # full tables, not one rank's shard
    assert result["loaded_equal"], "PeftModel.from_pretrained did not load the saved tables"
    assert (folder / "checkpoint-2").is_dir()
    _torchrun(script, "resume", str(folder), cwd=str(tests))  # a fresh pair of processes
    from safetensors.torch import load_file

    trained, resumed = (load_file(folder / name / "adapter_model.safetensors") for name in ("adapter", "resumed"))
    assert trained.keys() == resumed.keys()
    assert max((resumed[k] - v).abs().max().item() for k, v in trained.items()) <= 1e-6


def _port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_trainer_with_deepspeed_zero3_trains_a_spallm_adapter_saves_it_whole_and_resumes(tmp_path):
    needs("deepspeed", "the ZeRO-3 test (the tests nox session installs it)")
    needs("peft")
    from pathlib import Path

    tests = str(Path(__file__).parent)
    proc = run_python(
        TRAIN_ZERO3, "trained", _port(), str(tmp_path), ZERO3_RECIPE, env={"PYTHONPATH": tests}, cwd=tests
    )
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert result["partitioned"], "the base layer's codes are not ZeRO-3 parameters"
    losses = result["losses"]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    assert result["saved"] and all(k.endswith(".spallm_tables") for k in result["saved"])
    assert result["saved"] == result["expected"]  # full tables, not ZeRO-3's empty placeholders
    assert result["loaded_equal"], "PeftModel.from_pretrained did not load the saved tables"
    assert (tmp_path / "checkpoint-2").is_dir()
    proc = run_python(TRAIN_ZERO3, "resume", _port(), str(tmp_path), ZERO3_RECIPE, env={"PYTHONPATH": tests}, cwd=tests)
    resumed = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert resumed["resumed_max_diff"] <= 1e-6  # from checkpoint-2 (DeepSpeed's): the uninterrupted run's tables


def test_trainer_refuses_zero_quantized_codes_before_deepspeed_sees_the_model(tmp_path):
    needs("deepspeed", "the ZeRO-3 test (the tests nox session installs it)")
    needs("peft")
    from pathlib import Path

    tests = str(Path(__file__).parent)
    proc = run_python(
        TRAIN_ZERO3, "refused", _port(), str(tmp_path), ZERO3_RECIPE, env={"PYTHONPATH": tests}, cwd=tests
    )
    assert "REFUSED TrainingArguments.deepspeed: zero_optimization.zero_quantized_nontrainable_weights is true" in (
        proc.stdout
    ), proc.stdout[-2000:]
