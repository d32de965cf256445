"""The calibrated sketch of one linear, tested against the math it claims."""

import logging

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from spallm_plugins.bench.quality import rtn_quantize
from spallm_plugins.config import SketchConfig
from spallm_plugins.format import unpack_codes
from spallm_plugins.kernels.reference import dequantize
from spallm_plugins.sketch import sketch_linear
from spallm_plugins.sketch.gptq import (
    HessianError,
    error_feedback_codes,
    gather_weight,
    layer_loss,
    prepare_hessian,
    refit_tables,
)


def correlated_problem(out_f=48, in_f=64, n=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_f, in_f, generator=g) * 0.4 + torch.eye(in_f)
    x = torch.randn(n, in_f, generator=g) @ mix
    x[:, :4] *= 8  # a few outlier channels, as in real activations
    h = 2 * x.T @ x / n
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    return w, h


def test_calibrated_beats_data_free_and_rtn_on_output_error():
    w, h = correlated_problem()
    for bits in (4, 3):
        cal = sketch_linear(w, SketchConfig(bits=bits, groups_per_row=2, method="gptq", nsamples=1, seqlen=1), h)
        free = sketch_linear(w, SketchConfig(bits=bits, groups_per_row=2))
        cal_loss = layer_loss(w, dequantize(cal.codes, cal.tables, bits, torch.float32), h).sum()
        free_loss = layer_loss(w, dequantize(free.codes, free.tables, bits, torch.float32), h).sum()
        rtn_loss = layer_loss(w, rtn_quantize(w, bits, 32), h).sum()
        assert cal_loss < 0.8 * free_loss and cal_loss < 0.8 * rtn_loss
        torch.testing.assert_close(torch.tensor(cal.loss), cal_loss, rtol=1e-4, atol=0)


def test_a_prepared_hessian_gives_the_sketch_of_the_hessian_itself():
    w, h = correlated_problem()
    h[:, 5] = h[5, :] = 0  # a dead column: prepared once, zeroed in each weight that reads it
    for act_order in (False, True):
        config = SketchConfig(bits=3, groups_per_row=2, method="gptq", nsamples=1, seqlen=1, act_order=act_order)
        prepared = prepare_hessian(h, config.damping, act_order=act_order)
        for weight in (w, w.flip(0) * 2):  # two layers reading one input share the factorisation
            direct, shared = sketch_linear(weight, config, h), sketch_linear(weight, config, prepared)
            assert torch.equal(direct.codes, shared.codes) and torch.equal(direct.tables, shared.tables)
            assert direct.loss == shared.loss
    with pytest.raises(TypeError, match="prepared Hessian is for method 'gptq'"):
        sketch_linear(w, SketchConfig(bits=3), prepared)


def test_prepare_hessian_overwrite_factors_the_callers_matrix_without_copying_it():
    _, h = correlated_problem()
    h[:, 5] = h[5, :] = 0
    for act_order in (False, True):
        kept = h.clone()
        copied = prepare_hessian(kept, 0.01, act_order=act_order)
        assert torch.equal(kept, h)  # the caller's matrix is left alone by default
        handed = h.clone()
        taken = prepare_hessian(handed, 0.01, act_order=act_order, overwrite=True)
        assert taken.hessian.data_ptr() == handed.data_ptr() and handed[5, 5] == 1  # fixed in place
        assert torch.equal(taken.hessian, copied.hessian) and torch.equal(taken.perm, copied.perm)
        assert torch.equal(taken.inverse_cholesky, copied.inverse_cholesky)
    double = h.double()
    assert prepare_hessian(double, 0.01, overwrite=True).hessian.dtype == torch.float32
    assert double[5, 5] == 0  # another dtype is converted, never written


class CountNewMatrices(TorchDispatchMode):
    """Counts aten ops whose output is a new ``[n, n]`` float matrix (not written over one of their inputs)."""

    def __init__(self, n: int):
        super().__init__()
        self.n, self.new = n, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() == self.n**2:
                if t.untyped_storage().data_ptr() not in inputs:
                    self.new.append(str(func))
        return out


def test_prepare_hessian_factors_inverts_and_factors_again_in_one_matrix():
    """Handed the Hessian, the only new ``[in, in]`` matrix is its damped copy (or permuted copy), in whose memory
    the factor, the inverse and the inverse's factor are computed: a 70B down_proj's is 3.3 GB."""
    _, h = correlated_problem()
    n = h.shape[0]
    for act_order in (False, True):
        reference = prepare_hessian(h, 0.01, act_order=act_order).inverse_cholesky
        handed = h.clone()
        with CountNewMatrices(n) as counted:
            prepared = prepare_hessian(handed, 0.01, act_order=act_order, overwrite=True)
        assert len(counted.new) == 1, counted.new
        assert torch.equal(prepared.inverse_cholesky, reference)
        perm = prepared.perm
        damped = h[perm[:, None], perm] + 0.01 * h.diagonal().mean() * torch.eye(n)
        upper = prepared.inverse_cholesky
        torch.testing.assert_close(upper.T @ upper, torch.linalg.inv(damped), rtol=1e-3, atol=1e-5)
        assert torch.equal(upper, upper.triu())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prepare_hessian_in_place_on_cuda_matches_the_cpu():
    """cuSOLVER's factorisations written over their input (the same column-major view in and out) agree with
    LAPACK's, and the GPU holds one matrix besides the Hessian plus what ``cholesky_inverse`` copies."""
    _, h = correlated_problem(in_f=1024, n=4096)
    h[:, 5] = h[5, :] = 0
    for act_order in (False, True):
        cpu = prepare_hessian(h, 0.01, act_order=act_order)
        handed = h.cuda()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        gpu = prepare_hessian(handed, 0.01, act_order=act_order, overwrite=True)
        torch.cuda.synchronize()
        extra = (torch.cuda.max_memory_allocated() - before) / h.numel() / 4
        assert extra < 3.5, f"{extra:.2f} [in, in] matrices besides the Hessian"
        torch.testing.assert_close(gpu.inverse_cholesky.cpu(), cpu.inverse_cholesky, rtol=1e-3, atol=1e-4)


