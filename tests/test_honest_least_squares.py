"""Honest numerics of least_squares, Levenberg-Marquardt and the solver layer: badly scaled but
well-posed problems are solved (or fail with the cause), never reported converged where they
started; bad input raises before any work. References: numpy/scipy float64."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import funcopt as fo

DEFAULT_DTYPE = torch.float64
S = fo.solvers
RULES = [fo.TrustRegion(), fo.Nielsen(), fo.Classic()]
X = np.linspace(0.0, 3.0, 12)
Y = 2.5 * np.exp(-1.3 * X) + 0.1 * np.sin(7 * X)


def _constant(scale, dtype):
    return lambda a: (a - 3) * scale * torch.ones(4, dtype=a.dtype)


# ------------------------------------------------------------------ least_squares: scale


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("scale, dtype", [(1e-200, torch.float64), (1e-25, torch.float32),
                                          (1e200, torch.float64), (1e30, torch.float32)])
def test_badly_scaled_residuals_are_solved(rule, scale, dtype):
    """r = (a - 3) * scale * ones(4) from a = 1: the cost 0.5 ||r||^2 under- or overflows, the
    norms do not; the answer a = 3 is independent of the scale."""
    a, info = fo.least_squares(_constant(scale, dtype), torch.tensor([1.0], dtype=dtype),
                               rule=rule)
    assert info.success, info.reason
    torch.testing.assert_close(a, torch.tensor([3.0], dtype=dtype))
    assert info.residual_norm < 1e-6 * 4 * scale


def _exp_residual(scale):
    def fn(p):
        return (p[0] * torch.exp(-p[1] * torch.as_tensor(X)) - torch.as_tensor(Y)) * scale
    return fn


@pytest.fixture(scope="module")
def minpack_solution():
    scipy_opt = pytest.importorskip("scipy.optimize")
    ref = scipy_opt.least_squares(lambda v: v[0] * np.exp(-v[1] * X) - Y, np.array([1.0, 0.5]),
                                  method="lm", xtol=1e-15, ftol=1e-15, gtol=1e-15)
    return ref.x


@settings(max_examples=20, deadline=None)
@given(k=st.integers(-300, 300), rule=st.sampled_from(RULES))
def test_scaled_problem_stops_where_the_unscaled_one_does(minpack_solution, k, rule):
    """Multiplying the residuals by 10^k changes no stopping test: the fit succeeds and gives
    MINPACK's (scipy) answer of the unscaled problem."""
    p, info = fo.least_squares(_exp_residual(10.0**k), torch.tensor([1.0, 0.5]), rule=rule)
    assert info.success, (k, info.reason)
    np.testing.assert_allclose(p.numpy(), minpack_solution, rtol=1e-8)


def test_overflowing_cost_at_the_start_is_never_success_unmoved():
    """cost = inf at the start (||r|| = 4e200): solved through the norms, cost reported 0."""
    a, info = fo.least_squares(_constant(1e200, torch.float64), torch.tensor([1.0]))
    assert info.history[0]["cost"] == math.inf and math.isfinite(info.history[0]["residual_norm"])
    assert info.success and float(a) == pytest.approx(3.0) and info.cost == 0.0


# ------------------------------------------------------------------ least_squares: failures


@pytest.mark.parametrize("rule", RULES)
def test_residual_finite_only_at_the_start_fails_with_the_cause(rule):
    fn = lambda a: torch.where(a == 1, a - 3, torch.nan)  # noqa: E731
    a, info = fo.least_squares(fn, torch.tensor([1.0]), rule=rule)
    assert not info.success and "not finite" in info.reason
    assert float(a) == 1.0


@pytest.mark.parametrize("rule", RULES)
def test_residual_that_turns_nan_after_moving_fails_with_the_cause(rule):
    """Finite for a <= 2 only, minimum at a = 3: the iterates stop at the edge a = 2, which is
    no minimum (the gradient there is not zero)."""
    fn = lambda a: torch.where(a <= 2, a - 3, torch.nan)  # noqa: E731
    a, info = fo.least_squares(fn, torch.tensor([1.0]), rule=rule)
    assert not info.success and "not finite" in info.reason
    assert 1.0 < float(a) <= 2.0


def test_max_damping_is_a_failure():
    """No step from a = 1 reduces the cost (every other point has residual a + 100)."""
    fn = lambda a: torch.where(a == 1, a - 3, a + 100)  # noqa: E731
    a, info = fo.least_squares(fn, torch.tensor([1.0]), rule=fo.Nielsen(max_damping=1.0))
    assert not info.success and info.reason.startswith("damping reached max_damping")
    _, info = fo.least_squares(fn, torch.tensor([1.0]), rule=fo.Nielsen())
    assert not info.success and float(a) == 1.0


def test_start_point_never_left_is_not_success():
    fn = lambda a: torch.where(a == 1, a - 3, a + 100)  # noqa: E731
    for rule in RULES:
        a, info = fo.least_squares(fn, torch.tensor([1.0]), rule=rule)
        assert not info.success, (rule, info.reason)
        assert float(a) == 1.0


