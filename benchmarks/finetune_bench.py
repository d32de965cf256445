"""The fine-tune sweep: SpaLLM against its real peers, on the same data, steps and tokens.

    pip install -e ".[bench,peers,lm-eval]"
    python benchmarks/finetune_bench.py --data DIR [--model smollm2] [--out benchmarks/finetune-smollm2]

Variants (each in its own child process, one after the other; the parent writes ``finetune.json`` and
``finetune.png``):

- ``spallm-g1``, ``spallm-g4``: the tables of a sketched model (4-bit codes, 1 or 4 table groups per row;
  a calibrated sketch of the model by default, or ``--sketched`` checkpoints prepared before);
- ``qlora``: bitsandbytes NF4 base (double quantisation) + LoRA (:mod:`lora_peers`);
- ``lora``: LoRA on the dense float32 base; both LoRA arms at the rank whose trainable count matches
  SpaLLM gpr 4's tables (``--match-gpr``);
- ``full``: every parameter of the dense float32 model.

Each variant trains at each learning rate of its sweep (paper defaults in :data:`DEFAULT_LRS`; the model is
rebuilt for each) on a mix of the training splits of the local llm-adapters sets (ARC-Easy, OpenBookQA, BoolQ),
rendered by the local lm-eval tasks' own prompt/answer templates, so training teaches exactly the format the
evaluation scores (loss on the answer tokens only). Every ``--eval-every`` steps the in-memory model is scored by
lm-eval (``simple_evaluate`` on ``HFLM`` over the model object: the same call for every variant) on the held-out
test splits (``--limit`` rows per task); ARC-Challenge has no test split in the shared data, so its train split
(never trained on) is scored in its place. The learning rate is chosen on a validation set, never on the
reported evaluation: ``--validation-rows`` rows of each training set's train split are held out of training
and scored once at the end of every run; the run with the best mean validation accuracy is reported.
Reported per run: the accuracy-vs-steps curve, median training step time, the training peak resident memory
(Linux's high-water mark reset before each training segment, so evaluation does not count), trainable
parameters and adapter bytes (the saved PEFT adapter; for full fine-tuning the whole model's tensors).

The full sweep takes hours, so it is resumable: each finished run is written at once, atomically, to
``OUT/runs/VARIANT-lrLR.json`` together with the settings that produced it (every option that changes the
result, and a digest of the training, validation and evaluation rows). ``--resume`` keeps those runs and
trains only the missing ones; a run file made with other settings is refused, naming the file and the
settings that differ, never mixed in. Each run records the CPU it ran on and when, as step times from
different hosts do not compare.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from lora_peers import lora_rank_matching

from spallm_plugins.format import read_json, write_json

VARIANTS = ("spallm-g1", "spallm-g4", "qlora", "lora", "full")
# Paper learning rates, each the middle of a 3-value sweep (a factor ~2 either side):
#   QLoRA (Dettmers et al. 2023) 2e-4 for 7B/13B; LoRA (Hu et al. 2021, GPT-2 M) 2e-4;
#   full fine-tuning of instruction models (Alpaca, Taori et al. 2023) 2e-5;
#   SpaLLM tables: 3e-4, the quickstart's value (1e-3 moved the general-text perplexity ~40%, 3e-3 broke it).
DEFAULT_LRS = {
    "spallm": (1e-4, 3e-4, 1e-3),
    "qlora": (1e-4, 2e-4, 4e-4),
    "lora": (1e-4, 2e-4, 4e-4),
    "full": (1e-5, 2e-5, 5e-5),
}
TRAIN_MIX = ("ARC-Easy", "openbookqa", "boolq")  # llm-adapters folders with a train split
EVAL_TASKS = ("arc_easy_local", "arc_challenge_local", "openbookqa_local", "boolq_local")
IGNORE_INDEX = -100


def kind_of(variant: str) -> str:
    """``spallm-g4`` -> ``spallm``; the others are their own kind."""
    return variant.split("-", 1)[0]


def gpr_of(variant: str) -> int | None:
    if not variant.startswith("spallm-g"):
        return None
    try:
        return int(variant[len("spallm-g") :])
    except ValueError:
        raise ValueError(f"{variant!r}: a SpaLLM variant is spallm-gN (N table groups per row)") from None


def check_variant(variant: str) -> str:
    if variant.startswith("spallm"):
        if gpr_of(variant) is None or gpr_of(variant) < 1:
            raise ValueError(f"{variant!r}: a SpaLLM variant is spallm-gN (N table groups per row, N >= 1)")
    elif variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)} (or spallm-gN)")
    return variant


def select_best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the highest mean validation accuracy (the first of equals: the sweep's order breaks ties)."""
    if not runs:
        raise ValueError("no runs to select from")
    return max(runs, key=lambda r: (r["validation_mean_acc"], -runs.index(r)))