def test_refit_never_increases_the_loss():
    for seed in range(3):
        w, h = correlated_problem(seed=seed)
        cfg = SketchConfig(bits=3, groups_per_row=4, method="gptq", nsamples=1, seqlen=1)
        with_refit = sketch_linear(w, cfg, h)
        without = sketch_linear(w, cfg.replace(refit=False), h)
        assert with_refit.loss <= with_refit.loss_before_refit
        assert with_refit.loss_before_refit == pytest.approx(without.loss, rel=1e-6)
        per_row_with = layer_loss(w, dequantize(with_refit.codes, with_refit.tables, 3, torch.float32), h)
        per_row_without = layer_loss(w, dequantize(without.codes, without.tables, 3, torch.float32), h)
        assert torch.all(per_row_with <= per_row_without * (1 + 1e-5))


def test_refit_solves_the_normal_equations():
    w, h = correlated_problem(out_f=3, in_f=16)
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 4, (3, 16), generator=g)
    tables = torch.randn(3, 2, 4, generator=g)
    got = refit_tables(w, codes, tables, h, iters=200, tol=1e-10)
    for r in range(3):
        entry = (torch.arange(16) // 8) * 4 + codes[r]
        s = torch.nn.functional.one_hot(entry, 8).double().T  # [entries, in]
        m = s @ h.double() @ s.T
        rhs = s @ h.double() @ w[r].double()
        used = s.sum(1) > 0
        exact = torch.linalg.solve(m[used][:, used], rhs[used])
        torch.testing.assert_close(got[r].reshape(-1)[used].double(), exact, rtol=1e-3, atol=1e-4)


def test_error_feedback_with_identity_hessian_is_nearest_rounding():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(10, 32, generator=g)
    tables = torch.randn(10, 2, 8, generator=g).sort(-1).values
    prepared = prepare_hessian(torch.eye(32), damping=0.0)
    codes = error_feedback_codes(w, tables, torch.arange(32) // 16, prepared.inverse_cholesky, block_size=8)
    group = torch.arange(32) // 16
    nearest = (w[..., None] - tables[:, group, :]).abs().argmin(-1)
    assert torch.equal(codes, nearest)


def test_act_order_round_trips_the_permutation():
    w, h = correlated_problem()
    h = h + torch.diag(torch.linspace(0, 5, 64))  # make the act-order permutation non-trivial
    cfg = SketchConfig(bits=4, groups_per_row=4, method="gptq", nsamples=1, seqlen=1, act_order=True)
    result = sketch_linear(w, cfg, h)
    recomputed = layer_loss(w, dequantize(result.codes, result.tables, 4, torch.float32), h).sum()
    torch.testing.assert_close(torch.tensor(result.loss), recomputed, rtol=1e-4, atol=0)
    plain = sketch_linear(w, cfg.replace(act_order=False), h)
    assert not torch.equal(result.codes, plain.codes)
    # every code indexes the table of its own (unpermuted) column group
    codes = unpack_codes(result.codes, 4).long()
    rebuilt = gather_weight(result.tables.float(), codes)
    torch.testing.assert_close(rebuilt, dequantize(result.codes, result.tables, 4, torch.float32))


def test_non_finite_hessian_is_refused():
    w, h = correlated_problem()
    h[3, 5] = float("nan")
    with pytest.raises(HessianError, match=r"proj: the Hessian has NaN or inf"):
        sketch_linear(w, SketchConfig(method="gptq", nsamples=1, seqlen=1), h, name="proj")


def test_not_positive_definite_retries_with_more_damping_and_says_so(caplog):
    w, _ = correlated_problem()
    v = torch.randn(64, 3)
    h = v @ v.T - 1e-3 * torch.eye(64)  # rank 3 and slightly indefinite
    with caplog.at_level(logging.WARNING):
        result = sketch_linear(w, SketchConfig(method="gptq", nsamples=1, seqlen=1, damping=0.0), h, name="proj")
    assert result.damping > 0
    assert "proj: Hessian is not positive definite after damping; retrying with damping" in caplog.text


def test_hopeless_hessian_gives_a_clear_error():
    w, _ = correlated_problem()
    with pytest.raises(HessianError, match="not positive definite even with damping"):
        sketch_linear(w, SketchConfig(method="gptq", nsamples=1, seqlen=1), -torch.eye(64), name="proj")


def test_gptq_without_a_hessian_asks_for_calibration():
    with pytest.raises(ValueError, match="needs calibration data"):
        sketch_linear(torch.randn(8, 16), SketchConfig(method="gptq", nsamples=1, seqlen=1))
