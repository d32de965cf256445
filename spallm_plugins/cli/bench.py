"""``spallm bench``: the benchmarks a user runs on their own setup; each command parses its options and
calls a function of :mod:`spallm_plugins.bench`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import add_output_options, add_revision_option, check_json_output, human_bytes, positive_int


def peer_list(text: str) -> list[str]:
    """``--peers``: comma-separated peer names, or ``none``."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    return [] if names == ["none"] else names


def cmd_bench_quality(args: argparse.Namespace) -> int:
    from ..bench.quality import run_quality

    run_quality(
        args.model, args.text, args.calib, args.nsamples, args.seqlen, args.eval_seqlen,
        only=args.only, grid_exponent=args.grid_exponent, out_dir=args.out, overwrite=args.overwrite,
        peers=args.peers, seed=args.seed, max_windows=args.max_windows, revision=args.revision,
    )  # fmt: skip
    print(f"wrote {Path(args.out) / 'quality.json'}")
    return 0


def cmd_bench_kmeans(args: argparse.Namespace) -> int:
    from ..bench.kmeans import run_layer_kmeans_bench

    check_json_output(args)
    result = run_layer_kmeans_bench(args.model, args.layer, bits=args.bits, calibration=args.calib,
                                    nsamples=args.nsamples, seqlen=args.seqlen, revision=args.revision)  # fmt: skip
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def cmd_bench_kernels(args: argparse.Namespace) -> int:
    from ..bench.kernels import run_kernel_bench

    if args.sass:
        from ..kernels.triton.machine_code import sass_table, toolchain_refusal

        if toolchain_refusal():
            print(f"spallm bench kernels --sass: {toolchain_refusal()}", file=sys.stderr)
            return 1
        print(json.dumps(sass_table(), indent=2))
        return 0
    if args.device == "cpu":
        from ..bench.kernels import run_cpu_kernel_bench

        run_cpu_kernel_bench(bits=args.bits, groups_per_row=args.groups_per_row, out_dir=args.out,
                             overwrite=args.overwrite)  # fmt: skip
    else:
        run_kernel_bench(bits=args.bits, groups_per_row=args.groups_per_row, out_dir=args.out, overwrite=args.overwrite)
    print(f"wrote {Path(args.out) / 'kernels.json'}")
    return 0


def cmd_bench_scale(args: argparse.Namespace) -> int:
    from ..bench.scale import run_scale_bench

    run_scale_bench(args.out, layers=tuple(args.layers), nsamples=args.nsamples, seqlen=args.seqlen,
                    groups_per_row=args.groups_per_row, modes=tuple(args.modes), device=args.device,
                    overwrite=args.overwrite)  # fmt: skip
    print(f"wrote {Path(args.out) / 'scale.json'}")
    return 0


def cmd_bench_sharding(args: argparse.Namespace) -> int:
    from ..bench.sharding import SMOLLM2, TINY, run_sharding_bench

    run_sharding_bench(args.out, world_sizes=tuple(args.world_sizes), shape={"smollm2": SMOLLM2, "tiny": TINY}[args.shape],
                       bits=args.bits, groups_per_row=args.groups_per_row, steps=args.steps, batch=args.batch,
                       seqlen=args.seqlen, overwrite=args.overwrite)  # fmt: skip
    print(f"wrote {Path(args.out) / 'sharding.json'}")
    return 0


def cmd_bench_inference(args: argparse.Namespace, run_inference_bench=None) -> int:
    """``spallm bench inference`` (the library's dense and sketched arms), or ``benchmarks/inference_bench.py``
    with its own ``run_inference_bench`` (the QLoRA arms added)."""
    if run_inference_bench is None:
        from ..bench.inference import run_inference_bench

    summary = run_inference_bench(
        args.model, args.out, sketched=args.sketched, adapter=args.adapter, variants=tuple(args.variants.split(",")),
        groups_per_row=args.groups_per_row, batches=args.batches, prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens, repeats=args.repeats, overwrite=args.overwrite, rounds=args.rounds,
        revision=args.revision,
    )  # fmt: skip
    print_inference_summary(summary, Path(args.out))
    return 0


