"""The device check: the one prepared script a session lent a GPU runs (``bash tests/gpu/run.sh OUT``,
or ``python tests/gpu/device_check.py --out OUT``). Test plumbing, not part of the package.

Four steps, in order, each given a share of one time budget (default 420 s, so the whole run with
Python's start stays under 8 minutes); a step whose deadline passes skips the rest of its work and
says what it skipped, and a failing step (its traceback recorded) never stops the next one:

1. ``pytest``: ``tests/test_kernels_triton.py`` and every other test marked ``gpu``, in a child
   process; pass/fail counts and each failure's text (from ``--junitxml``).
2. ``correctness``: the Triton backend against the PyTorch reference, in this order: a tiny
   sketched Llama's training step (gradients of the input embeddings and of every table, Triton vs
   the reference in float32, then an optimizer step); a CUDA graph captured around a sketched
   layer's decode step (M = 1); three table sets mixed in one batch; and a sweep over bits 2 and 4
   (3, or whatever else ``can_implement`` refuses, is listed with the reason), groups per row
   1/2/4/8, fp16 and bf16, M = 1, 3 and beyond the GEMV range, N off the tile grid: forward and both
   gradients through the autograd op, ordered so that a deadline leaves every value covered.
3. ``timing``: ``spallm bench kernels``' measurement (:mod:`spallm_plugins.bench.kernels`) on
   Llama-7B/8B shapes in bf16: microseconds of the LUT kernel, cuBLAS and dequantize-then-matmul,
   speedups, GB/s and the fraction of the device's HBM bandwidth (H200: 4.8 TB/s).
4. ``training``: forward + backward + AdamW step of a SmolLM2-135M-shaped Llama (random weights),
   sketched at 4 bits, 4 groups per row (tables trained) against the same model dense in bf16 (the
   same linears' weights trained): the step-time ratio.

``OUT/gpu.json`` is rewritten after every step (and names the step running), so a run killed at
any point still leaves what it measured. ``tiny=True`` runs the same steps on tiny shapes: on CPU
under ``TRITON_INTERPRET=1`` in well under a minute (timings meaningless; CI runs it). Without CUDA
(and, with ``tiny``, without the interpreter) the kernel steps record "no CUDA" and are skipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import importlib.util
import itertools
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from spallm_plugins.bench import kernels as kernel_bench

JSON_NAME = "gpu.json"
DEFAULT_BUDGET_S = 420.0
HARD_STOP_AFTER_BUDGET_S = 40.0  # then faulthandler dumps every thread's stack and ends the process
H200_HBM_GBPS = kernel_bench.H200_HBM_GBPS  # the GPU this script is written for
# On the H200 (2026-12-04, 210-220 s budgets) the tests needed over 44 s on 4 workers, timing took
# 26-43 s of its 66-70 and training 4-11 s of 61-83: the first step gets more, the last ones less.
STEP_SHARES = {"pytest": 0.3, "correctness": 0.32, "timing": 0.24, "training": 0.14}
LLAMA_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)]  # (out N, in K) of Llama-7B/8B
# max |got - reference| / max(|reference|, 1) allowed, per activation dtype (as tests/test_kernels_triton.py)
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# a whole model's loss and gradients (relative to their largest value), Triton in the model's dtype
# against the reference in float32; passes too when no worse than twice the reference's own error
MODEL_TOL = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048,
                    tie_word_embeddings=True)  # fmt: skip
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=96, max_position_embeddings=128,
                  tie_word_embeddings=False)  # fmt: skip
KERNEL_TESTS = "tests/test_kernels_triton.py"
TINY_TESTS = ("test_gemv_refuses_prefill_sizes or test_backend_explains_what_it_cannot_run or "
              "test_autotuned_kernels_key_on_the_row_bucket_never_on_m or test_triton_backend_through_the_autograd_op")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What each step runs: the full set for an H200, or tiny shapes for the CPU interpreter."""

    sweep_nk: tuple[int, int]
    sweep_rows: tuple[int, ...]
    sweep_bits: tuple[int, ...]
    sweep_gprs: tuple[int, ...]
    sweep_dtypes: tuple[torch.dtype, ...]
    table_set_rows: int
    model: dict[str, Any]
    model_batch: tuple[int, int]
    graph_nk: tuple[int, int]
    timing_shapes: tuple[tuple[int, int], ...]
    timing_rows: tuple[int, ...]
    timing_train_rows: int
    timing_wall_clock: bool  # time by the wall clock (CPU, interpreter), not CUDA events
    train_model: dict[str, Any]
    train_batch: tuple[int, int]
    train_warmup: int
    train_steps: int

    @classmethod
    def full(cls) -> Sizes:
        return cls(
            sweep_nk=(1000, 1024), sweep_rows=(1, 3, 77, 300), sweep_bits=(4, 2, 3), sweep_gprs=(4, 1, 2, 8),
            sweep_dtypes=(torch.bfloat16, torch.float16), table_set_rows=77,
            model={**TINY_LLAMA, "hidden_size": 256, "intermediate_size": 512, "vocab_size": 1024},
            model_batch=(2, 64), graph_nk=(4096, 4096),
            timing_shapes=tuple(LLAMA_SHAPES), timing_rows=tuple(kernel_bench.ROWS), timing_train_rows=2048,
            timing_wall_clock=False, train_model=SMOLLM2_135M, train_batch=(4, 256), train_warmup=2, train_steps=5,
        )  # fmt: skip

    @classmethod
    def tiny(cls) -> Sizes:
        return cls(
            sweep_nk=(40, 128), sweep_rows=(1, 3, 20), sweep_bits=(4, 2, 3), sweep_gprs=(4, 1, 2, 8),
            sweep_dtypes=(torch.bfloat16, torch.float16), table_set_rows=21,
            model=TINY_LLAMA, model_batch=(2, 12), graph_nk=(64, 128),
            timing_shapes=((64, 128),), timing_rows=(1, 4), timing_train_rows=8, timing_wall_clock=True,
            train_model=TINY_LLAMA, train_batch=(1, 8), train_warmup=1, train_steps=1,
        )  # fmt: skip


