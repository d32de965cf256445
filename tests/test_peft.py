"""The PEFT method ``spallm`` through real PEFT: registration, config, train/save/load, adapters, merge."""

from __future__ import annotations

import enum
import json
import sysconfig
from pathlib import Path

import pytest
import torch
from conftest import needs, run_cli, run_python, tiny_llama, tiny_tokenizer
from torch import nn

needs("peft", "nox -s tests / peft_latest install it")

from peft import PeftConfig, PeftModel, get_peft_model  # noqa: E402
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING  # noqa: E402
from peft.utils.peft_types import PeftType  # noqa: E402

from spallm_plugins.config import SketchConfig  # noqa: E402
from spallm_plugins.format import AdapterBaseMismatchError, CheckpointError  # noqa: E402
from spallm_plugins.hooks import architecture_for  # noqa: E402
from spallm_plugins.integrations.peft import SpaLLMConfig, SpaLLMLayer, SpaLLMModel  # noqa: E402
from spallm_plugins.integrations.peft.registration import add_enum_member, register  # noqa: E402
from spallm_plugins.layer import SketchedLinear  # noqa: E402
from spallm_plugins.pipeline import load_sketched, sketch_to_folder  # noqa: E402

PTH = Path(sysconfig.get_paths()["purelib"]) / "spallm_plugins_autoregister.pth"
IDS = torch.arange(24).view(2, 12) % 30


def logits(model, ids=IDS, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


def train_steps(model, steps: int = 2, lr: float = 5e-2, seed: int = 0):
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    for _ in range(steps):
        ids = torch.randint(4, 30, (2, 12))
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return model


def spallm_layers(model) -> list[SpaLLMLayer]:
    return [m for m in model.modules() if isinstance(m, SpaLLMLayer)]


@pytest.fixture
def sketched_base(sketched_dir):
    model, _ = load_sketched(sketched_dir)
    return model


# ------------------------------------------------------------------------------------------------
# registration and config


def test_add_enum_member_behaves_like_a_declared_member():
    class Kind(str, enum.Enum):
        A = "A"

    member = add_enum_member(Kind, "NEW", "NEW")
    assert Kind.NEW is member and Kind["NEW"] is member and Kind("NEW") is member
    assert list(Kind) == [Kind.A, Kind.NEW] and member == "NEW" and json.dumps(member) == '"NEW"'
    assert add_enum_member(Kind, "NEW", "NEW") is member
    with pytest.raises(ValueError, match="already exists"):
        add_enum_member(Kind, "NEW", "OTHER")
    with pytest.raises(ValueError, match="already has a member with value 'A'"):
        add_enum_member(Kind, "B", "A")


def test_registration_is_idempotent_and_complete():
    register()
    register()
    assert PeftType.SPALLM == "SPALLM" and "SPALLM" in list(PeftType)
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.SPALLM] is SpaLLMConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.SPALLM] is SpaLLMModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.SPALLM] == "spallm_"


def test_importing_the_core_does_not_import_peft():
    proc = run_python(
        "import sys, spallm_plugins, spallm_plugins.config, spallm_plugins.format\nprint('peft' in sys.modules)",
        env={"SPALLM_NO_AUTOREGISTER": "1"},
    )
    assert proc.stdout.strip() == "False"


def test_config_reuses_sketch_fields_and_round_trips(tmp_path):
    peft_fields = set(SpaLLMConfig.__dataclass_fields__)
    assert set(SketchConfig.field_names()) <= peft_fields
    config = SpaLLMConfig(groups_per_row=4, bits=3, target_modules=["q_proj"], layers_to_transform=[1])
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, SpaLLMConfig)
    assert (loaded.bits, loaded.groups_per_row, loaded.target_modules, loaded.layers_to_transform) == (
        3,
        4,
        {"q_proj"},
        [1],
    )
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "SPALLM"
    with pytest.raises(ValueError, match=r"SpaLLMConfig: SketchConfig.bits=5 is invalid"):
        SpaLLMConfig(bits=5)
    with pytest.raises(ValueError, match=r"groups_per_row=9 is invalid"):
        SpaLLMConfig(groups_per_row=9)