def split_validation(data: Path, out: Path, mix: tuple[str, ...], rows: int, seed: int = 0) -> dict[str, int]:
    """Hold ``rows`` rows of each training set out for choosing the learning rate: ``out/train/FOLDER/train.json``
    keeps the rest, ``out/validation/FOLDER/test.json`` the held-out ones (drawn with ``seed``). Returns
    ``{folder: held-out rows}``."""
    held = {}
    for folder in mix:
        source = data / folder / "train.json"
        if not source.is_file():
            raise FileNotFoundError(f"{source}: no such file (training set {folder})")
        entries = json.loads(source.read_text(encoding="utf-8"))
        if not isinstance(entries, list) or len(entries) <= rows:
            raise ValueError(f"{source}: expected a JSON list of more than {rows} rows (--validation-rows)")
        order = list(range(len(entries)))
        random.Random(seed).shuffle(order)
        chosen = set(order[:rows])
        for part, name, keep in (("train", "train.json", False), ("validation", "test.json", True)):
            (out / part / folder).mkdir(parents=True, exist_ok=True)
            subset = [e for i, e in enumerate(entries) if (i in chosen) == keep]
            (out / part / folder / name).write_text(json.dumps(subset), encoding="utf-8")
        held[folder] = len(chosen)
    return held


# ------------------------------------------------------------------------------------------------
# data: the lm-eval tasks' own templates over the training splits; held-out test splits


def task_folders() -> dict[str, str]:
    """``{task: llm-adapters folder}`` of the packaged lm-eval tasks."""
    from spallm_plugins.evaluate import local_tasks

    return {task: splits["test"].split("/", 1)[0] for task, splits in local_tasks().items()}


def eval_data_dir(data: Path, out: Path, tasks: tuple[str, ...], mix: tuple[str, ...]) -> dict[str, str]:
    """Lay out ``out/FOLDER/test.json`` for ``tasks`` (links into ``data``); returns ``{task: split scored}``.

    A folder without ``test.json`` (ARC-Challenge in the shared data) is scored on its ``train.json`` when that
    set is not in the training ``mix``."""
    folders, splits = task_folders(), {}
    for task in tasks:
        folder = folders[task]
        split = "test" if (data / folder / "test.json").is_file() else "train"
        if split == "train" and (folder in mix or not (data / folder / "train.json").is_file()):
            raise FileNotFoundError(f"{data / folder}/test.json: no such file (and its train split is not held out)")
        (out / folder).mkdir(parents=True, exist_ok=True)
        (out / folder / "test.json").unlink(missing_ok=True)  # a rerun (--overwrite) links afresh
        (out / folder / "test.json").symlink_to((data / folder / f"{split}.json").resolve())
        splits[task] = split
    return splits


def render_training_rows(data: Path, mix: tuple[str, ...], rows_per_set: int, seed: int = 0) -> list[tuple[str, str]]:
    """``(context, continuation)`` pairs of the training splits of ``mix``, as the local lm-eval tasks render
    their rows (``doc_to_text``, target delimiter + the right choice); ``rows_per_set`` drawn from each, shuffled."""
    from lm_eval.tasks import TaskManager

    from spallm_plugins.evaluate import write_local_tasks

    by_folder = {folder: task for task, folder in task_folders().items()}
    unknown = [f for f in mix if f not in by_folder]
    if unknown:
        raise ValueError(f"training sets {unknown}: no local lm-eval task renders them ({', '.join(by_folder)})")
    pairs: list[tuple[str, str]] = []
    order = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="spallm-train-mix-") as tmp:
        tmp = Path(tmp)
        for folder in mix:
            source = data / folder / "train.json"
            if not source.is_file():
                raise FileNotFoundError(f"{source}: no such file (training set {folder})")
            (tmp / "data" / folder).mkdir(parents=True)
            (tmp / "data" / folder / "test.json").symlink_to(source.resolve())
        names = [by_folder[f] for f in mix]
        include = write_local_tasks(tmp / "data", tmp / "tasks", names)
        tasks = TaskManager(include_path=str(include), include_defaults=False).load(names)["tasks"]
        for name in names:
            task = tasks[name]
            docs = list(task.test_docs())
            order.shuffle(docs)
            delimiter = task.config.target_delimiter
            for doc in docs[:rows_per_set]:
                choice = task.doc_to_choice(doc)[task.doc_to_target(doc)]
                pairs.append((task.doc_to_text(doc), delimiter + choice))
    order.shuffle(pairs)
    return pairs