class DeadlinePassed(Exception):
    """Raised inside a step when its deadline has passed (the step records what it skipped)."""


@dataclasses.dataclass
class Deadline:
    at: float  # time.monotonic() value
    seconds: float  # what the step was given

    def left(self) -> float:
        return self.at - time.monotonic()

    def passed(self) -> bool:
        return self.left() <= 0


class Budget:
    """Shares of one time budget: each step, when it starts, gets its share of what is left, so the
    time an early step does not use goes to the later ones."""

    def __init__(self, total_s: float, shares: dict[str, float]) -> None:
        self.end = time.monotonic() + total_s
        self.pending = dict(shares)

    def deadline_for(self, step: str) -> Deadline:
        now = time.monotonic()
        share = self.pending.pop(step)
        seconds = max(0.0, self.end - now) * share / (share + sum(self.pending.values()))
        return Deadline(now + seconds, seconds)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def relative_error(got: torch.Tensor, want: torch.Tensor, floor: float = 1.0) -> float:
    """``max |got - want| / max(max |want|, floor)``."""
    got, want = got.detach().float(), want.detach().float()
    scale = max(float(want.abs().max()), floor) if want.numel() else floor
    return float((got - want).abs().max()) / scale if want.numel() else 0.0


def ensure_builtin_plugins() -> str:
    """Register the built-in kernel backends and architectures when the ``spallm`` entry points are
    missing (a bare source tree on ``PYTHONPATH``, as on the lent GPU); say which it was."""
    from spallm_plugins import builtin_plugins
    from spallm_plugins.hooks import BUILTIN_PLUGIN, get_plugin_manager, register_plugin

    if get_plugin_manager().has_plugin(BUILTIN_PLUGIN):
        return "entry points"
    register_plugin(builtin_plugins, name=BUILTIN_PLUGIN)
    return "registered from the source tree (no entry points installed)"


def pytest_configure(config) -> None:
    """pytest plugin hook (``-p device_check``): the test processes, xdist workers too,
    find the kernel backends when run from a source tree."""
    ensure_builtin_plugins()


class _ForcedBackend:
    """Takes every LUT call to ``inner``: runs a whole model's layers through one backend (the
    Triton kernels on CPU under the interpreter, whose ``can_implement`` refuses CPU tensors; or
    the reference, to compare against)."""

    priority = 1_000_000
    min_capability = 0

    def __init__(self, inner) -> None:
        self.inner = inner
        self.name = f"forced-{inner.name}"

    def can_implement(self, problem) -> tuple[bool, str]:
        return True, ""

    def forward(self, x, codes, tables, bias, bits):
        return self.inner.forward(x, codes, tables, bias, bits)

    def forward_table_sets(self, x, codes, table_sets, slots, bias, bits):
        return self.inner.forward_table_sets(x, codes, table_sets, slots, bias, bits)

    def backward(self, grad_out, x, codes, tables, bits, need_input_grad, need_tables_grad):
        return self.inner.backward(grad_out, x, codes, tables, bits, need_input_grad, need_tables_grad)


@contextlib.contextmanager
def forced_backend(inner) -> Iterator[None]:
    from spallm_plugins.hooks import hookimpl, register_plugin, unregister_plugin

    backend = _ForcedBackend(inner)

    class Plugin:
        @hookimpl
        def spallm_kernel_backends(self) -> list:
            return [backend]

    plugin = Plugin()
    register_plugin(plugin, name=f"device-check-{backend.name}")
    try:
        yield
    finally:
        unregister_plugin(plugin)


