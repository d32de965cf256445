"""The peers of the fine-tune sweep and the inference comparison (``benchmarks/``) on a tiny random Llama (no hub):
QLoRA through a real bitsandbytes NF4 base on CPU, its dense merge, the lr sweep's selection, and both benches
end to end in tiny mode (real child processes, tiny sizes)."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import needs, tiny_llama, tiny_tokenizer

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"  # not in the wheel: its scripts import each other
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

pytestmark = pytest.mark.slow  # scheduled first under pytest-xdist (conftest.py)

needs("peft", "nox -s tests installs it")
needs("bitsandbytes", "pip install '.[peers]' (nox -s tests installs it)")

DATA = Path(__file__).resolve().parent / "data" / "llm_adapters"


def data_words() -> list[str]:
    """Every word and punctuation run of the bundled rows: a tokenizer over them reads the benches' data as text
    (calibration refuses text that tokenizes to a few repeated tokens, as unknown words would)."""
    rows = [row for file in sorted(DATA.glob("*/test.json")) for row in json.loads(file.read_text())]
    text = " ".join(row[key] for row in rows for key in ("instruction", "input", "output"))
    return sorted(set(re.findall(r"\w+|[^\w\s]+", text)))


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dense")
    words = data_words()
    tiny_llama(vocab_size=len(words) + 4).save_pretrained(path)
    tiny_tokenizer(words).save_pretrained(path)
    return path


def test_qlora_arm_builds_an_nf4_base_and_trains_one_step_on_cpu(dense):
    import bitsandbytes as bnb
    from lora_peers import build, nf4_linears, targets_of

    from spallm_plugins.integrations.peft.finetune import train

    torch.manual_seed(0)
    model, _ = build("qlora", dense, rank=4)
    quantised = nf4_linears(model)
    targets = targets_of(model)
    assert len(quantised) == 2 * len(targets)  # every target of both blocks, nothing else (lm_head stays dense)
    assert {name.split(".")[-2] for name in quantised} == targets
    for layer in quantised.values():
        state = layer.weight.quant_state
        assert layer.weight.dtype == torch.uint8 and state.quant_type == "nf4" and state.nested  # double quant
        assert layer.compute_dtype == torch.float32 and not layer.weight.requires_grad
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    packed = {n: m.weight.detach().clone() for n, m in quantised.items()}
    ids = torch.randint(4, 30, (2, 12), generator=torch.Generator().manual_seed(0))
    history = train(model, iter([{"input_ids": ids, "labels": ids}]), steps=1, lr=1e-2)
    assert torch.isfinite(torch.tensor(history[0]["loss"]))
    after = dict(model.named_parameters())
    moved = [n for n in trainable if "lora_B" in n and not torch.equal(after[n].detach(), trainable[n])]
    assert len(moved) == len(quantised)  # the backward reached the LoRA factors of every NF4 layer
    assert all(torch.equal(m.weight, packed[n]) for n, m in quantised.items())  # the base stayed frozen
    assert isinstance(next(iter(quantised.values())), bnb.nn.Linear4bit)


def test_an_evaluation_between_steps_leaves_the_qlora_arm_s_gradients_unchanged(dense):
    """The bench evaluates with lm-eval (eval mode, no gradients) before and between training steps. On a CPU
    with AVX512-BF16, bitsandbytes 0.50 then repacks the NF4 weights for inference, and later training forwards
    run a kernel with no autograd formula: the LoRA factors below the last layer got wrong gradients. (On CPUs
    without AVX512-BF16 bitsandbytes never repacks, and both sides of this test agree with or without the guard.)"""
    from lora_peers import build, nf4_linears

    ids = torch.randint(4, 30, (2, 12), generator=torch.Generator().manual_seed(0))

    def lora_grads(evaluate_first: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model, _ = build("qlora", dense, rank=4)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.1, generator=torch.Generator().manual_seed(len(name)))
        if evaluate_first:
            with torch.no_grad():
                model.eval()(input_ids=ids)
        model.train()(input_ids=ids, labels=ids).loss.backward()
        assert not any(
            getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in nf4_linears(model).values()
        )
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    fresh, evaluated = lora_grads(False), lora_grads(True)
    assert fresh.keys() == evaluated.keys()
    first_layer = [n for n in fresh if ".layers.0." in n and "lora_A" in n]
    assert first_layer and all(fresh[n].abs().sum() > 0 for n in first_layer)
    for name in fresh:
        torch.testing.assert_close(evaluated[name], fresh[name], msg=name)


def test_qlora_merged_into_dense_computes_what_the_unmerged_model_does(dense):
    from lora_peers import load_nf4, lora_config, qlora_merged_dense, targets_of
    from peft import get_peft_model

    base, _ = load_nf4(dense)
    torch.manual_seed(0)
    qlora = get_peft_model(base, lora_config(4, targets_of(base), init_lora_weights=False)).eval()
    merged = qlora_merged_dense(qlora, dense)
    assert not any("Linear4bit" in type(m).__name__ or "lora" in type(m).__name__.lower() for m in merged.modules())
    ids = torch.randint(4, 30, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = qlora(input_ids=ids).logits, merged(input_ids=ids).logits
        plain = tiny_llama(vocab_size=len(data_words()) + 4)(input_ids=ids).logits  # the dense model, again
    # bitsandbytes' CPU 4-bit matmul rounds differently from a float32 matmul (~5e-3 here): merged and unmerged
    # agree far better than either agrees with the original model (NF4 error and the LoRA update)
    merge_error, change = (got - expected).abs().max().item(), (got - plain).abs().max().item()
    assert merge_error < 1e-2 and merge_error < 0.2 * change, (merge_error, change)


def test_the_best_lr_is_the_highest_validation_accuracy_and_ties_keep_the_sweep_order():
    from finetune_bench import check_variant, select_best

    runs = [{"lr": 1e-4, "validation_mean_acc": 0.30, "final_mean_acc": 0.9},
            {"lr": 2e-4, "validation_mean_acc": 0.41, "final_mean_acc": 0.1},
            {"lr": 4e-4, "validation_mean_acc": 0.41, "final_mean_acc": 0.5}]  # fmt: skip
    assert select_best(runs)["lr"] == 2e-4
    assert select_best(runs[:1])["lr"] == 1e-4
    with pytest.raises(ValueError, match="no runs"):
        select_best([])
    assert check_variant("spallm-g2") == "spallm-g2"
    for bad in ("spallm-gx", "spallm-g0", "dora"):
        with pytest.raises(ValueError):
            check_variant(bad)


def test_validation_rows_are_held_out_of_training(tmp_path):
    from finetune_bench import split_validation

    (tmp_path / "ARC-Easy").mkdir()
    shutil.copy(DATA / "ARC-Easy" / "test.json", tmp_path / "ARC-Easy" / "train.json")
    rows = json.loads((DATA / "ARC-Easy" / "test.json").read_text())
    assert split_validation(tmp_path, tmp_path / "split", ("ARC-Easy",), 3) == {"ARC-Easy": 3}
    kept = json.loads((tmp_path / "split" / "train" / "ARC-Easy" / "train.json").read_text())
    held = json.loads((tmp_path / "split" / "validation" / "ARC-Easy" / "test.json").read_text())
    assert len(held) == 3 and len(kept) == len(rows) - 3
    assert sorted(map(json.dumps, kept + held)) == sorted(map(json.dumps, rows))
    with pytest.raises(ValueError, match=r"ARC-Easy/train.json: expected a JSON list of more than 10 rows"):
        split_validation(tmp_path, tmp_path / "split2", ("ARC-Easy",), len(rows))


def test_eval_data_links_are_laid_out_again_on_a_rerun(tmp_path):
    from finetune_bench import eval_data_dir

    tasks = ("arc_easy_local", "boolq_local")
    for other in ("ARC-Easy", "boolq"):
        (tmp_path / "data" / other).mkdir(parents=True)
        (tmp_path / "data" / other / "test.json").write_text("[]")
    for _ in range(2):  # the second run is bench finetune --overwrite into the same --out
        splits = eval_data_dir(tmp_path / "data", tmp_path / "eval", tasks, ("openbookqa",))
    assert splits == {"arc_easy_local": "test", "boolq_local": "test"}
    assert (tmp_path / "eval" / "boolq" / "test.json").resolve() == (
        tmp_path / "data" / "boolq" / "test.json"
    ).resolve()


def test_training_rows_are_the_lm_eval_prompts_with_the_answer_as_continuation(tmp_path):
    from finetune_bench import encode_pair, render_training_rows

    for folder in ("ARC-Easy", "boolq"):
        (tmp_path / folder).mkdir()
        shutil.copy(DATA / folder / "test.json", tmp_path / folder / "train.json")
    pairs = render_training_rows(tmp_path, ("ARC-Easy", "boolq"), rows_per_set=4)
    assert len(pairs) == 8
    for context, continuation in pairs:
        assert context.startswith("Question: ") and context.endswith("\nAnswer:")
        assert continuation.startswith(" ") and "answer" not in continuation.lower()
    assert sum(c in (" true", " false") for _, c in pairs) == 4
    ids, labels = encode_pair(tiny_tokenizer(), "the rider", " road", max_length=64)
    assert len(ids) == len(labels) and labels[: len(ids) - 1] == [-100] * (len(ids) - 1) and labels[-1] == ids[-1]


def test_finetune_bench_tiny_mode_sweeps_lrs_per_variant_and_reports_the_best(tmp_path, dense, monkeypatch, capfd):
    from finetune_bench import run_finetune_bench

    from spallm_plugins.outputs import OutputError

    monkeypatch.setenv("SPALLM_HOME", str(tmp_path / "home"))  # the cached calibrated sketch
    data = tmp_path / "data"
    for folder in ("ARC-Easy", "openbookqa", "boolq"):
        (data / folder).mkdir(parents=True)
        for split in ("train", "test"):
            shutil.copy(DATA / folder / "test.json", data / folder / f"{split}.json")
    (data / "ARC-Challenge").mkdir()  # no test split, as in the shared data: its (untrained) train split is scored
    shutil.copy(DATA / "ARC-Challenge" / "test.json", data / "ARC-Challenge" / "train.json")
    lrs = {"spallm": (1e-3, 3e-2), "qlora": (1e-3, 3e-2)}
    options = dict(
        variants=("spallm-g1", "qlora"), lrs=lrs, steps=2, eval_every=2, limit=4, batch=2, seqlen=48, warmup=1,
        eval_batch=16, calib_samples=2, calib_seqlen=16, rows_per_set=6, validation_rows=3,
    )  # fmt: skip
    summary = run_finetune_bench(str(dense), tmp_path / "out", data, **options)
    saved = json.loads((tmp_path / "out" / "finetune.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert (tmp_path / "out" / "finetune.png").stat().st_size > 0
    assert saved["eval_splits"]["arc_challenge_local"] == "train" and saved["eval_splits"]["boolq_local"] == "test"
    assert saved["train_rows"] == 18 and saved["lora_rank"] >= 1
    assert saved["validation_rows"] == {"ARC-Easy": 3, "openbookqa": 3, "boolq": 3}
    assert "gptq" in saved["sketched"]["1"]  # calibrated
    for name, kind in (("spallm-g1", "spallm"), ("qlora", "qlora")):
        result = saved["variants"][name]
        assert [r["lr"] for r in result["runs"]] == list(lrs[kind])
        best = max(result["runs"], key=lambda r: r["validation_mean_acc"])
        assert result["best_lr"] == best["lr"] and result["best"]["validation_mean_acc"] == best["validation_mean_acc"]
        for run in result["runs"]:
            assert [c["step"] for c in run["curve"]] == [0, 2]
            assert set(run["final_tasks"]) == set(saved["eval_tasks"])
            assert set(run["validation_tasks"]) == {"arc_easy_local", "openbookqa_local", "boolq_local"}
            assert run["final_mean_acc"] == pytest.approx(sum(t["acc"] for t in run["final_tasks"].values()) / 4)
            assert run["median_step_seconds"] > 0 and run["train_peak_rss_bytes"] > 0 and len(run["losses"]) == 2
            assert run["adapter_bytes"] >= 4 * run["trainable_params"] * 0.5
    g1, qlora = saved["variants"]["spallm-g1"]["best"], saved["variants"]["qlora"]["best"]
    assert g1["trainable_params"] < qlora["trainable_params"]  # LoRA's rank matches gpr 4, four times gpr 1
    # the same batches for every run: equal first-step losses at both lrs of a variant
    for name in ("spallm-g1", "qlora"):
        runs = saved["variants"][name]["runs"]
        assert runs[0]["losses"][0] == pytest.approx(runs[1]["losses"][0])

    # a sweep cut short resumes: the finished runs are kept as they are, only the missing one trains again
    runs_dir = tmp_path / "out" / "runs"
    names = ["qlora-lr0.001.json", "qlora-lr0.03.json", "spallm-g1-lr0.001.json", "spallm-g1-lr0.03.json"]
    assert sorted(p.name for p in runs_dir.iterdir()) == names
    (runs_dir / "qlora-lr0.03.json").unlink()
    (tmp_path / "out" / "finetune.json").unlink()
    with pytest.raises(OutputError, match="already exists and is not empty"):
        run_finetune_bench(str(dense), tmp_path / "out", data, **options)  # without resume nothing is reused
    resumed = run_finetune_bench(str(dense), tmp_path / "out", data, resume=True, **options)
    assert resumed["variants"]["spallm-g1"]["reused_lrs"] == [1e-3, 3e-2]
    assert resumed["variants"]["qlora"]["reused_lrs"] == [1e-3]
    assert resumed["variants"]["spallm-g1"]["runs"] == saved["variants"]["spallm-g1"]["runs"]
    before, after = saved["variants"]["qlora"]["runs"], resumed["variants"]["qlora"]["runs"]
    assert after[0] == before[0] and after[1]["finished_at"] >= before[1]["finished_at"]
    assert after[1]["losses"] == pytest.approx(before[1]["losses"]) and after[1]["curve"] == before[1]["curve"]
    assert sorted(p.name for p in runs_dir.iterdir()) == names
    with pytest.raises(ValueError, match="resume and overwrite exclude each other"):
        run_finetune_bench(str(dense), tmp_path / "out", data, resume=True, overwrite=True, **options)
    capfd.readouterr()
    with pytest.raises(RuntimeError, match=r"\[spallm-g1\] its child process failed .* rerun .* with --resume"):
        run_finetune_bench(str(dense), tmp_path / "out", data, resume=True, **{**options, "steps": 3})
    assert "spallm-g1-lr0.001.json: made with other settings (steps: 2 there, 3 now)" in capfd.readouterr().err
    assert sorted(p.name for p in runs_dir.iterdir()) == names  # nothing was replaced


def test_a_stored_run_is_reused_only_under_the_same_settings(tmp_path):
    from finetune_bench import child_parser, finished_run, run_path, run_settings

    from spallm_plugins.format import CheckpointError, write_json

    args = child_parser().parse_args(
        ["--variant", "qlora", "--dense", "/a/cache/smollm2", "--lrs", "2e-4", "--include", "i", "--train-rows", "t",
         "--validation-include", "v", "--validation-tasks", "boolq_local", "--data-sha256", "ab", "--runs-dir",
         str(tmp_path), "--json", "j"]
    )  # fmt: skip
    settings = run_settings(args, 2e-4)
    # every option that can change a run is part of its identity (where to read and write things is not)
    places = {"include", "train_rows", "validation_include", "runs_dir", "resume", "json", "lrs"}
    assert vars(args).keys() - places <= settings.keys() and settings["lr"] == 2e-4
    assert settings["dense"] == "smollm2"  # a cache's location differs between machines
    path = run_path(tmp_path, "qlora", 2e-4)
    assert path.name == "qlora-lr0.0002.json" and finished_run(path, settings) is None
    write_json(path, {"settings": settings, "result": {"lr": 2e-4, "final_mean_acc": 0.5}})
    assert finished_run(path, settings) == {"lr": 2e-4, "final_mean_acc": 0.5}
    with pytest.raises(ValueError, match=r"qlora-lr0.0002.json: made with other settings \(steps: 200 there, 100 now"):
        finished_run(path, {**settings, "steps": 100})
    with pytest.raises(ValueError, match="data_sha256: 'ab' there, 'cd' now"):
        finished_run(path, {**settings, "data_sha256": "cd"})
    path.write_text('{"lr": 0.0002}')
    with pytest.raises(ValueError, match=r"qlora-lr0.0002.json: not a run of the fine-tune sweep"):
        finished_run(path, settings)
    path.write_text('{"settings": {')
    with pytest.raises(CheckpointError, match=r"qlora-lr0.0002.json: invalid JSON"):
        finished_run(path, settings)


def test_inference_bench_tiny_mode_times_generate_side_by_side(tmp_path, dense, monkeypatch):
    from inference_bench import run_inference_bench

    monkeypatch.setenv("SPALLM_HOME", str(tmp_path / "home"))
    summary = run_inference_bench(
        str(dense), tmp_path / "out", variants=("dense", "spallm", "qlora", "qlora-merged"), batches=(1, 3),
        prompt_tokens=6, new_tokens=5, repeats=1,
    )  # fmt: skip
    saved = json.loads((tmp_path / "out" / "inference.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    variants = saved["variants"]
    for name, result in variants.items():
        assert [g["batch"] for g in result["generate"]] == [1, 3], name
        for g in result["generate"]:
            assert g["new_tokens"] == 5 and len(g["first_row"]) == 5 and g["tokens_per_second"] > 0, name
        assert result["model_bytes"] > 0 and result["peak_rss_bytes"] > 0
    assert "SketchedLinear" in variants["spallm"]["linear_kinds"]
    assert "Linear4bit" in variants["qlora"]["linear_kinds"]
    assert variants["qlora-merged"]["linear_kinds"] == ["Linear"] == variants["dense"]["linear_kinds"]
    assert variants["qlora-merged"]["model_bytes"] == variants["dense"]["model_bytes"]
    assert variants["spallm"]["model_bytes"] < variants["dense"]["model_bytes"]
    # merged and unmerged QLoRA are the same function: the same greedy tokens
    assert variants["qlora-merged"]["generate"][0]["first_row"] == variants["qlora"]["generate"][0]["first_row"]


def test_inference_bench_rounds_rotate_the_order_and_report_ratios_within_each_round(tmp_path, dense, monkeypatch):
    from spallm_plugins.bench.inference import run_inference_bench  # spallm bench inference: the core's own children

    monkeypatch.setenv("SPALLM_HOME", str(tmp_path / "home"))
    summary = run_inference_bench(
        str(dense), tmp_path / "out", variants=("spallm", "dense"), batches=(1,), prompt_tokens=4, new_tokens=3,
        repeats=1, rounds=2,
    )  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "out").glob("inference-*-round*.json")) == [
        "inference-dense-round0.json", "inference-dense-round1.json",
        "inference-spallm-round0.json", "inference-spallm-round1.json",
    ]  # fmt: skip
    rounds = summary["tokens_per_second_by_round"]
    assert len(rounds) == 2 and summary["rounds"] == 2
    ratio = summary["spallm_speed_ratios"]["spallm/dense"]["1"]
    expected = [r["spallm"]["1"] / r["dense"]["1"] for r in rounds]
    assert ratio["by_round"] == pytest.approx(expected)
    assert ratio["min"] <= ratio["median"] <= ratio["max"] and ratio["median"] == pytest.approx(sum(expected) / 2)
    first = json.loads((tmp_path / "out" / "inference-spallm-round0.json").read_text())
    assert summary["variants"]["spallm"] == first
    with pytest.raises(ValueError, match="rounds=0: expected at least 1"):
        run_inference_bench(str(dense), tmp_path / "none", variants=("dense",), rounds=0)
