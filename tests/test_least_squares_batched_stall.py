"""least_squares(batched=True): a tolerance stop that follows an update whose attempts were
all rejected is checked for stationarity, per problem, as the single driver checks it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import least_squares as scipy_lsq

import funcopt as fo
import funcopt.least_squares_batched as lsb
import funcopt.least_squares_stalls as stalls

F64 = torch.float64
STALLED = len(lsb.REASONS) - 1


def _flip(z):
    """``z`` in value, ``-dz`` in derivative: a residual whose Jacobian has the wrong sign."""
    return 2 * z.detach() - z


def _pair_batched(k, c):
    """Row b: ``(1000 p0, p1 - c_b)``; the second residual's derivative is ``1 - 2 k_b``, so
    ``k_b = 1`` gives a Jacobian of the wrong sign there and ``k_b = 0`` the exact one."""
    def fn(P):
        p1 = P[:, 1]
        return torch.stack([1000 * P[:, 0], k * _flip(p1) + (1 - k) * p1 - c], 1)
    return fn


def _pair_single(k, c):
    def fn(p):
        return torch.stack([1000 * p[0], k * _flip(p[1]) + (1 - k) * p[1] - c])
    return fn


def _gnorm(r, J):
    """MINPACK's gnorm, max_j |J_j^T r| / (||J_j|| ||r||), in numpy float64."""
    col = np.linalg.norm(J, axis=0)
    return float(np.max(np.abs(J.T @ r) / (col * np.linalg.norm(r))))


@pytest.mark.parametrize("tol, stop", [(fo.Tolerances(), 5), (fo.Tolerances(1e-8, 1e-8, 1e-8), 5),
                                       (fo.Tolerances(0.0, 0.0, 0.0), 7)],
                         ids=["default", "loose", "machine-precision"])
