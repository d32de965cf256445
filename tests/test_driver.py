"""Block-by-block calibrated sketching of a tiny random Llama, resume and bad activations."""

import json

import pytest
import torch
from conftest import needs, run_cli, sample_words, tiny_llama
from safetensors.torch import load_file

from spallm_plugins.config import SketchConfig
from spallm_plugins.format import safetensors_files
from spallm_plugins.pipeline import load_sketched, sketch_to_folder
from spallm_plugins.sketch import sketch_model
from spallm_plugins.sketch.calibration import CalibrationError
from spallm_plugins.sketch.driver import sketch_model_calibrated
from spallm_plugins.sketch.progress import PARTIAL_DIR, ResumeError

CONFIG = SketchConfig(bits=3, groups_per_row=2, method="gptq", nsamples=12, seqlen=32)


@pytest.fixture
def calib_file(tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_text("\n".join(json.dumps({"text": sample_words(60, seed=i)}) for i in range(20)))
    return path


def test_calibrated_model_is_closer_to_the_original_than_data_free():
    torch.manual_seed(0)
    model = tiny_llama()
    vocab = model.config.vocab_size
    calib, held_out = torch.randint(4, vocab, (16, 32)), torch.randint(4, vocab, (4, 32))
    calibrated, data_free = tiny_llama(), tiny_llama()
    report = sketch_model_calibrated(calibrated, CONFIG, calib)
    sketch_model(data_free, CONFIG.replace(method="kmeans"))
    with torch.no_grad():
        ref = model(held_out).logits
        err_cal = (calibrated(held_out).logits - ref).pow(2).mean()
        err_free = (data_free(held_out).logits - ref).pow(2).mean()
    assert err_cal < 0.7 * err_free
    assert len(report["layers"]) == 14
    assert all(v["loss"] <= v["loss_before_refit"] for v in report["layers"].values())


def _tensors(folder):
    out = {}
    for f in safetensors_files(folder):
        out.update(load_file(str(f)))
    return out


def test_resume_after_a_kill_is_bit_identical(tmp_path, dense_dir, calib_file):
    config = CONFIG.replace(calibration=str(calib_file))
    sketch_to_folder(dense_dir, tmp_path / "straight", config, progress=False)

    def killed_after_block_0(index):
        if index == 0:
            raise KeyboardInterrupt("simulated kill")

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        sketch_to_folder(dense_dir, out, config, progress=False, on_block_done=killed_after_block_0)
    assert not (out / "config.json").exists()
    progress = json.loads((out / PARTIAL_DIR / "progress.json").read_text())
    assert progress["finished_blocks"] == 1
    report = sketch_to_folder(dense_dir, out, config, progress=False, resume=True)
    assert report["resumed_from_block"] == 1
    assert not (out / PARTIAL_DIR).exists()
    straight, resumed = _tensors(tmp_path / "straight"), _tensors(out)
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    load_sketched(out)


def test_resume_with_another_config_is_refused(tmp_path, dense_dir, calib_file):
    config = CONFIG.replace(calibration=str(calib_file))

    def kill(index):
        raise KeyboardInterrupt

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        sketch_to_folder(dense_dir, out, config, progress=False, on_block_done=kill)
    with pytest.raises(ResumeError, match="different config"):
        sketch_to_folder(dense_dir, out, config.replace(bits=4), progress=False, resume=True)


def test_non_finite_activations_are_reported_with_the_layer():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[3] = float("inf")
    ids = torch.randint(4, model.config.vocab_size, (4, 16))
    with pytest.raises(
        CalibrationError, match=r"block 0, self_attn.q_proj: calibration activations contain NaN or inf"
    ):
        sketch_model_calibrated(model, CONFIG, ids)


def test_cli_calibrated_sketch_with_report(tmp_path, dense_dir, calib_file):
    needs("matplotlib", "pip install '.[bench]'")
    out = tmp_path / "cli"
    proc = run_cli("sketch", str(dense_dir), "--out", str(out), "--calib", str(calib_file), "--nsamples", "8",
                   "--seqlen", "32", "--bits", "4", "--gpr", "2", "--kmeans-restarts", "3", "--report", "--quiet")  # fmt: skip
    assert "sketched 14 linear layers" in proc.stdout
    report = json.loads((out / "sketch_report.json").read_text())
    import hashlib

    digest = hashlib.sha256(calib_file.read_bytes()).hexdigest()
    assert report["config"]["method"] == "gptq"
    assert report["config"]["calibration"] == f"file:{calib_file.name}?sha256={digest}"  # by name, not local path
    assert report["config"]["kmeans_restarts"] == 3
    assert (out / "sketch_report.png").stat().st_size > 1000


def test_hessians_are_per_distinct_input_and_match_the_definition():
    from spallm_plugins.sketch.hessians import HessianCollector

    model = tiny_llama()
    block = model.model.layers[0]
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]  # fmt: skip
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [block.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: inputs[n].append(a[0].detach().reshape(-1, a[0].shape[-1]).clone())) for n in names]  # fmt: skip
    ids = torch.randint(4, model.config.vocab_size, (6, 16))
    with HessianCollector({n: block.get_submodule(n) for n in names}, 0) as collector, torch.no_grad():
        for batch in ids.split(2):
            collector.new_batch()
            model(batch)
    for h in handles:
        h.remove()
    assert collector.owner["self_attn.k_proj"] == collector.owner["self_attn.v_proj"] == "self_attn.q_proj"
    assert collector.owner["mlp.up_proj"] == "mlp.gate_proj"
    assert (
        collector.owner["mlp.down_proj"] == "mlp.down_proj"
        and collector.owner["self_attn.o_proj"] == "self_attn.o_proj"
    )
    for n in names:
        x = torch.cat(inputs[n])
        torch.testing.assert_close(collector.hessian(n), 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-6)
    # the sums became the Hessians in place: read again they are not scaled twice, and one input's
    # readers get one tensor
    q = collector.hessian("self_attn.q_proj")
    assert (
        q.data_ptr()
        == collector.hessian("self_attn.v_proj").data_ptr()
        == collector.sums["self_attn.q_proj"].data_ptr()
    )
    x = torch.cat(inputs["self_attn.q_proj"])
    torch.testing.assert_close(q, 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-6)
    with collector, torch.no_grad(), pytest.raises(RuntimeError, match=r"q_proj: its Hessian was already read"):
        collector.new_batch()
        model(ids[:2])
    collector.release("self_attn.k_proj")
    assert "self_attn.q_proj" not in collector.sums and "mlp.down_proj" in collector.sums