def test_default_targets_come_from_the_architecture_hook(sketched_base):
    model = get_peft_model(sketched_base, SpaLLMConfig())
    spec = architecture_for("llama")
    assert model.peft_config["default"].target_modules == set(spec.target_modules)
    adapted = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, SpaLLMLayer)}
    assert adapted == set(spec.target_modules)


# ------------------------------------------------------------------------------------------------
# sketched base: table sets over shared codes


def test_sketched_base_adapter_trains_only_tables_and_starts_as_the_base(sketched_base):
    expected = logits(sketched_base)
    codes_before = {n: m.codes.clone() for n, m in sketched_base.named_modules() if isinstance(m, SketchedLinear)}
    tables_before = {n: m.tables.clone() for n, m in sketched_base.named_modules() if isinstance(m, SketchedLinear)}
    model = get_peft_model(sketched_base, SpaLLMConfig(task_type="CAUSAL_LM"))
    assert torch.equal(logits(model), expected)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".spallm_tables." in n for n in trainable)
    layers = spallm_layers(model)
    assert sum(p.numel() for p in trainable.values()) == sum(m.out_features * 2 * 16 for m in layers)
    assert model.get_nb_trainable_parameters()[0] == sum(p.numel() for p in trainable.values())  # codes: frozen
    assert all(not m.spallm_codes for m in layers), "a sketched base's codes are shared, not copied"
    train_steps(model)
    assert not torch.equal(logits(model), expected)
    for name, m in model.base_model.model.named_modules():
        if isinstance(m, SketchedLinear):
            name = name.removesuffix(".base_layer")
            assert torch.equal(m.codes, codes_before[name]) and torch.equal(m.tables, tables_before[name])
    with model.disable_adapter():
        assert torch.equal(logits(model), expected)


def test_sketched_base_save_holds_tables_and_fingerprint_and_reloads(tmp_path, sketched_dir, sketched_base):
    model = train_steps(get_peft_model(sketched_base, SpaLLMConfig(task_type="CAUSAL_LM")))
    trained = logits(model)
    model.save_pretrained(tmp_path / "adapter")
    from safetensors import safe_open

    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.endswith(".spallm_tables") for k in keys)
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_codes_fingerprint"].startswith("sha256:") and cfg["groups_per_row"] == 2
    base, _ = load_sketched(sketched_dir)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert torch.equal(logits(reloaded), trained)


FRESH_LOAD = """
import sys, torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from peft import PeftModel
base = AutoModelForCausalLM.from_pretrained(sys.argv[1])
model = PeftModel.from_pretrained(base, sys.argv[2])
model.load_adapter(sys.argv[3], adapter_name="second")
ids = torch.arange(24).view(2, 12) % 30
with torch.no_grad():
    first = model(ids).logits
    model.set_adapter("second")
    second = model(ids).logits
expected = load_file(sys.argv[4])
print("spallm_plugins imported by user:", "spallm_plugins.integrations.peft.model" in sys.modules)
print("FIRST", "EQUAL" if torch.equal(first, expected["first"]) else "DIFFERENT")
print("SECOND", "EQUAL" if torch.equal(second, expected["second"]) else "DIFFERENT")
"""


def test_fresh_process_round_trip_without_spallm_import(tmp_path, sketched_dir, sketched_base):
    needs("pth", "install the package (pip install . or -e .)")
    model = train_steps(get_peft_model(sketched_base, SpaLLMConfig(task_type="CAUSAL_LM")), seed=1)
    model.save_pretrained(tmp_path / "first")
    first = logits(model)
    second_base, _ = load_sketched(sketched_dir)
    second = train_steps(get_peft_model(second_base, SpaLLMConfig(task_type="CAUSAL_LM")), seed=2)
    second.save_pretrained(tmp_path / "second")
    from safetensors.torch import save_file

    save_file({"first": first, "second": logits(second)}, tmp_path / "expected.safetensors")
    proc = run_python(FRESH_LOAD, str(sketched_dir), str(tmp_path / "first"), str(tmp_path / "second"),
                      str(tmp_path / "expected.safetensors"))  # fmt: skip
    assert "FIRST EQUAL" in proc.stdout and "SECOND EQUAL" in proc.stdout, proc.stdout + proc.stderr


