"""An update rejected because its linear solves failed measures no step: it must not pass a
tolerance test, and a fit that cannot go on ends with a failure that names the solver."""

import math

import torch

import funcopt as fo
from funcopt.least_squares import _outcome, _record


def _wide_problem():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(200, 50, generator=g, dtype=torch.float64) * torch.logspace(0, 2, 50, dtype=torch.float64)
    y = torch.randn(200, generator=g, dtype=torch.float64)
    return lambda p: torch.tanh(A @ p / 100) * 3 - y


def _never_converges():
    return fo.solvers.CG(tol=0.0, atol=0.0, maxiter=3)  # a tolerance no iterate meets


def test_failed_solves_record_no_step_and_pass_no_tolerance_test():
    """Before: the failed solve gave a zero step and a predicted reduction of 0, and the
    ftol and xtol tests reported success."""
    fn = _wide_problem()
    tx = fo.levenberg_marquardt(fn, rule=fo.Nielsen(), solver=_never_converges(), max_attempts=2)
    p = torch.full((50,), 0.01, dtype=torch.float64)
    _, state = tx.update(None, tx.init(p), p)
    h = _record(state)
    assert not h["accepted"] and h["solve_failed"]
    assert math.isnan(h["step_norm"]) and math.isnan(h["predicted_reduction"])
    eps = torch.finfo(torch.float64).eps
    reason, success = _outcome(h, (1e-8, 1e-8, 1e-8, eps), (1e16, False, 1e-300), [h])
    assert not success and reason is None  # the damping can still rise: go on


def test_fit_whose_solves_always_fail_ends_with_the_solver_failure():
    fn = _wide_problem()
    p, info = fo.least_squares(fn, torch.zeros(50, dtype=torch.float64), rule=fo.Nielsen(),
                               solver=_never_converges())
    assert not info.success
    assert "linear solver failed" in info.reason, info.reason
    assert all(h["solve_failed"] for h in info.history)
    torch.testing.assert_close(p, torch.zeros(50, dtype=torch.float64))


def test_ordinary_matrix_free_fit_still_succeeds():
    """The same problem with a CG that converges: success at scipy's cost (70.99145...)."""
    fn = _wide_problem()
    _, info = fo.least_squares(fn, torch.zeros(50, dtype=torch.float64), rule=fo.Nielsen(),
                               solver=fo.solvers.CG(tol=1e-12, preconditioner="jacobi"),
                               tolerances=fo.Tolerances(ftol=1e-12, xtol=1e-12))
    assert info.success, info.reason
    assert not any(h["solve_failed"] for h in info.history)
    assert abs(info.cost - 70.99145384823066) <= 1e-8 * 70.99
