"""Hugging Face Hub ids wherever a model or adapter is named, from a Hub cache built by hand, offline.

The cache has huggingface_hub's layout (``models--org--name/snapshots/<commit>/...``, ``refs/main``), so the
real ``snapshot_download`` resolves it; ``HF_HOME`` and ``HF_HUB_OFFLINE`` are set per test, after
huggingface_hub was imported, as a user's shell would set them before a run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import cli, needs, sample_words, tiny_llama, tiny_tokenizer

from spallm_plugins.hub import HubOrigin, hub_cache_dir, hub_origin, looks_like_repo_id

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def cached_repo(hub: Path, repo_id: str, commit: str = COMMIT, refs: tuple[str, ...] = ("main",)) -> Path:
    """An empty snapshot folder of ``repo_id`` at ``commit`` in the hub cache ``hub``, named by ``refs``."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """``HF_HOME`` in ``tmp_path`` holding ``org/tiny`` (a tiny Llama and its tokenizer) at COMMIT, offline."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hf" / "hub"
    snapshot = cached_repo(cache, "org/tiny")
    tiny_llama().save_pretrained(snapshot)
    tiny_tokenizer().save_pretrained(snapshot)
    return cache


def one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_sketch_and_info_take_a_hub_id_from_the_offline_cache(tmp_path, hub):
    out = tmp_path / "sketched"
    proc = cli("sketch", "org/tiny", "--out", str(out), "--gpr", "2", "--quiet", cwd=tmp_path)
    assert "sketched 14 linear layers" in proc.stdout
    report = json.loads((out / "sketch_report.json").read_text())
    assert report["source_hub"] == {"repo_id": "org/tiny", "revision": "main", "commit": COMMIT}
    assert hub_origin(report["source"]) == HubOrigin("org/tiny", COMMIT)
    info = json.loads(cli("info", "org/tiny", "--json", "--gpr", "2").stdout)
    assert info["model_type"] == "llama" and info["sketched_layers"] == 14 and not info["sketched_from_checkpoint"]
    assert cli("info", "org/tiny").stdout.startswith("org/tiny: llama, bits=4")


def test_revision_picks_the_snapshot_and_a_missing_one_is_one_line(tmp_path, hub):
    tagged = cached_repo(hub, "org/tiny", OTHER_COMMIT, refs=("v2",))
    tiny_llama(seed=1).save_pretrained(tagged)
    out = tmp_path / "v2"
    cli("sketch", "org/tiny", "--revision", "v2", "--out", str(out), "--quiet")
    report = json.loads((out / "sketch_report.json").read_text())
    assert report["source_hub"] == {"repo_id": "org/tiny", "revision": "v2", "commit": OTHER_COMMIT}
    cli("sketch", "org/tiny", "--revision", COMMIT, "--out", str(tmp_path / "by-commit"), "--quiet")
    proc = cli("sketch", "org/tiny", "--revision", "nope", "--out", str(tmp_path / "none"), check=False)
    line = one_error_line(proc)
    assert line.startswith("spallm sketch: error: org/tiny@nope: ")
    assert "main -> 0123456" in line and "v2 -> fedcba9" in line and "HF_HUB_OFFLINE=1" in line
    assert not (tmp_path / "none").exists()


def test_an_uncached_id_offline_is_one_line_naming_what_was_tried(tmp_path, hub):
    line = one_error_line(cli("sketch", "org/absent", "--out", str(tmp_path / "o"), check=False))
    assert line.startswith("spallm sketch: error: org/absent@main: no local folder of that name; ")
    assert f"not in the Hugging Face cache ({hub};" in line and "HF_HUB_OFFLINE=1" in line
    line = one_error_line(cli("eval", "org/absent", "--revision", "v1", check=False))
    assert "org/absent@v1: " in line
    assert not (tmp_path / "o").exists()


