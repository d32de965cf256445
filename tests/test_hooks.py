"""Kernel-backend and architecture extension points, through pluggy and real entry points."""

import textwrap

import torch
from conftest import run_python

from spallm_plugins.format import pack_codes
from spallm_plugins.hooks import (
    architecture_for,
    explain_backends,
    hookimpl,
    kernel_backends,
    register_plugin,
    select_backend,
    unregister_plugin,
)
from spallm_plugins.kernels import LUTProblem
from spallm_plugins.kernels.reference import dequantize
from spallm_plugins.ops import lut_linear


class EvenRowsBackend:
    """A third-party backend: a different (unpack + index) implementation, for even row counts only."""

    name = "even-rows"
    priority = 50

    def __init__(self):
        self.calls = 0

    def can_implement(self, problem: LUTProblem):
        if problem.rows % 2:
            return False, f"needs an even number of rows, got {problem.rows}"
        return True, ""

    def forward(self, x, codes, tables, bias, bits):
        self.calls += 1
        from spallm_plugins.format import unpack_codes

        idx = unpack_codes(codes, bits).long()
        out_f, gpr, _ = tables.shape
        group = idx.shape[1] // gpr
        cols = torch.arange(idx.shape[1])
        w = tables[torch.arange(out_f)[:, None], (cols // group)[None, :], idx].to(x.dtype)
        return x @ w.T + (0 if bias is None else bias)

    def backward(self, grad_out, x, codes, tables, bits, need_x, need_tables):
        raise NotImplementedError


class Plugin:
    def __init__(self, backend):
        self.backend = backend

    @hookimpl
    def spallm_kernel_backends(self):
        return [self.backend]


def test_dispatch_prefers_an_accepting_plugin_and_falls_back_with_a_reason():
    backend = EvenRowsBackend()
    plugin = Plugin(backend)
    register_plugin(plugin, "even-rows-test")
    try:
        assert next(b.name for b in kernel_backends()) == "even-rows"
        codes = pack_codes(torch.randint(0, 16, (3, 8)), 4)
        tables = torch.randn(3, 2, 16)
        x_even, x_odd = torch.randn(4, 8), torch.randn(3, 8)
        y = lut_linear(x_even, codes, tables, None, 4)
        assert backend.calls == 1
        torch.testing.assert_close(y, x_even @ dequantize(codes, tables, 4).T)
        lut_linear(x_odd, codes, tables, None, 4)
        assert backend.calls == 1
        problem = LUTProblem("cpu", torch.float32, torch.float32, 4, 8, 3, 2, rows=3)
        assert select_backend(problem).name == "cpu"  # the next best: the compiled CPU kernels
        reasons = {name: (ok, why) for name, ok, why in explain_backends(problem)}
        assert reasons["even-rows"] == (False, "needs an even number of rows, got 3")
    finally:
        unregister_plugin(plugin)
    assert "even-rows" not in [b.name for b in kernel_backends()]


def test_builtin_architectures():
    llama = architecture_for("llama")
    assert "q_proj" in llama.target_modules and llama.fused_modules["gate_up_proj"] == ("gate_proj", "up_proj")
    for model_type in ("mistral", "qwen2", "gemma", "phi3"):
        assert architecture_for(model_type) is not None
    assert architecture_for("no-such-model") is None


def test_third_party_entry_points_are_discovered(tmp_path):
    pkg = tmp_path / "spallm_thirdparty"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        textwrap.dedent("""
        from spallm_plugins.hooks import ArchitectureSpec, hookimpl

        class Backend:
            name, priority = "thirdparty", 10
            def can_implement(self, problem):
                return False, "demo backend"

        @hookimpl
        def spallm_kernel_backends():
            return [Backend()]

        @hookimpl
        def spallm_architectures():
            return [ArchitectureSpec(("toyformer",), ("mix",))]
    """)
    )
    (tmp_path / "broken_plugin.py").write_text("raise ImportError('broken on purpose')\n")
    dist = tmp_path / "spallm_thirdparty-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: spallm-thirdparty\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[spallm]\nthirdparty = spallm_thirdparty\nbroken = broken_plugin\n")
    code = textwrap.dedent("""
        from spallm_plugins.hooks import architecture_for, kernel_backends
        print(sorted(b.name for b in kernel_backends()))
        print(architecture_for("toyformer").target_modules)
    """)
    proc = run_python(code, env={"PYTHONPATH": str(tmp_path)})
    assert "'thirdparty'" in proc.stdout and "'reference'" in proc.stdout
    assert "('mix',)" in proc.stdout
    assert "could not load plugin entry point 'broken'" in proc.stderr