def test_solution_at_the_start_is_success():
    a, info = fo.least_squares(lambda a: a - 3, torch.tensor([3.0]))
    assert info.success and info.reason == "zero residual" and info.steps == 1


def test_mixed_dtypes_raise_before_any_work():
    calls = []

    def fn(a):
        calls.append(1)
        return (a.double() - 3) * torch.ones(3, dtype=torch.float64)

    with pytest.raises(TypeError, match=r"float64 residuals for torch.float32 param.*r.to\(torch.float32\)"):
        fo.least_squares(fn, torch.tensor([1.0], dtype=torch.float32))
    assert len(calls) == 1
    tx = fo.levenberg_marquardt(fn)
    p = torch.tensor([1.0], dtype=torch.float32)
    with pytest.raises(TypeError, match="float64 residuals for torch.float32"):
        tx.update(None, tx.init(p), p)


def test_state_reductions_are_minpacks_relative_ones():
    """actual_reduction = 1 - (||r_new|| / ||r||)^2, predicted_reduction = (L(0) - L(delta)) / F
    (numpy float64), the same at scale 1e-200 where F underflows to 0."""
    p0 = np.array([2.0, 1.0])
    out = []
    for scale in (1.0, 1e-200):
        tx = fo.levenberg_marquardt(_exp_residual(scale), rule=fo.Nielsen(initial_damping=1e-2))
        step, st_ = tx.update(None, tx.init(torch.tensor(p0)), torch.tensor(p0))
        out.append((step.numpy(), float(st_.actual_reduction), float(st_.predicted_reduction),
                    float(st_.residual_norm) / scale))
    a, b = p0
    r0 = a * np.exp(-b * X) - Y
    r1 = (a + out[0][0][0]) * np.exp(-(b + out[0][0][1]) * X) - Y
    np.testing.assert_allclose(out[0][1], 1 - (np.linalg.norm(r1) / np.linalg.norm(r0)) ** 2, rtol=1e-10)
    np.testing.assert_allclose(out[0][3], np.linalg.norm(r0), rtol=1e-14)
    for got, ref in zip(out[1], out[0]):
        np.testing.assert_allclose(got, ref, rtol=1e-9)


# ------------------------------------------------------------------ CG


def _spd(rng, n):
    U = np.linalg.qr(rng.standard_normal((n, n)))[0]
    return (U * np.geomspace(1.0, 10.0, n)) @ U.T


CG_CASES = [(1e300, torch.float64), (1e-300, torch.float64), (1e-310, torch.float64),
            (1e20, torch.float32), (1e-20, torch.float32), (1e38, torch.float32)]


@pytest.mark.parametrize("scale, dtype", CG_CASES)
@pytest.mark.parametrize("kind", ["dense-cg", "matrix-free-auto", "matrix-free-pcg"])
def test_cg_solves_systems_whose_norms_over_or_underflow(scale, dtype, kind):
    A64 = np.array([[2.0, 1.0], [1.0, 3.0]])
    b64 = np.array([1.0, 2.0])
    A, b = torch.tensor(A64 * scale, dtype=dtype), torch.tensor(b64 * scale, dtype=dtype)
    if kind == "dense-cg":
        sol = S.solve(S.dense(A, positive_definite=True), b, "cg")
    else:
        op = S.matrix_free(lambda v: A @ v, 2, dtype=dtype, device="cpu", positive_definite=True)
        sol = S.solve(op, b, "auto" if kind == "matrix-free-auto" else S.CG(preconditioner="jacobi"))
    assert bool(sol.success) and sol.solver == "cg"
    tol = 1e-5 if dtype == torch.float32 else 1e-9
    np.testing.assert_allclose(sol.x.double().numpy(), np.linalg.solve(A64, b64), rtol=tol * 10)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 6), k=st.integers(-300, 300), seed=st.integers(0, 2**31 - 1))
def test_cg_success_means_the_true_residual_meets_the_tolerance(n, k, seed):
    rng = np.random.default_rng(seed)
    A64, b64 = _spd(rng, n), rng.standard_normal(n)
    A, b = torch.tensor(A64 * 10.0**k), torch.tensor(b64 * 10.0**k)
    sol = S.solve(S.dense(A, positive_definite=True), b, S.CG(tol=1e-10))
    assert bool(sol.success)
    x = sol.x.numpy()
    true_rel = np.linalg.norm(b64 - A64 @ x) / np.linalg.norm(b64)  # unscaled, in float64
    assert true_rel <= 2e-10 and float(sol.residual_norm) <= 1e-10
    np.testing.assert_allclose(x, np.linalg.solve(A64, b64), rtol=1e-8, atol=1e-8)


def test_cg_that_cannot_meet_the_tolerance_reports_failure():
    """tol 1e-25 is below what float64 can resolve for this system: the recursive residual
    drops below it, the true one does not, so the answer is a failure."""
    rng = np.random.default_rng(3)
    U = np.linalg.qr(rng.standard_normal((8, 8)))[0]
    A = torch.tensor((U * np.geomspace(1.0, 1e10, 8)) @ U.T)
    A = (A + A.T) / 2
    sol = S.solve(S.dense(A, positive_definite=True), torch.ones(8), S.CG(tol=1e-25))
    assert not bool(sol.success) and torch.equal(sol.x, torch.zeros(8))
    assert float(sol.residual_norm) > 1e-25


