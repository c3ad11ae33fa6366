"""Levenberg-Marquardt with ``CuPyNumeric(row_block=k)`` never holds the whole Jacobian.

The rows of ``J`` are formed ``k`` at a time (whole samples for per-sample residuals), each
block goes to cuPyNumeric's Gram sum and to the column statistics, and is dropped. Runs under
Legate in a process of its own (``.ci/cupynumeric.sh``), as tests/test_solvers_cupynumeric.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import funcopt as fo
from funcopt.transforms import lm_model

pytestmark = [pytest.mark.cupynumeric, pytest.mark.filterwarnings("ignore:(?s).*Seeding the random")]
S = fo.solvers
F64 = torch.float64


@pytest.fixture(scope="module", autouse=True)
def _legate():
    pytest.importorskip("cupynumeric", reason="pip install funcopt[cupynumeric]", exc_type=ImportError)


def _mlp_problem(samples=120, width=6, d_in=2):
    """A d_in-width-1 tanh MLP (2-6-1: 25 parameters) on noisy data: per-sample MSE residuals."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(samples, d_in, generator=g, dtype=F64)
    y = torch.sin(X[:, :1] * 1.5) * X[:, 1:2] + 0.05 * torch.randn(samples, 1, generator=g, dtype=F64)
    params = {"w1": 0.7 * torch.randn(d_in, width, generator=g, dtype=F64) / (d_in / 2) ** 0.5,
              "b1": torch.zeros(width, dtype=F64),
              "w2": 0.7 * torch.randn(width, 1, generator=g, dtype=F64),
              "b2": torch.zeros(1, dtype=F64)}

    def model(p, x):
        return torch.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    return fo.mse_residuals(model, per_sample=True), params, (X, y)


def _generic_problem():
    """Exponentials and a sine on 90 points, columns of very different scales."""
    t = torch.linspace(0, 4, 90, dtype=F64)
    g = torch.Generator().manual_seed(9)
    y = 2.5 * torch.exp(-1.3 * t) + 0.4 * torch.sin(2.0 * t) + 0.01 * torch.randn(90, generator=g, dtype=F64)

    def residual(p, batch):
        return p[0] * torch.exp(-p[1] * t) + 1e3 * p[2] * torch.sin(p[3] * t) - batch

    return residual, torch.tensor([1.0, 1.0, 1e-3, 1.8], dtype=F64), y


def _problem(kind):
    return _mlp_problem() if kind == "per-sample" else _generic_problem()


def _run(residual, params, batch, steps, **kw):
    """``steps`` eager updates; the parameters and state after each."""
    opt = fo.levenberg_marquardt(residual, **kw)
    state, out = opt.init(params), []
    for _ in range(steps):
        upd, state = opt.update(None, state, params, batch=batch)
        params = fo.apply_updates(params, upd)
        out.append((params, state))
    return out


