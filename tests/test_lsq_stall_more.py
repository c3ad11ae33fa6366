"""Stops on a tolerance that are not minima, in the batched and the data-parallel drivers.

The batched driver gives the stops below machine precision (and the xtol / ftol stops whose
tolerance is below eps, the same test under another name) the single driver's float64
Gauss-Newton gain check; the data-parallel driver gets the batched driver's whole stall check
on its all-reduced model, equal on every rank."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

import funcopt as fo
import funcopt.least_squares_batched as lsb
from funcopt import nist
from funcopt.least_squares_options import _stall_check
from funcopt.least_squares_options import gauss_newton_gain as single_gain
from funcopt.least_squares_parallel import _stacked_r, least_squares_parallel
from funcopt.transforms.lm_batched import gauss_newton_gain

F32, F64 = torch.float32, torch.float64
STALLED = len(lsb.REASONS) - 1
WORLD = 2


def _mgh10_jacobian(b, x):
    """MGH10's ``b0 exp(b1 / (x + b2))`` and its exact Jacobian, numpy float64."""
    b0, b1, b2 = (float(v) for v in b)
    e = np.exp(b1 / (x + b2))
    return b0 * e, np.stack([e, b0 * e / (x + b2), -b0 * b1 * e / (x + b2) ** 2], 1)


def _numpy_gain(J, r):
    """The full Gauss-Newton step of ``||J d + r||`` by numpy's lstsq (scaled columns) and
    its relative reduction of the linear model."""
    c = np.linalg.norm(J, axis=0)
    c = np.where(c > 0, c, 1.0)
    z = np.linalg.lstsq(J / c, -r, rcond=None)[0]
    d = z / c
    return 1.0 - np.linalg.norm(r + J @ d) ** 2 / np.linalg.norm(r) ** 2, d


def _certified_or_failed(problem, info, rows):
    """Each row either failed or sits at the certified cost (float32's accuracy)."""
    cost = problem.certified_rss / 2
    slack = 1e-9 * float(problem.y.double().pow(2).sum())
    for s in rows:
        if bool(info.success[s]):
            assert float(info.cost[s]) <= 1.01 * cost + slack, (s, info.reasons()[s])


def test_batched_float32_mgh10_from_start_0_fails_as_the_single_driver():
    """Both starts as one float32 batch: row 0 stopped on xtol (code 6) with success at cost
    1.1e8 against the certified 44. Its gnorm there cannot be computed in float32 (the first
    Jacobian column's norm, ~4e38, overflows), and the single driver's check catches its
    own endpoint only by the float64 Gauss-Newton gain, which it runs for stops below
    machine precision; xtol = 1e-12 < eps_32 makes this xtol stop one. Row 0 now fails as
    'stalled' (numpy's float64 step from there predicts most of the cost away, by a move of
    many float32 units). Row 1 ends at the certified minimum with success, or short of it as
    'stalled', as float32 rounding leads it: the cost carries ~1e-3 of rounding there (y is
    7e3 times r), so the last steps along MGH10's flat valley are decided by rounding, and by
    the CPU's kernels (stalled at 1.08 times the certified cost on an AMD CPU with AVX2, a
    success where the test was written); a success anywhere else would be wrong."""
    problem = nist.load("MGH10", dtype=F32)
    fn = nist.residual_fn(problem)
    P, info = fo.least_squares(torch.func.vmap(fn), problem.starts.clone(), batched=True)
    assert info.reason[0] == STALLED and not info.success[0]
    assert info.reasons()[0].startswith("stalled")
    assert bool(info.success[1]) or int(info.reason[1]) == STALLED
    _certified_or_failed(problem, info, (0, 1))
    x, y = problem.x.double().numpy(), problem.y.double().numpy()
    f, J = _mgh10_jacobian(P[0], x)
    gain, d = _numpy_gain(J, f - y)
    assert gain > 0.5 and float(info.cost[0]) > 1e6 * problem.certified_rss / 2
    assert np.max(np.abs(d) / (np.finfo(np.float32).eps * np.abs(P[0].double().numpy()))) > 1e6
    _, single = fo.least_squares(fn, problem.starts[0].clone())
    assert not single.success and single.reason.startswith("stalled")