def kernel_device(tiny: bool) -> tuple[str | None, str]:
    """``("cuda", "")``, ``("cpu", "")`` (tiny, under the interpreter), or ``(None, why not)``."""
    if torch.cuda.is_available():
        return "cuda", ""
    if importlib.util.find_spec("triton") is None:
        return None, "no CUDA, and triton is not installed"
    if not tiny:
        return None, "no CUDA: the full run needs a GPU (--tiny with TRITON_INTERPRET=1 runs the steps on CPU)"
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None, "no CUDA: set TRITON_INTERPRET=1 to run the kernels on CPU with --tiny"
    return "cpu", ""


def triton_backend():
    from spallm_plugins.kernels.triton import TritonBackend

    return TritonBackend()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# -- step 1: pytest ----------------------------------------------------------------------------------------


HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]


def gpu_marked_test_files(root: Path) -> list[str]:
    """Test files other than the kernels' that mark a test ``gpu`` (read as text, not imported)."""
    marker = "@pytest.mark." + "gpu"
    return sorted(
        str(p.relative_to(root))
        for p in (root / "tests").rglob("test_*.py")
        if p.name != Path(KERNEL_TESTS).name and marker in p.read_text(encoding="utf-8", errors="replace")
    )


def parse_junit(path: Path) -> dict[str, Any]:
    import xml.etree.ElementTree as ET

    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failures = []
    root = ET.parse(path).getroot()
    for suite in [root] if root.tag == "testsuite" else root.iter("testsuite"):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
        for case in suite.iter("testcase"):
            for kind in ("failure", "error"):
                for problem in case.findall(kind):
                    failures.append({"test": f"{case.get('classname')}::{case.get('name')}", "kind": kind,
                                     "message": (problem.get("message") or "")[:500],
                                     "text": (problem.text or "")[-4000:]})  # fmt: skip
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failures_detail": failures}


def run_pytest(args: list[str], root: Path, deadline: Deadline) -> dict[str, Any]:
    """``python -m pytest ARGS`` in ``root`` as a child process (its own process group, killed at the deadline)."""
    with tempfile.TemporaryDirectory(prefix="spallm-device-check-") as tmp:
        junit = Path(tmp) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-p", Path(__file__).stem, "-p", "no:cacheprovider", "-q",
                   f"--junitxml={junit}", *args]  # fmt: skip
        path = [str(root), str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
        proc = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)  # fmt: skip
        timed_out = False
        try:
            output, _ = proc.communicate(timeout=max(deadline.left(), 1.0))
        except subprocess.TimeoutExpired:
            timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the group this call started: pytest and its workers
            output, _ = proc.communicate()
        result: dict[str, Any] = {"command": ["python", *command[1:]], "returncode": proc.returncode,
                                  "timed_out": timed_out, "output_tail": output[-3000:]}  # fmt: skip
        if junit.is_file():
            result.update(parse_junit(junit))
        return result


