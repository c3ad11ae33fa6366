"""Edges of fo.least_squares: the stall check's work, a Jacobian column beyond the dtype on the
row-block path, and a start at x0 = 0 on residuals of a large or small scale."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

import funcopt as fo
from funcopt.transforms import lm_model

F64 = torch.float64


def _exp_fit32(noise):
    t = torch.linspace(0, 4, 100, dtype=F64)
    y = 2.5 * torch.exp(-1.3 * t) + 0.5 + noise * torch.randn(
        100, generator=torch.Generator().manual_seed(0), dtype=F64)
    t, y = t.float(), y.float()
    return lambda p: p[0] * torch.exp(-p[1] * t) + p[2] - y


@pytest.mark.parametrize("noise", [1e-5, 1e-3], ids=["gnorm-needed", "quiet"])
def test_stall_check_forms_the_jacobian_once(monkeypatch, noise):
    """A float32 fit that ends by a test 'below machine precision' after a rejected update:
    the stall check formed J for the float64 Gauss-Newton step and also took diag(J^T J)
    from min(m, n) more Jacobian products, even when the update was quiet (grad_cos^2 below
    ftol, gnorm not used). diag(J^T J) now comes from the J it forms, only when needed; the
    outcome is the same (success, float64 math's fit to float32 accuracy)."""
    from funcopt import least_squares_options as opts

    driver = sys.modules["funcopt.least_squares"]
    calls = {"column_norms_sq": 0, "jacobian": 0, "checks": 0}
    inside = [False]

    def counted(module, name):
        original = getattr(module, name, None)
        if original is None:
            return

        def wrapper(*a, **k):
            calls[name] += inside[0]
            return original(*a, **k)

        monkeypatch.setattr(module, name, wrapper)

    for module in (opts, lm_model):
        counted(module, "column_norms_sq")
        counted(module, "jacobian")
    check = driver._stall_check

    def stall_check(*a, **k):
        inside[0] = True
        calls["checks"] += 1
        assert "machine precision" in a[4] and not a[2]["accepted"]
        try:
            return check(*a, **k)
        finally:
            inside[0] = False

    monkeypatch.setattr(driver, "_stall_check", stall_check)
    fn = _exp_fit32(noise)
    p, info = fo.least_squares(fn, torch.tensor([1.0, 1.0, 0.0]))
    assert info.success, info.reason
    assert calls == {"column_norms_sq": 0, "jacobian": 1, "checks": 1}
    monkeypatch.undo()
    t = torch.linspace(0, 4, 100, dtype=F64)
    y = fn(torch.zeros(3)).double() * -1  # the float32 data, in float64
    ref, _ = fo.least_squares(lambda q: q[0] * torch.exp(-q[1] * t) + q[2] - y,
                              torch.tensor([1.0, 1.0, 0.0], dtype=F64))
    np.testing.assert_allclose(p.double().numpy(), ref.numpy(), rtol=0, atol=3e-4)


def _small_linear():
    A = torch.tensor([[2.0, 1.0, 0.0], [1.0, 3.0, 1.0], [0.0, 1.0, 4.0], [1.0, 0.0, 1.0]], dtype=F64)
    b = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64)
    return A, b