@pytest.mark.parametrize("name", ["Lanczos1", "Lanczos2", "Lanczos3", "MGH09", "MGH10"])
def test_float32_nist_batched_success_is_the_certified_minimum(name):
    """Both starts in float32: these batches ended with success (codes 6, 7, 8) at 3 to 3e19
    times the certified cost on some row; each row now fails or sits at the certified
    minimum."""
    problem = nist.load(name, dtype=F32)
    _, info = fo.least_squares(torch.func.vmap(nist.residual_fn(problem)),
                               problem.starts.clone(), batched=True)
    _certified_or_failed(problem, info, (0, 1))


@pytest.mark.parametrize("rule", [fo.TrustRegion(), fo.Nielsen(), fo.Classic()],
                         ids=["trust-region", "nielsen", "classic"])
def test_float32_zero_residual_rows_keep_their_success(rule):
    """Rows whose data the model reproduces (up to float32's rounding of ``y``): their stops
    below machine precision take the gain check and keep their success, next to MGH10's
    start 0, which fails."""
    problem = nist.load("MGH10", dtype=F32)
    x = problem.x
    y0 = problem.model(problem.certified, x)
    Y = torch.stack([problem.y, y0, y0])
    P0 = torch.stack([problem.starts[0], problem.starts[1], problem.certified * 1.01])
    fit = lambda P: P[:, :1] * torch.exp(P[:, 1:2] / (x + P[:, 2:3])) - Y  # noqa: E731
    _, info = fo.least_squares(fit, P0.clone(), batched=True)
    assert info.success.tolist() == [False, True, True]
    assert (info.residual_norm[1:] <= 1e-6 * float(y0.double().norm())).all()
    t = torch.linspace(0, 4, 20, dtype=F32)
    true = torch.tensor([[2.5, 1.3, 0.5], [1.0, 0.3, -1.0], [4.0, 2.0, 0.0]], dtype=F32)
    Yt = true[:, :1] * torch.exp(-true[:, 1:2] * t) + true[:, 2:3]
    _, info = fo.least_squares(lambda P: P[:, :1] * torch.exp(-P[:, 1:2] * t) + P[:, 2:3] - Yt,
                               torch.tensor([[1.0, 1.0, 0.0]] * 3), batched=True, rule=rule)
    assert info.success.all() and (info.residual_norm <= 1e-5).all(), info.reasons()


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(0, 6), st.integers(0, 2**31 - 1))
def test_the_batched_gain_is_the_single_drivers_and_numpys(n, extra, seed):
    """Random ``J`` (columns scaled over 6 decades) and ``r``: the batched gain and move
    equal the single driver's (an SVD of ``J``) and numpy's lstsq, and the triangular form
    ``(R_11, R_12, |R_22|)`` of ``[J r]`` (numpy's QR) gives the same numbers."""
    rng = np.random.default_rng(seed)
    m = n + extra + 1
    J = rng.standard_normal((m, n)) * 10.0 ** rng.uniform(-3, 3, n)
    r = rng.standard_normal(m)
    x = rng.uniform(0.5, 2.0, n)
    Jt, rt, xt = torch.tensor(J), torch.tensor(r), torch.tensor(x)
    gain, ulps = gauss_newton_gain(Jt[None], rt[None], torch.zeros(1, dtype=F64), xt[None], m)
    ref_gain, ref_ulps = single_gain(Jt, rt, xt)
    np_gain, d = _numpy_gain(J, r)
    np.testing.assert_allclose(float(gain), ref_gain, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(float(gain), np_gain, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(float(ulps), ref_ulps, rtol=1e-7)
    np.testing.assert_allclose(float(ulps), np.max(np.abs(d) / (np.finfo(float).eps * x)),
                               rtol=1e-6)
    R = torch.tensor(np.linalg.qr(np.column_stack([J, r]), mode="r"))
    tri = gauss_newton_gain(R[None, :n, :n], R[None, :n, n], R[n, n].abs()[None], xt[None], m)
    np.testing.assert_allclose(float(tri[0]), float(gain), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(float(tri[1]), float(ulps), rtol=1e-6)


def test_the_single_drivers_check_at_the_batched_mgh10_point():
    """At the batched fit's MGH10 point a stop on xtol (xtol = 1e-12 < eps_32) is one below
    machine precision under another name; the single driver's check gives it success (its
    gnorm is unknown there and the gain check does not run), and 'stalled' to the same
    point under the name 'xtol below machine precision'."""
    problem = nist.load("MGH10", dtype=F32)
    fn = nist.residual_fn(problem)
    x = torch.tensor([1.4070022234982272e-34, 384096.875, 4308.37939453125])
    tols = (1e-14, 1e-12, 1e-14, torch.finfo(F32).eps)
    h = {"accepted": True, "grad_cos": 0.5}
    named = _stall_check(fn, x, h, tols, "xtol below machine precision: no further", 48)
    assert not named[1]
    assert not _stall_check(fn, x, h, tols, "xtol: relative step below xtol", 48)[1]


# --------------------------------------------------------------------------- data-parallel


def _flip(z):
    """``z`` in value, ``-dz`` in derivative: a residual whose Jacobian has the wrong sign."""
    return 2 * z.detach() - z


def _pair(k, c):
    """``(1000 p0, p1 - c)`` whose second Jacobian entry is ``1 - 2 k``."""
    return lambda p: torch.stack([1000 * p[0], k * _flip(p[1]) + (1 - k) * p[1] - c])


def _gnorm(r, J):
    col = np.linalg.norm(J, axis=0)
    return float(np.max(np.abs(J.T @ r) / (col * np.linalg.norm(r))))


PAIRS = [(1.0, 1000.0, (50.0, 500.0)), (0.0, 1000.0, (50.0, 500.0)),
         (1.0, -300.0, (20.0, -150.0)), (0.0, 7.0, (-3.0, 1.0))]


@pytest.mark.parametrize("rule", [fo.TrustRegion(), fo.Nielsen(), fo.Classic()],
                         ids=["trust-region", "nielsen", "classic"])
@pytest.mark.parametrize("tol", [fo.Tolerances(), fo.Tolerances(1e-8, 1e-8, 1e-8),
                                 fo.Tolerances(0.0, 0.0, 0.0)],
                         ids=["default", "loose", "machine-precision"])
def test_parallel_one_process_agrees_with_the_single_driver(rule, tol):
    """The wrong-sign-Jacobian pairs (and the exact ones, whose Nielsen and Classic fits end
    at p0 ~ 1e-24 on xtol) ended with success in the data-parallel driver on 28 of these 36
    fits where the single driver says stalled; now every success agrees, and a success is
    a zero residual or a point whose numpy gnorm is below 1e-6."""
    for k, c, p0 in PAIRS:
        x0 = torch.tensor(p0, dtype=F64)
        p, info = least_squares_parallel(_pair(k, c), x0, rule=rule, tolerances=tol)
        _, single = fo.least_squares(_pair(k, c), x0, rule=rule, tolerances=tol)
        assert bool(info.success[0]) == single.success, (k, c, single.reason,
                                                         info.reasons()[0])
        r = np.array([1000 * float(p[0]), float(p[1]) - c])
        if info.success[0] and np.linalg.norm(r) > 0:
            assert _gnorm(r, np.diag([1000.0, 1.0])) <= 1e-6
        if not info.success[0] and single.reason.startswith("stalled"):
            assert info.reason[0] == STALLED


@pytest.mark.parametrize("name", ["BoxBOD", "Lanczos1", "Lanczos2", "Lanczos3", "MGH09",
                                  "MGH10"])
def test_float32_nist_parallel_success_is_the_certified_minimum(name):
    """float32, one process: these data-parallel fits ended with success (codes 4, 7, 8) at
    1.06 to 3e19 times the certified cost from some start; each now fails or sits at the
    certified minimum."""
    problem = nist.load(name, dtype=F32)
    for s in range(2):
        _, info = least_squares_parallel(nist.residual_fn(problem), problem.starts[s].clone())
        _certified_or_failed(problem, info, (0,))


T = torch.linspace(0, 4, 20, dtype=F64)
Y = 2.5 * torch.exp(-1.3 * T) + 0.5 + 0.01 * torch.sin(7 * T)


def _rounded(t, y):
    """float64 parameters, residuals computed in float32."""
    return lambda p: (p[0].float() * torch.exp(-p[1].float() * t.float()) + p[2].float()
                      - y.float()).double()


def test_parallel_residuals_rounded_to_float32_stall_as_the_single_driver():
    """The fit ended on 'ftol and xtol' with success, gnorm ~4e-6 (gnorm^2 above ftol and
    the measured rounding); the single driver says stalled, so does the parallel one now."""
    x0 = torch.tensor([1.0, 1.0, 0.0], dtype=F64)
    _, info = least_squares_parallel(_rounded(T, Y), x0)
    _, single = fo.least_squares(_rounded(T, Y), x0)
    assert single.reason.startswith("stalled") and info.reason.tolist() == [STALLED]


def _cases(rank, world):
    """(name, residual shard, x0) of the two-process test; shard = rows rank::world."""
    mgh = nist.load("MGH10", dtype=F32)
    sh = slice(rank, None, world)
    exact = lambda p: p[0] * torch.exp(-p[1] * T[sh]) + p[2] - Y[sh]  # noqa: E731
    mgh_fn = lambda b: mgh.model(b, mgh.x[sh]) - mgh.y[sh]  # noqa: E731
    return [
        ("wrong-sign", lambda p: _pair(1.0, 1000.0)(p)[sh], torch.tensor([50.0, 500.0], dtype=F64)),
        ("zero-residual", lambda p: _pair(0.0, 1000.0)(p)[sh], torch.tensor([50.0, 500.0], dtype=F64)),
        ("rounded", _rounded(T[sh], Y[sh]), torch.tensor([1.0, 1.0, 0.0], dtype=F64)),
        ("exact", exact, torch.tensor([1.0, 1.0, 0.0], dtype=F64)),
        ("mgh10-float32", mgh_fn, mgh.starts[1].clone()),
    ]


def _run_cases(rank, world):
    out = {}
    for name, fn, x0 in _cases(rank, world):
        p, info = least_squares_parallel(fn, x0)
        out[name] = (p, info)
    A = torch.tensor(np.random.default_rng(5).standard_normal((9, 4)))
    out["R"] = _stacked_r(A[rank::world], None)
    return out


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        torch.save(_run_cases(rank, WORLD), os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_give_every_rank_the_same_stall_codes():
    """Residuals split over 2 gloo processes: the wrong-sign pair and the float32-rounded fit
    fail, the zero-residual pair and the exact fit succeed, with equal codes on both ranks and
    those of one process; the stacked triangular factor has numpy's R^T R. float32 MGH10 from
    start 1 (which ended with success at 22 times the certified cost) gives equal results on
    both ranks, and with one or two processes succeeds at the certified minimum or fails as
    'stalled': ``J^T J`` summed in another order changes its float32 steps in their leading
    digits (MGH10's scaled Jacobian has a condition number of 3e3 at the minimum: float32
    normal equations keep none, cond^2 eps_32 ~ 1), so where the fit ends is decided by
    rounding (on a CPU with AVX2 two processes end at the minimum and one process stalls at
    50 times it)."""
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_worker, args=(os.path.join(d, "init"), d), nprocs=WORLD,
                           join=True, start_method="spawn")
        ranks = [torch.load(os.path.join(d, f"{r}.pt"), weights_only=False)
                 for r in range(WORLD)]
    one = _run_cases(0, 1)
    want = {"wrong-sign": False, "zero-residual": True, "rounded": False, "exact": True,
            "mgh10-float32": None}
    for name, ok in want.items():
        (p0, i0), (p1, i1) = ranks[0][name], ranks[1][name]
        assert torch.equal(p0, p1) and all(torch.equal(a, b) for a, b in zip(i0, i1)), name
        if ok is None:  # decided by rounding: at the minimum, or stalled short of it
            mgh = nist.load("MGH10", dtype=F32)
            for info in (i0, one[name][1]):
                assert bool(info.success[0]) or info.reason.tolist() == [STALLED], name
                _certified_or_failed(mgh, info, (0,))
            continue
        assert bool(i0.success[0]) == ok == bool(one[name][1].success[0]), (name, i0.reasons())
        if not ok:
            assert i0.reason.tolist() == one[name][1].reason.tolist() == [STALLED], name
    A = np.random.default_rng(5).standard_normal((9, 4))
    for out in ranks + [one]:
        R = out["R"].numpy()
        np.testing.assert_allclose(R.T @ R, A.T @ A, rtol=1e-12, atol=1e-12)
        assert np.allclose(np.tril(R, -1), 0.0)