def test_adapter_on_another_base_is_refused_and_changes_nothing(tmp_path, sketched_base, dense_dir):
    model = get_peft_model(sketched_base, SpaLLMConfig(task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "adapter")
    other_dense = tmp_path / "other-dense"
    tiny_llama(seed=7).save_pretrained(other_dense)
    tiny_tokenizer().save_pretrained(other_dense)
    sketch_to_folder(other_dense, tmp_path / "other", SketchConfig(bits=4, groups_per_row=2), progress=False)
    other, _ = load_sketched(tmp_path / "other")
    before = logits(other)
    with pytest.raises(
        AdapterBaseMismatchError, match=r"adapter: trained on codes with fingerprint sha256:.*has other codes"
    ):
        PeftModel.from_pretrained(other, tmp_path / "adapter")
    assert not spallm_layers(other) and torch.equal(logits(other), before)


def test_sketch_settings_must_match_a_sketched_base(sketched_base):
    with pytest.raises(ValueError, match=r"groups_per_row=4 but the sketched base has groups_per_row=2"):
        get_peft_model(sketched_base, SpaLLMConfig(groups_per_row=4))
    assert not spallm_layers(sketched_base)


@pytest.mark.parametrize("damage", ["truncated", "wrong_dtype", "wrong_shape", "missing_tensor"])
def test_corrupted_adapter_file_errors_clearly_and_changes_nothing(tmp_path, sketched_dir, sketched_base, damage):
    from safetensors.torch import load_file, save_file

    get_peft_model(sketched_base, SpaLLMConfig(task_type="CAUSAL_LM")).save_pretrained(tmp_path / "adapter")
    file = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(file)
    name = sorted(tensors)[0]
    if damage == "truncated":
        file.write_bytes(file.read_bytes()[:-64])
        match = "truncated safetensors file"
    else:
        if damage == "wrong_dtype":
            tensors[name] = tensors[name].to(torch.int32)
            match = "has dtype int32, expected a float"
        elif damage == "wrong_shape":
            tensors[name] = tensors[name][:, :1].contiguous()
            match = r"has shape \[\d+, 1, 16\], expected \[\d+, 2, 16\]"
        else:
            del tensors[name]
            match = "no tensor base_model.model.*spallm_tables for target"
        save_file(tensors, file)
    base, _ = load_sketched(sketched_dir)
    before = logits(base)
    with pytest.raises(CheckpointError, match=match) as err:
        PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert "adapter_model.safetensors" in str(err.value)
    assert not spallm_layers(base) and torch.equal(logits(base), before)


# ------------------------------------------------------------------------------------------------
# several adapters


def test_add_set_delete_adapters_and_two_active_is_an_error(sketched_base):
    expected = logits(sketched_base)
    model = get_peft_model(sketched_base, SpaLLMConfig(task_type="CAUSAL_LM"))
    train_steps(model, seed=1)
    first = logits(model)
    model.add_adapter("second", SpaLLMConfig(task_type="CAUSAL_LM", init_weights=False))
    assert torch.equal(logits(model), first), "adding an adapter does not activate it"
    model.set_adapter("second")
    second = logits(model)
    assert not torch.equal(second, first) and not torch.equal(second, expected)
    model.set_adapter("default")
    assert torch.equal(logits(model), first)
    model.base_model.set_adapter(["default", "second"])
    with pytest.raises(ValueError, match="cannot be summed"):
        logits(model)
    model.base_model.set_adapter("second")
    model.delete_adapter("second")
    assert all(set(m.spallm_tables) == {"default"} for m in spallm_layers(model))
    assert torch.equal(logits(model), first)


def test_mixed_batch_equals_each_sample_alone(sketched_base):
    model = get_peft_model(sketched_base, SpaLLMConfig(task_type="CAUSAL_LM"))
    train_steps(model, seed=1)
    model.add_adapter("other", SpaLLMConfig(task_type="CAUSAL_LM", init_weights=False))
    ids = torch.randint(4, 30, (4, 10), generator=torch.Generator().manual_seed(3))
    names = ["default", "other", "__base__", "other"]
    mixed = logits(model, ids, adapter_names=names)
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                alone = logits(model, ids[i : i + 1])
        else:
            model.set_adapter(name)
            alone = logits(model, ids[i : i + 1])
        torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="non-existing adapter"):
        logits(model, ids, adapter_names=["default", "typo", "other", "other"])