def _no_whole_jacobian(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the whole Jacobian was asked for on the row-block path")

    monkeypatch.setattr(lm_model, "_jacobian", refuse)  # what the dense path forms J with


def _rel(p, q):
    """Largest ``|p - q| / max(|q|, 1e-3)`` over the leaves (0 where both are 0)."""
    return max(float(((a - b).abs() / b.abs().clamp_min(1e-3)).nan_to_num(0.0).max())
               for a, b in zip(_leaves(p), _leaves(q)))


@pytest.mark.parametrize("kind", ["per-sample", "generic"])
@pytest.mark.parametrize("rule", [fo.Nielsen(), fo.TrustRegion()], ids=["nielsen", "trust"])
@pytest.mark.parametrize("scaling", [True, False])
def test_row_chunked_steps_equal_the_torch_dense_path(kind, rule, scaling, monkeypatch):
    """Every update through row blocks of 16 rows (fewer rows than m, not dividing it) gives
    the torch Cholesky path's parameters, damping, scaling d, gnorm, cost and gain ratio (where
    the relative reduction is above 1e-6: below, 1 - (||r_new|| / ||r||)^2 is rounding), to
    ``tol = max(1e-10, 10 b)`` relative, ``b`` how far the torch QR path's parameters are from
    the Cholesky path's at that step (and for each state field, how far QR's is): rounding
    differences grow over the steps of the MLP fit (to 3e-7 between torch's own QR and
    Cholesky after 8 trust-region steps with scaling), and the row blocks may differ from
    Cholesky no more than QR does (times 10)."""
    residual, p0, batch = _problem(kind)
    steps = 8
    ref = _run(residual, p0, batch, steps, rule=rule, scaling=scaling, solver="cholesky")
    qr = _run(residual, p0, batch, steps, rule=rule, scaling=scaling, solver="qr")
    _no_whole_jacobian(monkeypatch)
    got = _run(residual, p0, batch, steps, rule=rule, scaling=scaling,
               solver=S.CuPyNumeric(row_block=16))
    assert sum(bool(s.accepted) for _, s in ref) >= 3  # the fit moves
    for (p, s), (p_ref, s_ref), (p_qr, s_qr) in zip(got, ref, qr):
        assert bool(s.accepted) == bool(s_ref.accepted)
        tol = max(1e-10, 10 * _rel(p_qr, p_ref))
        assert _rel(p, p_ref) <= tol, (_rel(p, p_ref), tol)
        for name in ("damping", "radius", "scale", "grad_cos", "residual_norm", "new_cost"):
            a, b, c = getattr(s, name), getattr(s_ref, name), getattr(s_qr, name)
            tol = max(1e-10, 10 * _rel(c, b))
            assert _rel(a, b) <= tol, (name, _rel(a, b), tol)
        if float(s_ref.predicted_reduction) > 1e-6:
            tol = max(1e-8, 10 * _rel(s_qr.gain_ratio, s_ref.gain_ratio))
            assert _rel(s.gain_ratio, s_ref.gain_ratio) <= tol


def _leaves(p):
    return list(p.values()) if isinstance(p, dict) else [p.reshape(-1)]


class _Largest(TorchDispatchMode):
    """Records the largest tensor any torch operation returns (the memory actually held:
    under vmap the dispatcher sees the batched tensors)."""

    def __init__(self):
        super().__init__()
        self.largest, self.what = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.what = t.numel(), (tuple(t.shape), str(func))
        return out


@pytest.mark.parametrize("kind, m, d_in, width, k", [("per-sample", 2000, 2, 6, 40),
                                                     ("generic", 600, 20, 16, 4)])
def test_no_tensor_the_size_of_J_is_created(kind, m, d_in, width, k, monkeypatch):
    """Every tensor any torch operation returns during one update is recorded: on the row-block
    path none reaches m n / 4 numbers, while the torch path's J has m n; the Jacobian routine
    is never called, and the blocks handed over have at most k rows. Per-sample residuals
    hold k samples' Jacobians (k x n) at a time; a generic function k rows of vjp, whose
    cotangents are k copies of the forward pass's values (k x m x width here), so there it
    bounds the memory where n exceeds k times the width, as for this MLP (n = 353)."""
    residual, p0, batch = _mlp_problem(samples=m, width=width, d_in=d_in)
    n = sum(v.numel() for v in p0.values())
    fn = residual if kind == "per-sample" else (lambda p, b: residual(p, b) * 1.0)
    assert isinstance(fn, fo.func.PerSampleResiduals) == (kind == "per-sample")
    opt = fo.levenberg_marquardt(fn, solver=S.CuPyNumeric(row_block=k))
    from funcopt.solvers import cupynumeric_normal as cnn

    rows: list = []
    real = cnn.normal_equations
    monkeypatch.setattr(cnn, "normal_equations",
                        lambda blocks: real(b for b in blocks if rows.append(b[0].shape[0]) or True))
    _no_whole_jacobian(monkeypatch)
    with _Largest() as probe:
        opt.update(None, opt.init(p0), p0, batch=batch)
    assert sum(rows) == m and max(rows) <= k and len(rows) == -(-m // k)
    assert probe.largest < m * n // 4, (probe.what, m * n)
    monkeypatch.undo()
    with _Largest() as dense:  # the probe sees J on the torch path
        fo.levenberg_marquardt(fn, solver="cholesky").update(None, opt.init(p0), p0, batch=batch)
    assert dense.largest >= m * n


def test_row_block_larger_than_m_is_one_block(monkeypatch):
    """row_block = 10^6 > m: one block, the same fit as the torch path."""
    residual, p0, batch = _generic_problem()
    ref = _run(residual, p0, batch, 5, solver="cholesky")
    _no_whole_jacobian(monkeypatch)
    got = _run(residual, p0, batch, 5, solver=S.CuPyNumeric(row_block=10**6))
    for (p, s), (p_ref, s_ref) in zip(got, ref):
        torch.testing.assert_close(p, p_ref, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(s.damping, s_ref.damping, rtol=1e-9, atol=0)


def test_least_squares_through_row_blocks_solves_the_fit(monkeypatch):
    """fo.least_squares (default trust-region rule) on the per-sample MLP stops where the
    torch path stops, with success, J never whole."""
    residual, p0, batch = _mlp_problem()
    bound = residual.bind(batch)
    ref, ref_info = fo.least_squares(bound, p0, max_steps=20, solver="cholesky")
    _no_whole_jacobian(monkeypatch)
    got, info = fo.least_squares(bound, p0, max_steps=20, solver=S.CuPyNumeric(row_block=25))
    assert info.steps == ref_info.steps and info.reason == ref_info.reason
    np.testing.assert_allclose(info.cost, ref_info.cost, rtol=1e-8)
    for k in p0:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-6, atol=1e-9)


def test_nan_in_one_block_is_a_non_finite_failure_not_success(monkeypatch):
    """Per-sample residuals ``w0 x + sqrt(|w1 - x|)`` at ``w1 = 0.5``: finite everywhere, but
    the derivative in w1 is NaN for the samples with x = 0.5 (rows 50..59, inside the 4th block
    of 16) and finite elsewhere. The row-block path raises the torch path's non-finite error
    before any step, and reports no success."""
    x = torch.linspace(0, 1, 100, dtype=F64)
    x[50:60] = 0.5
    batch = (x, torch.ones(100, dtype=F64))
    residual = fo.per_sample_residuals(lambda w, s: w[0] * s[0] + torch.sqrt((w[1] - s[0]).abs()) - s[1])
    p0 = torch.tensor([1.0, 0.5], dtype=F64)
    assert bool(torch.isfinite(residual(p0, batch)).all())
    J, _ = fo.func.jacobian(residual, p0, batch)
    bad = ~torch.isfinite(J).all(1)
    assert bool(bad[50:60].all()) and not bool(bad[:50].any()) and not bool(bad[60:].any())
    with pytest.raises(ValueError, match="non-finite residuals or Jacobian"):
        fo.least_squares(residual.bind(batch), p0, solver="cholesky")
    _no_whole_jacobian(monkeypatch)
    with pytest.raises(ValueError, match="non-finite residuals or Jacobian"):
        fo.least_squares(residual.bind(batch), p0, solver=S.CuPyNumeric(row_block=16))
    opt = fo.levenberg_marquardt(residual, solver=S.CuPyNumeric(row_block=16))
    with pytest.raises(ValueError, match="non-finite residuals or Jacobian"):
        opt.update(None, opt.init(p0), p0, batch=batch)


def test_huge_jacobian_columns_do_not_overflow(monkeypatch):
    """Columns of size 1e200 (their squares overflow float64): the column norms, gnorm and
    steps equal the torch path's (which guards them too), none is inf or NaN."""
    t = torch.linspace(0, 2, 60, dtype=F64)

    def residual(p):
        return 1e200 * (p[0] * torch.exp(-p[1] * t) - 2.0 * torch.exp(-0.7 * t))

    p0 = torch.tensor([1.0, 1.0], dtype=F64)
    ref = _run(residual, p0, None, 4, rule=fo.Nielsen(), solver="cholesky")
    _no_whole_jacobian(monkeypatch)
    got = _run(residual, p0, None, 4, rule=fo.Nielsen(), solver=S.CuPyNumeric(row_block=7))
    for (p, s), (p_ref, s_ref) in zip(got, ref):
        assert bool(torch.isfinite(s.scale).all()) and bool(torch.isfinite(s.grad_cos))
        torch.testing.assert_close(s.scale, s_ref.scale, rtol=1e-12, atol=0)
        torch.testing.assert_close(p, p_ref, rtol=1e-9, atol=0)


@pytest.mark.cupynumeric
def test_row_blocks_with_a_rank_deficient_jacobian_fit_under_the_trust_region():
    """An unused parameter (a zero column): the default trust region's damping 0 meets a
    singular Gram matrix, which the row-block path's Cholesky cannot factor; the fit used to
    end after one update with 'the linear solver failed'. It now takes damped steps."""
    t = torch.linspace(0, 4, 50, dtype=torch.float64)
    y = 2.5 * torch.exp(-1.3 * t) + 0.01 * torch.sin(7 * t)
    full = lambda p: p[0] * torch.exp(-p[1] * t) + p[2] - y
    _, ref = fo.least_squares(full, torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64))
    _, info = fo.least_squares(lambda p: full(p[:3]) + 0 * p[3],
                               torch.tensor([1.0, 1.0, 0.0, 5.0], dtype=torch.float64),
                               solver=fo.solvers.CuPyNumeric(row_block=7))
    assert ref.success and info.success, info.reason
    assert abs(info.cost - ref.cost) <= 1e-9 * ref.cost