def print_inference_summary(summary: dict, out: Path) -> None:
    """Tokens/s and bytes per variant, and SpaLLM's speed ratios (also for benchmarks/inference_bench.py)."""
    for name, v in summary["variants"].items():
        speeds = "  ".join(f"batch {g['batch']}: {g['tokens_per_second']:7.1f} tok/s" for g in v["generate"])
        print(f"{name:13s} {human_bytes(v['model_bytes']):>10s}  {speeds}")
    for pair, by_batch in summary["spallm_speed_ratios"].items():
        text = "  ".join(f"batch {b}: x{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f})" for b, r in by_batch.items())
        print(f"{pair:20s} {text}  (median over {summary['rounds']} round(s), min-max)")
    print(f"wrote {out / 'inference.json'}")


def add_inference_options(p: argparse.ArgumentParser, variants: tuple[str, ...]) -> None:
    """The options of ``spallm bench inference`` (benchmarks/inference_bench.py takes them too)."""
    from ..bench.inference import add_measure_options

    p.add_argument("--model", default="smollm2", help="dense model: folder, Hub id, .gguf (default smollm2)")
    add_revision_option(p)
    p.add_argument("--sketched", help="sketched model (folder or Hub id) for the spallm arm (default: data-free "
                                      "sketch, cached)")  # fmt: skip
    p.add_argument("--adapter", help="a spallm adapter (folder or Hub id) merged into the sketched model first")
    p.add_argument("--gpr", "--groups-per-row", dest="groups_per_row", type=int, default=4,
                   help="table groups per row of the default sketch (default 4)")  # fmt: skip
    p.add_argument("--variants", default=",".join(variants), help="comma-separated (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run all variants this many times (order rotated); SpaLLM's speed ratios per round and "
                        "their median (default 1)")  # fmt: skip
    add_measure_options(p)
    add_output_options(p, default="bench-inference", what="inference.json")


