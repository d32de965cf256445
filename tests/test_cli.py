"""The ``spallm`` command line: the main job's commands as a user runs them (fresh processes), refusals and quick
``info`` calls through the same ``main`` in this process (conftest ``cli``)."""

import json

import pytest
from conftest import cli, run_cli, sample_words

LLAMA2_7B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
}


@pytest.fixture
def llama2_config(tmp_path):
    path = tmp_path / "llama2-7b" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(LLAMA2_7B))
    return path


def test_info_llama2_7b_table_values_from_config_alone(llama2_config):
    out = run_cli("info", str(llama2_config), "--gpr", "4").stdout
    assert "table values (trainable): 87.0M" in out
    h, i, n = 4096, 11008, 32
    rows_per_layer = 4 * h + 2 * i + h  # q, k, v, o, gate, up (out = h, h, h, h, i, i) + down (out = h)
    for gpr, printed in [(1, "21.8M"), (2, "43.5M"), (4, "87.0M"), (8, "174.1M")]:
        assert f"table values (trainable): {printed}" in cli("info", str(llama2_config), "--gpr", str(gpr)).stdout
        data = json.loads(cli("info", str(llama2_config.parent), "--gpr", str(gpr), "--json").stdout)
        assert data["table_values"] == n * rows_per_layer * gpr * 16
        assert data["sketched_layers"] == 7 * n
        assert data["code_bytes"] == n * (4 * h * h + 3 * h * i) // 2


def test_info_estimates_the_memory_of_sketching_it(llama2_config):
    data = json.loads(cli("info", str(llama2_config), "--json", "--nsamples", "128", "--seqlen", "512",
                              "--max-memory", "512MiB").stdout)["sketch_memory"]  # fmt: skip
    h, i = 4096, 11008
    assert data["block_float32_bytes"] == 4 * (4 * h * h + 3 * h * i + 2 * h)  # 7 linears and 2 norms
    assert data["activation_bytes"] == 2 * 128 * 512 * h * 4
    assert data["hessian_bytes"] == 2 * 4 * i * i  # down_proj's input is the widest: its Hessian and the factor
    assert data["workspace_bytes"] <= (512 + 100) << 20  # budget + k-means passes, not the 2.8 GB of 45M weights
    assert data["peak_bytes"] == sum(v for k, v in data.items() if k != "peak_bytes")
    on_gpu = json.loads(cli("info", str(llama2_config), "--json", "--device", "cuda").stdout)["sketch_memory"]
    assert on_gpu["hessian_bytes"] == 4 * 4 * i * i  # and up to two copies in cuSOLVER's cholesky_inverse


def test_info_kernels_explains_the_choice(llama2_config):
    rows = json.loads(cli("info", str(llama2_config), "--kernels", "--json").stdout)["kernels"]
    cpu = [r for r in rows if r["case"].startswith("cpu ")]
    assert {r["case"] for r in cpu} == {
        "cpu float16 M=1 4096x4096",
        "cpu bfloat16 M=256 4096x4096",
        "cpu float32 M=256 4096x4096",
    }
    for case in {r["case"] for r in cpu}:
        verdicts = {r["backend"]: (r["accepted"], r["reason"]) for r in cpu if r["case"] == case}
        assert verdicts["reference"] == (True, "")
        assert verdicts["cpu"] == (True, "")
        accepted, reason = verdicts["triton"]
        assert not accepted and reason in ("runs on CUDA, not cpu (CPU tests use TRITON_INTERPRET=1)",
                                           "triton is not installed (pip install 'spallm-plugins[triton]')")  # fmt: skip
    out = cli("info", str(llama2_config), "--kernels").stdout
    assert "cpu float32 M=256 4096x4096" in out and "no: runs on CUDA, not cpu" in out


def test_sketch_then_eval_then_info(tmp_path, dense_dir):
    out_dir = tmp_path / "sk"
    proc = run_cli("sketch", str(dense_dir), "--out", str(out_dir), "--bits", "4", "--gpr", "2", "--quiet", "--offload")
    assert "sketched 14 linear layers" in proc.stdout
    assert "--offload is deprecated and has no effect" in proc.stderr
    report = json.loads((out_dir / "sketch_report.json").read_text())
    assert report["config"]["groups_per_row"] == 2 and len(report["layers"]) == 14
    text = tmp_path / "text.txt"
    text.write_text(sample_words(400))
    results = tmp_path / "ppl.json"
    run_cli("eval", str(dense_dir), str(out_dir), "--text", str(text), "--seqlen", "64", "--json", str(results))
    ppl = json.loads(results.read_text())["perplexity"]
    dense_ppl, sketched_ppl = ppl[str(dense_dir)], ppl[str(out_dir)]
    assert 1 < dense_ppl < 1000 and 1 < sketched_ppl < 1000
    assert abs(sketched_ppl / dense_ppl - 1) < 0.5
    info = json.loads(run_cli("info", str(out_dir), "--json").stdout)
    assert info["sketched_from_checkpoint"] and info["groups_per_row"] == 2


