"""The streaming sketcher (#13): identical bytes to the in-memory sketch, one block resident at a time,
resume at and inside block boundaries (bias model included), and damaged sources named clearly."""

from __future__ import annotations

import json
import weakref

import pytest
import torch
from conftest import WORDS, sample_words, tiny_llama, tiny_tokenizer
from safetensors.torch import load_file, save_file

from spallm_plugins.config import SketchConfig
from spallm_plugins.format import CheckpointError, safetensors_files
from spallm_plugins.models import load_tokenizer
from spallm_plugins.pipeline import cast_dense_rest, load_sketched, sketch_to_folder
from spallm_plugins.sketch import sketch_model
from spallm_plugins.sketch.calibration import calibration_batch
from spallm_plugins.sketch.driver import sketch_model_calibrated
from spallm_plugins.sketch.progress import PARTIAL_DIR

pytestmark = pytest.mark.slow  # scheduled first under pytest-xdist (conftest.py)

DATA_FREE = SketchConfig(bits=4, groups_per_row=2)
CALIBRATED = SketchConfig(bits=3, groups_per_row=2, method="gptq", nsamples=8, seqlen=32)


def tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    config = Qwen2Config(vocab_size=40, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True)  # fmt: skip
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:  # visible biases (q/k/v have one)
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return model


def tiny_char_tokenizer():
    """Byte-level BPE over the letters of WORDS, no merges: what AutoTokenizer's Qwen2Tokenizer (chosen by
    model_type) reads back with distinct ids; it turns tiny_tokenizer's whole words into one repeated id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    letters = sorted(set("".join(WORDS)))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "\u0120": 4, **{c: i + 5 for i, c in enumerate(letters)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def save_sharded(model, path, dtype=None):
    """A dense checkpoint in several shards, with a tokenizer that reads the calibration words back."""
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path, max_shard_size="30KB")
    (tiny_char_tokenizer() if model.config.model_type == "qwen2" else tiny_tokenizer()).save_pretrained(path)
    assert len(safetensors_files(path)) >= 3
    return path


@pytest.fixture
def calib_file(tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_text("\n".join(json.dumps({"text": sample_words(60, seed=i)}) for i in range(20)))
    return path


def tensors(folder):
    out = {}
    for f in safetensors_files(folder):
        out.update(load_file(str(f)))
    return out


def in_memory(folder, config, ids=None, dense_dtype="float32"):
    """The sketch the streaming one replaces: the whole model in float32, sketched in place."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    if ids is None:
        sketch_model(model, config)
    else:
        sketch_model_calibrated(model, config, ids)
    cast_dense_rest(model, dense_dtype)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    return {k: v.detach() for k, v in model.state_dict().items() if k not in tied}


def assert_same(expected, folder):
    got = tensors(folder)
    assert set(got) == set(expected), sorted(set(got) ^ set(expected))
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streaming_data_free_equals_the_in_memory_sketch(tmp_path, dtype):
    source = save_sharded(tiny_llama(), tmp_path / "dense", dtype)
    report = sketch_to_folder(source, tmp_path / "out", DATA_FREE, progress=False)
    dense_dtype = str(dtype).removeprefix("torch.")
    assert report["streamed"] and report["dense_dtype"] == dense_dtype
    assert_same(in_memory(source, DATA_FREE, dense_dtype=dense_dtype), tmp_path / "out")
    assert len(report["blocks"]) == 2 and all(b["peak_rss_bytes"] > 0 for b in report["blocks"])
    load_sketched(tmp_path / "out")


def test_streaming_calibrated_equals_the_in_memory_sketch_with_biases_and_tied_embeddings(tmp_path, calib_file):
    source = save_sharded(tiny_qwen2(), tmp_path / "dense")
    config = CALIBRATED.replace(calibration=str(calib_file))
    sketch_to_folder(source, tmp_path / "out", config, progress=False)
    ids = calibration_batch(str(calib_file), load_tokenizer(source), config.nsamples, config.seqlen, config.seed)
    expected = in_memory(source, config, ids)
    assert "lm_head.weight" not in expected and "model.layers.0.self_attn.q_proj.bias" in expected
    assert_same(expected, tmp_path / "out")
    model, _ = load_sketched(tmp_path / "out")
    assert torch.isfinite(model(torch.tensor([[5, 6, 7]])).logits).all()