def _last_input(name, inputs):
    """A hook keeping the last input a dense linear saw: the one its stage's Hessian was captured from
    (the linear is replaced right after)."""

    def hook(module, args, output):
        inputs[name] = args[0].detach()

    return hook


def test_linears_sharing_an_input_share_one_factorisation_and_sketch_as_each_alone(monkeypatch):
    import spallm_plugins.sketch.block as block_sketch
    from spallm_plugins.sketch import sketch_layer

    ids = torch.randint(4, 30, (8, 16), generator=torch.Generator().manual_seed(1))
    seen: list[tuple[str, int]] = []
    real = block_sketch.prepare_hessian

    def counted(hessian, damping, name="layer", act_order=False, **kwargs):
        seen.append((name, hessian.shape[0]))
        prepared = real(hessian, damping, name, act_order, **kwargs)
        # the collector's sum is handed over and becomes the prepared Hessian: no [in, in] copy
        assert prepared.hessian.data_ptr() == hessian.data_ptr(), name
        return prepared

    monkeypatch.setattr(block_sketch, "prepare_hessian", counted)
    for true_sequential in (True, False):
        seen.clear()
        config = CONFIG.replace(true_sequential=true_sequential)
        model, inputs = tiny_llama(), {}
        block = model.model.layers[0]
        handles = [m.register_forward_hook(_last_input(n, inputs))
                   for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]  # fmt: skip
        sketch_model_calibrated(model, config, ids, batch_size=8)  # one batch: the last input is the one
        for h in handles:
            h.remove()
        blocks = model.config.num_hidden_layers
        attn, mlp = "model.layers.0.self_attn", "model.layers.0.mlp"
        assert len(seen) == 4 * blocks  # q/k/v, o_proj, gate/up, down_proj: one factorisation each
        assert f"{attn}.q_proj, {attn}.k_proj, {attn}.v_proj" in [name for name, _ in seen]
        assert f"{mlp}.gate_proj, {mlp}.up_proj" in [name for name, _ in seen]
        # block 0's k_proj and up_proj, sketched alone from their own Hessians, give the same bytes
        dense = tiny_llama().model.layers[0]
        for rel in ("self_attn.k_proj", "mlp.up_proj"):
            x = inputs[rel].reshape(-1, inputs[rel].shape[-1]).float()
            alone, _ = sketch_layer(dense.get_submodule(rel), config, hessian=2 * x.T @ x / x.shape[0])
            got = block.get_submodule(rel)
            assert torch.equal(got.codes, alone.codes), rel
            torch.testing.assert_close(got.tables, alone.tables, rtol=0, atol=0)


def test_offload_gives_the_same_sketch():
    ids = torch.randint(4, 30, (8, 16))
    a, b = tiny_llama(), tiny_llama()
    sketch_model_calibrated(a, CONFIG, ids)
    sketch_model_calibrated(b, CONFIG, ids, offload=True, device="cpu")
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name


