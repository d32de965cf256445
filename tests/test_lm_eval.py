"""lm-evaluation-harness as the evaluation path: the packaged local tasks over llm-adapters rows,
``lm_eval``'s own ``hf`` model on sketched checkpoints and ``spallm`` adapters (no spallm import), and
``spallm eval --tasks``. Data: tests/data/llm_adapters (10 original rows per format) and
tests/data/llm_adapters_20 (20 ARC-format rows over the tiny tokenizer's words)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import needs, run_python, tiny_llama, tiny_tokenizer

needs("lm_eval", "pip install '.[lm-eval]' (nox -s tests installs it)")

from lm_eval.api.metrics import exact_match_hf_evaluate  # noqa: E402
from lm_eval.filters.extraction import RegexFilter  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from spallm_plugins.evaluate import local_tasks, write_local_tasks  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "llm_adapters"
DATA_20 = Path(__file__).resolve().parent / "data" / "llm_adapters_20"
FOLDERS = {
    "arc_easy_local": "ARC-Easy",
    "arc_challenge_local": "ARC-Challenge",
    "openbookqa_local": "openbookqa",
    "boolq_local": "boolq",
    "gsm8k_local": "gsm8k",
}
# options per row of the fixtures (the llm-adapters rows state them in the instruction: Answer1: ... Answer5: ...)
CHOICES = {
    "arc_easy_local": [4, 4, 4, 4, 4, 4, 3, 4, 5, 4],
    "arc_challenge_local": [4, 4, 4, 4, 4, 4, 4, 4, 3, 4],
    "openbookqa_local": [4] * 10,
    "boolq_local": [2] * 10,
}
IDS = torch.arange(24).view(2, 12) % 30


def results_of(table: str, task: str) -> str:
    """The rows of ``task`` in a harness table (its first row and the unnamed rows after it)."""
    lines = table.splitlines()
    start = next(i for i, line in enumerate(lines) if line.replace(" ", "").startswith(f"|{task}|"))
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].replace(" ", "").startswith("||")), len(lines))
    return "\n".join(lines[start:end])


def labels(doc: dict) -> list[str]:
    return doc["instruction"].rsplit("Answer format:", 1)[1].strip().split("/")


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    include = write_local_tasks(DATA, tmp_path_factory.mktemp("tasks"), list(FOLDERS))
    return TaskManager(include_path=str(include), include_defaults=False).load(list(FOLDERS))["tasks"]


def test_the_package_ships_the_five_tasks_reading_llm_adapters_test_files():
    assert local_tasks() == {name: {"test": f"{folder}/test.json"} for name, folder in FOLDERS.items()}


@pytest.mark.parametrize("name", sorted(CHOICES))
def test_multiple_choice_tasks_parse_the_llm_adapters_rows(tasks, name):
    task = tasks[name]
    assert task.OUTPUT_TYPE == "multiple_choice"
    docs = list(task.test_docs())
    assert len(docs) == 10
    assert [len(task.doc_to_choice(d)) for d in docs] == CHOICES[name]
    for doc in docs:
        text, choices, target = task.doc_to_text(doc), task.doc_to_choice(doc), task.doc_to_target(doc)
        if name == "openbookqa_local":  # a sentence to complete, as in the harness's own openbookqa
            assert not text.startswith("Question") and not text.endswith(("\n", " ")), text
        else:
            assert text.startswith("Question: ") and text.endswith("\nAnswer:"), text
        assert "Please" not in text and "Answer1" not in text and "Answer format" not in text, text
        assert len(choices) == len(labels(doc)) and labels(doc)[target] == doc["answer"]
        if name == "boolq_local":
            assert choices == ["true", "false"]
        else:  # each option's own text, as the instruction states it
            assert all(c and "Answer" not in c for c in choices), choices
            assert f"Answer{target + 1}: {choices[target]}" in doc["instruction"]


def test_option_texts_keep_their_punctuation(tasks):
    docs = list(tasks["arc_easy_local"].test_docs())
    assert tasks["arc_easy_local"].doc_to_text(docs[0]) == (
        "Question: Which part of a bicycle turns when the rider pushes the pedals?\nAnswer:"
    )
    assert tasks["arc_easy_local"].doc_to_choice(docs[8])[-1] == 'the "deep" core'
    obqa = next(iter(tasks["openbookqa_local"].test_docs()))
    assert tasks["openbookqa_local"].doc_to_text(obqa) == "A magnet will stick to"


def test_gsm8k_task_generates_and_scores_the_last_number(tasks):
    task = tasks["gsm8k_local"]
    assert task.OUTPUT_TYPE == "generate_until"
    docs = list(task.test_docs())
    assert len(docs) == 10
    assert task.doc_to_text(docs[0]).startswith("Question: A rider cycles 12 miles")
    assert task.doc_to_text(docs[0]).endswith("\nAnswer:")
    assert [task.doc_to_target(d) for d in docs[:3]] == ["60.0", "29.0", "45.0"]
    # the YAML's own filter and metric settings: last number, "$", "," and a trailing "." or ".0" ignored
    (pipeline,) = task.config.filter_list
    regex = {k: v for k, v in pipeline["filter"][0].items() if k != "function"}
    ignore = task.config.metric_list[0]["regexes_to_ignore"]
    cases = [
        ("12 * 5 = 60. The answer is 60.", "60.0", 1.0),
        ("Half of 2,400 is 1,200. The answer is $1,200.", "1200.0", 1.0),
        ("5 - 8 = -3. The answer is -3", "-3.0", 1.0),
        ("The answer is 61.", "60.0", 0.0),
        ("no number at all", "60.0", 0.0),
    ]
    for response, target, expected in cases:
        (extracted,) = RegexFilter(**regex).apply([[response]], [{}])[0]
        score = exact_match_hf_evaluate(predictions=[extracted], references=[target], regexes_to_ignore=ignore)
        assert score["exact_match"] == expected, (response, extracted)


def test_unknown_task_or_missing_data_file_is_one_clear_error(tmp_path):
    with pytest.raises(
        ValueError, match=r"unknown task\(s\) hellaswag; the local tasks are arc_challenge_local, arc_easy_local"
    ):
        write_local_tasks(DATA, tmp_path / "a", ["hellaswag"])
    (tmp_path / "data" / "boolq").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"ARC-Challenge/test.json: no such file \(task arc_challenge_local"):
        write_local_tasks(tmp_path / "data", tmp_path / "b", ["arc_challenge_local"])
    with pytest.raises(FileNotFoundError, match="no such data folder"):
        write_local_tasks(tmp_path / "nowhere", tmp_path / "c", ["boolq_local"])


# ------------------------------------------------------------------------------------------------
# a sketched tiny model and a spallm adapter, through lm-eval's own hf model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A sketched tiny Llama, a spallm adapter on it, and the logits both give when loaded the usual way."""
    needs("peft", "nox -s tests installs it")
    from peft import PeftModel, get_peft_model
    from safetensors.torch import save_file

    from spallm_plugins.config import SketchConfig
    from spallm_plugins.integrations.peft import SpaLLMConfig
    from spallm_plugins.pipeline import load_sketched, sketch_to_folder

    root = tmp_path_factory.mktemp("models")
    tiny_llama().save_pretrained(root / "dense")
    tiny_tokenizer().save_pretrained(root / "dense")
    sketch_to_folder(root / "dense", root / "sketched", SketchConfig(bits=4, groups_per_row=2), progress=False)
    base, _ = load_sketched(root / "sketched")
    with torch.no_grad():
        base_logits = base(IDS).logits
    get_peft_model(base, SpaLLMConfig(task_type="CAUSAL_LM", init_weights=False)).save_pretrained(root / "adapter")
    adapted = PeftModel.from_pretrained(load_sketched(root / "sketched")[0], root / "adapter").eval()
    with torch.no_grad():
        adapter_logits = adapted(IDS).logits
    assert not torch.equal(base_logits, adapter_logits)
    save_file({"base": base_logits, "adapter": adapter_logits}, root / "expected.safetensors")
    return root