def add_quality_parsers(bench) -> None:
    """``spallm bench quality`` and ``kmeans``: what a sketch keeps of a model."""
    p = bench.add_parser("quality", help="perplexity: original, RTN/NF4 baselines, SpaLLM variants")
    p.add_argument("--model", default="smollm2", help="dense model to sketch: folder, Hub id, .gguf (default smollm2)")
    add_revision_option(p)
    p.add_argument("--text", help="held-out text: .txt, or .json/.jsonl rows (default: the bundled English sample)")
    p.add_argument("--max-windows", dest="max_windows", type=positive_int, default=None,
                   help="evaluate only the text's first N windows (default: all)")  # fmt: skip
    p.add_argument("--calib", help="calibration data for the calibrated variants")
    p.add_argument("--nsamples", type=int, default=64, help="calibration sequences (default 64)")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per calibration sequence (default 256)")
    p.add_argument("--eval-seqlen", dest="eval_seqlen", type=int, default=256,
                   help="perplexity window in tokens (default 256)")  # fmt: skip
    p.add_argument("--grid-exponent", dest="grid_exponent", type=float, default=None,
                   help="p of the calibrated variants' k-means weights (default: SketchConfig's)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="k-means seed of the SpaLLM variants (default 0)")
    p.add_argument("--only", nargs="+", help="run only these variants (names as in the JSON)")
    p.add_argument("--peers", type=peer_list, default=None,
                   help="real quantizers to run beside them, comma-separated: nf4-bnb, hqq-g64, gptq-g128, or "
                        "'none' (default: every one installed; with --only, those it names)")  # fmt: skip
    add_output_options(p, default="bench-quality", what="quality.json / quality.png")
    p.set_defaults(func=cmd_bench_quality)
    p = bench.add_parser("kmeans", help="batched weighted k-means vs scikit-learn per row, on one layer")
    p.add_argument("--model", default="smollm2", help="dense model: folder, Hub id, .gguf (default smollm2)")
    add_revision_option(p)
    p.add_argument("--layer", default="model.layers.0.mlp.up_proj", help="the linear whose weight is clustered")
    p.add_argument("--bits", type=int, default=4, help="bits per code (default 4)")
    p.add_argument("--calib", help="derive loss-error-aware column weights from this calibration data")
    p.add_argument("--nsamples", type=int, default=16, help="calibration sequences (default 16)")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per calibration sequence (default 256)")
    p.add_argument("--json", help="also write the result here")
    p.set_defaults(func=cmd_bench_kmeans)


def add_kernel_parsers(bench) -> None:
    """``spallm bench kernels``: the LUT kernels on this machine."""
    p = bench.add_parser("kernels", help="LUT kernels vs dense matmul and dequantize+matmul (CUDA, or --device cpu)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda: the Triton kernels vs cuBLAS fp16; cpu: the compiled CPU kernels vs torch's "
                        "float32 matmul and the reference (default cuda)")  # fmt: skip
    p.add_argument("--bits", type=int, default=4, help="bits per code (default 4)")
    p.add_argument("--gpr", "--groups-per-row", dest="groups_per_row", type=int, default=4,
                   help="table groups per row (default 4)")  # fmt: skip
    p.add_argument("--sass", action="store_true",
                   help="no timing, no GPU: compile the decode kernels for sm90a and print their K loops' machine "
                        "code (SASS per weight, SHFL/BAR/STS, load widths, registers, local memory) as JSON")  # fmt: skip
    add_output_options(p, default="bench-kernels", what="kernels.json")
    p.set_defaults(func=cmd_bench_kernels)


def add_scale_parsers(bench) -> None:
    """``spallm bench scale`` and ``sharding``: memory and time as models and ranks grow."""
    p = bench.add_parser("scale", help="peak memory and time of streaming sketches of Llama-2-7B-shaped models")
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8], help="decoder layers of each model (2 4 8)")
    p.add_argument("--modes", nargs="+", choices=["data-free", "calibrated"], default=["data-free", "calibrated"],
                   help="sketch each model data-free, calibrated, or both (default both)")  # fmt: skip
    p.add_argument("--nsamples", type=int, default=16, help="calibration sequences (default 16)")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per calibration sequence (default 256)")
    p.add_argument("--gpr", "--groups-per-row", dest="groups_per_row", type=int, default=4,
                   help="table groups per row (default 4)")  # fmt: skip
    p.add_argument("--device", default="cpu",
                   help="where each block is sketched: cpu (default) or cuda (one block on the GPU at a time)")  # fmt: skip
    add_output_options(p, default="bench-scale", what="scale.json (the models are made and removed under OUT/work)")
    p.set_defaults(func=cmd_bench_scale)

    p = bench.add_parser("sharding", help="FSDP2 on gloo: per-rank bytes and step time against one process")
    p.add_argument("--world-sizes", dest="world_sizes", type=int, nargs="+", default=[2],
                   help="ranks of each sharded run, beside one plain process (default 2)")  # fmt: skip
    p.add_argument("--shape", choices=["smollm2", "tiny"], default="smollm2",
                   help="Llama widths with random codes and tables (default smollm2: SmolLM2-135M's)")  # fmt: skip
    p.add_argument("--bits", type=int, default=4, choices=[2, 3, 4], help="code bits (default 4)")
    p.add_argument("--gpr", "--groups-per-row", dest="groups_per_row", type=int, default=4,
                   help="table groups per row (default 4)")  # fmt: skip
    p.add_argument("--steps", type=int, default=5, help="timed Adam steps after one warm-up (default 5)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step, split over the ranks (default 8)")
    p.add_argument("--seqlen", type=int, default=128, help="tokens per sequence (default 128)")
    add_output_options(p, default="bench-sharding", what="sharding.json")
    p.set_defaults(func=cmd_bench_sharding)


def add_inference_parser(bench) -> None:
    """``spallm bench inference``: generate throughput, dense against sketched."""
    from ..bench.inference import VARIANTS

    p = bench.add_parser("inference", help="generate tokens/s and bytes: the dense model and its SpaLLM sketch")
    add_inference_options(p, VARIANTS)
    p.set_defaults(func=cmd_bench_inference)


def add_parser(sub):
    """``spallm bench`` and its built-in commands; returns its subparsers, where integrations add theirs."""
    bench = sub.add_parser("bench", help="benchmarks (JSON out)").add_subparsers(dest="bench", required=True)
    for add in (add_quality_parsers, add_kernel_parsers, add_scale_parsers, add_inference_parser):
        add(bench)
    return bench