def test_kill_between_saving_inputs_and_committing_progress_resumes(tmp_path, dense_dir, calib_file, monkeypatch):
    from spallm_plugins.sketch import progress

    config = CONFIG.replace(calibration=str(calib_file))
    sketch_to_folder(dense_dir, tmp_path / "straight", config, progress=False)
    real_write_json = progress.write_json
    calls = {"n": 0}

    def dies_on_third_commit(path, data):  # commits: the tensors outside the blocks, block 0, block 1
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed before progress.json of block 1")
        real_write_json(path, data)

    monkeypatch.setattr(progress, "write_json", dies_on_third_commit)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        sketch_to_folder(dense_dir, out, config, progress=False)
    assert (out / PARTIAL_DIR / "inputs_00002.safetensors").is_file()  # saved, but block 1 not committed
    monkeypatch.setattr(progress, "write_json", real_write_json)
    report = sketch_to_folder(dense_dir, out, config, progress=False, resume=True)
    assert report["resumed_from_block"] == 1
    straight, resumed = _tensors(tmp_path / "straight"), _tensors(out)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_true_sequential_stages_follow_the_forward_and_calibrate_through_sketched_stages():
    from spallm_plugins.sketch.block import input_stages
    from spallm_plugins.sketch.blocks import capture_block_inputs

    model = tiny_llama()
    ids = torch.randint(4, model.config.vocab_size, (8, 16))
    hidden, kwargs_list = capture_block_inputs(model, model.model.layers, ids, 4, torch.device("cpu"))
    block = model.model.layers[0]
    names = ["mlp.down_proj", "mlp.up_proj", "self_attn.o_proj", "self_attn.v_proj", "mlp.gate_proj",
             "self_attn.q_proj", "self_attn.k_proj"]  # fmt: skip
    with torch.no_grad():
        stages = input_stages(block, {n: block.get_submodule(n) for n in names}, hidden[0], kwargs_list[0])
    assert [sorted(s) for s in stages] == [
        ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]
    together, staged = tiny_llama(), tiny_llama()
    sketch_model_calibrated(together, CONFIG.replace(true_sequential=False), ids)
    report = sketch_model_calibrated(staged, CONFIG.replace(true_sequential=True), ids)
    a, b = together.state_dict(), staged.state_dict()
    first = "model.layers.0.self_attn.{}_proj.codes"
    # the first stage sees the same inputs either way; o_proj is calibrated through the sketched q/k/v
    assert all(torch.equal(a[first.format(p)], b[first.format(p)]) for p in "qkv")
    assert not torch.equal(a[first.format("o")], b[first.format("o")])
    assert len(report["layers"]) == 14


def _output(block, hidden, kwargs):
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _block_errors(model, dense, ids):
    """Per block: the squared error of the block's outputs against the dense block's, on the same inputs."""
    from spallm_plugins.sketch.blocks import capture_block_inputs

    hidden, kwargs_list = capture_block_inputs(model, model.model.layers, ids, 8, torch.device("cpu"))
    errors = []
    with torch.no_grad():
        for block, reference in zip(model.model.layers, dense.model.layers):
            outputs = [_output(block, h, kw) for h, kw in zip(hidden, kwargs_list)]
            targets = [_output(reference, h, kw) for h, kw in zip(hidden, kwargs_list)]
            errors.append(sum(float((o - t).pow(2).sum()) for o, t in zip(outputs, targets)))
            hidden = outputs
    return errors


def test_table_tuning_fits_each_block_to_the_dense_block_and_keeps_only_improvements():
    from spallm_plugins.sketch.blocks import capture_block_inputs
    from spallm_plugins.sketch.tuning import tune_block_tables

    torch.manual_seed(0)
    dense = tiny_llama()
    ids = torch.randint(4, dense.config.vocab_size, (16, 32))
    plain, tuned = tiny_llama(), tiny_llama()
    sketch_model_calibrated(plain, CONFIG, ids)
    report = sketch_model_calibrated(tuned, CONFIG.replace(tune_steps=12, tune_lr=1e-3), ids)
    outcomes = [block["tuning"] for block in report["blocks"]]
    assert len(outcomes) == 2 and all(o["kept"] and o["loss_after"] < o["loss_before"] for o in outcomes)
    assert report["seconds"]["tune"] > 0
    tuned_errors, plain_errors = _block_errors(tuned, dense, ids), _block_errors(plain, dense, ids)
    assert tuned_errors[0] < 0.9 * plain_errors[0] and sum(tuned_errors) < 0.9 * sum(plain_errors)
    codes = "model.layers.0.mlp.up_proj.codes"  # block 0 is sketched from the same inputs either way
    assert torch.equal(plain.state_dict()[codes], tuned.state_dict()[codes])  # tuning trains tables only
    layer = tuned.model.layers[1].mlp.up_proj
    assert layer.tables.dtype == CONFIG.torch_table_dtype() and layer.tables.requires_grad

    # steps that make the block worse are undone: the tables come back bit for bit
    hidden, kwargs_list = capture_block_inputs(tuned, tuned.model.layers, ids, 8, torch.device("cpu"))
    block = tuned.model.layers[0]
    with torch.no_grad():
        targets = [_output(dense.model.layers[0], h, kw) for h, kw in zip(hidden, kwargs_list)]
    layers = {n: m for n, m in block.named_modules() if hasattr(m, "tables")}
    before = {n: m.tables.detach().clone() for n, m in layers.items()}
    outcome = tune_block_tables(block, layers, hidden, kwargs_list, targets, steps=3, lr=0.5)
    assert not outcome["kept"] and outcome["loss_after"] >= outcome["loss_before"]
    assert all(torch.equal(m.tables, before[n]) for n, m in layers.items())