# ------------------------------------------------------------------ symmetric solvers


@pytest.mark.parametrize("name", ["cholesky", "eigh"])
def test_symmetric_solvers_refuse_an_untagged_unsymmetric_matrix(name):
    A = torch.tensor([[2.0, 5.0], [0.0, 2.0]])
    b = torch.tensor([1.0, 1.0])
    with pytest.raises(ValueError, match=r"not tagged symmetric.*solver='lu'.*symmetric=True"):
        S.solve(A, b, name)
    np.testing.assert_allclose(S.solve(A, b, "lu").x.numpy(), [-0.75, 0.5])
    np.testing.assert_allclose(S.solve(A, b, "auto").x.numpy(), [-0.75, 0.5])
    spd = torch.tensor([[2.0, 1.0], [1.0, 2.0]])  # untagged but symmetric: solved
    np.testing.assert_allclose(S.solve(spd, b, name).x.numpy(), [1 / 3, 1 / 3])


# ------------------------------------------------------------------ damping and Gram overflow


@pytest.mark.parametrize("damping", [-1.0, torch.tensor(-1.0), torch.tensor(float("nan"))])
def test_negative_or_nan_damping_raises(damping):
    J, r = torch.randn(5, 3), torch.randn(5)
    with pytest.raises(ValueError, match="damping"):
        S.damped_least_squares(J, r, damping)
    with pytest.raises(ValueError, match="damping"):
        S.solve(S.gram(J, damping), J.T @ r)


def _lm_step_reference(J, r, lam):
    """(J^T J + lam I)^{-1} J^T r = J^T (J J^T + lam I)^{-1} r in numpy float64; the
    minimum-norm least-squares answer pinv(J) r when lam = 0."""
    J, r = J.numpy(), r.numpy()
    if lam == 0:
        return np.linalg.pinv(J) @ r
    if J.shape[0] < J.shape[1]:
        return J.T @ np.linalg.solve(J @ J.T + lam * np.eye(J.shape[0]), r)
    return np.linalg.solve(J.T @ J + lam * np.eye(J.shape[1]), J.T @ r)


@pytest.mark.parametrize("solver", ["auto", "cholesky", "lu", "qr", "lstsq", "svd", "eigh", "cg"])
@pytest.mark.parametrize("scale, lam", [(1e160, 0.0), (1e-170, 0.0), (1e100, 1e-2)])
@pytest.mark.parametrize("form", ["primal", "dual"])
def test_damped_least_squares_with_a_jacobian_whose_gram_overflows(solver, scale, lam, form):
    """(J^T J + lambda I) x = J^T r with J and r scaled by s and lambda by s^2 has the unscaled
    answer; J^T J itself overflows (s = 1e160) or underflows to 0 (s = 1e-170) in float64."""
    g = torch.Generator().manual_seed(0)
    J, r = torch.randn(6, 3, generator=g), torch.randn(6, generator=g)
    if form == "dual":
        J, r = J.T.contiguous(), torch.randn(3, generator=g)
    sol = S.damped_least_squares(J * scale, r * scale, lam * scale * scale,
                                 solver=S.CG(tol=1e-12) if solver == "cg" else solver, form=form)
    assert bool(sol.success)
    np.testing.assert_allclose(sol.x.numpy(), _lm_step_reference(J, r, lam), rtol=1e-8, atol=1e-12)


def test_damping_far_above_a_tiny_gram_gives_the_gradient_step():
    g = torch.Generator().manual_seed(1)
    J, r = torch.randn(6, 3, generator=g) * 1e-200, torch.randn(6, generator=g)
    sol = S.damped_least_squares(J, r, 2.0)
    assert bool(sol.success) and sol.solver == "diagonal"
    torch.testing.assert_close(sol.x, J.T @ r / 2.0, rtol=1e-14, atol=0)


def test_gram_operator_that_overflows_is_named():
    J = torch.ones(4, 2) * 1e200
    with pytest.raises(ValueError, match=r"Gram matrix J\^T J overflows.*[Rr]escale"):
        S.solve(S.gram(J, 1.0), torch.ones(2))


@pytest.mark.parametrize("name", ["cholesky", "lu", "qr", "lstsq", "svd", "eigh", "auto"])
def test_direct_solvers_report_a_non_finite_materialised_matrix(name):
    """A matrix-free operator whose matrix overflows: a failure, never a LAPACK error."""
    A = torch.tensor([[2.0, 1.0], [1.0, 3.0]]) * 1e308
    op = S.matrix_free(lambda v: A @ (v * 10.0), 2, dtype=torch.float64, device="cpu",
                       symmetric=True)
    sol = S.get(name).solve(op, torch.ones(2))
    assert not bool(sol.success) and torch.equal(sol.x, torch.zeros(2))