def step_pytest(tiny: bool, deadline: Deadline) -> dict[str, Any]:
    root = REPO_ROOT  # the checkout this script sits in
    if not tiny and not torch.cuda.is_available():
        raise StepSkipped("no CUDA: the GPU tests would be skipped (the CPU suite runs the kernels' interpreter tests)")
    runs = []
    if tiny:
        runs.append([KERNEL_TESTS, "-k", TINY_TESTS])
    else:
        workers = str(max(1, min(8, (os.cpu_count() or 2) // 2)))  # compiling is the CPU's work
        parallel = ["-n", workers] if importlib.util.find_spec("xdist") else []
        runs.append([KERNEL_TESTS, *parallel])
        others = gpu_marked_test_files(root)
        if others:
            runs.append([*others, "-m", "gpu"])
    results = []
    for args in runs:
        if deadline.passed():
            results.append({"args": args, "skipped": "deadline passed", "timed_out": True})
        else:
            results.append(run_pytest(args, root, deadline))
    total = {key: sum(r.get(key, 0) for r in results) for key in ("tests", "passed", "failures", "errors", "skipped")}
    cut = any(r["timed_out"] for r in results)  # killed at the deadline: what ran is kept, the rest did not run
    finished = [r for r in results if not r["timed_out"]]
    ok = all(r["returncode"] == 0 and "tests" in r for r in finished) and not total["failures"] + total["errors"]
    return {"ok": ok and (cut or total["tests"] > 0), "partial": cut, **total, "runs": results}


class StepSkipped(Exception):
    """The step cannot run here (no CUDA, no tests folder): recorded as skipped with this reason."""


# -- step 2: correctness ------------------------------------------------------------------------------------


def random_problem(m, n, k, gpr, bits, dtype, device, seed=0):
    from spallm_plugins.format import pack_codes

    g = torch.Generator().manual_seed(seed)
    codes = pack_codes(torch.randint(0, 1 << bits, (n, k), generator=g), bits).to(device)
    tables = torch.randn(n, gpr, 1 << bits, generator=g).to(dtype).to(device)
    x = torch.randn(m, k, generator=g).to(dtype).to(device)
    bias = torch.randn(n, generator=g).to(dtype).to(device)
    return x, codes, tables, bias


def check_case(backend, m, n, k, gpr, bits, dtype, device) -> dict[str, Any]:
    """Forward and both gradients through the autograd op with ``backend``, against the reference in float32."""
    from spallm_plugins.kernels.reference import lut_linear as reference
    from spallm_plugins.kernels.reference import lut_linear_backward
    from spallm_plugins.ops import lut_linear

    x, codes, tables, bias = random_problem(m, n, k, gpr, bits, dtype, device, seed=m * 100 + gpr * 10 + bits)
    x.requires_grad_(True)
    tables.requires_grad_(True)
    y = lut_linear(x, codes, tables, bias, bits, backend=backend)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
    y.backward(grad)
    xf, tf = x.detach().float(), tables.detach().float()
    want_y = reference(xf, codes, tf, bias.float(), bits)
    want_gx, want_gt = lut_linear_backward(grad.float(), xf, codes, tf, bits, True, True)
    errors = {"forward": relative_error(y, want_y), "grad_x": relative_error(x.grad, want_gx),
              "grad_tables": relative_error(tables.grad, want_gt)}  # fmt: skip
    return {"errors": errors, "tol": TOL[dtype], "ok": all(e <= TOL[dtype] for e in errors.values())}


def check_table_sets(backend, m, n, k, bits, dtype, device) -> dict[str, Any]:
    """Three table sets mixed in one batch (runs of one slot and alternating slots) against the reference."""
    from spallm_plugins.kernels.reference import lut_linear as reference

    x, codes, tables, bias = random_problem(m, n, k, 2, bits, dtype, device, seed=7)
    g = torch.Generator().manual_seed(8)
    sets = torch.stack([tables, *(torch.randn(tables.shape, generator=g).to(dtype).to(device) for _ in range(2))])
    pattern = [0, 2, 2, 1, 0, 1, 1, 2] + [0] * 8 + [2] * 4 + [1]
    slots = torch.tensor([pattern[i % len(pattern)] for i in range(m)], device=device)
    got = backend.forward_table_sets(x, codes, sets, slots, bias, bits)
    want = torch.cat([reference(x[i : i + 1].float(), codes, sets[s].float(), bias.float(), bits)
                      for i, s in enumerate(slots.tolist())])  # fmt: skip
    error = relative_error(got, want)
    return {"error": error, "tol": TOL[dtype], "ok": error <= TOL[dtype]}


def coverage_first(combos: list[tuple]) -> list[tuple]:
    """``combos`` reordered so that the first few already cover every value of every position (a
    deadline that cuts the sweep short still leaves each bit width, dtype, gpr and M checked)."""
    seen: dict[tuple[int, Any], int] = {}
    ordered, rest = [], list(combos)
    while rest:
        best = min(rest, key=lambda c: sum(seen.get((i, v), 0) for i, v in enumerate(c)))
        rest.remove(best)
        ordered.append(best)
        for i, v in enumerate(best):
            seen[(i, v)] = seen.get((i, v), 0) + 1
    return ordered


def kernel_sweep(backend, sizes: Sizes, device: str, deadline: Deadline) -> dict[str, Any]:
    from spallm_plugins.ops import describe_problem

    n, k = sizes.sweep_nk
    cases, refused, skipped = [], {}, []
    accepted = []
    for bits, dtype, gpr, m in itertools.product(
        sizes.sweep_bits, sizes.sweep_dtypes, sizes.sweep_gprs, sizes.sweep_rows
    ):
        problem = dataclasses.replace(
            describe_problem(torch.empty(m, k, dtype=dtype), torch.empty(n, k * bits // 8),
                             torch.empty(n, gpr, 1 << bits, dtype=dtype), bits),
            device_type="cuda", needs_grad=True,
        )  # fmt: skip
        ok, reason = backend.can_implement(problem)
        if ok:
            accepted.append((bits, dtype, gpr, m))
        else:
            refused.setdefault(reason, []).append(f"bits{bits}-{dtype_name(dtype)}-gpr{gpr}-M{m}")
    for bits, dtype, gpr, m in coverage_first(accepted):
        label = f"bits{bits}-{dtype_name(dtype)}-gpr{gpr}-M{m}"
        if deadline.passed():
            skipped.append(label)
            continue
        try:
            cases.append({"case": label, **check_case(backend, m, n, k, gpr, bits, dtype, device)})
        except Exception as err:
            cases.append({"case": label, "ok": False, "error": repr(err), "traceback": traceback.format_exc()})
    failed = [c["case"] for c in cases if not c["ok"]]
    return {"N": n, "K": k, "cases": cases, "refused": refused, "skipped_for_deadline": skipped,
            "checked": len(cases), "failed": failed, "ok": not failed,
            "max_error": max((max(c["errors"].values()) for c in cases if "errors" in c), default=None)}  # fmt: skip


def table_set_checks(backend, sizes: Sizes, device: str, deadline: Deadline) -> dict[str, Any]:
    n, k = sizes.sweep_nk
    results = []
    for bits in (4, 3, 2):
        for dtype in sizes.sweep_dtypes:
            label = f"bits{bits}-{dtype_name(dtype)}-3sets-M{sizes.table_set_rows}"
            if deadline.passed():
                results.append({"case": label, "skipped": "deadline passed", "ok": True})
                continue
            try:
                results.append({"case": label, **check_table_sets(backend, sizes.table_set_rows, n, k, bits, dtype,
                                                                  device)})  # fmt: skip
            except Exception as err:
                results.append({"case": label, "ok": False, "error": repr(err), "traceback": traceback.format_exc()})
    return {"cases": results, "ok": all(r["ok"] for r in results)}


def build_llama(shape: dict[str, Any], device: str, dtype: torch.dtype, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**shape))
    return model.to(dtype)


def sketch_randomly(model, bits: int, groups_per_row: int, dtype: torch.dtype, device: str, seed: int = 0) -> int:
    """Swap the model's target linears for SketchedLinear with random codes and N(0, 0.02) tables
    (the numbers a sketch would find do not matter to kernels); return how many were swapped."""
    from spallm_plugins.config import SketchConfig
    from spallm_plugins.convert import replace_with_empty, sketched_layers

    config = SketchConfig(bits=bits, groups_per_row=groups_per_row, table_dtype=dtype_name(dtype))
    replace_with_empty(model, config, device)
    torch.manual_seed(seed)
    layers = sketched_layers(model)
    with torch.no_grad():
        for layer in layers.values():
            layer.codes.copy_(torch.randint(0, 256, layer.codes.shape, dtype=torch.uint8, device=device))
            layer.tables.copy_(torch.randn(layer.tables.shape, device=device) * 0.02)
    return len(layers)


def model_gradients(model, ids: torch.Tensor) -> dict[str, Any]:
    """Loss and gradients (input embeddings, every table) of one forward + backward; grads left in place."""
    from spallm_plugins.convert import sketched_layers

    model.zero_grad(set_to_none=True)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    loss = model(inputs_embeds=embeds, labels=ids).loss
    loss.backward()
    tables = {name: layer.tables.grad.detach().float().clone() for name, layer in sketched_layers(model).items()}
    return {"loss": loss.detach().float(), "grad_x": embeds.grad.detach().float(), "tables": tables}


def compare_gradients(got: dict[str, Any], want: dict[str, Any]) -> dict[str, float]:
    return {
        "loss": abs(float(got["loss"] - want["loss"])) / max(abs(float(want["loss"])), 1e-6),
        "grad_x": relative_error(got["grad_x"], want["grad_x"], floor=1e-12),
        "grad_tables": max(relative_error(got["tables"][n], t, floor=1e-12) for n, t in want["tables"].items()),
    }


def model_training_check(triton, sizes: Sizes, device: str) -> dict[str, Any]:
    """A tiny sketched Llama: loss, gradient of the input embeddings and of every table through the
    Triton kernels against the reference in float32; then an AdamW step on the tables."""
    import copy

    from spallm_plugins.convert import sketched_layers
    from spallm_plugins.kernels.reference import ReferenceBackend

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = build_llama(sizes.model, device, dtype)
    swapped = sketch_randomly(model, 4, 4, dtype, device)
    for name, param in model.named_parameters():
        param.requires_grad_(name.endswith(".tables"))
    batch, seqlen = sizes.model_batch
    ids = torch.randint(0, sizes.model["vocab_size"], (batch, seqlen), generator=torch.Generator().manual_seed(3))
    ids = ids.to(device)
    anchor_model = copy.deepcopy(model).float()
    with forced_backend(ReferenceBackend()):
        anchor = model_gradients(anchor_model, ids)
        reference_same_dtype = model_gradients(model, ids)
    del anchor_model
    with forced_backend(triton):
        got = model_gradients(model, ids)
        tables = [layer.tables for layer in sketched_layers(model).values()]
        before = [t.detach().clone() for t in tables]
        optimizer = torch.optim.AdamW(tables, lr=1e-3)
        optimizer.step()
        with torch.no_grad():
            loss_after = float(model(input_ids=ids, labels=ids).loss)
    errors = compare_gradients(got, anchor)
    reference_errors = compare_gradients(reference_same_dtype, anchor)
    allowed = {key: max(MODEL_TOL[dtype], 2 * reference_errors[key]) for key in errors}
    changed = all(not torch.equal(a, b.detach()) for a, b in zip(before, tables))
    finite = bool(torch.isfinite(got["loss"])) and all(torch.isfinite(t.grad).all() for t in tables)
    finite = finite and torch.isfinite(torch.tensor(loss_after)).item()
    ok = all(errors[key] <= allowed[key] for key in errors) and changed and finite
    return {"dtype": dtype_name(dtype), "layers_sketched": swapped, "batch": [batch, seqlen],
            "errors_vs_float32_reference": errors, "reference_errors_same_dtype": reference_errors,
            "allowed": allowed, "loss_before": float(got["loss"]), "loss_after_step": loss_after,
            "tables_changed": changed, "finite": finite, "ok": ok}  # fmt: skip


def cuda_graph_check(sizes: Sizes, device: str) -> dict[str, Any]:
    """A sketched layer's decode step (M = 1) captured in a CUDA graph, replayed on new inputs."""
    if device != "cuda":
        return {"skipped": "not on CUDA: torch.cuda.CUDAGraph needs a GPU", "ok": True}
    from spallm_plugins.kernels.reference import lut_linear as reference
    from spallm_plugins.layer import SketchedLinear

    n, k = sizes.graph_nk
    layer = SketchedLinear(k, n, bits=4, groups_per_row=4, bias=True, table_dtype=torch.bfloat16, device=device)
    with torch.no_grad():
        layer.codes.copy_(torch.randint(0, 256, layer.codes.shape, dtype=torch.uint8, device=device))
        layer.tables.copy_(torch.randn(layer.tables.shape, device=device))
        layer.bias.copy_(torch.randn(n, device=device))
    x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # autotune and compile before capture
                layer(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = layer(x)
        errors = []
        for seed in range(3):
            x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x))
            graph.replay()
            torch.cuda.synchronize()
            want = reference(x.float(), layer.codes, layer.tables.float(), layer.bias.float(), 4)
            errors.append(relative_error(y, want))
        replay_us = kernel_bench.time_us(graph.replay)
        eager_us = kernel_bench.time_us(lambda: layer(x))
    ok = max(errors) <= TOL[torch.bfloat16]
    return {"N": n, "K": k, "M": 1, "errors": errors, "tol": TOL[torch.bfloat16], "replay_us": replay_us,
            "eager_us": eager_us, "ok": ok}  # fmt: skip


def step_correctness(sizes: Sizes, device: str, deadline: Deadline) -> dict[str, Any]:
    from spallm_plugins.hooks import select_backend
    from spallm_plugins.ops import describe_problem

    triton = triton_backend()
    result: dict[str, Any] = {}
    if device == "cuda":  # what the dispatcher itself picks for a bf16 training call
        n, k = sizes.sweep_nk
        x = torch.empty(8, k, device=device, dtype=torch.bfloat16)
        problem = describe_problem(x, torch.empty(n, k // 2, device=device), torch.empty(n, 4, 16, device=device,
                                   dtype=torch.bfloat16), 4)  # fmt: skip
        result["dispatched_backend"] = select_backend(dataclasses.replace(problem, needs_grad=True)).name
    checks = [("model_training", lambda: model_training_check(triton, sizes, device)),
              ("cuda_graph", lambda: cuda_graph_check(sizes, device)),
              ("table_sets", lambda: table_set_checks(triton, sizes, device, deadline)),
              ("sweep", lambda: kernel_sweep(triton, sizes, device, deadline))]  # fmt: skip
    for name, check in checks:
        if deadline.passed():
            result[name] = {"skipped": "deadline passed", "deadline_passed": True, "ok": True}
            continue
        try:
            result[name] = check()
        except Exception as err:
            result[name] = {"ok": False, "error": repr(err), "traceback": traceback.format_exc()}
    result["ok"] = all(result[name]["ok"] for name, _ in checks)
    result["partial"] = any(result[name].get("deadline_passed") for name, _ in checks) or bool(
        result["sweep"].get("skipped_for_deadline")
        or any(case.get("skipped") for case in result["table_sets"].get("cases", ()))
    )
    return result


# -- step 3: timing -----------------------------------------------------------------------------------------


def step_timing(sizes: Sizes, device: str, deadline: Deadline, log: Callable[[str], None]) -> dict[str, Any]:
    from spallm_plugins.kernels.reference import dequantize

    bits, gpr, dtype = 4, 4, torch.bfloat16
    timer = kernel_bench.wall_time_us if sizes.timing_wall_clock or device != "cuda" else kernel_bench.time_us
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = kernel_bench.peak_bandwidth_gbps(name)
    result: dict[str, Any] = {"bits": bits, "groups_per_row": gpr, "dtype": dtype_name(dtype), "device_name": name,
                              "peak_gbps": peak, "rows": [], "training": [], "errors": [],
                              "skipped_for_deadline": []}  # fmt: skip
    torch.manual_seed(0)
    for n, k in sizes.timing_shapes:
        if deadline.passed():
            result["skipped_for_deadline"].append(f"N={n} K={k}")
            continue
        try:
            codes, tables = kernel_bench.random_layer(n, k, bits, gpr, dtype, device)
            dense = dequantize(codes, tables, bits, dtype)
        except Exception as err:
            result["errors"].append({"N": n, "K": k, "error": repr(err), "traceback": traceback.format_exc()})
            continue
        for m in sizes.timing_rows:
            if deadline.passed():
                result["skipped_for_deadline"].append(f"N={n} K={k} M={m}")
                continue
            try:
                row = kernel_bench.time_layer(codes, tables, dense, bits, m, timer=timer, peak_gbps=peak)
            except Exception as err:
                result["errors"].append({"N": n, "K": k, "M": m, "error": repr(err),
                                         "traceback": traceback.format_exc()})  # fmt: skip
                continue
            result["rows"].append(row)
            log(kernel_bench.describe_row(row))
        if deadline.passed():
            result["skipped_for_deadline"].append(f"N={n} K={k} training M={sizes.timing_train_rows}")
            continue
        try:  # on CPU the dispatcher would pick the reference: put the interpreted kernels under it
            with forced_backend(triton_backend()) if device == "cpu" else contextlib.nullcontext():
                train = kernel_bench.time_training(codes, tables, dense, bits, sizes.timing_train_rows, timer=timer)
            result["training"].append(train)
            log(f"train N={n} K={k} M={sizes.timing_train_rows}: lut fwd+bwd x{train['ratio']:.2f} of dense")
        except Exception as err:
            result["errors"].append({"N": n, "K": k, "M": sizes.timing_train_rows, "training": True,
                                     "error": repr(err), "traceback": traceback.format_exc()})  # fmt: skip
        del codes, tables, dense
    result["ok"] = not result["errors"] and bool(result["rows"])
    result["partial"] = bool(result["skipped_for_deadline"])
    return result


# -- step 4: training step ----------------------------------------------------------------------------------


def time_train_steps(model, params, ids, device: str, warmup: int, steps: int, deadline: Deadline) -> dict[str, Any]:
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    times, losses = [], []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        if i >= warmup + 1 and deadline.passed():
            break
        sync(device)
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    times.sort()
    return {"step_ms": 1e3 * times[len(times) // 2] if times else None, "steps_timed": len(times),
            "losses": losses, "finite": all(map(lambda v: v == v and abs(v) != float("inf"), losses)),
            "trainable_parameters": sum(p.numel() for p in params),
            "peak_gpu_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None}  # fmt: skip


def step_training(sizes: Sizes, device: str, deadline: Deadline, log: Callable[[str], None]) -> dict[str, Any]:
    from spallm_plugins.config import SketchConfig
    from spallm_plugins.convert import resolve_targets
    from spallm_plugins.hooks import select_backend
    from spallm_plugins.ops import describe_problem

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = build_llama(sizes.train_model, device, dtype)
    model.config.use_cache = False
    targets = set(resolve_targets(model, SketchConfig(bits=4, groups_per_row=4)))
    batch, seqlen = sizes.train_batch
    ids = torch.randint(0, sizes.train_model["vocab_size"], (batch, seqlen), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    result: dict[str, Any] = {"model": {k: v for k, v in sizes.train_model.items()}, "dtype": dtype_name(dtype),
                              "batch": [batch, seqlen], "bits": 4, "groups_per_row": 4,
                              "sketched_layers": len(targets)}  # fmt: skip
    for name, param in model.named_parameters():
        param.requires_grad_(name.removesuffix(".weight") in targets)
    dense_params = [p for p in model.parameters() if p.requires_grad]
    result["dense"] = time_train_steps(model, dense_params, ids, device, sizes.train_warmup, sizes.train_steps,
                                       deadline)  # fmt: skip
    log(f"dense {dtype_name(dtype)} training step: {result['dense']['step_ms']:.1f} ms")
    del dense_params
    if device == "cuda":
        torch.cuda.empty_cache()
    sketch_randomly(model, 4, 4, dtype, device)
    for name, param in model.named_parameters():
        param.requires_grad_(name.endswith(".tables"))
    table_params = [p for p in model.parameters() if p.requires_grad]
    if device == "cuda":
        hidden = sizes.train_model["hidden_size"]
        problem = describe_problem(torch.empty(batch * seqlen, hidden, device=device, dtype=dtype),
                                   torch.empty(hidden, hidden // 2, device=device),
                                   torch.empty(hidden, 4, 16, device=device, dtype=dtype), 4)  # fmt: skip
        result["backend"] = select_backend(dataclasses.replace(problem, needs_grad=True)).name
        context = contextlib.nullcontext()
    else:
        result["backend"] = "triton (forced onto CPU tensors under the interpreter)"
        context = forced_backend(triton_backend())
    if deadline.passed():
        raise DeadlinePassed("the dense model's steps used the step's time; the sketched model was not timed")
    with context:
        result["sketched"] = time_train_steps(model, table_params, ids, device, sizes.train_warmup,
                                              sizes.train_steps, deadline)  # fmt: skip
    log(f"sketched training step: {result['sketched']['step_ms']:.1f} ms")
    dense_ms, sketched_ms = result["dense"]["step_ms"], result["sketched"]["step_ms"]
    result["step_time_ratio_sketched_over_dense"] = sketched_ms / dense_ms if dense_ms and sketched_ms else None
    result["ok"] = result["dense"]["finite"] and result["sketched"]["finite"] and sketched_ms is not None
    return result


# -- the driver ---------------------------------------------------------------------------------------------


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__,
                                    "cuda": torch.version.cuda}  # fmt: skip
    for name in ("triton", "transformers", "peft", "pytest"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def run_step(name: str, work: Callable[[Deadline], dict[str, Any]], budget: Budget, report: dict[str, Any],
             save: Callable[[], None], log: Callable[[str], None]) -> None:  # fmt: skip
    """Run one step under its deadline and record it: ok, partial (the deadline cut it short), failed
    (a check failed, or it raised: the traceback is kept), or skipped (cannot run here: why)."""
    deadline = budget.deadline_for(name)
    entry: dict[str, Any] = {"status": "running", "given_s": round(deadline.seconds, 1)}
    report["steps"][name] = entry
    save()
    log(f"== {name} (deadline in {deadline.seconds:.0f} s)")
    start = time.monotonic()
    try:
        if deadline.passed():
            raise DeadlinePassed("no time left in the budget")
        result = work(deadline)
        entry["result"] = result
        entry["status"] = ("partial" if result.get("partial") else "ok") if result.get("ok") else "failed"
    except StepSkipped as why:
        entry.update(status="skipped", reason=str(why))
    except DeadlinePassed as why:
        entry.update(status="partial", reason=str(why))
    except Exception as err:
        entry.update(status="failed", error=repr(err), traceback=traceback.format_exc())
    entry["seconds"] = round(time.monotonic() - start, 2)
    log(
        f"== {name}: {entry['status']} in {entry['seconds']:.1f} s"
        + (f" ({entry['reason']})" if "reason" in entry else "")
    )
    if "traceback" in entry:
        log(entry["traceback"])
    save()


def run_device_check(
    out_dir: str | Path,
    *,
    tiny: bool = False,
    budget_s: float = DEFAULT_BUDGET_S,
    overwrite: bool = False,
    log: Callable[[str], None] = lambda line: print(line, flush=True),
) -> dict[str, Any]:
    """Run the four steps and write ``OUT/gpu.json`` (after each step); return the report."""
    from spallm_plugins.format import write_json
    from spallm_plugins.outputs import prepare_output_dir

    out_dir = prepare_output_dir(out_dir, overwrite=overwrite)
    started = time.monotonic()
    budget = Budget(budget_s, STEP_SHARES)
    faulthandler.dump_traceback_later(budget_s + HARD_STOP_AFTER_BUDGET_S, exit=True)
    sizes = Sizes.tiny() if tiny else Sizes.full()
    device, why_not = kernel_device(tiny)
    report: dict[str, Any] = {
        "tiny": tiny,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "kernel_device": device,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "h200_hbm_gbps": H200_HBM_GBPS,
        "peak_gbps": kernel_bench.peak_bandwidth_gbps(torch.cuda.get_device_name()) if torch.cuda.is_available() else None,
        "budget_s": budget_s,
        "versions": versions(),
        "plugins": ensure_builtin_plugins(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "status": "running",
        "step_order": list(STEP_SHARES),
        "steps": {},
    }  # fmt: skip
    path = out_dir / JSON_NAME

    def save() -> None:
        report["seconds"] = round(time.monotonic() - started, 2)
        write_json(path, report)

    def needs_kernels(work: Callable[[Deadline], dict[str, Any]]) -> Callable[[Deadline], dict[str, Any]]:
        def run(deadline: Deadline) -> dict[str, Any]:
            if device is None:
                raise StepSkipped(why_not)
            return work(deadline)

        return run

    log(f"device check{' --tiny' if tiny else ''}: {report['device_name']}, budget {budget_s:.0f} s -> {path}")
    try:
        steps = {
            "pytest": lambda d: step_pytest(tiny, d),
            "correctness": needs_kernels(lambda d: step_correctness(sizes, device, d)),
            "timing": needs_kernels(lambda d: step_timing(sizes, device, d, log)),
            "training": needs_kernels(lambda d: step_training(sizes, device, d, log)),
        }
        for name, work in steps.items():
            run_step(name, work, budget, report, save, log)
    finally:
        faulthandler.cancel_dump_traceback_later()
    report["summary"] = {name: entry["status"] for name, entry in report["steps"].items()}
    report["failed_steps"] = [name for name, status in report["summary"].items() if status == "failed"]
    report["status"] = "done"
    save()
    log(f"device check: {report['summary']} in {report['seconds']:.0f} s -> {path}")
    return report


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="device_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for gpu.json (new or empty), rewritten after every step")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny shapes: runs on CPU under TRITON_INTERPRET=1 in under a minute (timings meaningless)")  # fmt: skip
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                        help=f"seconds shared by the four steps; a step past its share skips the rest (default {DEFAULT_BUDGET_S:.0f})")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace what OUT holds")
    args = parser.parse_args(argv)
    report = run_device_check(args.out, tiny=args.tiny, budget_s=args.budget, overwrite=args.overwrite)
    print(f"wrote {Path(args.out) / JSON_NAME}")
    return 1 if report["failed_steps"] else 0


if __name__ == "__main__":
    sys.exit(main())