HARNESS_ONLY = """
import json, sys, torch
import lm_eval, lm_eval.evaluator
from safetensors.torch import load_file
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

lm_eval.evaluator.add_env_info = lambda results: None  # torch's collect_env: seconds of subprocesses
sketched, adapter, include, expected = sys.argv[1:]
expected = load_file(expected)
report = {}
for name, peft in (("base", None), ("adapter", adapter)):
    lm = HFLM(pretrained=sketched, peft=peft, batch_size=20, device="cpu")
    with torch.no_grad():
        logits = lm.model(torch.arange(24).view(2, 12) % 30).logits
    out = lm_eval.simple_evaluate(model=lm, tasks=["arc_easy_local"], log_samples=False,
                                  task_manager=TaskManager(include_path=include, include_defaults=False))
    report[name] = {
        "kinds": sorted({type(m).__name__ for m in lm.model.modules()}),
        "same_logits": torch.allclose(logits, expected[name], rtol=1e-4, atol=1e-5),
        "results": out["results"]["arc_easy_local"],
        "rows": out["n-samples"]["arc_easy_local"]["effective"],
    }
print("REPORT " + json.dumps(report))
"""


def test_lm_eval_scores_a_sketched_model_and_adapter_without_a_spallm_import(tmp_path, models):
    """What ``lm_eval --model hf --model_args pretrained=SKETCHED[,peft=ADAPTER]`` runs, in a fresh
    interpreter whose code imports only lm_eval: the installed ``.pth`` registers spallm."""
    needs("pth", "install the package (pip install .)")
    include = write_local_tasks(DATA_20, tmp_path / "tasks", ["arc_easy_local"])
    proc = run_python(HARNESS_ONLY, str(models / "sketched"), str(models / "adapter"), str(include),
                      str(models / "expected.safetensors"))  # fmt: skip
    report = json.loads(proc.stdout.split("REPORT ", 1)[1])
    for name in ("base", "adapter"):
        got = report[name]
        assert "SketchedLinear" in got["kinds"], got["kinds"]  # not silently dense with random weights
        assert got["same_logits"], f"{name}: lm-eval's model differs from the one spallm loads"
        assert got["rows"] == 20
        assert 0.0 <= got["results"]["acc,none"] <= 1.0 and 0.0 <= got["results"]["acc_norm,none"] <= 1.0
    assert "SpaLLMLayer" in report["adapter"]["kinds"] and "SpaLLMLayer" not in report["base"]["kinds"]