# ------------------------------------------------------------------------------------------------
# merge


def test_merge_on_sketched_base_is_lossless_and_saves_as_a_sketched_checkpoint(tmp_path, sketched_dir, sketched_base):
    model = train_steps(get_peft_model(sketched_base, SpaLLMConfig(task_type="CAUSAL_LM")))
    trained = logits(model)
    model.merge_adapter()
    assert torch.equal(logits(model), trained)
    model.unmerge_adapter()
    with model.disable_adapter():
        base_again = logits(model)
    base, _ = load_sketched(sketched_dir)
    assert torch.equal(base_again, logits(base))
    model.save_pretrained(tmp_path / "adapter")
    merged = model.merge_and_unload()
    assert isinstance(merged.model.layers[0].self_attn.q_proj, SketchedLinear) and not spallm_layers(merged)
    assert torch.equal(logits(merged), trained)
    merged.save_pretrained(tmp_path / "merged")
    reloaded, _ = load_sketched(tmp_path / "merged")
    assert torch.equal(logits(reloaded), trained)
    proc = run_cli("merge", str(sketched_dir), str(tmp_path / "adapter"), "--out", str(tmp_path / "cli-merged"))
    assert "tables replaced, codes copied" in proc.stdout
    from_cli, _ = load_sketched(tmp_path / "cli-merged")
    assert torch.equal(logits(from_cli), trained)


def test_cli_merge_refuses_the_wrong_base(tmp_path, sketched_base):
    get_peft_model(sketched_base, SpaLLMConfig(task_type="CAUSAL_LM")).save_pretrained(tmp_path / "adapter")
    other_dense = tmp_path / "other-dense"
    tiny_llama(seed=5).save_pretrained(other_dense)
    sketch_to_folder(other_dense, tmp_path / "other", SketchConfig(bits=4, groups_per_row=2), progress=False)
    proc = run_cli("merge", str(tmp_path / "other"), str(tmp_path / "adapter"), "--out", str(tmp_path / "m"),
                   check=False)  # fmt: skip
    assert proc.returncode == 2 and "other codes" in proc.stderr and not (tmp_path / "m").exists()


# ------------------------------------------------------------------------------------------------
# dense base: the adapter sketches and stores codes


def test_dense_base_adapter_stores_codes_disables_exactly_and_merges(tmp_path, dense_dir):
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(dense_dir)
    expected = logits(dense)
    model = get_peft_model(dense, SpaLLMConfig(task_type="CAUSAL_LM", groups_per_row=4, bits=4))
    layers = spallm_layers(model)
    assert layers and all(set(m.spallm_codes) == {"default"} for m in layers)
    with model.disable_adapter():
        assert torch.equal(logits(model), expected)
    sketched_logits = logits(model)
    assert not torch.equal(sketched_logits, expected)
    train_steps(model)
    trained = logits(model)
    model.save_pretrained(tmp_path / "adapter")
    fresh = AutoModelForCausalLM.from_pretrained(dense_dir)
    assert torch.equal(logits(PeftModel.from_pretrained(fresh, tmp_path / "adapter")), trained)
    merged = model.merge_and_unload()
    q_proj = merged.model.layers[0].self_attn.q_proj
    assert type(q_proj) is nn.Linear
    torch.testing.assert_close(logits(merged), trained, rtol=1e-5, atol=1e-5)
    proc = run_cli("merge", str(dense_dir), str(tmp_path / "adapter"), "--out", str(tmp_path / "merged"))
    assert "weights replaced by the adapter's codes" in proc.stdout
    from_cli, _ = load_sketched(tmp_path / "merged")
    torch.testing.assert_close(logits(from_cli), trained, rtol=1e-5, atol=1e-5)


def test_groups_per_row_that_does_not_divide_is_a_clear_error(dense_dir):
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(dense_dir)
    with pytest.raises(ValueError, match=r"groups_per_row=3 does not divide in_features=64"):
        get_peft_model(dense, SpaLLMConfig(groups_per_row=3))
    assert not spallm_layers(dense)