def test_no_two_blocks_are_ever_resident(tmp_path, calib_file):
    from spallm_plugins.streaming import sketch_streaming

    source = save_sharded(tiny_llama(num_hidden_layers=4), tmp_path / "dense")
    reads: list[int] = []
    dense_linears: dict[int, list] = {}  # block -> weak references to its dense nn.Linear modules

    def check(name, model):
        if not name.startswith("model.layers."):
            return
        index = int(name.split(".")[2])
        reads.append(index)
        for i, block in enumerate(model.model.layers):
            resident = [n for n, t in block.state_dict(keep_vars=True).items() if t.device.type != "meta"]
            assert i == index or not resident, f"reading block {index} while block {i} holds {resident[:2]}"
        if index not in dense_linears:
            dense_linears[index] = [weakref.ref(m) for m in model.model.layers[index].modules()
                                    if type(m) is torch.nn.Linear]  # fmt: skip
        for i, refs in dense_linears.items():
            alive = [m for m in (r() for r in refs) if m is not None and m.weight.device.type != "meta"]
            assert i == index or not alive, f"reading block {index} while block {i}'s dense linears live on"

    ids = calibration_batch(str(calib_file), tiny_tokenizer(), 8, 32)
    for calibration in (None, ids):
        reads.clear()
        dense_linears.clear()
        out = tmp_path / ("calibrated" if calibration is not None else "data-free")
        sketch_streaming(source, out, CALIBRATED if calibration is not None else DATA_FREE,
                         dense_dtype="float32", calibration_ids=calibration, on_read=check)  # fmt: skip
        assert reads == sorted(reads) and set(reads) == {0, 1, 2, 3}


class Killed(Exception):
    pass


@pytest.mark.parametrize("where", ["block boundary", "inside a block"])
def test_resume_after_a_kill_gives_the_same_bytes_with_biases(tmp_path, calib_file, where):
    from spallm_plugins import streaming

    source = save_sharded(tiny_qwen2(), tmp_path / "dense")
    config = CALIBRATED.replace(calibration=str(calib_file))
    sketch_to_folder(source, tmp_path / "straight", config, progress=False)
    out = tmp_path / "resumed"

    def kill_after_block_0(index):
        if index == 0:
            raise Killed

    def kill_inside_block_1(name, model):
        if name.startswith("model.layers.1.mlp"):
            raise Killed

    kwargs = {"on_block_done": kill_after_block_0} if where == "block boundary" else {}
    original = streaming.TensorSource.read
    if where == "inside a block":

        def read(self, name, like=None):
            tensor = original(self, name, like)
            kill_inside_block_1(name, None)
            return tensor

        streaming.TensorSource.read = read
    try:
        with pytest.raises(Killed):
            sketch_to_folder(source, out, config, progress=False, **kwargs)
    finally:
        streaming.TensorSource.read = original
    assert not (out / "config.json").exists() and (out / PARTIAL_DIR / "progress.json").is_file()
    report = sketch_to_folder(source, out, config, progress=False, resume=True)
    assert report["resumed_from_block"] == 1 and not (out / PARTIAL_DIR).exists()
    straight, resumed = tensors(tmp_path / "straight"), tensors(out)
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert straight[name].dtype == resumed[name].dtype and torch.equal(straight[name], resumed[name]), name


@pytest.mark.parametrize("first, second", [(True, True), (True, False), (False, True)])
def test_offloaded_activations_give_the_same_bytes_and_resume_across_modes(tmp_path, calib_file, first, second):
    source = save_sharded(tiny_qwen2(), tmp_path / "dense")
    config = CALIBRATED.replace(calibration=str(calib_file), true_sequential=True)
    sketch_to_folder(source, tmp_path / "straight", config, progress=False)
    out = tmp_path / "offloaded"
    spilled: list[list[str]] = []

    def kill_after_block_0(index):
        spilled.append(sorted(p.name for p in (out / PARTIAL_DIR).glob("activations_*")))
        raise Killed

    with pytest.raises(Killed):
        sketch_to_folder(source, out, config, progress=False, offload_activations=first,
                         on_block_done=kill_after_block_0)  # fmt: skip
    batches = len(range(0, config.nsamples, 8))
    expected = [f"activations_{tag}_{i:05d}.safetensors" for tag in "ab" for i in range(batches)]
    assert spilled == [expected if first else []]
    assert (out / PARTIAL_DIR / "inputs_00001.safetensors").is_file() != first
    report = sketch_to_folder(source, out, config, progress=False, resume=True, offload_activations=second)
    assert report["resumed_from_block"] == 1
    straight, offloaded = tensors(tmp_path / "straight"), tensors(out)
    assert straight.keys() == offloaded.keys()
    for name in straight:
        assert torch.equal(straight[name], offloaded[name]), name


def _damage(source, kind):
    index = json.loads((source / "model.safetensors.index.json").read_text())
    shard = source / index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    if kind == "missing shard":
        shard.unlink()
        return str(shard.name)
    if kind == "tensor not in its shard":
        other = next(f for f in sorted(set(index["weight_map"].values())) if f != shard.name)
        index["weight_map"]["model.layers.1.mlp.up_proj.weight"] = other
        (source / "model.safetensors.index.json").write_text(json.dumps(index))
        return "model.layers.1.mlp.up_proj.weight"
    if kind == "truncated shard":
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) - 100])
        return f"{shard.name}: truncated"
    if kind == "unexpected dtype":
        held = load_file(str(shard))
        held["model.layers.1.mlp.up_proj.weight"] = torch.ones_like(held["model.layers.1.mlp.up_proj.weight"],
                                                                    dtype=torch.int32)  # fmt: skip
        save_file(held, str(shard), metadata={"format": "pt"})
        return "model.layers.1.mlp.up_proj.weight has dtype int32, expected a float dtype"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing shard", "tensor not in its shard", "truncated shard", "unexpected dtype"])
