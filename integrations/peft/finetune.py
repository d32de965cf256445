"""A short table fine-tune through the PEFT method (the quickstart's step, and benchmarks/finetune_bench.py's).

Instruction rows (``instruction`` / ``input`` / ``output``, the llm-adapters layout) are rendered with
the tokenizer's chat template; the loss is on the answer tokens only.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

QUICKSTART_DATA = "quickstart_instructions.json"  # in spallm_plugins/data
IGNORE_INDEX = -100
PERPLEXITY_SEQLEN = 256  # as the quickstart's step 3 (general English text: evaluate.sample_text())


def read_instructions(path: str | Path) -> list[dict[str, str]]:
    """Rows with ``instruction`` and ``output`` (``input`` optional) from a JSON list or JSONL file."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        rows = json.loads(text) if path.suffix != ".jsonl" else [json.loads(line) for line in text.splitlines() if line]
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err})") from None
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path}: expected a non-empty list of rows")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not row.get("instruction") or "output" not in row:
            raise ValueError(f"{path}: row {i} needs 'instruction' and 'output' keys")
    return rows


def prompt_of(row: dict[str, str]) -> str:
    return row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")


def encode(row: dict[str, str], tokenizer, max_length: int) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)``: the chat-formatted prompt (labels ignored) followed by the answer."""
    messages = [{"role": "user", "content": prompt_of(row)}]
    if tokenizer.chat_template:
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:
        prompt = prompt_of(row) + "\n"
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(str(row["output"]) + (tokenizer.eos_token or ""), add_special_tokens=False)["input_ids"]
    ids = (prompt_ids + answer_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:max_length]
    return ids, labels


def batches(rows, tokenizer, batch_size: int, max_length: int, seed: int = 0, pad_to: int | None = None):
    """Endless shuffled batches of right-padded ``input_ids`` / ``labels`` / ``attention_mask``."""
    encoded = [encode(r, tokenizer, max_length) for r in rows]
    order = random.Random(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    while True:
        picks = order.sample(encoded, min(batch_size, len(encoded)))
        while len(picks) < batch_size:
            picks.append(order.choice(encoded))
        width = pad_to or max(len(ids) for ids, _ in picks)
        input_ids = torch.full((batch_size, width), pad, dtype=torch.long)
        labels = torch.full((batch_size, width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for i, (ids, lab) in enumerate(picks):
            ids, lab = ids[:width], lab[:width]
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(lab)] = torch.tensor(lab)
            mask[i, : len(ids)] = 1
        yield {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def train(
    model,
    data,
    steps: int,
    lr: float,
    *,
    warmup: int = 0,
    on_step: Callable[[int, float, float], None] | None = None,
) -> list[dict[str, float]]:
    """AdamW over the trainable parameters with a linear schedule; returns ``[{step, loss, seconds}]``."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(warmup, 1)) * max(0.0, 1 - s / max(steps, 1))
    )
    model.train()
    history = []
    for step in range(steps):
        batch = next(data)
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss became {loss.item()} at step {step + 1}")
        history.append({"step": step + 1, "loss": loss.item(), "seconds": seconds})
        if on_step is not None:
            on_step(step + 1, loss.item(), seconds)
    model.eval()
    return history


def eval_loss(model, rows, tokenizer, max_length: int, batch_size: int = 8) -> float:
    """Mean answer-token loss over ``rows`` (held-out curves)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            batch = next(batches(chunk, tokenizer, len(chunk), max_length, seed=i))
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            total += model(**batch).loss.item() * n
            count += n
    return total / max(count, 1)


def quickstart_finetune(
    sketched_dir: str | Path,
    out_dir: str | Path,
    steps: int = 20,
    lr: float = 3e-4,
    *,
    warmup: int = 3,
    batch_size: int = 4,
    max_length: int = 96,
    data: str | Path | None = None,
    measure_before: bool = True,
) -> dict[str, Any]:
    """Fine-tune the tables of a sketched model on the bundled instruction set; save the adapter.

    ``data`` replaces the bundled set (its first 4 rows are held out). Besides the held-out loss, the
    general-text perplexity of the bundled English text (``evaluate.sample_text()``, windows of 256 tokens,
    never trained on) is measured after the fine-tune (``perplexity_after``) and, with ``measure_before``,
    on the PEFT model before it (``perplexity_before``, the sketch's value: the adapter starts as the base;
    None without ``measure_before``), so the report shows what the fine-tune cost the model's general English.

    The defaults (20 steps, lr 3e-4, warmup 3, batch 4) teach the answer style while keeping the general-text
    perplexity close to the sketch's: Adam moves every table value by about ``lr`` per step, so a larger lr
    costs the model's general English quickly.
    """
    from importlib.resources import as_file, files

    from peft import get_peft_model

    from spallm_plugins.evaluate import generate_answer, perplexity, sample_text
    from spallm_plugins.pipeline import load_sketched

    from .config import SpaLLMConfig

    if data is None:
        with as_file(files("spallm_plugins") / "data" / QUICKSTART_DATA) as path:
            rows = read_instructions(path)
    else:
        rows = read_instructions(data)
    if len(rows) < 5:
        raise ValueError(
            f"{data or QUICKSTART_DATA}: {len(rows)} rows; the first 4 are held out, at least 5 are needed"
        )
    held_out, train_rows = rows[:4], rows[4:]
    model, tokenizer = load_sketched(sketched_dir)
    question = "What is the capital of Italy?"
    before = generate_answer(model, tokenizer, question)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, SpaLLMConfig(task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    data_iter = batches(train_rows, tokenizer, batch_size=batch_size, max_length=max_length, seed=0)
    text = sample_text()

    def report(step: int, loss: float, seconds: float) -> None:
        if step == 1 or step % 5 == 0 or step == steps:
            print(f"      step {step:3d}  loss {loss:.3f}  ({seconds:.2f} s/step)")

    peft_model.eval()
    ppl_before = perplexity(peft_model, tokenizer, text, seqlen=PERPLEXITY_SEQLEN) if measure_before else None
    loss_before = eval_loss(peft_model, held_out, tokenizer, max_length)
    history = train(peft_model, data_iter, steps, lr, warmup=warmup, on_step=report)
    after = generate_answer(peft_model, tokenizer, question)
    ppl_after = perplexity(peft_model, tokenizer, text, seqlen=PERPLEXITY_SEQLEN)
    peft_model.save_pretrained(out_dir)
    adapter_bytes = sum(f.stat().st_size for f in Path(out_dir).glob("*.safetensors"))
    base_bytes = sum(f.stat().st_size for f in Path(sketched_dir).glob("*.safetensors"))
    return {
        "question": question,
        "answer_before": before,
        "answer_after": after,
        "held_out_loss_before": loss_before,
        "held_out_loss_after": eval_loss(peft_model, held_out, tokenizer, max_length),
        "perplexity_before": ppl_before,
        "perplexity_after": ppl_after,
        "perplexity_seqlen": PERPLEXITY_SEQLEN,
        "trainable_table_values": trainable,
        "loss_first": history[0]["loss"],
        "loss_last": history[-1]["loss"],
        "steps": steps,
        "lr": lr,
        "warmup": warmup,
        "batch_size": batch_size,
        "train_rows": len(train_rows),
        "train_seconds": round(sum(h["seconds"] for h in history), 2),
        "adapter_dir": str(out_dir),
        "adapter_bytes": adapter_bytes,
        "base_bytes": base_bytes,
    }