def test_calibrated_injection_on_a_dense_base(tmp_path, dense_dir):
    from conftest import sample_words
    from transformers import AutoModelForCausalLM

    text = tmp_path / "calib.txt"
    text.write_text(sample_words(600, seed=4))
    free = get_peft_model(AutoModelForCausalLM.from_pretrained(dense_dir), SpaLLMConfig(groups_per_row=2))
    config = SpaLLMConfig(groups_per_row=2, method="gptq", calibration=str(text), nsamples=4, seqlen=32)
    calibrated = get_peft_model(AutoModelForCausalLM.from_pretrained(dense_dir), config)
    dense = AutoModelForCausalLM.from_pretrained(dense_dir)
    assert all(type(m) is nn.Linear for m in [calibrated.base_model.model.model.layers[0].mlp.down_proj.base_layer])
    ids = torch.randint(4, 30, (2, 32), generator=torch.Generator().manual_seed(9))
    err_free = (logits(free, ids) - logits(dense, ids)).pow(2).mean()
    err_calibrated = (logits(calibrated, ids) - logits(dense, ids)).pow(2).mean()
    assert err_calibrated < err_free
    with calibrated.disable_adapter():
        assert torch.equal(logits(calibrated, ids), logits(dense, ids))
    calibrated.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["calibration"]
    assert saved.startswith("file:calib.txt?sha256=") and str(tmp_path) not in saved


# ------------------------------------------------------------------------------------------------
# training path and dtypes


def test_trainer_with_gradient_checkpointing_trains_only_tables(tmp_path, sketched_base):
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(sketched_base, SpaLLMConfig(task_type="CAUSAL_LM"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    codes_before = {n: t.clone() for n, t in model.state_dict().items() if t.dtype == torch.uint8}
    assert codes_before and not any(p.requires_grad for p in model.parameters() if p.dtype == torch.uint8)
    ids = torch.randint(4, 30, (8, 16), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=3, learning_rate=5e-2,
        gradient_checkpointing=True, report_to=[], save_strategy="no", use_cpu=True, logging_steps=1,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all(".spallm_tables." in n for n in changed)
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in optimized}
    assert names == {n for n, p in model.named_parameters() if ".spallm_tables." in n}
    assert all(torch.equal(t, codes_before[n]) for n, t in model.state_dict().items() if n in codes_before)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_keep_their_dtype_and_merge_losslessly(sketched_dir, dtype):
    base, _ = load_sketched(sketched_dir, dtype=dtype)
    model = get_peft_model(base, SpaLLMConfig(task_type="CAUSAL_LM"))
    assert all(m.spallm_tables["default"].dtype == torch.float32 for m in spallm_layers(model))
    train_steps(model, lr=1e-2)
    out = logits(model)
    assert out.dtype == dtype and torch.isfinite(out).all()
    model.merge_adapter()
    assert torch.equal(logits(model), out)


# ------------------------------------------------------------------------------------------------
# PEFT's conventions and the one fingerprint policy


def test_config_fields_are_declared_and_follow_the_core():
    import dataclasses
    import typing

    from spallm_plugins.integrations.peft.config import FROM_BASE, PEFT_OWNED

    declared = {f.name: f for f in dataclasses.fields(SpaLLMConfig)}
    core = {f.name: f for f in dataclasses.fields(SketchConfig)}
    assert "bits" in SpaLLMConfig.__annotations__  # declared in the class body, visible to type checkers
    hints = typing.get_type_hints(SpaLLMConfig)
    for name, core_field in core.items():
        assert name in declared, f"SketchConfig.{name} is missing from SpaLLMConfig"
        assert declared[name].metadata.get("help"), f"SpaLLMConfig.{name} has no help text"
        if name in PEFT_OWNED:
            continue
        ours = declared[name]
        default = ours.default_factory() if ours.default_factory is not dataclasses.MISSING else ours.default
        if name in FROM_BASE:
            assert default is None
            continue
        theirs = (
            core_field.default_factory()
            if core_field.default_factory is not dataclasses.MISSING
            else core_field.default
        )
        assert default == theirs, f"SpaLLMConfig.{name} defaults to {default!r}, SketchConfig to {theirs!r}"
        assert name in hints


def test_dense_base_tables_take_the_base_weights_dtype(dense_dir):
    from transformers import AutoModelForCausalLM

    for dtype, autocast, stored in ((torch.float32, True, torch.float32), (torch.bfloat16, False, torch.bfloat16)):
        dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=dtype)
        model = get_peft_model(dense, SpaLLMConfig(target_modules=["q_proj"]), autocast_adapter_dtype=autocast)
        assert model.peft_config["default"].table_dtype == str(stored).removeprefix("torch.")
        assert {m.spallm_tables["default"].dtype for m in spallm_layers(model)} == {stored}
    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.bfloat16)
    model = get_peft_model(dense, SpaLLMConfig(target_modules=["q_proj"]))  # PEFT upcasts to float32 to train
    assert {m.spallm_tables["default"].dtype for m in spallm_layers(model)} == {torch.float32}
    assert {m.storage_dtype["default"] for m in spallm_layers(model)} == {torch.bfloat16}