def test_a_damaged_source_is_named_and_resume_continues_once_fixed(tmp_path, calib_file, kind):
    import shutil

    source = save_sharded(tiny_llama(), tmp_path / "dense")
    backup = tmp_path / "backup"
    shutil.copytree(source, backup)
    expected = _damage(source, kind)
    config = CALIBRATED.replace(calibration=str(calib_file))
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=expected.replace(".", r"\.")):
        sketch_to_folder(source, out, config, progress=False)
    assert not (out / "config.json").exists() and not list(tmp_path.glob(".out.tmp-*"))
    shutil.rmtree(source)
    shutil.copytree(backup, source)
    sketch_to_folder(source, out, config, progress=False, resume=True)
    load_sketched(out)


def test_bench_scale_makes_sharded_checkpoints_and_measures_each_sketch(tmp_path):
    from spallm_plugins.bench.scale import run_scale_bench

    tiny = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 4,
            "vocab_size": 4100}  # fmt: skip
    results = run_scale_bench(tmp_path / "bench", layers=(1, 3), nsamples=4, seqlen=32, groups_per_row=2,
                              shape=tiny, log=lambda line: None)  # fmt: skip
    rows = {(r["layers"], r["mode"]): r for r in results["rows"]}
    assert set(rows) == {(1, "data-free"), (1, "calibrated"), (3, "data-free"), (3, "calibrated")}
    assert all(r["peak_rss_bytes"] > 50 << 20 and r["seconds_per_block"] > 0 for r in rows.values())
    assert rows[(3, "calibrated")]["blocks"] == 3
    assert set(results["peak_rss_growth_bytes_first_to_last"]) == {"data-free", "calibrated"}
    assert json.loads((tmp_path / "bench" / "scale.json").read_text())["rows"] == results["rows"]
    assert results["device"] == "cpu" and all(
        r["device"] == "cpu" and r["peak_gpu_bytes"] is None for r in rows.values()
    )


MMAP_PROBE = """
import ctypes, sys, torch
from spallm_plugins.sketch.process_memory import _glibc, fix_mmap_threshold

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = _glibc()
if libc is None or not hasattr(libc, "mallinfo2"):
    print("no-glibc")
    sys.exit(0)
libc.mallinfo2.restype = MallInfo2
fixed = fix_mmap_threshold() if sys.argv[1] == "fixed" else None
big = torch.ones(20 << 20, dtype=torch.uint8)
del big  # freeing a 20 MiB mapping raises glibc's dynamic threshold to 20 MiB
before = libc.mallinfo2().hblkhd
medium = torch.ones(4 << 20, dtype=torch.uint8)
print(fixed, libc.mallinfo2().hblkhd - before)
"""


def test_a_fixed_mmap_threshold_keeps_medium_temporaries_out_of_the_heap():
    import os

    from conftest import run_python

    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        pytest.skip("MALLOC_MMAP_THRESHOLD_ is set for this test run: glibc's default is not observable")
    default = run_python(MMAP_PROBE, "default").stdout.split()
    if default == ["no-glibc"]:
        pytest.skip("not glibc: fix_mmap_threshold is a no-op there")
    assert default == ["None", "0"], "glibc's dynamic threshold should put a 4 MiB block in the heap"
    fixed, mapped = run_python(MMAP_PROBE, "fixed").stdout.split()
    assert fixed == "True" and int(mapped) >= 4 << 20  # its own mapping, returned to the system when freed
    respected = run_python(MMAP_PROBE, "fixed", env={"MALLOC_MMAP_THRESHOLD_": "1048576"}).stdout.split()
    assert respected[0] == "False"  # the user's own setting wins


def test_table_tuning_streams_with_spilled_targets_and_resumes_to_the_same_bytes(tmp_path, calib_file):
    source = save_sharded(tiny_qwen2(), tmp_path / "dense")
    config = CALIBRATED.replace(calibration=str(calib_file), tune_steps=3, tune_lr=1e-5)
    report = sketch_to_folder(source, tmp_path / "straight", config, progress=False)
    assert any(block["tuning"]["kept"] for block in report["blocks"])  # so the bytes compared below are tuned
    ids = calibration_batch(str(calib_file), load_tokenizer(source), config.nsamples, config.seqlen, config.seed)
    assert_same(in_memory(source, config, ids), tmp_path / "straight")
    out = tmp_path / "offloaded"
    spilled: list[str] = []

    def kill_after_block_0(index):
        spilled.extend(p.name for p in (out / PARTIAL_DIR).glob("activations_targets_*"))
        raise Killed

    with pytest.raises(Killed):
        sketch_to_folder(
            source, out, config, progress=False, offload_activations=True, on_block_done=kill_after_block_0
        )
    assert spilled  # the dense block's outputs, the tuning's targets, were spilled beside the activations
    sketch_to_folder(source, out, config, progress=False, resume=True, offload_activations=True)
    assert_same(tensors(tmp_path / "straight"), out)
