#!/usr/bin/env bash
# The prepared device script (issue #16), for a session lent a GPU: run it once, from the source tree,
# nothing installed (no registry there):
#
#     bash tests/gpu/run.sh "$OUT"            # OUT: the folder the JSON goes to (new or empty)
#     bash tests/gpu/run.sh "$OUT" --tiny     # extra arguments go to tests/gpu/device_check.py
#
# It runs tests/gpu/device_check.py: the GPU tests, the kernel checks against
# the reference, kernel timings on Llama-7B/8B shapes (per row: today's kernels on format-v1 codes, the
# code-word decode GEMV at M <= 16 as `words_us`, three table sets mixed as `words_three_sets_us`, the
# fused prefill matmul over code words at 17-1024 rows as `words_matmul_us`, cuBLAS on the dense bf16 W,
# dequantize + cuBLAS) and a
# SmolLM2-135M-shaped training step, within
# a 420 s budget (under 8 minutes in all), and writes OUT/gpu.json after every step. Exit status 1 when
# a step failed (the JSON says which, with its traceback).
set -u
if [ $# -lt 1 ]; then
    echo "usage: tests/gpu/run.sh OUTDIR [device_check.py options: --tiny --budget S --overwrite]" >&2
    exit 2
fi
out="$1"
shift
case "$out" in /*) ;; *) out="$PWD/$out" ;; esac
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" tests/gpu/device_check.py --out "$out" "$@"
