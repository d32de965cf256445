"""Output folders lose no data (#18): refusals before any work, stale temporaries, permissions, full and
read-only file systems, and reports that count what is written. What a process shows (kills, the umask, warnings
and logged reports, mounts) runs in fresh processes; refusals, which ``main`` prints, run through ``main`` in this
process (conftest ``cli``)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys

import pytest
from conftest import CLI_CODE, cli, run_cli, run_python
from safetensors import safe_open


def sketch_cli(dense_dir, out, *extra, check=False, cwd=None, fresh=False):
    run = run_cli if fresh else cli
    return run("sketch", str(dense_dir), "--out", str(out), "--gpr", "2", "--quiet", *extra, check=check, cwd=cwd)


def one_error_line(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def tree(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_sketch_refuses_an_existing_non_empty_folder_unless_overwrite(tmp_path, dense_dir):
    out = tmp_path / "work"
    (out / "sub").mkdir(parents=True)
    (out / "thesis.txt").write_text("four years of work")
    (out / "sub" / "notes.md").write_text("notes")
    proc = sketch_cli(dense_dir, out)
    one_error_line(proc, str(out), "already exists and is not empty", "thesis.txt", "--overwrite")
    assert (out / "thesis.txt").read_text() == "four years of work" and (out / "sub" / "notes.md").is_file()
    assert tree(out) == ["sub", "sub/notes.md", "thesis.txt"]

    proc = sketch_cli(dense_dir, out, "--overwrite", check=True)
    assert (out / "config.json").is_file() and not (out / "thesis.txt").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    sketch_cli(dense_dir, empty, check=True)  # an empty folder is fine without --overwrite
    assert (empty / "config.json").is_file()


def test_sketch_never_replaces_its_source_a_file_or_the_current_directory(tmp_path, dense_dir):
    before = {p: p.read_bytes() for p in dense_dir.iterdir()}
    for extra in ((), ("--overwrite",)):
        one_error_line(sketch_cli(dense_dir, dense_dir, *extra), str(dense_dir), "the model being read")
        one_error_line(sketch_cli(dense_dir, tmp_path, *extra), str(tmp_path), f"a folder holding {dense_dir}")
    assert {p: p.read_bytes() for p in dense_dir.iterdir()} == before

    a_file = tmp_path / "results.txt"
    a_file.write_text("keep me")
    for extra in ((), ("--overwrite",)):
        one_error_line(sketch_cli(dense_dir, a_file, *extra), str(a_file), "is a file, not a folder")
    assert a_file.read_text() == "keep me"

    workdir = tmp_path / "cwd"
    workdir.mkdir()
    (workdir / "data.txt").write_text("mine")
    one_error_line(sketch_cli(dense_dir, ".", "--overwrite", cwd=workdir), str(workdir), "is the current directory")
    assert (workdir / "data.txt").read_text() == "mine"


def test_merge_refuses_to_replace_its_base_or_adapter_and_copies_no_stale_reports(tmp_path, sketched_dir):
    pytest.importorskip("peft")
    from peft import get_peft_model

    from spallm_plugins.integrations.peft import SpaLLMConfig
    from spallm_plugins.pipeline import load_sketched

    base, _ = load_sketched(sketched_dir)
    get_peft_model(base, SpaLLMConfig(task_type="CAUSAL_LM", init_weights=False)).save_pretrained(tmp_path / "adapter")
    (sketched_dir / "quickstart.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in sketched_dir.iterdir()}
    for target in (sketched_dir, tmp_path / "adapter"):
        for extra in ((), ("--overwrite",)):
            proc = cli("merge", str(sketched_dir), str(tmp_path / "adapter"), "--out", str(target), *extra,
                       check=False)  # fmt: skip
            one_error_line(proc, str(target), "which the output would replace")
    assert {p.name: p.read_bytes() for p in sketched_dir.iterdir()} == before
    merged = tmp_path / "merged"
    cli("merge", str(sketched_dir), str(tmp_path / "adapter"), "--out", str(merged))
    assert (merged / "merge_report.json").is_file() and (merged / "tokenizer.json").is_file()
    assert not (merged / "sketch_report.json").exists() and not (merged / "quickstart.json").exists()


def test_a_killed_write_leaves_a_temporary_that_the_next_run_removes_and_reports(tmp_path, dense_dir):
    out = tmp_path / "sk"
    code = (
        "import os, signal, sys\n"
        "from spallm_plugins.format import atomic_path\n"
        "with atomic_path(sys.argv[1], is_dir=True) as tmp:\n"
        "    (tmp / 'model.safetensors').write_bytes(b'x' * 4096)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = run_python(code, str(out), check=False)
    assert proc.returncode == -signal.SIGKILL
    leftovers = list(tmp_path.glob(".sk.tmp-*"))
    assert len(leftovers) == 1 and not out.exists()
    proc = sketch_cli(dense_dir, out, check=True, fresh=True)
    assert f"removed {leftovers[0]} (a temporary left by a killed run)" in proc.stderr
    assert not list(tmp_path.glob(".sk.*")) and (out / "config.json").is_file()


def test_a_live_writers_temporary_is_kept_and_a_half_replaced_output_is_put_back(tmp_path):
    from spallm_plugins.outputs import remove_stale_temporaries

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    live = tmp_path / f".out.tmp-{os.getpid()}-abcd"
    live.mkdir()
    old = tmp_path / f".out.old-{dead_pid}-efgh"
    old.mkdir()
    (old / "config.json").write_text('{"previous": true}')
    stale_file = tmp_path / f".out.tmp-{dead_pid}-ijkl"
    stale_file.write_text("half a file")
    done = remove_stale_temporaries(tmp_path / "out")
    assert len(done) == 2 and "put back the previous content" in done[0]
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == {"previous": True}
    assert live.is_dir() and not stale_file.exists() and not old.exists()


def test_outputs_follow_the_umask_not_a_private_mode(tmp_path, dense_dir):
    from spallm_plugins.format import write_json

    previous = os.umask(0o022)
    try:
        sketch_cli(dense_dir, tmp_path / "sk", check=True, fresh=True)
        write_json(tmp_path / "settings.json", {"a": 1})
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "sk").stat().st_mode) == 0o755
    files = [f for f in (tmp_path / "sk").iterdir()]
    assert {"config.json", "sketch_report.json", "model.safetensors.index.json"} <= {f.name for f in files}
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f.name
    assert stat.S_IMODE((tmp_path / "settings.json").stat().st_mode) == 0o644


def test_data_free_two_and_three_bit_sketches_warn_and_point_at_calibration(tmp_path, dense_dir):
    proc = sketch_cli(dense_dir, tmp_path / "b2", "--bits", "2", check=True, fresh=True)
    warning = [line for line in proc.stderr.splitlines() if line.startswith("spallm: a data-free 2-bit sketch")]
    assert len(warning) == 1 and "--calib" in warning[0], proc.stderr
    assert json.loads((tmp_path / "b2" / "sketch_report.json").read_text())["warning"] == warning[0]
    proc = sketch_cli(dense_dir, tmp_path / "b4", "--bits", "4", check=True, fresh=True)
    assert "data-free" not in proc.stderr


def _stored_rest(folder):
    from spallm_plugins.format import safetensors_files

    rest = []
    for file in safetensors_files(folder):
        with safe_open(str(file), framework="pt") as fh:
            rest += [fh.get_tensor(n) for n in fh.keys() if not n.endswith((".codes", ".tables"))]
    return sum(t.numel() * t.element_size() for t in rest), {str(t.dtype) for t in rest}


def test_info_counts_what_is_written_and_dense_dtype_writes_smaller_rests(tmp_path, dense_dir):
    import torch

    from spallm_plugins.pipeline import load_sketched

    sketch_cli(dense_dir, tmp_path / "fp32", check=True)
    sketch_cli(dense_dir, tmp_path / "bf16", "--dense-dtype", "bfloat16", check=True)
    for name, dtype in (("fp32", "float32"), ("bf16", "bfloat16")):
        stored_bytes, stored_dtypes = _stored_rest(tmp_path / name)
        assert stored_dtypes == {f"torch.{dtype}"}
        info = json.loads(cli("info", str(tmp_path / name), "--json").stdout)
        assert (info["dense_rest_bytes"], info["dense_dtype"]) == (stored_bytes, dtype)
        files = sum(f.stat().st_size for f in (tmp_path / name).glob("*.safetensors"))
        assert info["sketched_model_bytes"] <= files < info["sketched_model_bytes"] + 64 * 1024  # + the headers
    assert _stored_rest(tmp_path / "bf16")[0] * 2 == _stored_rest(tmp_path / "fp32")[0]
    dense_info = json.loads(cli("info", str(dense_dir), "--json").stdout)
    assert dense_info["dense_dtype"] == "float32"  # the tiny model is stored in float32
    model, _ = load_sketched(tmp_path / "bf16")
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.isfinite(model(torch.tensor([[4, 5, 6]])).logits).all()


# ---- full and read-only file systems: a small tmpfs in a private mount namespace (root only) --------------


def private_mount(tmp_path, options: str, *cli_args: str) -> subprocess.CompletedProcess:
    """Run ``spallm *cli_args`` with a fresh tmpfs (mount ``options``) at ``tmp_path/mnt``, visible to it alone."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
        pytest.skip("needs unshare -m (root) to mount a small private file system")
    mnt = tmp_path / "mnt"
    mnt.mkdir(exist_ok=True)
    cli = shlex.join([sys.executable, "-c", CLI_CODE, *cli_args])
    script = f"mount -t tmpfs -o {options} tmpfs {shlex.quote(str(mnt))} && {cli}"
    return subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=600)