@pytest.mark.parametrize("scale", [1e20, 1e100, 1e150, 1e300, 1e-100])
def test_zero_start_on_scaled_residuals_matches_scipy(scale):
    """r(x) = s (A x - b) from x0 = 0. MINPACK's first radius is factor ||D x0||, or factor
    when that is 0, in units of D x (D: the column norms, ~s): for s >= 1e16 the first step
    changed the cost by less than eps, and fo.least_squares stopped at x0 ('stalled'), or
    raised 'the damping contains NaN or inf' (s = 1e150). scipy's method='lm' with
    x_scale=1 (D = I, radius factor = 100) solves it; its default x_scale='jac' (MINPACK's
    D, as here) stops at x0 with success (status 2). Delta_0 = factor ||r(x0)|| at x0 = 0
    solves it at every scale."""
    from scipy.optimize import least_squares as scipy_lsq

    A, b = _small_linear()
    An, bn = A.numpy(), b.numpy()
    with np.errstate(over="ignore", invalid="ignore"):  # scipy's cost overflows at 1e300
        ref = scipy_lsq(lambda x: scale * (An @ x - bn), np.zeros(3), jac=lambda x: scale * An,
                        method="lm", x_scale=1.0)
    assert ref.success
    p, info = fo.least_squares(lambda x: scale * (A @ x - b), torch.zeros(3, dtype=F64))
    assert info.success, info.reason
    np.testing.assert_allclose(p.numpy(), ref.x, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(p.numpy(), np.linalg.lstsq(An, bn, rcond=None)[0], rtol=1e-12)


@pytest.mark.parametrize("scale", [1e20, 1e200, 1e300])
def test_zero_start_scaled_residuals_every_path(scale):
    """The zero-start radius lives in TrustRegion.initial_radius, so the batched driver and
    the transform stepped by hand get it too (they stopped at x0 = 0 with success False from
    s = 1e20 on); the batched path also without scaling (D = I, MINPACK's Delta_0 =
    factor)."""
    A, b = _small_linear()
    ref = np.linalg.lstsq(A.numpy(), b.numpy(), rcond=None)[0]
    for scaling in (True, False):
        P, binfo = fo.least_squares(lambda X: scale * (X @ A.T - b), torch.zeros(4, 3, dtype=F64),
                                    batched=True, scaling=scaling)
        assert binfo.success.all()
        np.testing.assert_allclose(P.numpy(), np.broadcast_to(ref, (4, 3)), rtol=1e-12)
    tx = fo.levenberg_marquardt(lambda x: scale * (A @ x - b), rule=fo.TrustRegion())
    x = torch.zeros(3, dtype=F64)
    state = tx.init(x)
    for _ in range(3):
        u, state = tx.update(None, state, x)
        x = fo.apply_updates(x, u)
    np.testing.assert_allclose(x.numpy(), ref, rtol=1e-10)


@pytest.mark.parametrize("radius", [1e-3, 1e-110, 1e-200])
def test_trust_region_damping_tiny_radius(radius):
    """The Newton search for mu with phi(mu) = ||z(mu)|| in [0.9, 1.1] radius: for radii below
    ~1e-102 the old sum(w^2 / q^3) overflowed q^3 (mu ~ 1/radius), the step was inf and the
    damping NaN. Checked against phi computed in log space from the returned mu."""
    from funcopt.transforms.lm_damping import trust_region_damping

    s = torch.tensor([1.0, 0.5, 0.25], dtype=F64)
    w = torch.tensor([0.6, 0.0, 0.8], dtype=F64)
    lam = trust_region_damping(s, w, torch.tensor(1.0, dtype=F64), torch.tensor(radius, dtype=F64))
    assert torch.isfinite(lam) and lam > 0
    logphi = 0.5 * torch.logsumexp(2 * torch.log(w[w != 0]) - 2 * torch.log(s[w != 0] ** 2 + lam), 0)
    assert math.log(0.9 * radius) <= float(logphi) <= math.log(1.1 * radius)


def test_zero_start_radius_is_scale_free():
    """From x0 = 0 the fit of s r(x) takes the same steps for every s: the history's radii
    scale with s and everything else agrees."""
    A, b = _small_linear()
    fn = lambda x, s: s * (torch.tanh(A @ x) - 0.5 * torch.tanh(b))  # noqa: E731
    _, one = fo.least_squares(lambda x: fn(x, 1.0), torch.zeros(3, dtype=F64))
    _, big = fo.least_squares(lambda x: fn(x, 2.0**200), torch.zeros(3, dtype=F64))
    assert one.success and big.success and one.steps == big.steps > 2
    for h1, h2 in zip(one.history, big.history, strict=True):
        np.testing.assert_allclose(h2["radius"], 2.0**200 * h1["radius"], rtol=1e-12)
        np.testing.assert_allclose(h2["gain_ratio"], h1["gain_ratio"], rtol=1e-9, atol=1e-12)


@pytest.mark.cupynumeric
@pytest.mark.filterwarnings("ignore:(?s).*Seeding the random")
@pytest.mark.parametrize("dtype, big", [(F64, 1.5e308), (F64, 1e308), (torch.float32, 3e38)])
def test_row_blocks_column_beyond_the_dtype_is_the_dense_error(dtype, big):
    """CuPyNumeric(row_block=k) with a column whose norm exceeds the dtype: its power-of-two
    column scale 2 * 2^e overflowed to inf for entries >= 2^e_max and the fit failed inside
    an SVD ('the input matrix contained non-finite values'). Now it raises the dense path's
    ValueError naming the column and the fix."""
    pytest.importorskip("cupynumeric", reason="pip install funcopt[cupynumeric]", exc_type=ImportError)
    t = torch.linspace(0, 4, 20, dtype=dtype)
    y = 2.5 * torch.exp(-1.3 * t)
    fn = lambda p: p[0] * torch.exp(-p[1] * t) + p[2] * big - y  # noqa: E731
    x0 = torch.tensor([1.0, 1.0, 0.0], dtype=dtype)
    with pytest.raises(ValueError, match="column 2 of the Jacobian has a norm beyond") as dense:
        fo.least_squares(fn, x0)
    with pytest.raises(ValueError, match="column 2 of the Jacobian has a norm beyond") as rows:
        fo.least_squares(fn, x0, solver=fo.solvers.CuPyNumeric(row_block=7))
    assert str(rows.value) == str(dense.value)


@pytest.mark.cupynumeric
@pytest.mark.filterwarnings("ignore:(?s).*Seeding the random")
def test_row_blocks_entry_above_the_largest_power_of_two_fits_as_dense():
    """One Jacobian entry of 1.5e308 (above 2^1023) in a column whose norm is finite: the
    row-block column scale overflowed and the fit failed in an SVD; it now fits as the dense
    path does (exact data: the true parameters)."""
    pytest.importorskip("cupynumeric", reason="pip install funcopt[cupynumeric]", exc_type=ImportError)
    t = torch.linspace(0, 4, 20, dtype=F64)
    y = 2.5 * torch.exp(-1.3 * t)
    fn = lambda p: torch.cat([p[0] * torch.exp(-p[1] * t) - y, (p[2] * 1.5e308)[None]])  # noqa: E731
    x0 = torch.tensor([1.0, 1.0, 0.0], dtype=F64)
    dense, dinfo = fo.least_squares(fn, x0)
    rows, rinfo = fo.least_squares(fn, x0, solver=fo.solvers.CuPyNumeric(row_block=7))
    assert dinfo.success and rinfo.success, rinfo.reason
    np.testing.assert_allclose(rows.numpy(), [2.5, 1.3, 0.0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(rows.numpy(), dense.numpy(), rtol=1e-10, atol=1e-12)


def test_tiny_nonzero_start_names_the_trust_radius():
    """From x0 = 1e-30 on 1e100 (A x - b), MINPACK's Delta_0 = factor ||d x0|| is 1e-29 of
    ||r||: no step changes the cost and the fit stops at x0. The failure said to use 'pcg', a
    dense solver or float64, none of which applies; it now names the trust region's first
    radius and the fixes, and the first fix given (x0 = 0) reaches numpy's solution."""
    A, b = _small_linear()
    fn = lambda x: 1e100 * (A @ x - b)  # noqa: E731
    _, info = fo.least_squares(fn, torch.full((3,), 1e-30, dtype=F64))
    assert not info.success
    assert "trust region's first radius" in info.reason and "radius_factor" in info.reason
    p, fixed = fo.least_squares(fn, torch.zeros(3, dtype=F64))
    assert fixed.success, fixed.reason
    np.testing.assert_allclose(p.numpy(), np.linalg.lstsq(A.numpy(), b.numpy(), rcond=None)[0],
                               rtol=1e-12)


@pytest.mark.parametrize("scale", [1.0, 1e-10, 1e-100, 1e-200])
def test_zero_column_at_x0_small_scale_reaches_the_optimum(scale):
    """a exp(-b t) + c from x0 = 0, where the b column of J is zero. MINPACK gives a zero column
    the scale 1 and keeps that 1 in its running maximum, so while the real column stayed far
    below 1 (residuals scaled by s << 1) the trust region pinned b at 0: the batched fit ended
    there with success True (50x the optimum's residual norm at s = 1e-10; scipy's 'lm' stops
    there too), the single fit 'stalled' (1e-100) or claimed success (1e-200). The running
    maximum now runs over the column norms alone (1 only where a column is zero so far)."""
    t = torch.linspace(0, 4, 30, dtype=F64)
    y = 2.5 * torch.exp(-1.3 * t) + 0.5 + 0.01 * torch.sin(7 * t)
    f = lambda x: x[..., :1] * torch.exp(-x[..., 1:2] * t) + x[..., 2:3] - y  # noqa: E731
    best, one = fo.least_squares(f, torch.tensor([1.0, 1.0, 0.0], dtype=F64))
    assert one.success
    optimum = float(f(best).norm())
    x, info = fo.least_squares(lambda v: scale * f(v), torch.zeros(3, dtype=F64))
    assert info.success and float(f(x).norm()) <= 1.0001 * optimum, info.reason
    X, binfo = fo.least_squares(lambda v: scale * f(v), torch.zeros(2, 3, dtype=F64),
                                batched=True)
    assert binfo.success.all() and float(f(X).norm(dim=-1).max()) <= 1.0001 * optimum
    if scale >= 1e-30:  # float32 residuals
        X32, i32 = fo.least_squares(lambda v: (scale * f(v.double())).float(),
                                    torch.zeros(1, 3), batched=True)
        assert i32.success.all() and float(f(X32.double()).norm()) <= 1.001 * optimum


@pytest.mark.parametrize("rule", [None, fo.Nielsen()])
def test_unscaled_damping_beyond_the_dtype_is_one_clear_error(rule):
    """scaling=False puts the damping in units of J^T J: residuals of 1e160 make it inf. That
    was 'the damping contains NaN or inf ... check the residuals or the Jacobian' (both
    finite); it now names the overflow and the fix. At 1e150 the fit still succeeds."""
    A, b = _small_linear()
    p, info = fo.least_squares(lambda x: 1e150 * (A @ x - b), torch.zeros(3, dtype=F64),
                               scaling=False, rule=rule)
    assert info.success
    np.testing.assert_allclose(p.numpy(), np.linalg.lstsq(A.numpy(), b.numpy(), rcond=None)[0],
                               rtol=1e-10)
    with pytest.raises(ValueError, match="beyond the largest torch.float64 number.*scaling=True"):
        fo.least_squares(lambda x: 1e160 * (A @ x - b), torch.zeros(3, dtype=F64),
                         scaling=False, rule=rule)


@pytest.mark.parametrize("x2", [0.5, 1e-3])
def test_xtol_is_not_fooled_by_one_huge_parameter(x2):
    """p0 exp(-p1 t) + p2 1e100 - y from p2 = 0.5: the first Gauss-Newton step, taken where the
    O(1) part of the residuals is lost under 0.5e100, sends p1 to ~1e85; then ||D x|| is
    dominated by p1 and the xtol test holds while p0 would still move by all of itself: the fit
    ends with success at cost 1.6e109, at a point that is not stationary (the p0 column alone
    would remove most of the cost). A success must be a stationary point (MINPACK's gnorm
    small); at 1e20 the same start ends at a true local minimum (p1 ~ 3e4: the exponential
    gone, p0 and p2 fitted), which a local method may report. Now a stop on xtol is checked
    for stationarity over the columns whose own Gauss-Newton move exceeds xtol |x_j|: these
    end as 'stalled' failures."""
    t = torch.linspace(0, 4, 20, dtype=F64)
    y = 2.5 * torch.exp(-1.3 * t)
    fn = lambda p: p[0] * torch.exp(-p[1] * t) + p[2] * 1e100 - y  # noqa: E731
    p, info = fo.least_squares(fn, torch.tensor([1.0, 1.0, x2], dtype=F64))
    J, r = torch.func.jacrev(fn)(p), fn(p)
    norms = J.norm(dim=0)
    cos = ((J.T @ r).abs() / (norms * r.norm())).where(norms > 0, 0.0).max()
    assert not info.success or float(cos) <= 1e-6
    assert info.reason.startswith("stalled") and "xtol" in info.reason
    fn20 = lambda p: p[0] * torch.exp(-p[1] * t) + p[2] * 1e20 - y  # noqa: E731
    p, info = fo.least_squares(fn20, torch.tensor([1.0, 1.0, 0.5], dtype=F64))
    J, r = torch.func.jacrev(fn20)(p), fn20(p)
    norms = J.norm(dim=0)
    cos = ((J.T @ r).abs() / (norms * r.norm())).where(norms > 0, 0.0).max()
    assert info.success and float(cos) <= 1e-6  # a true (if poor) local minimum


def test_batched_xtol_is_not_fooled_by_one_huge_parameter():
    """The batched driver's xtol stops get the same stationarity check: the problem started at
    p2 = 0.5 (p1 driven to ~3e85, gnorm 0.99 at its end) ended with success at cost 3e107;
    now it fails with the 'stalled' code, while its neighbour started at p2 = 0, a
    zero-residual fit whose residuals are rounding noise at the end, keeps its success."""
    from funcopt.least_squares_batched import REASONS

    t = torch.linspace(0, 4, 20, dtype=F64)
    y = 2.5 * torch.exp(-1.3 * t)
    fn = lambda P: P[:, :1] * torch.exp(-P[:, 1:2] * t) + P[:, 2:3] * 1e100 - y  # noqa: E731
    P, info = fo.least_squares(fn, torch.tensor([[1.0, 1.0, 0.5], [1.0, 1.0, 0.0]], dtype=F64),
                               batched=True)
    assert info.success.tolist() == [False, True]
    assert info.reasons()[0] == REASONS[-1] and info.reasons()[0].startswith("stalled")
    np.testing.assert_allclose(P[1, :2].numpy(), [2.5, 1.3], rtol=1e-12)
