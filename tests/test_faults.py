"""Faults a user meets (#35): a kill between the renames of --overwrite, two runs on one folder, Ctrl-C,
unreadable inputs. Each test failed before its fix."""

from __future__ import annotations

import pytest
from conftest import save_adapter


@pytest.fixture
def adapter_dir(tmp_path, sketched_dir):
    """A saved SpaLLM adapter (perturbed tables) on ``sketched_dir``."""
    return save_adapter(sketched_dir, tmp_path / "adapter")


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


SKETCH_AND_WAIT = (
    "import sys, time\n"
    "from spallm_plugins.config import SketchConfig\n"
    "from spallm_plugins.pipeline import sketch_to_folder\n"
    "def wait(index):\n"
    "    print('block', index, flush=True)\n"
    "    time.sleep(600)\n"
    "sketch_to_folder(sys.argv[1], sys.argv[2], SketchConfig(bits=4, groups_per_row=2), progress=False,\n"
    "                 on_block_done=wait)\n"
)


def test_a_second_writer_of_one_folder_is_refused_and_a_killed_one_leaves_no_stuck_lock(
    tmp_path, dense_dir, sketched_dir, adapter_dir
):
    import re
    import signal
    import subprocess
    import sys

    from spallm_plugins.config import SketchConfig
    from spallm_plugins.format import OutputError
    from spallm_plugins.merge import merge_adapter
    from spallm_plugins.pipeline import sketch_to_folder

    out = tmp_path / "C"
    first = subprocess.Popen([sys.executable, "-c", SKETCH_AND_WAIT, str(dense_dir), str(out)],
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert first.stdout.readline().strip() == "block 0"  # the first run holds progress in C/.spallm-partial
        config = SketchConfig(bits=4, groups_per_row=2)
        busy = re.escape(f"{out}: another spallm run (pid {first.pid}) is writing this folder")
        for resume in (False, True):
            with pytest.raises(OutputError, match=busy):
                sketch_to_folder(dense_dir, out, config, progress=False, resume=resume, overwrite=True)
        with pytest.raises(OutputError, match=busy):
            merge_adapter(sketched_dir, adapter_dir, out, overwrite=True)
        assert (out / ".spallm-partial" / "block_00000.safetensors").is_file()  # the first run's progress is intact
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    report = sketch_to_folder(dense_dir, out, config, progress=False, resume=True)  # the kill left no stuck lock
    assert report["resumed_from_block"] == 1
    assert not (out / ".spallm-partial").exists() and not list(tmp_path.glob(".C.*"))


def test_ctrl_c_during_a_block_prints_one_line_with_the_resume_command_and_exits_130(
    tmp_path, dense_dir, monkeypatch, capsys
):
    import shlex

    from spallm_plugins.cli import main
    from spallm_plugins.sketch import model as sketch_model_module

    real = sketch_model_module.sketch_layer

    def interrupted_in_block_1(linear, config, name, **kwargs):
        if ".layers.1." in name:
            raise KeyboardInterrupt  # what SIGINT raises in the main thread
        return real(linear, config, name=name, **kwargs)

    monkeypatch.setattr(sketch_model_module, "sketch_layer", interrupted_in_block_1)
    out = tmp_path / "C"
    argv = ["sketch", str(dense_dir), "--out", str(out), "--gpr", "2", "--quiet"]
    try:
        rc = main(argv)
    except KeyboardInterrupt:
        pytest.fail("spallm sketch let KeyboardInterrupt escape (a traceback for the user)")
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 130 and len(lines) == 1, lines
    assert f"kept in {out / '.spallm-partial'}" in lines[0]
    command = lines[0].split("continue with: ", 1)[1]
    assert command == shlex.join(["spallm", *argv, "--resume"])
    monkeypatch.setattr(sketch_model_module, "sketch_layer", real)
    assert main(shlex.split(command)[1:]) == 0
    assert (out / "config.json").is_file() and not (out / ".spallm-partial").exists()


PAUSE_IN_BLOCK_1 = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGINT, signal.default_int_handler)\n"  # as from a terminal (a background runner ignores it)
    "from spallm_plugins.cli import main\n"
    "from spallm_plugins.sketch import model\n"
    "real = model.sketch_layer\n"
    "def paused(linear, config, name, **kwargs):\n"
    "    if '.layers.1.' in name:\n"
    "        print('in block 1', flush=True)\n"
    "        time.sleep(600)\n"
    "    return real(linear, config, name=name, **kwargs)\n"
    "model.sketch_layer = paused\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def test_a_real_sigint_in_a_block_exits_130_without_a_traceback(tmp_path, dense_dir):
    import signal
    import subprocess
    import sys

    out = tmp_path / "C"
    argv = ["sketch", str(dense_dir), "--out", str(out), "--gpr", "2", "--quiet"]
    proc = subprocess.Popen([sys.executable, "-c", PAUSE_IN_BLOCK_1, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "in block 1"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].endswith(" --resume") and f"kept in {out / '.spallm-partial'}" in err, err


@pytest.mark.parametrize(
    "data, offset",
    [(b"the \xbc wheel", 4), ("the caf\xe9 wheel".encode("latin-1"), 7), (b"\x89PNG\r\n\x1a\n\x00\x00", 0)],
    ids=["one-bad-byte", "latin-1", "binary"],
)
def test_calibration_and_eval_text_that_is_not_utf8_names_the_file_and_byte(tmp_path, data, offset):
    from conftest import tiny_tokenizer

    from spallm_plugins.evaluate import read_text
    from spallm_plugins.sketch.calibration import CalibrationError, calibration_batch

    path = tmp_path / "calib.txt"
    path.write_bytes(data)
    where = f"{path}: not UTF-8 text: byte 0x{data[offset]:02x} at offset {offset}"
    with pytest.raises(CalibrationError, match=where) as err:
        calibration_batch(path, tiny_tokenizer(), nsamples=1, seqlen=4)
    assert "read as UTF-8" in str(err.value)
    with pytest.raises(ValueError, match=where):
        read_text(path)


@pytest.mark.parametrize("text", [" \n\t \n" * 500, "the " * 4000, ""], ids=["whitespace", "one-word", "empty"])
def test_calibration_text_without_a_handful_of_distinct_tokens_is_refused(tmp_path, text):
    from conftest import tiny_tokenizer

    from spallm_plugins.sketch.calibration import CalibrationError, calibration_batch

    path = tmp_path / "calib.txt"
    path.write_text(text)
    with pytest.raises(CalibrationError, match=f"{path}: .*(empty|distinct)"):
        calibration_batch(path, tiny_tokenizer(), nsamples=4, seqlen=16)


def test_a_pickle_checkpoint_is_refused_by_every_command_naming_the_file(tmp_path, dense_dir, capsys):
    import pickle

    from spallm_plugins.cli import main

    (dense_dir / "model.safetensors").unlink()
    (dense_dir / "pytorch_model.bin").write_bytes(pickle.dumps({"not": "weights"}))
    commands = (
        ["eval", str(dense_dir), "--quiet"],
        ["sketch", str(dense_dir), "--out", str(tmp_path / "out"), "--quiet"],
        ["merge", str(dense_dir), str(tmp_path / "adapter"), "--out", str(tmp_path / "out")],  # refused before it
    )
    for argv in commands:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert f"{dense_dir / 'pytorch_model.bin'}: a pickle checkpoint" in err and "save_pretrained" in err, err


def test_merge_warns_about_an_unknown_adapter_config_field_naming_it(tmp_path, sketched_dir, adapter_dir):
    import json
    import warnings

    from spallm_plugins.merge import merge_adapter

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merge_adapter(sketched_dir, adapter_dir, tmp_path / "plain")
    assert not [w for w in caught if "adapter_config" in str(w.message)]  # a config PEFT wrote has no unknown field
    config = adapter_dir / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "lora_dropuot": 0.1}))
    with pytest.warns(UserWarning, match=rf"{config}: unexpected field\(s\) \['lora_dropuot'\]"):
        merge_adapter(sketched_dir, adapter_dir, tmp_path / "merged")


