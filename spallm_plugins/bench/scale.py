"""``spallm bench scale``: the streaming sketcher's peak memory and time on Llama-2-7B-shaped checkpoints.

The checkpoints have the real widths (hidden 4096, intermediate 11008, 32 heads, vocabulary 32000)
and random bfloat16 weights, written block by block as shards (never the whole model in memory),
with 2, 4, 8 (or any) decoder layers. Each is sketched data-free and calibrated, each sketch in its
own child process so that its peak resident memory is its own. The claim measured: peak memory does
not grow with the number of layers.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

LLAMA2_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32,
             "vocab_size": 32000, "max_position_embeddings": 4096}  # fmt: skip
WORDS = 4000  # the calibration tokenizer's word list (ids beyond it are never produced)


def make_checkpoint(path: str | Path, layers: int, *, shape: dict[str, int] | None = None, seed: int = 0) -> Path:
    """A Llama checkpoint of ``shape`` (default: Llama-2-7B's widths) with ``layers`` decoder layers and
    random bfloat16 weights, one shard per block, plus a word-level tokenizer; returns ``path``."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**{**LLAMA2_7B, **(shape or {})}, num_hidden_layers=layers, tie_word_embeddings=False)
    config.dtype = torch.bfloat16
    config.save_pretrained(path)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    groups: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, param in skeleton.state_dict().items():
        parts = name.split(".")
        key = f"block-{int(parts[2]):05d}" if parts[:2] == ["model", "layers"] else "outside"
        groups.setdefault(key, {})[name] = tuple(param.shape)
    generator = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    total = 0
    for key, tensors in sorted(groups.items()):
        shard = {}
        for name, tensor_shape in tensors.items():
            if name.endswith("norm.weight"):
                shard[name] = torch.ones(tensor_shape, dtype=torch.bfloat16)
            else:
                shard[name] = (torch.randn(tensor_shape, generator=generator) * 0.02).to(torch.bfloat16)
            total += shard[name].numel() * 2
        file = f"{key}.safetensors"
        save_file(shard, str(path / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
        del shard
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(
        path
    )
    return path


def calibration_text(path: str | Path, words: int, seed: int = 0) -> Path:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, WORDS, (words,), generator=generator).tolist()
    Path(path).write_text(" ".join(f"w{i}" for i in ids) + "\n")
    return Path(path)


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    """One sketch in this process; its peak resident memory is this process's."""
    from ..config import SketchConfig
    from ..pipeline import sketch_to_folder
    from ..sketch.process_memory import fix_mmap_threshold

    fix_mmap_threshold()  # as `spallm sketch` does
    config = SketchConfig(bits=4, groups_per_row=args.groups_per_row)
    if args.calib:
        config = config.replace(method="gptq", calibration=args.calib, nsamples=args.nsamples, seqlen=args.seqlen)
    start = time.perf_counter()
    report = sketch_to_folder(args.source, args.out, config, progress=False, overwrite=True, device=args.device)
    seconds = [b["seconds"] for b in report["blocks"]]
    gpu_peaks = [b["peak_gpu_bytes"] for b in report["blocks"] if "peak_gpu_bytes" in b]
    return {
        "wall_seconds": round(time.perf_counter() - start, 2),
        "seconds_per_block": round(sum(seconds) / len(seconds), 3),
        "block_seconds": seconds,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "block_peak_rss_bytes": [b["peak_rss_bytes"] for b in report["blocks"]],
        "blocks": len(seconds),
        "device": args.device,
        "peak_gpu_bytes": max(gpu_peaks) if gpu_peaks else None,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
    }


def run_scale_bench(
    out_dir: str | Path, *, layers: tuple[int, ...] = (2, 4, 8), nsamples: int = 16, seqlen: int = 256,
    groups_per_row: int = 4, shape: dict[str, int] | None = None, modes: tuple[str, ...] = ("data-free", "calibrated"),
    device: str = "cpu", overwrite: bool = False, log=print,
) -> dict[str, Any]:  # fmt: skip
    """Make the checkpoints, sketch each in a child process, write ``scale.json`` into ``out_dir``.

    ``device="cuda"`` sketches one block at a time on the GPU (the rest of the model is never
    loaded); the peak GPU memory is recorded beside the peak RSS."""
    from ..outputs import prepare_output_dir

    out_dir = prepare_output_dir(out_dir, overwrite=overwrite)
    work = out_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    calib = calibration_text(work / "calibration.txt", nsamples * seqlen * 2)
    rows = []
    for n in layers:
        source = make_checkpoint(work / f"llama-{n}-layers", n, shape=shape)
        for mode in modes:
            cmd = [sys.executable, "-m", "spallm_plugins.bench.scale", "--child", "--source", str(source),
                   "--out", str(work / f"sketch-{n}-{mode}"), "--gpr", str(groups_per_row), "--device", device]  # fmt: skip
            if mode == "calibrated":
                cmd += ["--calib", str(calib), "--nsamples", str(nsamples), "--seqlen", str(seqlen)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(f"bench scale: the {mode} sketch of {n} layers failed:\n{proc.stderr[-3000:]}")
            row = {"layers": n, "mode": mode, **json.loads(proc.stdout.strip().splitlines()[-1])}
            rows.append(row)
            log(f"{n} layers {mode:<10} peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB  "
                f"{row['seconds_per_block']:.1f} s/block  wall {row['wall_seconds']:.1f} s  on {device}")  # fmt: skip
            shutil.rmtree(work / f"sketch-{n}-{mode}", ignore_errors=True)
        shutil.rmtree(source, ignore_errors=True)
    growth = {}
    for mode in modes:
        peaks = [r["peak_rss_bytes"] for r in rows if r["mode"] == mode]
        if len(peaks) > 1:
            growth[mode] = peaks[-1] - peaks[0]
    results = {
        "device": device,
        "projections": project(rows) if shape is None else {},
        "shape": {**LLAMA2_7B, **(shape or {})},
        "nsamples": nsamples,
        "seqlen": seqlen,
        "groups_per_row": groups_per_row,
        "rows": rows,
        "peak_rss_growth_bytes_first_to_last": growth,
        "torch_threads": torch.get_num_threads(),
    }
    from ..format import write_json

    write_json(out_dir / "scale.json", results)
    return results


# weights of one decoder block's seven linears: Llama-2-7B and Llama-3-70B (GQA, 8 KV heads of 128)
BLOCK_WEIGHTS = {"llama-2-7b": 4 * 4096 * 4096 + 3 * 4096 * 11008,
                 "llama-3-70b": 2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672}  # fmt: skip
BLOCKS = {"llama-2-7b": 32, "llama-3-70b": 80}


def project(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Whole-model sketch times on the device measured from its seconds per 7B-shaped block.

    Assumes a block's time grows with its weight count (k-means, error feedback and refit are
    linear in the rows and, per row, in the columns; the Hessian factorisation, cubic in the
    input width, is a few percent of a 7B block and is not scaled separately).
    """
    out: dict[str, Any] = {"assumption": "seconds per block scale with the block's weight count"}
    for mode in sorted({r["mode"] for r in rows}):
        per_block = max(r["seconds_per_block"] for r in rows if r["mode"] == mode)
        for model, blocks in BLOCKS.items():
            scale = BLOCK_WEIGHTS[model] / BLOCK_WEIGHTS["llama-2-7b"]
            out[f"{model}_{mode}_hours"] = round(per_block * scale * blocks / 3600, 2)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="one sketch of spallm bench scale (run by the parent)")
    p.add_argument("--child", action="store_true", required=True)
    p.add_argument("--source", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--gpr", dest="groups_per_row", type=int, default=4)
    p.add_argument("--calib")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--device", default="cpu")
    print(json.dumps(run_child(p.parse_args(argv))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