def test_rejected_ftol_stop_off_a_minimum_is_not_success(monkeypatch, tol, stop):
    """From (50, 500) the first step fits p0 (accepted); then every step on p1, whose
    Jacobian has the wrong sign, raises the cost: the trust region shrinks over rejected
    attempts until a rejected trial's predicted and actual reductions fall below ftol (or
    eps), and the batched fit ended with success at cost 5e5, gnorm 1. The single driver
    calls that point stalled; so does the batched one now, while the neighbour in the same
    batch (exact Jacobian, a zero-residual fit) keeps its success at scipy's solution."""
    seen = []
    check = stalls.check_stalls

    def spy(f, x, stops, *rest):
        seen.append((stops[0].tolist(), stops[1].tolist()))
        return check(f, x, stops, *rest)

    monkeypatch.setattr(stalls, "check_stalls", spy)
    k = torch.tensor([1.0, 0.0], dtype=F64)
    c = torch.tensor([1000.0, 1000.0], dtype=F64)
    P0 = torch.tensor([[50.0, 500.0], [50.0, 500.0]], dtype=F64)
    P, info = fo.least_squares(_pair_batched(k, c), P0, batched=True, tolerances=tol)
    assert seen == [([stop, 1], [True, False])]  # an ftol stop after a rejected update
    assert info.success.tolist() == [False, True]
    assert info.reason.tolist() == [STALLED, 1] and info.reasons()[0].startswith("stalled")
    for b in range(2):
        _, single = fo.least_squares(_pair_single(float(k[b]), float(c[b])), P0[b],
                                     tolerances=tol)
        assert single.success == bool(info.success[b]), single.reason
    # the true residuals (1000 p0, p1 - 1000): scipy with their exact Jacobian reaches cost 0
    ref = scipy_lsq(lambda q: [1000 * q[0], q[1] - 1000.0], [50.0, 500.0], method="lm",
                    jac=lambda q: [[1000.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(P[1].numpy(), ref.x, rtol=1e-12, atol=1e-12)
    assert float(info.cost[0]) > 1e5 and ref.cost < 1e-20  # the stalled row is no minimum
    r = _pair_single(1.0, 1000.0)(P[0]).numpy()
    assert _gnorm(r, np.array([[1000.0, 0.0], [0.0, 1.0]])) > 0.5


def _exp_batched(t, y):
    return lambda P: P[:, :1] * torch.exp(-P[:, 1:2] * t) + P[:, 2:3] - y


def test_residuals_rounded_to_float32_agree_with_the_single_driver():
    """float64 parameters, residuals computed in float32: the fit ends on ftol after a
    rejected update with gnorm ~4e-6 (gnorm^2 above ftol and above the rounding the float64
    probes measure), which the single driver calls stalled and the batched one called
    success; both fail now, each problem of the batch, and the point is within float32's
    accuracy of scipy's float64 fit (so the failure is about the claim, not the fit)."""
    t = torch.linspace(0, 4, 20, dtype=F64)
    y = 2.5 * torch.exp(-1.3 * t) + 0.5 + 0.01 * torch.sin(7 * t)

    def single(p):
        return (p[0].float() * torch.exp(-p[1].float() * t.float()) + p[2].float()
                - y.float()).double()

    def batched(P):
        return _exp_batched(t.float(), y.float())(P.float()).double()

    x0 = torch.tensor([1.0, 1.0, 0.0], dtype=F64)
    P, info = fo.least_squares(batched, x0.repeat(3, 1), batched=True)
    _, ref = fo.least_squares(single, x0)
    assert not ref.success and ref.reason.startswith("stalled")
    assert info.success.tolist() == [False] * 3 and info.reason.tolist() == [STALLED] * 3
    sp = scipy_lsq(lambda q: q[0] * np.exp(-q[1] * t.numpy()) + q[2] - y.numpy(), x0.numpy(),
                   method="lm", xtol=1e-15, ftol=1e-15, gtol=1e-15)
    np.testing.assert_allclose(P[0].numpy(), sp.x, rtol=1e-5)


def test_the_check_runs_once_per_batch_and_only_after_a_tolerance_stop(monkeypatch):
    """The check (the batched Jacobian the zero-column probe shares, and the rounding
    evaluations) runs once for a batch in which some problem stopped on a tolerance test: an
    ordinary batch (every problem stops on ftol after an accepted step, which is judged too:
    such a step can end on a saddle line, tests/test_lm_ftol_stall.py) keeps its fits (equal
    to scipy's) and its success; a batch that ends on gtol or a zero residual runs none."""
    calls = []
    rounding = stalls.rounding

    def counted(*a):
        calls.append(1)
        return rounding(*a)

    monkeypatch.setattr(stalls, "rounding", counted)
    t = torch.linspace(0, 4, 30, dtype=F64)
    rng = np.random.default_rng(3)
    y = torch.tensor(np.stack([a * np.exp(-b * t.numpy()) + 0.3 + 0.01 * rng.standard_normal(30)
                               for a, b in [(2.0, 1.1), (1.5, 0.7), (3.0, 2.0)]]))
    P0 = torch.tensor([[1.0, 1.0, 0.0]], dtype=F64).repeat(3, 1)
    tol = fo.Tolerances(1e-10, 1e-10, 1e-10)
    P, info = fo.least_squares(_exp_batched(t, y), P0, batched=True, tolerances=tol)
    assert info.reason.tolist() == [5, 5, 5] and info.success.all() and len(calls) == 1
    for b in range(3):
        sp = scipy_lsq(lambda q, b=b: q[0] * np.exp(-q[1] * t.numpy()) + q[2] - y[b].numpy(),
                       [1.0, 1.0, 0.0], method="lm", xtol=1e-15, ftol=1e-15, gtol=1e-15)
        np.testing.assert_allclose(P[b].numpy(), sp.x, rtol=1e-8)
    k, c = torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([1000.0, 1000.0], dtype=F64)
    fo.least_squares(_pair_batched(k, c), torch.tensor([[50.0, 500.0]] * 2, dtype=F64),
                     batched=True)
    assert len(calls) == 2
    line = lambda a: a[:, :1] * t + a[:, 1:] - (2 * t + 1)  # noqa: E731  (exact: zero residual)
    _, info = fo.least_squares(line, torch.tensor([[2.0, 1.0]] * 2, dtype=F64), batched=True)
    assert set(info.reason.tolist()) <= {1, 2, 3} and len(calls) == 2


@pytest.mark.parametrize("rule", [fo.TrustRegion(), fo.Nielsen(), fo.Classic()],
                         ids=["trust-region", "nielsen", "classic"])
@pytest.mark.parametrize("tol", [fo.Tolerances(), fo.Tolerances(0.0, 0.0, 0.0)],
                         ids=["default", "machine-precision"])
def test_batched_and_single_drivers_agree_on_success(rule, tol):
    """Each rule and tolerance: rows with the wrong-sign Jacobian and rows with the exact one
    (whose Nielsen and Classic fits end on 'xtol below machine precision' after an accepted
    step at p0 ~ 1e-24, where the single driver's check on xtol reports a stall); the batched
    fit gives each row the single driver's success."""
    k = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=F64)
    c = torch.tensor([1000.0, 1000.0, -300.0, 7.0], dtype=F64)
    P0 = torch.tensor([[50.0, 500.0], [50.0, 500.0], [20.0, -150.0], [-3.0, 1.0]], dtype=F64)
    _, info = fo.least_squares(_pair_batched(k, c), P0, batched=True, rule=rule, tolerances=tol)
    for b in range(4):
        _, single = fo.least_squares(_pair_single(float(k[b]), float(c[b])), P0[b], rule=rule,
                                     tolerances=tol)
        assert single.success == bool(info.success[b]), (b, single.reason, info.reasons()[b])


# targets of every size, 0 < |c| < 1e-12 included: there a wrong-sign fit ends at x = 0, where
# the rounding floor steps a zero parameter at the scale ||r|| / ||J_j|| (rounding_steps)
_TARGETS = st.floats(-1e3, 1e3)


@settings(max_examples=15, deadline=None)
@given(st.lists(st.tuples(st.booleans(), _TARGETS, st.floats(1.0, 100.0),
                          st.floats(0.05, 0.95)), min_size=1, max_size=4))
def test_a_success_of_the_batch_is_a_stationary_point(rows):
    """Random rows of (wrong-sign or exact Jacobian, target c, start p0, start p1 = s c): a
    batched success is a point whose gnorm (numpy float64, the true Jacobian) is below
    1e-6, whatever its neighbours did."""
    k = torch.tensor([float(w) for w, *_ in rows], dtype=F64)
    c = torch.tensor([v for _, v, _, _ in rows], dtype=F64)
    P0 = torch.tensor([[p0, s * v] for _, v, p0, s in rows], dtype=F64)
    P, info = fo.least_squares(_pair_batched(k, c), P0, batched=True)
    for b in range(len(rows)):
        r = np.array([1000 * float(P[b, 0]), float(P[b, 1]) - float(c[b])])
        if info.success[b] and np.linalg.norm(r) > 0:
            assert _gnorm(r, np.array([[1000.0, 0.0], [0.0, 1.0]])) <= 1e-6, info.reasons()[b]


def test_the_stall_code_is_the_last_reason():
    assert stalls.STALLED == len(lsb.REASONS) - 1 and "stall" in lsb.REASONS[-1]