def test_resume_with_other_settings_names_the_setting_and_both_values(tmp_path, dense_dir):
    from spallm_plugins.config import SketchConfig
    from spallm_plugins.pipeline import sketch_to_folder
    from spallm_plugins.sketch.progress import ResumeError

    class Killed(Exception):
        pass

    def kill(index):
        raise Killed

    out, config = tmp_path / "C", SketchConfig(bits=4, groups_per_row=2)
    with pytest.raises(Killed):
        sketch_to_folder(dense_dir, out, config, progress=False, on_block_done=kill)
    with pytest.raises(ResumeError, match=r"different config: groups_per_row was 2, this run has 4"):
        sketch_to_folder(dense_dir, out, config.replace(groups_per_row=4), progress=False, resume=True)
    with pytest.raises(ResumeError, match=r"different dense dtype: it was 'float32', this run has 'bfloat16'"):
        sketch_to_folder(dense_dir, out, config, progress=False, resume=True, dense_dtype="bfloat16")


def test_eval_json_that_cannot_be_written_is_refused_before_evaluating(tmp_path, dense_dir, capsys):
    from spallm_plugins.cli import main

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for target in (blocker / "results.json", tmp_path):  # under a file; a folder
        argv = ["eval", str(dense_dir), "--seqlen", "8", "--max-windows", "1", "--quiet", "--json", str(target)]
        assert main(argv) == 2
        captured = capsys.readouterr()
        assert "perplexity" not in captured.out, captured.out  # refused before any evaluation
        assert captured.err.startswith(f"spallm eval: error: {target}: "), captured.err