def test_an_unreachable_hub_is_named_and_the_cache_still_serves(tmp_path, hub, monkeypatch):
    """Online, with the Hub endpoint refusing connections: the cached id resolves, the uncached one says why."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # in case the test run itself started offline
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    line = one_error_line(cli("info", "org/absent", check=False))
    assert "org/absent@main: " in line and "the Hub could not be reached (ConnectError" in line
    assert cli("info", "org/tiny", "--json").returncode == 0


def test_a_repo_of_pickle_weights_is_refused_naming_it(tmp_path, hub):
    snapshot = cached_repo(hub, "org/pickled")
    tiny_llama().config.save_pretrained(snapshot)
    (snapshot / "pytorch_model.bin").write_bytes(b"never unpickled")
    line = one_error_line(cli("sketch", "org/pickled", "--out", str(tmp_path / "o"), check=False))
    assert "org/pickled@main: the repo holds only pickle weights (pytorch_model.bin)" in line
    assert "never unpickles" in line
    assert not (tmp_path / "o").exists()


def test_eval_merge_and_adapters_take_hub_ids(tmp_path, hub):
    from spallm_plugins.models import resolve_adapter

    text = tmp_path / "text.txt"
    text.write_text(sample_words(200))
    out = cli("eval", "org/tiny", "--text", str(text), "--seqlen", "32", "--max-windows", "1", "--quiet").stdout
    assert out.startswith("org/tiny: perplexity ")
    adapter = cached_repo(hub, "org/adapter")
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    assert resolve_adapter("org/adapter") == adapter.resolve()
    line = one_error_line(cli("merge", "org/tiny", "org/adapter-missing", "--out", str(tmp_path / "m"), check=False))
    assert "org/adapter-missing@main: " in line


def test_merge_a_hub_adapter_into_a_hub_base(tmp_path, hub):
    """A sketched base and a SpaLLM adapter, both published (cached) as Hub repos, merged by their ids."""
    needs("peft", "nox -s tests installs it")
    import shutil

    from peft import get_peft_model

    from spallm_plugins.integrations.peft import SpaLLMConfig
    from spallm_plugins.pipeline import load_sketched

    cli("sketch", "org/tiny", "--out", str(tmp_path / "sketched"), "--gpr", "2", "--quiet")
    base = cached_repo(hub, "org/tiny-spallm")
    shutil.copytree(tmp_path / "sketched", base, dirs_exist_ok=True)
    model, _ = load_sketched("org/tiny-spallm")
    adapter = cached_repo(hub, "org/tiny-adapter", OTHER_COMMIT)
    get_peft_model(model, SpaLLMConfig(task_type="CAUSAL_LM", init_weights=False)).save_pretrained(adapter)
    out = tmp_path / "merged"
    cli("merge", "org/tiny-spallm", "org/tiny-adapter", "--adapter-revision", OTHER_COMMIT, "--out", str(out))
    report = json.loads((out / "merge_report.json").read_text())
    assert report["base_hub"] == {"repo_id": "org/tiny-spallm", "revision": "main", "commit": COMMIT}
    assert report["adapter_hub"] == {"repo_id": "org/tiny-adapter", "revision": OTHER_COMMIT, "commit": OTHER_COMMIT}
    assert report["merged_layers"] == 14

    old = tmp_path / "old-adapter"  # saved before fingerprints were recorded: the Hub base's codes vouched for
    shutil.copytree(adapter, old)
    config = json.loads((old / "adapter_config.json").read_text())
    recorded = config.pop("base_codes_fingerprint")
    (old / "adapter_config.json").write_text(json.dumps(config))
    cli("fingerprint", str(old), "--base", "org/tiny-spallm", "--revision", COMMIT)
    assert json.loads((old / "adapter_config.json").read_text())["base_codes_fingerprint"] == recorded


def test_revision_of_a_local_path_is_refused(tmp_path, hub, dense_dir):
    line = one_error_line(
        cli("sketch", str(dense_dir), "--revision", "main", "--out", str(tmp_path / "o"), check=False)
    )
    assert f"{dense_dir}: --revision main applies to Hugging Face Hub ids" in line


def test_what_looks_like_a_hub_id_and_where_the_cache_is(tmp_path, monkeypatch):
    assert looks_like_repo_id("meta-llama/Llama-3.2-1B") and looks_like_repo_id("org/name.v2")
    for not_an_id in ("smollm2", "./org/name", "/abs/path", "a/b/c", "org/--x", "org/../x", "org/m.gguf", "org/"):
        assert not looks_like_repo_id(not_an_id), not_an_id
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert hub_cache_dir() == tmp_path / "elsewhere"
    assert hub_origin(tmp_path) is None
    assert hub_origin(tmp_path / "models--a--b" / "snapshots" / COMMIT) == HubOrigin("a/b", COMMIT)


def test_serve_spends_the_hub_id_and_revision_on_the_snapshot(hub):
    from spallm_plugins.integrations.vllm.serve import with_hub_model

    snapshot = str((hub / "models--org--tiny" / "snapshots" / COMMIT).resolve())
    assert with_hub_model(["org/tiny", "--revision", COMMIT, "--port", "8000"]) == [
        snapshot, "--port", "8000", "--served-model-name", "org/tiny"
    ]  # fmt: skip
    assert with_hub_model(["--model=org/tiny", "--served-model-name", "t"]) == [
        "--served-model-name", "t", "--model", snapshot
    ]  # fmt: skip
    assert with_hub_model(["--port", "8000"]) == ["--port", "8000"]