# ------------------------------------------------------------------------------------------------
# spallm eval --tasks


@pytest.fixture
def spallm_main(monkeypatch):
    """``spallm`` in this process, without the harness's slow environment report."""
    import lm_eval.evaluator

    from spallm_plugins.cli import main

    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main() replaces it
    return main


def test_spallm_eval_tasks_prints_the_harness_table_and_writes_json(tmp_path, models, spallm_main, capsys):
    out = tmp_path / "results.json"
    code = spallm_main(["eval", str(models / "sketched"), "--tasks", "arc_easy_local,boolq_local",
                        "--data", str(DATA), "--adapter", str(models / "adapter"), "--limit", "2",
                        "--batch-size", "4", "--json", str(out), "--quiet"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert f"{models / 'sketched'} + adapter {models / 'adapter'}: lm-eval tasks on {DATA}, first 2 rows" in printed
    assert "|Tasks|Version|Filter|n-shot|Metric|" in printed.replace(" ", "")
    assert "|arc_easy_local|" in printed.replace(" ", "") and "|boolq_local|" in printed.replace(" ", "")
    assert "acc_norm" not in results_of(printed, "boolq_local")  # boolq_local scores acc only
    saved = json.loads(out.read_text())
    assert saved["tasks"] == ["arc_easy_local", "boolq_local"] and saved["limit"] == 2
    results = saved["results"][str(models / "sketched")]
    for task in ("arc_easy_local", "boolq_local"):
        assert 0.0 <= results["results"][task]["acc,none"] <= 1.0
        assert results["n-samples"][task]["effective"] == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["M", "--tasks", "boolq_local"], "--tasks needs --data DIR"),
        (["M", "--tasks", "boolq_local", "--data", "D", "--seqlen", "64"], "--seqlen: perplexity options"),
        (["M", "M", "--tasks", "boolq_local", "--data", "D", "--adapter", "A"], "--adapter goes with one model, got 2"),
        (["M", "--tasks", "boolq_local", "--data", "D/nowhere"], "no such data folder"),
        (["M", "--tasks", "boolq_local,hellaswag", "--data", "D"], "unknown task(s) hellaswag"),
        (["M", "--tasks", "arc_challenge_local", "--data", "E"], "ARC-Challenge/test.json: no such file"),
        (["M", "--tasks", "boolq_local", "--data", "D"], "no config.json"),  # the model, before any work
    ],
)
def test_spallm_eval_tasks_refuses_bad_options_before_loading(tmp_path, spallm_main, capsys, argv, message):
    (tmp_path / "empty" / "boolq").mkdir(parents=True)
    where = {"M": str(tmp_path), "D": str(DATA), "A": str(tmp_path), "E": str(tmp_path / "empty")}
    argv = [where.get(a, a.replace("D/", f"{DATA}/")) for a in argv]
    assert spallm_main(["eval", *argv]) == 2
    assert message in capsys.readouterr().err


def test_harness_options_without_tasks_are_refused(tmp_path, spallm_main, capsys):
    assert spallm_main(["eval", str(tmp_path), "--limit", "3", "--data", str(DATA)]) == 2
    assert "--data, --limit: options of lm-eval tasks; add --tasks" in capsys.readouterr().err


def test_eval_help_names_every_local_task():
    from spallm_plugins.cli import build_parser

    sub = next(a for a in build_parser()._actions if hasattr(a, "choices") and a.choices and "eval" in a.choices)
    tasks_help = next(a.help for a in sub.choices["eval"]._actions if a.dest == "tasks")
    assert all(name in tasks_help for name in local_tasks())