def test_read_only_output_is_refused_before_any_sketching(tmp_path, dense_dir):
    proc = private_mount(tmp_path, "ro,size=1m", "sketch", str(dense_dir), "--out", str(tmp_path / "mnt" / "sk"))
    one_error_line(proc, str(tmp_path / "mnt" / "sk"), "cannot write there", "Read-only file system")
    assert "sketching" not in proc.stderr  # no progress bar: refused before the work


def test_too_little_space_is_refused_before_any_sketching(tmp_path, dense_dir):
    proc = private_mount(tmp_path, "size=16k", "sketch", str(dense_dir), "--out", str(tmp_path / "mnt" / "sk"))
    one_error_line(proc, "not enough free space", "MiB are free")
    assert "sketching" not in proc.stderr


def test_a_disk_that_fills_up_while_writing_leaves_nothing_that_looks_complete(tmp_path):
    code = (
        "import sys, torch\n"
        "from spallm_plugins.format import OutputSpaceError, write_tensors\n"
        "try:\n"
        "    write_tensors(sys.argv[1], {'w': torch.zeros(1 << 20)})\n"
        "except OutputSpaceError as err:\n"
        "    print(err)\n"
        "    sys.exit(3)\n"
    )
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
        pytest.skip("needs unshare -m (root) to mount a small private file system")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    out = mnt / "ckpt"
    script = (
        f"mount -t tmpfs -o size=256k tmpfs {shlex.quote(str(mnt))} && "
        f"{shlex.join([sys.executable, '-c', code, str(out)])}; rc=$?; ls -A {shlex.quote(str(out))}; exit $rc"
    )
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"{out / 'model.safetensors'}: no space left on the device"), lines
    assert lines[1:] == []  # the folder holds no partial shard and no temporary