def test_sketch_errors_are_clear_and_leave_nothing(tmp_path, dense_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = cli("sketch", str(empty), "--out", str(tmp_path / "o1"), check=False)
    assert proc.returncode == 2 and "no config.json" in proc.stderr
    proc = cli("sketch", str(dense_dir), "--out", str(tmp_path / "o2"), "--gpr", "3", check=False)
    assert proc.returncode == 2 and "groups_per_row=3 does not divide in_features=64" in proc.stderr
    proc = cli("sketch", str(dense_dir), "--out", str(tmp_path / "o3"), "--bits", "5", check=False)
    assert proc.returncode == 2 and "bits=5" in proc.stderr
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    for config, expected in (({"model_type": "not-a-model"}, "unsupported architecture 'not-a-model'"),
                             ({"hidden_size": 8}, "no model_type; cannot tell the architecture")):  # fmt: skip
        (unknown / "config.json").write_text(json.dumps(config))
        proc = cli("sketch", str(unknown), "--out", str(tmp_path / "o4"), check=False)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and last.startswith(f"spallm sketch: error: {unknown / 'config.json'}: {expected}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense", "empty", "unknown"]


def test_info_kernels_lists_the_triton_backend_with_its_reason(llama2_config):
    out = cli("info", str(llama2_config), "--kernels").stdout
    assert "triton" in out and ("runs on CUDA, not cpu" in out or "not installed" in out)


def test_bench_kernels_without_cuda_says_so():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = cli("bench", "kernels", check=False)
    assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr


@pytest.mark.parametrize(("option", "value"), [("--seqlen", "0"), ("--seqlen", "-5"), ("--max-windows", "0")])
def test_eval_rejects_window_options_that_predict_nothing(tmp_path, option, value):
    proc = cli("eval", str(tmp_path), option, value, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"spallm eval: error: argument {option}:") and repr(value) in last


GGUF_HEADER = b"GGUF" + (3).to_bytes(4, "little")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"hello world\n", "not a GGUF file (expected the magic bytes 'GGUF' at offset 0, found b'hell')"),
        (b"", "not a GGUF file (expected the magic bytes 'GGUF' at offset 0, found b'')"),
        (GGUF_HEADER + (10**6).to_bytes(8, "little") * 2 + bytes(range(64)), "damaged GGUF file"),
        (GGUF_HEADER + bytes(range(7, 256, 3)) * 4, "damaged GGUF file"),
    ],
    ids=["text", "empty", "counts-past-the-end", "garbage"],
)
def test_eval_of_a_bad_gguf_file_names_it_and_what_was_expected(tmp_path, monkeypatch, content, expected):
    monkeypatch.setenv("SPALLM_HOME", str(tmp_path / "home"))
    bad = tmp_path / "x.gguf"
    bad.write_bytes(content)
    proc = cli("eval", str(bad), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"spallm eval: error: {bad}: {expected}"), last
    assert not (tmp_path / "home" / "models" / "x").exists()


def test_sketch_of_a_damaged_gguf_file_names_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SPALLM_HOME", str(tmp_path / "home"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(GGUF_HEADER + (10**6).to_bytes(8, "little") * 2)
    proc = cli("sketch", str(bad), "--out", str(tmp_path / "out"), "--quiet", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"spallm sketch: error: {bad}: damaged GGUF file (") and "GGUF v2/v3" in last, last
    assert not (tmp_path / "out").exists()


def test_eval_shows_a_progress_bar_unless_quiet(tmp_path, dense_dir):
    text = tmp_path / "text.txt"
    text.write_text(sample_words(200))
    loud = run_cli("eval", str(dense_dir), "--text", str(text), "--seqlen", "64")
    assert f"perplexity {dense_dir}" in loud.stderr and "4/4" in loud.stderr and "window" in loud.stderr
    quiet = run_cli("eval", str(dense_dir), "--text", str(text), "--seqlen", "64", "--quiet")
    assert quiet.stderr == "" and quiet.stdout == loud.stdout
    assert f"{dense_dir}: perplexity" in quiet.stdout