def test_safe_merge_with_nan_tables_raises_peft_wording_and_names_the_layer(sketched_base):
    model = get_peft_model(sketched_base, SpaLLMConfig(task_type="CAUSAL_LM", target_modules=["v_proj"]))
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    with torch.no_grad():
        layer.spallm_tables["default"][0, 0, 0] = float("nan")
    with pytest.raises(
        ValueError,
        match=r"NaNs detected in the merged weights. The adapter default seems to be broken .*model\.layers\.1\.self_attn\.v_proj",
    ):
        model.merge_and_unload(safe_merge=True)


def test_adapter_without_fingerprint_is_refused_everywhere_until_recorded(tmp_path, sketched_dir, sketched_base):
    model = train_steps(get_peft_model(sketched_base, SpaLLMConfig(task_type="CAUSAL_LM")), seed=3)
    trained = logits(model)
    model.save_pretrained(tmp_path / "adapter")
    cfg_path = tmp_path / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    recorded = cfg.pop("base_codes_fingerprint")
    cfg_path.write_text(json.dumps(cfg))
    fresh, _ = load_sketched(sketched_dir)
    with pytest.raises(AdapterBaseMismatchError, match=r"has no base_codes_fingerprint.*spallm fingerprint"):
        PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    proc = run_cli("merge", str(sketched_dir), str(tmp_path / "adapter"), "--out", str(tmp_path / "m"), check=False)
    assert proc.returncode == 2 and "has no base_codes_fingerprint" in proc.stderr and not (tmp_path / "m").exists()
    proc = run_cli("fingerprint", str(tmp_path / "adapter"), "--base", str(sketched_dir))
    assert json.loads(cfg_path.read_text())["base_codes_fingerprint"] == recorded
    proc = run_cli("fingerprint", str(tmp_path / "adapter"), "--base", str(sketched_dir), check=False)
    assert proc.returncode == 2 and "already records base_codes_fingerprint" in proc.stderr
    fresh, _ = load_sketched(sketched_dir)
    assert torch.equal(logits(PeftModel.from_pretrained(fresh, tmp_path / "adapter")), trained)


# ------------------------------------------------------------------------------------------------
# codes are frozen storage, not adapter weights: the rules PEFT's own generic tests apply to every method


def prefixed(model) -> dict[str, torch.Tensor]:
    """What PEFT takes for adapter weights: every parameter named with the method's prefix."""
    return {n: p for n, p in model.named_parameters() if PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.SPALLM] in n}