def test_quickstart_benchmarks_and_the_python_api_follow_the_same_rule(tmp_path, sketched_dir):
    from spallm_plugins.format import OutputError, load_quantization_config
    from spallm_plugins.pipeline import load_sketched, save_sketched_model

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    adapter_taken = tmp_path / "fresh-adapter"
    adapter_taken.mkdir()
    (adapter_taken / "keep.txt").write_text("mine too")
    one_error_line(run_cli("quickstart", "--out", str(taken), check=False), str(taken), "--overwrite")
    one_error_line(run_cli("quickstart", "--out", str(tmp_path / "fresh"), check=False), str(adapter_taken))
    for bench in ("quality", "kernels"):
        proc = run_cli("bench", bench, "--out", str(taken), check=False)
        if bench == "kernels" and "needs a CUDA GPU" in proc.stderr:
            continue  # refused earlier, for want of a GPU: nothing written either
        one_error_line(proc, str(taken), "already exists and is not empty")
    model, tokenizer = load_sketched(sketched_dir)
    config = load_quantization_config(sketched_dir)
    with pytest.raises(OutputError, match="already exists and is not empty"):
        save_sketched_model(model, tokenizer, taken, config)
    save_sketched_model(model, tokenizer, taken, config, overwrite=True)
    assert (taken / "config.json").is_file() and not (taken / "keep.txt").exists()
    assert (adapter_taken / "keep.txt").read_text() == "mine too" and not (tmp_path / "fresh").exists()
