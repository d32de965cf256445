"""``spallm sketch``: a model into a sketched checkpoint, streamed block by block."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import SketchConfig
from .common import add_dense_dtype_option, add_output_options, add_revision_option, add_sketch_options, memory_size


def cmd_sketch(args: argparse.Namespace) -> int:
    from ..pipeline import sketch_to_folder
    from ..sketch.process_memory import fix_mmap_threshold

    fix_mmap_threshold()  # this process only sketches: no block's temporaries stay resident in the heap
    if args.offload:
        print("spallm sketch: --offload is deprecated and has no effect (every sketch streams one block at a time); "
              "it will be removed", file=sys.stderr)  # fmt: skip

    config = SketchConfig(**{k: getattr(args, k) for k in SketchConfig.field_names() if hasattr(args, k)})
    report = sketch_to_folder(
        args.model,
        args.out,
        config,
        progress=not args.quiet,
        resume=args.resume,
        device=args.device,
        overwrite=args.overwrite,
        dense_dtype=args.dense_dtype,
        max_memory=args.max_memory,
        offload_activations=args.offload_activations,
        revision=args.revision,
    )
    print(f"sketched {len(report['layers'])} linear layers in {report['sketch_seconds']:.1f} s -> {args.out}")
    if args.report:
        from ..bench.plots import plot_layer_errors

        png = plot_layer_errors(report, Path(args.out) / "sketch_report.png")
        print(f"per-layer error plot: {png}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("sketch", help="sketch a model (HF folder, Hub id, .gguf file, or 'smollm2') into a checkpoint")
    p.add_argument("model", help="HF model folder, Hugging Face Hub id (org/name), .gguf file, or 'smollm2' "
                                 "(the embedded default)")  # fmt: skip
    add_revision_option(p)
    add_output_options(p, what="the sketched checkpoint (written atomically)")
    add_dense_dtype_option(p, default_help="the source checkpoint's dtype")
    add_sketch_options(p)
    p.add_argument("--method", choices=["kmeans", "gptq"], default=argparse.SUPPRESS,
                   help="kmeans: data-free; gptq: calibrated error feedback (default when --calib is given)")  # fmt: skip
    p.add_argument("--calib", dest="calibration", default=argparse.SUPPRESS,
                   help="calibration text: .txt, .json/.jsonl rows (text or instruction/input/output), a datasets "
                   "folder, or a Hub dataset hf://datasets/ORG/NAME[@REVISION][?config=C&split=S&column=COL&data_files=GLOB]")  # fmt: skip
    p.add_argument("--nsamples", type=int, default=argparse.SUPPRESS,
                   help=f"calibration sequences (default {SketchConfig.nsamples})")  # fmt: skip
    p.add_argument("--seqlen", type=int, default=argparse.SUPPRESS,
                   help=f"tokens per sequence (default {SketchConfig.seqlen})")  # fmt: skip
    p.add_argument("--damping", type=float, default=argparse.SUPPRESS, help="fraction of mean diag(H) (default 0.01)")
    p.add_argument("--grid-exponent", dest="grid_exponent", type=float, default=argparse.SUPPRESS,
                   help="p in the loss-error-aware k-means weights U_cc^-p")  # fmt: skip
    p.add_argument("--act-order", dest="act_order", action="store_true", default=argparse.SUPPRESS,
                   help="assign codes in order of descending Hessian diagonal (GPTQ's act-order)")  # fmt: skip
    p.add_argument("--true-sequential", dest="true_sequential", action=argparse.BooleanOptionalAction,
                   default=argparse.SUPPRESS,
                   help="sketch a block's linears stage by stage (q/k/v, o, gate/up, down), each calibrated "
                        "through the stages already sketched (default: on)")  # fmt: skip
    p.add_argument("--no-refit", dest="refit", action="store_false", default=argparse.SUPPRESS,
                   help="skip the closed-form table refit")  # fmt: skip
    p.add_argument("--refit-rounds", dest="refit_rounds", type=int, default=argparse.SUPPRESS,
                   help="alternate code assignment and table refit this many times (default 1)")  # fmt: skip
    p.add_argument("--seed", type=int, default=argparse.SUPPRESS,
                   help="seed of k-means starts and calibration shuffling (default 0)")  # fmt: skip
    p.add_argument("--kmeans-iters", dest="kmeans_iters", type=int, default=argparse.SUPPRESS,
                   help="Lloyd iterations of the weighted k-means (default 50)")  # fmt: skip
    p.add_argument("--kmeans-restarts", dest="kmeans_restarts", type=int, default=argparse.SUPPRESS,
                   help="seeded k-means++ starts per row-group besides the quantile and min-max grid starts; "
                        "the best is kept (default 2)")  # fmt: skip
    p.add_argument("--tune-steps", dest="tune_steps", type=int, default=argparse.SUPPRESS,
                   help="after a block is sketched, Adam steps on its tables against the dense block's outputs, "
                        "one calibration batch each (calibrated only; default 0: none)")  # fmt: skip
    p.add_argument("--tune-lr", dest="tune_lr", type=float, default=argparse.SUPPRESS,
                   help="Adam learning rate of --tune-steps (default 5e-5)")  # fmt: skip
    p.add_argument("--resume", action="store_true", help="continue a killed calibrated run from its last block")
    p.add_argument("--max-memory", dest="max_memory", type=memory_size, default=None,
                   help="workspace budget for sketching one linear, e.g. 2GiB (default 1GiB); rows are "
                        "sketched in chunks that fit it, with the same result for any budget")  # fmt: skip
    p.add_argument("--device", default="cpu", help="compute device for calibrated sketching (cpu, cuda, cuda:1)")
    p.add_argument("--offload-activations", dest="offload_activations", action="store_true",
                   help="keep the calibration activations (2 x nsamples x seqlen x hidden x 4 bytes, 3 x with "
                        "--tune-steps) in files under OUT/.spallm-partial, one batch in memory at a time")  # fmt: skip
    p.add_argument("--offload", action="store_true",
                   help="deprecated, no effect: every sketch streams, one block in memory at a time")  # fmt: skip
    p.add_argument("--report", action="store_true", help="also draw sketch_report.png (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sketch)
