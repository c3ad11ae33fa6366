"""An ftol stop is a success only at a stationary point, in every driver.

MINPACK's ftol test reads the last step's predicted relative reduction. A step along a Jacobian
column that is near zero predicts almost none wherever it goes, so the test can hold on a
saddle line while the cost still falls along another column. The drivers judge the final
point as their stall check does (``gnorm`` over the columns with a representable move against
``max(ftol, eps, rounding)``; ftol times the damping margin of
:func:`funcopt.least_squares_options.damping_margin` after an accepted damped step)."""

from __future__ import annotations

import pytest
import torch

import funcopt as fo
from funcopt import least_squares_batched as lsb
from funcopt import nist
from funcopt.least_squares_options import damping_margin
from funcopt.least_squares_parallel import least_squares_parallel

F64 = torch.float64
T = torch.linspace(0, 1, 20, dtype=F64)
STALLED = len(lsb.REASONS) - 1
# a0 = 2^-51, a1 = 0: J = [a1 t, a0 t] = [0, 2^-51 t]; the first step goes along a1 only
# (the a0 column is zero), predicts a relative reduction of ~1e-30 and lands on a1 = 3.82,
# where the cost falls along a0 by most of itself
SADDLE_START = (2.0**-51, 0.0)


def _product(a):  # J = [a1 t, a0 t]: rank 1, zero along a1 on the saddle line a0 = 0
    return a[..., :1] * a[..., 1:] * T - 2 * T + 0.05 * torch.sin(5 * T)


def _drivers(fn, x0, **kw):
    """(name, params, success, reason text) of the single (both solvers), batched and
    data-parallel drivers from ``x0`` (``fn`` maps one point, or rows of points, to rows)."""
    out = []
    for solver in ("auto", "cholesky"):
        x, info = fo.least_squares(fn, x0.clone(), solver=solver, **kw)
        out.append((solver, x, info.success, info.reason))
    rows = lambda X: torch.stack([fn(x) for x in X])  # noqa: E731
    xb, ib = fo.least_squares(rows, x0[None].clone(), batched=True, **kw)
    out.append(("batched", xb[0], bool(ib.success[0]), ib.reasons()[0]))
    xp, ip = least_squares_parallel(fn, x0.clone(), **kw)
    out.append(("parallel", xp, bool(ip.success[0]), lsb.REASONS[int(ip.reason[0])]))
    return out


def test_an_ftol_stop_onto_the_saddle_line_fails_in_every_driver():
    x0 = torch.tensor(SADDLE_START, dtype=F64)
    for name, x, success, reason in _drivers(_product, x0):
        assert x[0] == 2.0**-51 and float(x[1]) > 1.0, (name, x)  # the same point
        g = torch.func.jacrev(_product)(x).T @ _product(x)
        assert abs(float(g[0])) > 1.0  # not stationary along a0
        assert not success and reason.startswith("stalled"), (name, reason)
    x, info = fo.least_squares(_product, x0.clone())
    assert "(ftol: relative reduction" in info.reason and "saddle" in info.reason


def test_the_batched_driver_on_the_saddle_crossing_start_is_no_success():
    """From the start whose single Cholesky fit ends on the saddle line, the batched fit ends
    near the origin (the saddle point of a0 a1), which is no minimum either."""
    x0 = torch.tensor([[1.1842344333619526, -0.5281191826820573]], dtype=F64)
    xb, info = fo.least_squares(_product, x0.clone(), batched=True)
    assert not bool(info.success[0]) and int(info.reason[0]) == STALLED, info.reasons()


def test_the_random_batch_reports_no_success_at_the_saddle():
    """About half of these starts end near the origin on MINPACK's tests (ftol among them
    after an accepted step): none of those may be a success, and every success is on the
    solution curve a0 a1 = c."""
    X = torch.randn(200, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * 1.5
    xb, info = fo.least_squares(_product, X.clone(), batched=True)
    ref = torch.linalg.lstsq(T[:, None], (2 * T - 0.05 * torch.sin(5 * T))[:, None]).solution
    on_curve = (xb[:, 0] * xb[:, 1] - ref[0, 0]).abs() < 1e-6
    assert bool(on_curve[info.success].all())
    assert int((~on_curve).sum()) > 50 and not bool(info.success[~on_curve].any())


_t = torch.linspace(0, 3, 40, dtype=F64)
_y = 2 * torch.exp(-1.3 * _t) + 0.05 * torch.sin(7 * _t)


def _exp_fit(p):  # a nonzero-residual exponential fit
    return p[..., :1] * torch.exp(-p[..., 1:2] * _t) - _y


@pytest.mark.parametrize("tol", [fo.Tolerances(1e-10, 0, 0), fo.Tolerances(1.5e-8, 1.5e-8, 1.5e-8)])
def test_ordinary_ftol_stops_keep_their_success(tol):
    """A nonzero-residual fit stopped by ftol after an accepted step is a success in every
    driver, and so are NIST BoxBOD's (both starts, default tolerances)."""
    x0 = torch.tensor([1.0, 1.0], dtype=F64)
    for name, _, success, reason in _drivers(_exp_fit, x0, tolerances=tol):
        assert success and reason.startswith("ftol"), (name, reason)
    p = nist.load("BoxBOD")
    f = nist.residual_fn(p)
    for start in (0, 1):
        for name, x, success, reason in _drivers(f, p.starts[start]):
            assert success and reason.startswith("ftol"), (name, start, reason)
            assert nist.significant_digits(x, p.certified).min() >= 6


def test_the_damping_margin():
    """``lambda / (2 c^2)``, at least 1: 0 damping gives none; the trust region's damping is
    the step's, Nielsen's state holds at least a third of it, the classic one 1 /
    decrease_factor; a column above its running maximum (c > 1) shrinks it, one below does
    not widen it; with D = I the damping is relative to the smallest nonzero column."""
    col = torch.tensor([[1.0, 2.0]], dtype=F64)
    scale = torch.tensor([[1.0, 2.0]], dtype=F64)
    lam = torch.tensor([16.0], dtype=F64)
    assert float(damping_margin(lam * 0, scale, col, fo.TrustRegion())) == 1.0
    assert float(damping_margin(lam, scale, col, fo.TrustRegion())) == 8.0
    assert float(damping_margin(lam, scale, col, fo.Nielsen())) == 24.0
    assert float(damping_margin(lam, scale, col, fo.Classic())) == 80.0
    assert float(damping_margin(lam, scale, col * 1e-9, fo.TrustRegion())) == 8.0
    assert float(damping_margin(lam, scale, col * 2, fo.TrustRegion())) == 2.0
    assert float(damping_margin(lam, scale * 0, col, fo.TrustRegion())) == 2.0  # d = 1
    assert float(damping_margin(lam, -torch.ones_like(scale), col, fo.TrustRegion())) == 8.0