def test_from_pretrained_errors_on_a_sharded_checkpoint_name_its_folder(tmp_path, sketched_dir):
    import shutil

    from transformers import AutoModelForCausalLM

    from spallm_plugins.format import CheckpointError, read_tensors, write_tensors
    from spallm_plugins.hooks import register_host

    register_host("transformers")
    folder = tmp_path / "sharded"
    folder.mkdir()
    shutil.copy(sketched_dir / "config.json", folder)
    tensors = read_tensors(sketched_dir)
    del tensors["model.layers.1.mlp.up_proj.codes"]
    assert len(write_tensors(folder, tensors, max_shard_bytes=32 << 10)) > 2
    with pytest.raises(CheckpointError) as err:
        AutoModelForCausalLM.from_pretrained(folder)
    assert str(err.value).startswith(f"{folder} ("), str(err.value)
    assert "model.layers.1.mlp.up_proj" in str(err.value)


def test_troubleshooting_page_documents_a_lost_quantization_config_as_spallm_reports_it(tmp_path, sketched_dir, capsys):
    import json
    from pathlib import Path

    from spallm_plugins.cli import main

    page = Path(__file__).resolve().parents[1] / "docs" / "troubleshooting.md"
    assert page.is_file(), "docs/troubleshooting.md is missing"
    text = page.read_text(encoding="utf-8")
    config = sketched_dir / "config.json"
    config.write_text(
        json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "quantization_config"})
    )
    quoted = "no quantization_config, but the weights store sketched tensors"
    assert quoted in text
    for argv in (["eval", str(sketched_dir)], ["sketch", str(sketched_dir), "--out", str(tmp_path / "o")],
                 ["info", str(sketched_dir)]):  # fmt: skip
        assert main([*argv, "--quiet"] if argv[0] != "info" else argv) == 2, argv
        assert quoted in capsys.readouterr().err, argv  # the page quotes what every spallm command says
    assert "from_pretrained" in text and "random weights" in text