def test_dense_base_adapter_weights_follow_peft_dtype_and_grad_rules_and_codes_still_save(tmp_path, dense_dir):
    from peft.utils.save_and_load import get_base_model_state_dict
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    config = SpaLLMConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], init_weights=False)
    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.bfloat16)
    base_keys = set(dense.state_dict())
    model = get_peft_model(dense, config)
    model.add_adapter("other", config)
    assert set(get_base_model_state_dict(model)) == base_keys, "the codes saved as spallm_codes are the adapter's"
    assert prefixed(model) and {p.dtype for p in prefixed(model).values()} == {torch.float32}  # PEFT's autocast
    layers = spallm_layers(model)
    assert all(set(m.sketched_codes) == {"default", "other"} for m in layers), "a dense base's codes stay"
    model.train()
    model(IDS, labels=IDS).loss.backward()
    assert all(p.grad is not None for n, p in prefixed(model).items() if ".default" in n)
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        codes = {k: f.get_tensor(k).dtype for k in f.keys() if "codes" in k}
    assert len(codes) == len(layers) and all(k.endswith(".spallm_codes") for k in codes)  # format v1's names
    assert set(codes.values()) == {torch.uint8}
    expected = logits(model)
    for low_cpu_mem_usage in (False, True):
        fresh = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.bfloat16)
        loaded = PeftModel.from_pretrained(fresh, tmp_path, is_trainable=True, low_cpu_mem_usage=low_cpu_mem_usage)
        assert {p.dtype for p in prefixed(loaded).values()} == {torch.float32}
        assert all(p.requires_grad for p in prefixed(loaded).values())
        assert torch.equal(logits(loaded), expected)
        loaded.requires_grad_(True)  # the reloaded codes are frozen codes again
        assert not any(p.requires_grad for p in loaded.parameters() if p.dtype == torch.uint8)


def test_modules_to_save_over_sketched_layers_and_requires_grad_on_a_sketched_model(tmp_path, sketched_base):
    sketched_base.requires_grad_(True)  # codes as transformers loaded them
    assert not any(p.requires_grad for p in sketched_base.parameters() if p.dtype == torch.uint8)
    base_logits = logits(sketched_base)
    config = SpaLLMConfig(task_type="CAUSAL_LM", target_modules=["q_proj"], modules_to_save=["mlp"])
    model = get_peft_model(sketched_base, config)
    codes = {n: p.clone() for n, p in model.named_parameters() if p.dtype == torch.uint8}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("modules_to_save.default.down_proj.tables" in n for n in trainable)
    assert all(n.endswith(("spallm_tables.default", ".tables")) for n in trainable)
    logits_before = logits(model)
    model(IDS, labels=IDS).loss.backward()
    with torch.no_grad():  # one SGD step (Adam's eps underflows in the base's float16 tables)
        for name in trainable:
            model.get_parameter(name).sub_(0.1 * model.get_parameter(name).grad)
    trained = logits(model)
    assert torch.isfinite(trained).all() and not torch.equal(trained, logits_before)
    assert all(torch.equal(p, codes[n]) for n, p in model.named_parameters() if p.dtype == torch.uint8)
    with model.disable_adapter():
        assert torch.equal(logits(model), base_logits)
    model.save_pretrained(tmp_path / "adapter")
    fresh, _ = load_sketched(Path(sketched_base.name_or_path))
    assert torch.equal(logits(PeftModel.from_pretrained(fresh, tmp_path / "adapter")), trained)


def test_safe_merge_of_a_dense_base_adapter_with_nan_in_every_adapter_weight(dense_dir):
    """PEFT's test_merge_layers_nan writes NaN into every prefixed parameter: codes must not be among them."""
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(dense_dir), SpaLLMConfig(target_modules=["v_proj"]))
    with torch.no_grad():
        for param in prefixed(model).values():
            param.data[0] = torch.nan
    with pytest.raises(
        ValueError, match=r"NaNs detected in the merged weights\. The adapter default seems to be broken"
    ):
        model.merge_and_unload(safe_merge=True)


@pytest.mark.parametrize(
    "targets",
    [
        {"target_modules": ["q_prj"]},  # a typo
        {"target_modules": ["q_proj"], "exclude_modules": ["q_proj"]},
        {"target_modules": ["q_proj"], "exclude_modules": ".*"},
    ],
    ids=["not-found", "none-targeted", "all-excluded"],
)
def test_configs_that_target_nothing_get_peft_own_messages(dense_dir, targets):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError) as lora:
        get_peft_model(AutoModelForCausalLM.from_pretrained(dense_dir), LoraConfig(**targets))
    assert "table_dtype" not in str(lora.value)
    with pytest.raises(ValueError) as ours:
        get_peft_model(AutoModelForCausalLM.from_pretrained(dense_dir), SpaLLMConfig(**targets))
    assert str(ours.value) == str(lora.value)