def encode_pair(tokenizer, context: str, continuation: str, max_length: int) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` as lm-eval's ``_encode_pair`` splits them (context's trailing spaces move to the
    continuation; the whole is encoded once); labels only on the continuation; the context is cut from the left."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n_context = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    labels = [IGNORE_INDEX] * n_context + whole[n_context:]
    return whole[-max_length:], labels[-max_length:]


def pair_batches(encoded: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int, seed: int = 0):
    """Endless right-padded batches in a fixed order (the same tokens for every variant with the same seed)."""
    order = random.Random(seed)
    while True:
        picks = order.sample(encoded, min(batch_size, len(encoded)))
        width = max(len(ids) for ids, _ in picks)
        input_ids = torch.full((len(picks), width), pad_id, dtype=torch.long)
        labels = torch.full((len(picks), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(picks), width), dtype=torch.long)
        for i, (ids, lab) in enumerate(picks):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(lab)] = torch.tensor(lab)
            mask[i, : len(ids)] = 1
        yield {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def lm_eval_accuracy(model, tokenizer, include: str, tasks: list[str], limit: int | None, batch_size: int):
    """``{task: {"acc": .., "acc_norm": ..}}`` of the in-memory ``model`` through lm-eval's ``HFLM``."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    was_training = model.training
    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(
        model=lm, tasks=list(tasks), limit=limit, log_samples=False, verbosity="ERROR",
        task_manager=TaskManager(include_path=include, include_defaults=False),
    )  # fmt: skip
    if was_training:
        model.train()
    scores = {}
    for task in tasks:
        found = out["results"][task]
        scores[task] = {m: found[f"{m},none"] for m in ("acc", "acc_norm") if f"{m},none" in found}
    return scores


def adapter_bytes(model, variant: str) -> int:
    """Bytes of what the fine-tune produces: the saved PEFT adapter, or (full) every tensor of the model."""
    from lora_peers import state_bytes

    if kind_of(variant) == "full":
        return state_bytes(model)
    with tempfile.TemporaryDirectory(prefix="spallm-adapter-") as tmp:
        model.save_pretrained(tmp)
        return sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors"))


# ------------------------------------------------------------------------------------------------
# one variant (a child process)


def run_one(args: argparse.Namespace, lr: float, pairs: list[list[str]], tasks: list[str]) -> dict[str, Any]:
    """One learning rate of one variant: a fresh model, the sweep's batches, the curve."""
    from lora_peers import build, peak_rss_bytes, reset_peak_rss

    from spallm_plugins.integrations.peft.finetune import train

    variant, kind = args.variant, kind_of(args.variant)
    torch.manual_seed(args.seed)
    model, tokenizer = build(
        kind, args.dense, args.sketched, args.rank, compute_dtype=getattr(torch, args.qlora_compute_dtype),
        gradient_checkpointing=args.gradient_checkpointing,
    )  # fmt: skip
    if args.gradient_checkpointing and kind != "qlora":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if kind == "full":
        model.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [encode_pair(tokenizer, c, t, args.seqlen) for c, t in pairs]
    data = pair_batches(encoded, args.batch, pad, seed=args.seed)
    curve: list[dict[str, Any]] = []
    train_peak = process_peak = 0

    def evaluate(step: int) -> None:
        scores = lm_eval_accuracy(model, tokenizer, args.include, tasks, args.limit, args.eval_batch)
        mean = statistics.fmean(s["acc"] for s in scores.values())
        curve.append({"step": step, "mean_acc": mean, "tasks": scores})
        print(f"[{variant} lr {lr:g}] step {step}: mean acc {mean:.4f}", flush=True)

    def on_step(step: int, loss: float, seconds: float) -> None:
        nonlocal train_peak, process_peak
        if step % args.eval_every == 0 or step == args.steps:
            train_peak = max(train_peak, peak_rss_bytes())
            evaluate(step)
            process_peak = max(process_peak, peak_rss_bytes())
            reset_peak_rss()  # the next training segment's peak, without the evaluation's

    evaluate(0)
    process_peak = peak_rss_bytes()
    reset_peak_rss()
    history = train(model, data, args.steps, lr, warmup=args.warmup, on_step=on_step)
    validation = lm_eval_accuracy(
        model, tokenizer, args.validation_include, args.validation_tasks.split(","), None, args.eval_batch
    )
    times = [h["seconds"] for h in history[min(2, len(history) - 1) :]]  # the first steps warm caches up
    return {
        "lr": lr,
        "host": {
            "cpu": cpu_model(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_threads": torch.get_num_threads(),
        },
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "peak_rss_bytes": max(process_peak, peak_rss_bytes()),
        "trainable_params": trainable,
        "adapter_bytes": adapter_bytes(model, variant),
        "median_step_seconds": statistics.median(times),
        "train_peak_rss_bytes": train_peak,
        "losses": [h["loss"] for h in history],
        "curve": curve,
        "final_mean_acc": curve[-1]["mean_acc"],
        "final_tasks": curve[-1]["tasks"],
        "validation_mean_acc": statistics.fmean(v["acc"] for v in validation.values()),
        "validation_tasks": validation,
    }


def cpu_model() -> str:
    """The CPU's model name (Linux), so that step times from different hosts are never compared unknowingly."""
    try:
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
    except OSError:
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")


def run_settings(args: argparse.Namespace, lr: float) -> dict[str, Any]:
    """Everything that decides one run's result; a run file is reused only under equal settings. Models are named
    by folder (a cache's location differs between machines; the sketch's folder name holds its settings)."""
    return {
        "variant": args.variant, "lr": lr, "dense": Path(args.dense).name,
        "sketched": Path(args.sketched).name if args.sketched else None, "rank": args.rank, "steps": args.steps,
        "eval_every": args.eval_every, "batch": args.batch, "seqlen": args.seqlen, "warmup": args.warmup,
        "eval_batch": args.eval_batch, "limit": args.limit, "tasks": args.tasks,
        "validation_tasks": args.validation_tasks, "qlora_compute_dtype": args.qlora_compute_dtype,
        "gradient_checkpointing": args.gradient_checkpointing, "seed": args.seed, "data_sha256": args.data_sha256,
    }  # fmt: skip


def run_path(runs_dir: str | Path, variant: str, lr: float) -> Path:
    return Path(runs_dir) / f"{variant}-lr{lr:g}.json"


def finished_run(path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The run stored at ``path`` when it was made with ``settings``; None when there is none. A file that is not a
    finished run, or one made with other settings, is an error naming the file (and the settings that differ)."""
    if not path.is_file():
        return None
    stored = read_json(path)
    if not isinstance(stored, dict) or not isinstance(stored.get("settings"), dict) or "result" not in stored:
        raise ValueError(f"{path}: not a run of the fine-tune sweep (expected keys 'settings' and 'result')")
    differ = sorted(
        k for k in settings.keys() | stored["settings"].keys() if stored["settings"].get(k) != settings.get(k)
    )
    if differ:
        shown = ", ".join(f"{k}: {stored['settings'].get(k)!r} there, {settings.get(k)!r} now" for k in differ[:4])
        raise ValueError(
            f"{path}: made with other settings ({shown}{', ...' if len(differ) > 4 else ''}); --resume continues "
            f"only the same sweep: run it with the same options, or give --out a new folder"
        )
    return stored["result"]


def run_variant(args: argparse.Namespace) -> dict[str, Any]:
    """Every learning rate of one variant in this process: a fresh model each, the same batches each. Each finished
    run is written to ``--runs-dir`` at once; with ``--resume`` the runs already there are reused."""
    import lm_eval.evaluator

    lm_eval.evaluator.add_env_info = lambda results: None  # torch's collect_env: seconds of subprocesses
    kind = kind_of(args.variant)
    pairs = json.loads(Path(args.train_rows).read_text(encoding="utf-8"))
    runs, reused = [], []
    for lr in args.lrs:
        settings, path = run_settings(args, lr), run_path(args.runs_dir, args.variant, lr)
        run = finished_run(path, settings) if args.resume else None
        if run is not None:
            print(f"[{args.variant} lr {lr:g}] reused {path} (finished {run.get('finished_at', '?')})", flush=True)
            reused.append(lr)
        else:
            run = run_one(args, lr, pairs, args.tasks.split(","))
            write_json(path, {"settings": settings, "result": run})
        runs.append(run)
    best = select_best(runs)
    return {
        "variant": args.variant,
        "kind": kind,
        "groups_per_row": gpr_of(args.variant),
        "rank": args.rank if kind in ("lora", "qlora") else None,
        "qlora_compute_dtype": args.qlora_compute_dtype if kind == "qlora" else None,
        "sketched": args.sketched if kind == "spallm" else None,
        "runs": runs,
        "best_lr": best["lr"],
        "best": best,
        "reused_lrs": reused,
        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs),
    }


# ------------------------------------------------------------------------------------------------
# the parent


def calibrated_sketch(dense: Path, gpr: int, calibration: str, nsamples: int, seqlen: int) -> Path:
    """The model sketched (4-bit, ``gpr`` groups per row) with error feedback on ``calibration``, cached."""
    from spallm_plugins.config import SketchConfig
    from spallm_plugins.models import cache_dir
    from spallm_plugins.pipeline import sketch_to_folder

    tag = f"{dense.name}-spallm-b4-g{gpr}-gptq-{Path(calibration).parent.name}-{nsamples}x{seqlen}"
    out = cache_dir() / "bench" / tag
    if not (out / "config.json").is_file():
        config = SketchConfig(bits=4, groups_per_row=gpr, method="gptq", calibration=str(calibration),
                              nsamples=nsamples, seqlen=seqlen)  # fmt: skip
        print(f"sketching {dense} (gpr {gpr}, calibrated on {calibration}) into {out}", flush=True)
        sketch_to_folder(dense, out, config, progress=False, overwrite=True)
    return out


def run_finetune_bench(
    model_ref: str,
    out_dir: str | Path,
    data: str | Path,
    *,
    variants: tuple[str, ...] = VARIANTS,
    sketched: dict[int, str] | None = None,
    lrs: dict[str, tuple[float, ...]] | None = None,
    match_gpr: int = 4,
    mix: tuple[str, ...] = TRAIN_MIX,
    tasks: tuple[str, ...] = EVAL_TASKS,
    rows_per_set: int = 1000,
    validation_rows: int = 100,
    steps: int = 200,
    eval_every: int = 50,
    limit: int | None = 200,
    batch: int = 8,
    seqlen: int = 256,
    warmup: int = 10,
    eval_batch: int = 16,
    calib_samples: int = 64,
    calib_seqlen: int = 256,
    qlora_compute_dtype: str = "float32",
    gradient_checkpointing: bool = False,
    seed: int = 0,
    overwrite: bool = False,
    resume: bool = False,
    revision: str | None = None,
) -> dict[str, Any]:
    """Run ``variants`` (one child process each) and write ``finetune.json`` / ``finetune.png`` in ``out_dir``.

    Every finished run is kept in ``out_dir/runs``; ``resume=True`` reuses those made with the same settings
    (a killed or partial sweep continues where it stopped) and trains the rest. ``model_ref`` may be a Hub id,
    at ``revision``."""
    from lora_peers import targets_of

    from spallm_plugins.config import SketchConfig
    from spallm_plugins.convert import plan_sketch
    from spallm_plugins.evaluate import write_local_tasks
    from spallm_plugins.models import load_model, resolve_model
    from spallm_plugins.outputs import prepare_output_dir

    variants = tuple(check_variant(v) for v in variants)
    lrs = {**DEFAULT_LRS, **(lrs or {})}
    sketched = dict(sketched or {})
    data = Path(data)
    if resume and overwrite:
        raise ValueError(
            "resume and overwrite exclude each other: --resume keeps the finished runs, --overwrite drops them"
        )
    own = own_entries(out_dir) if resume else ()
    out_dir = prepare_output_dir(out_dir, overwrite=overwrite, own_entries=own)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs_dir = out_dir / "runs"
    if overwrite and runs_dir.is_dir():
        shutil.rmtree(runs_dir)
    work = out_dir / "work"
    work.mkdir(exist_ok=True)
    splits = eval_data_dir(data, work / "eval-data", tasks, mix)
    include = write_local_tasks(work / "eval-data", work / "tasks", list(tasks))
    held_out = split_validation(data, work / "split", mix, validation_rows, seed)
    by_folder = {folder: task for task, folder in task_folders().items()}
    validation_tasks = [by_folder[folder] for folder in mix]
    validation_include = write_local_tasks(work / "split" / "validation", work / "validation-tasks", validation_tasks)
    pairs = render_training_rows(work / "split" / "train", mix, rows_per_set, seed)
    (work / "train_rows.json").write_text(json.dumps(pairs), encoding="utf-8")
    data_sha256 = digest_files(
        [work / "train_rows.json", *sorted((work / "split" / "validation").rglob("*.json")),
         *sorted((work / "eval-data").rglob("*.json"))]
    )  # fmt: skip
    dense = resolve_model(model_ref, revision=revision)
    model, _ = load_model(dense, dtype=torch.float32)
    table_values = plan_sketch(model, SketchConfig(bits=4, groups_per_row=match_gpr)).table_values
    rank = lora_rank_matching(model, targets_of(model), table_values)
    del model
    calibration = str(data / mix[0] / "train.json")
    results = {}
    for variant in variants:
        kind, gpr = kind_of(variant), gpr_of(variant)
        if gpr is not None and gpr not in sketched:
            sketched[gpr] = str(calibrated_sketch(dense, gpr, calibration, calib_samples, calib_seqlen))
        path = out_dir / f"finetune-{variant}.json"
        cmd = [
            sys.executable, str(Path(__file__).resolve()), "child", "--variant", variant, "--dense", str(dense),
            "--rank", str(rank), "--lrs", ",".join(f"{lr:g}" for lr in lrs[kind]), "--steps", str(steps),
            "--eval-every", str(eval_every), "--batch", str(batch), "--seqlen", str(seqlen), "--warmup", str(warmup),
            "--eval-batch", str(eval_batch), "--tasks", ",".join(tasks), "--include", str(include),
            "--train-rows", str(work / "train_rows.json"), "--validation-include", str(validation_include),
            "--validation-tasks", ",".join(validation_tasks), "--qlora-compute-dtype", qlora_compute_dtype,
            "--seed", str(seed), "--data-sha256", data_sha256, "--runs-dir", str(runs_dir), "--json", str(path),
        ]  # fmt: skip
        if resume:
            cmd.append("--resume")
        if gpr is not None:
            cmd += ["--sketched", str(sketched[gpr])]
        if limit is not None:
            cmd += ["--limit", str(limit)]
        if gradient_checkpointing:
            cmd.append("--gradient-checkpointing")
        print(f"[{variant}] {' '.join(cmd[3:])}", flush=True)
        start = time.perf_counter()
        if subprocess.run(cmd).returncode != 0:
            raise RuntimeError(
                f"[{variant}] its child process failed (the error is printed above); the finished runs are kept in "
                f"{runs_dir}: fix the cause and rerun the same command with --resume"
            )
        results[variant] = json.loads(path.read_text())
        results[variant]["child_seconds"] = round(time.perf_counter() - start, 1)
        print(f"[{variant}] done in {results[variant]['child_seconds']:.1f} s", flush=True)
    summary = {
        "model": str(dense),
        "data": str(data),
        "train_mix": list(mix),
        "train_rows": len(pairs),
        "validation_rows": held_out,
        "eval_tasks": list(tasks),
        "eval_splits": splits,
        "limit": limit,
        "steps": steps,
        "eval_every": eval_every,
        "batch": batch,
        "seqlen": seqlen,
        "warmup": warmup,
        "seed": seed,
        "data_sha256": data_sha256,
        "lora_rank": rank,
        "rank_matches_gpr": match_gpr,
        "sketched": {str(g): p for g, p in sketched.items()},
        "calibration": {"file": calibration, "nsamples": calib_samples, "seqlen": calib_seqlen},
        "torch_threads": torch.get_num_threads(),
        "selection": "lr with the best mean validation accuracy (rows held out of the training splits), per variant",
        "variants": results,
    }
    write_json(out_dir / "finetune.json", summary)
    plot(summary, out_dir / "finetune.png")
    return summary


def own_entries(out_dir: str | Path) -> set[str]:
    """What a finetune bench writes into its ``--out``: a resumed sweep may find these there."""
    found = {"runs", "work", "finetune.json", "finetune.png"}
    if Path(out_dir).is_dir():
        found |= {p.name for p in Path(out_dir).glob("finetune-*.json")}
    return found


def digest_files(paths: list[Path]) -> str:
    """sha256 over the files' contents (links followed), in the given order."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()


def plot(summary: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    variants = summary["variants"]
    names = list(variants)
    colors = [f"C{i}" for i in range(len(names))]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name, color in zip(names, colors):
        best = variants[name]["best"]
        curve = best["curve"]
        axes[0].plot([c["step"] for c in curve], [c["mean_acc"] for c in curve], marker="o", color=color,
                     label=f"{name} (lr {best['lr']:g})")  # fmt: skip
    axes[0].set_xlabel("training step")
    axes[0].set_ylabel(f"mean acc, {len(summary['eval_tasks'])} held-out tasks")
    axes[0].set_title(f"lm-eval, first {summary['limit']} rows per task")
    axes[0].legend(fontsize=8)
    best = [variants[n]["best"] for n in names]
    axes[1].bar(names, [b["median_step_seconds"] for b in best], color=colors)
    axes[1].set_ylabel("median training step (s)")
    hosts = {b["host"].get("cpu", b["host"].get("cpu_capability")) for b in best}
    where = "CPU" if len(hosts) == 1 else f"{len(hosts)} different hosts: compare within one"
    axes[1].set_title(f"batch {summary['batch']}, <= {summary['seqlen']} tokens, {where}")
    axes[2].bar(names, [b["train_peak_rss_bytes"] / 2**30 for b in best], color=colors)
    axes[2].set_ylabel("training peak RSS (GiB)")
    axes[2].set_title(f"LoRA rank {summary['lora_rank']} (= SpaLLM g{summary['rank_matches_gpr']} trainable)")
    for ax in axes[1:]:
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# command line


def float_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated learning rates") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive learning rates")
    return values


def sketched_option(text: str) -> dict[int, str]:
    """``--sketched 1=DIR,4=DIR`` (or ``DIR`` alone for gpr 4)."""
    found = {}
    for item in text.split(","):
        gpr, _, path = item.rpartition("=")
        found[int(gpr) if gpr else 4] = path
    return found


def cmd_bench_finetune(args: argparse.Namespace) -> int:
    from spallm_plugins.cli.common import human, human_bytes

    lrs = {kind: getattr(args, f"{kind}_lrs") for kind in DEFAULT_LRS if getattr(args, f"{kind}_lrs")}
    summary = run_finetune_bench(
        args.model, args.out, args.data, variants=tuple(args.variants.split(",")),
        sketched=sketched_option(args.sketched) if args.sketched else None, lrs=lrs, match_gpr=args.match_gpr,
        mix=tuple(args.train_mix.split(",")), tasks=tuple(args.tasks.split(",")), rows_per_set=args.rows_per_set,
        validation_rows=args.validation_rows,
        steps=args.steps, eval_every=args.eval_every, limit=args.limit or None, batch=args.batch, seqlen=args.seqlen,
        warmup=args.warmup, eval_batch=args.eval_batch, calib_samples=args.calib_samples,
        calib_seqlen=args.calib_seqlen, qlora_compute_dtype=args.qlora_compute_dtype,
        gradient_checkpointing=args.gradient_checkpointing, seed=args.seed, overwrite=args.overwrite,
        resume=args.resume, revision=args.revision,
    )  # fmt: skip
    for name, v in summary["variants"].items():
        b = v["best"]
        print(
            f"{name:10s} best lr {b['lr']:<7g} mean acc {b['curve'][0]['mean_acc']:.3f} -> {b['final_mean_acc']:.3f}  "
            f"trainable {human(b['trainable_params']):>7s}  adapter {human_bytes(b['adapter_bytes']):>9s}  "
            f"step {b['median_step_seconds']:.3f} s  train peak RSS {human_bytes(b['train_peak_rss_bytes'])}"
        )
    print(f"wrote {Path(args.out) / 'finetune.json'} and finetune.png")
    return 0


def add_finetune_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=200, help="training steps of every run (default 200)")
    p.add_argument("--eval-every", type=int, default=50, help="steps between lm-eval points of the curve (default 50)")
    p.add_argument("--batch", type=int, default=8, help="rows per step (default 8)")
    p.add_argument("--seqlen", type=int, default=256, help="most tokens per training row (default 256)")
    p.add_argument("--warmup", type=int, default=10, help="linear warmup steps, then linear decay (default 10)")
    p.add_argument("--eval-batch", type=int, default=16, help="lm-eval batch size (default 16)")
    p.add_argument("--tasks", default=",".join(EVAL_TASKS), help="held-out lm-eval tasks (default: %(default)s)")
    p.add_argument("--qlora-compute-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="bnb_4bit_compute_dtype of the QLoRA arm (default float32, as the other arms)")  # fmt: skip
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--seed", type=int, default=0, help="data order and initialisation (default 0)")


def parser() -> argparse.ArgumentParser:
    """The sweep's options (those of the former ``spallm bench finetune``)."""
    from spallm_plugins.cli.common import add_output_options, add_revision_option

    p = argparse.ArgumentParser(description="SpaLLM vs QLoRA (bitsandbytes NF4) vs LoRA vs full fine-tuning, lm-eval")
    p.add_argument("--model", default="smollm2", help="dense model: folder, Hub id, .gguf (default smollm2)")
    add_revision_option(p)
    p.add_argument("--data", required=True, help="the llm-adapters dataset folder (ARC-Easy/train.json, ...)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated (default: %(default)s)")
    p.add_argument("--sketched", help="prepared sketched bases: GPR=DIR[,GPR=DIR] (default: a calibrated sketch "
                                      "of the model on the first training set, cached)")  # fmt: skip
    p.add_argument("--match-gpr", type=int, default=4, help="LoRA's rank matches this SpaLLM gpr's table count")
    p.add_argument("--train-mix", default=",".join(TRAIN_MIX), help="training sets (default: %(default)s)")
    p.add_argument("--rows-per-set", type=int, default=1000, help="training rows drawn from each set (default 1000)")
    p.add_argument("--limit", type=int, default=200, help="rows per held-out task (0: all; default 200)")
    p.add_argument("--validation-rows", type=int, default=100,
                   help="rows of each training set held out to choose the learning rate (default 100)")  # fmt: skip
    for kind, values in DEFAULT_LRS.items():
        p.add_argument(f"--{kind}-lrs", type=float_list, help=f"{kind} lr sweep (default {','.join(map(str, values))})")
    p.add_argument("--calib-samples", type=int, default=64, help="calibration sequences of the sketch (default 64)")
    p.add_argument("--calib-seqlen", type=int, default=256, help="tokens per calibration sequence (default 256)")
    add_finetune_options(p)
    add_output_options(p, default="bench-finetune", what="finetune.json / finetune.png")
    p.add_argument("--resume", action="store_true",
                   help="keep the finished runs in OUT/runs (same settings only) and train the missing ones")  # fmt: skip
    return p


def child_parser() -> argparse.ArgumentParser:
    """The options of one variant's child process (the parent passes them; :func:`run_settings` records them)."""
    p = argparse.ArgumentParser(description="one variant of the fine-tune sweep (run by the parent)")
    p.add_argument("--variant", type=check_variant, required=True)
    p.add_argument("--dense", required=True)
    p.add_argument("--sketched")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lrs", type=float_list, required=True)
    p.add_argument("--include", required=True, help="lm-eval include path of the held-out tasks")
    p.add_argument("--train-rows", required=True, help="JSON [[context, continuation], ...]")
    p.add_argument("--validation-include", required=True, help="lm-eval include path of the validation tasks")
    p.add_argument("--validation-tasks", required=True, help="comma-separated validation tasks")
    p.add_argument("--limit", type=int)
    add_finetune_options(p)
    p.add_argument("--data-sha256", required=True, help="digest of the training, validation and evaluation rows")
    p.add_argument("--runs-dir", required=True, help="where each finished run is written")
    p.add_argument("--resume", action="store_true", help="reuse the runs in --runs-dir made with the same settings")
    p.add_argument("--json", required=True)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["child"]:  # one variant, run by the parent
        args = child_parser().parse_args(argv[1:])
        write_json(args.json, run_variant(args))
        return 0
    return cmd_bench_finetune(parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
