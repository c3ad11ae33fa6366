"""Levenberg-Marquardt against a float64 dense transcription of the damped Gauss-Newton step."""

import numpy as np
import pytest
import torch

import funcopt as fo
from funcopt.testing import check_transform, check_vmap

DEFAULT_DTYPE = torch.float64  # applied per test by tests/conftest.py
X = np.linspace(0.0, 3.0, 12)
Y = 2.5 * np.exp(-1.3 * X) + 0.1 * np.sin(7 * X)


def residual(p):
    return p[0] * torch.exp(-p[1] * torch.as_tensor(X)) - torch.as_tensor(Y)


def reference_step(p, lam):
    """numpy float64: analytic J, D = diag(col norms^2), delta = -(J^T J + lam D)^-1 J^T r."""
    a, b = p
    e = np.exp(-b * X)
    J = np.stack([e, -a * X * e], axis=1)
    r = a * e - Y
    D = np.diag((J**2).sum(0))
    delta = -np.linalg.solve(J.T @ J + lam * D, J.T @ r)
    pred = 0.5 * np.sum((J @ delta) ** 2) + lam * delta @ D @ delta
    cost = 0.5 * r @ r
    new = 0.5 * np.sum(((a + delta[0]) * np.exp(-(b + delta[1]) * X) - Y) ** 2)
    return delta, (cost - new) / pred


SOLVERS = ["auto", "cholesky", "lu", "qr", "lstsq", "svd"]


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("form", ["primal", "dual", "auto"])
def test_first_step_is_exact_damped_gauss_newton_step(solver, form):
    p0 = np.array([2.0, 1.0])
    lam = 1e-2
    tx = fo.levenberg_marquardt(residual, rule=fo.Nielsen(initial_damping=lam), solver=solver,
                                form=form)
    state = tx.init(torch.tensor(p0))
    step, state = tx.update(None, state, torch.tensor(p0))
    delta, rho = reference_step(p0, lam)
    np.testing.assert_allclose(step.numpy(), delta, rtol=1e-7, atol=1e-12)
    assert bool(state.accepted)
    np.testing.assert_allclose(float(state.gain_ratio), rho, rtol=1e-6)
    # Nielsen's rule: lambda *= max(1/3, 1 - (2 rho - 1)^3)
    np.testing.assert_allclose(float(state.damping), lam * max(1 / 3, 1 - (2 * rho - 1) ** 3), rtol=1e-6)


@pytest.mark.cupynumeric
def test_cupynumeric_solver_gives_the_same_step():
    pytest.importorskip("cupynumeric", exc_type=ImportError)
    p0 = np.array([2.0, 1.0])
    tx = fo.levenberg_marquardt(residual, rule=fo.Nielsen(initial_damping=1e-2),
                                solver="cupynumeric")
    step, _ = tx.update(None, tx.init(torch.tensor(p0)), torch.tensor(p0))
    np.testing.assert_allclose(step.numpy(), reference_step(p0, 1e-2)[0], rtol=1e-7)


def test_least_squares_matches_scipy_minpack():
    scipy_opt = pytest.importorskip("scipy.optimize")
    p0 = np.array([1.0, 0.5])
    ref = scipy_opt.least_squares(lambda v: v[0] * np.exp(-v[1] * X) - Y, p0, method="lm",
                                  xtol=1e-15, ftol=1e-15, gtol=1e-15)
    p, info = fo.least_squares(residual, torch.tensor(p0))
    np.testing.assert_allclose(p.numpy(), ref.x, rtol=1e-9)
    np.testing.assert_allclose(info.cost, ref.cost, rtol=1e-9)
    assert info.success and info.steps == len(info.history)


def test_non_finite_candidate_is_rejected_and_damping_raised():
    def guarded(p):  # NaN when the parameter leaves (-1, 1): the full GN step lands there
        r = p[0] ** 2 - 9.0
        bad = torch.where(p[0].abs() < 1.0, torch.full_like(p[0], float("nan")), torch.zeros_like(p[0]))
        return torch.stack([r + bad, p[0] * 0.0 + bad])

    x0 = torch.tensor([1.05])
    tx = fo.levenberg_marquardt(guarded, rule=fo.Nielsen(initial_damping=1e-6), max_attempts=1,
                                scaling=False)
    state = tx.init(x0)
    step, state = tx.update(None, state, x0)
    assert not bool(state.accepted) and float(state.damping) > 1e-6 * 4 * 1.05**2
    assert torch.equal(step, torch.zeros(1))
    p, info = fo.least_squares(guarded, x0, max_steps=200)
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p, torch.tensor([3.0]))


def test_rank_deficient_jacobian():
    # r depends on a + b only: J has two equal columns; LM still moves to a + b = 3.
    fn = lambda p: torch.stack([p[0] + p[1] - 3.0, 2.0 * (p[0] + p[1]) - 6.0])
    p, info = fo.least_squares(fn, torch.tensor([0.0, 0.0]))
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.sum(), torch.tensor(3.0))
    assert info.cost < 1e-20


def test_wrong_shapes_are_reported():
    with pytest.raises(ValueError, match="1-D"):
        fo.least_squares(lambda p: p.reshape(1, -1), torch.ones(2))
    with pytest.raises(ValueError, match="1-D"):
        fo.least_squares(lambda p: p.sum(), torch.ones(2))
    calls = []

    def shifting(p):
        calls.append(1)
        return p if len(calls) < 2 else torch.cat([p, p])  # the first call is at x

    tx = fo.levenberg_marquardt(shifting)
    with pytest.raises(ValueError, match="same number"):
        tx.update(None, tx.init(torch.ones(2)), torch.ones(2))
    with pytest.raises(ValueError, match="needs the current parameters"):
        tx.update(None, tx.init(torch.ones(2)))


XT, YT = torch.tensor(X), torch.tensor(Y)  # tensors, not numpy: torch.compile traces them


def residual_t(p):
    return p[0] * torch.exp(-p[1] * XT) - YT


def test_integer_leaves_get_zero_updates_and_contract_holds():
    params = {"w": torch.tensor([2.0, 1.0]), "n": torch.tensor(4)}
    fn = lambda p, batch: residual_t(p["w"]) * batch
    tx = fo.levenberg_marquardt(fn)
    state = tx.init(params)
    upd, state = tx.update(None, state, params, batch=torch.tensor(1.0))
    assert upd["n"].dtype == torch.int64 and int(upd["n"]) == 0
    # check_vmap scales every leaf by a float (funcopt.testing), which an int64 leaf cannot
    # take: the vmap check runs on the float leaves, the rest of the contract on the whole tree
    check_transform(tx, params, vmap=False, batch=torch.tensor(1.0))
    check_vmap(fo.levenberg_marquardt(lambda p: residual_t(p["w"])), {"w": params["w"]})


def test_chains_with_other_transforms():
    p0 = torch.tensor([2.0, 1.0])
    lm = fo.levenberg_marquardt(residual, rule=fo.Nielsen(initial_damping=1e-2))
    half = fo.chain(fo.levenberg_marquardt(residual, rule=fo.Nielsen(initial_damping=1e-2)),
                    fo.scale(0.5))
    s1, _ = lm.update(None, lm.init(p0), p0)
    s2, _ = half.update(None, half.init(p0), p0)
    torch.testing.assert_close(s2, 0.5 * s1)


def test_residual_adapters_match_torch_losses():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(4, 3, generator=g)
    x = torch.randn(10, 4, generator=g)
    model = lambda p, inp: inp @ p
    y = torch.randn(10, 3, generator=g)
    r = fo.mse_residuals(model)(W, (x, y))
    torch.testing.assert_close(0.5 * r @ r, 0.5 * torch.nn.functional.mse_loss(x @ W, y))
    labels = torch.randint(0, 3, (10,), generator=g)
    r = fo.cross_entropy_residuals(model, eps=0.0)(W, (x, labels))
    torch.testing.assert_close(0.5 * r @ r, torch.nn.functional.cross_entropy(x @ W, labels))
    with pytest.raises(ValueError, match="shape"):
        fo.mse_residuals(model)(W, (x, y[:, :2]))


@pytest.mark.parametrize("h", [None, 0.1])
def test_geodesic_acceleration_step(h):
    p0 = np.array([2.0, 1.0])
    lam = 1e-2
    tx = fo.levenberg_marquardt(residual, rule=fo.Nielsen(initial_damping=lam),
                                geodesic=fo.Geodesic(fd_step=h))
    step, state = tx.update(None, tx.init(torch.tensor(p0)), torch.tensor(p0))
    delta, _ = reference_step(p0, lam)
    a, b = p0
    e = np.exp(-b * X)
    J = np.stack([e, -a * X * e], axis=1)
    D = np.diag((J**2).sum(0))
    if h is None:  # second directional derivative of r along delta, by hand
        rvv = -2 * delta[0] * delta[1] * X * e + a * delta[1] ** 2 * X**2 * e
    else:  # Transtrum & Sethna's finite difference
        rh = (a + h * delta[0]) * np.exp(-(b + h * delta[1]) * X) - Y
        rvv = (2 / h) * ((rh - (a * e - Y)) / h - J @ delta)
    acc = -np.linalg.solve(J.T @ J + lam * D, J.T @ rvv)
    np.testing.assert_allclose(step.numpy(), delta + 0.5 * acc, rtol=1e-7)


def _tanh_problem(n=12, m=40):
    g = torch.Generator().manual_seed(3)
    A = torch.randn(m, n, generator=g) / n**0.5
    y = torch.tanh(A @ torch.randn(n, generator=g))
    return (lambda w: torch.tanh(A @ w) - y), A, y


@pytest.mark.parametrize("solver, rtol", [("cg", 1e-3), (fo.solvers.CG(tol=1e-12), 1e-9)])
def test_matrix_free_cg_step_equals_dense_step(solver, rtol):
    fn, A, y = _tanh_problem()
    w0 = 0.1 * torch.ones(12)
    lam = 1e-1
    tx = fo.levenberg_marquardt(fn, rule=fo.Nielsen(initial_damping=lam), solver=solver)
    step, state = tx.update(None, tx.init(w0), w0)
    # float64 dense reference with D = I: J of tanh(A w) - y by hand
    An, wn = A.numpy(), w0.numpy()
    t = np.tanh(An @ wn)
    J = (1 - t**2)[:, None] * An
    delta = -np.linalg.solve(J.T @ J + lam * np.eye(12), J.T @ (t - y.numpy()))
    np.testing.assert_allclose(step.numpy(), delta, rtol=rtol, atol=rtol * np.abs(delta).max())
    assert float(state.grad_cos) == float("inf")


@pytest.mark.parametrize("solver, rtol", [("cg", 1e-3),
                                          (fo.solvers.CG(tol=1e-12, preconditioner="jacobi"), 1e-8)])
def test_matrix_free_scaled_step_equals_dense_scaled_step(solver, rtol):
    """scaling=True on the matrix-free path (D from diag(J^T J), no J formed) gives the
    dense path's scaled step and its MINPACK gnorm, in float64 numpy math."""
    fn, A, y = _tanh_problem()
    An, yn = A.double().numpy(), y.double().numpy()
    w0 = 0.1 * torch.ones(12, dtype=torch.float64)
    lam = 1e-1
    tx = fo.levenberg_marquardt(lambda w: torch.tanh(A.double() @ w) - y.double(),
                                rule=fo.Nielsen(initial_damping=lam), solver=solver,
                                scaling=True)
    step, state = tx.update(None, tx.init(w0), w0)
    t = np.tanh(An @ w0.numpy())
    J, r = (1 - t**2)[:, None] * An, t - yn
    d2 = (J * J).sum(0)
    delta = -np.linalg.solve(J.T @ J + lam * np.diag(d2), J.T @ r)
    np.testing.assert_allclose(step.numpy(), delta, rtol=rtol, atol=rtol * np.abs(delta).max())
    gnorm = np.max(np.abs(J.T @ r) / np.sqrt(d2)) / np.linalg.norm(r)
    np.testing.assert_allclose(float(state.grad_cos), gnorm, rtol=1e-10)


def test_matrix_free_least_squares_converges():
    fn, A, y = _tanh_problem()
    w, info = fo.least_squares(fn, torch.zeros(12), solver="cg", rule=fo.Nielsen(),
                               max_steps=100)
    assert info.cost < 1e-16, info.reason


def test_trust_region_step_has_the_trust_radius_length():
    """Moré's rule: lambda makes ||d * delta|| = Delta_0 = factor ||d x_0|| within 10%, and the
    step is the exact damped Gauss-Newton step at that lambda."""
    p0 = np.array([2.0, 1.0])
    factor = 0.05
    tx = fo.levenberg_marquardt(residual, rule=fo.TrustRegion(radius_factor=factor))
    step, state = tx.update(None, tx.init(torch.tensor(p0)), torch.tensor(p0))
    lam = float(state.damping)
    assert lam > 0
    delta, _ = reference_step(p0, lam)
    np.testing.assert_allclose(step.numpy(), delta, rtol=1e-7)
    a, b = p0
    e = np.exp(-b * X)
    d = np.linalg.norm(np.stack([e, -a * X * e], axis=1), axis=0)
    radius0 = factor * np.linalg.norm(d * p0)
    assert 0.9 * radius0 <= np.linalg.norm(d * delta) <= 1.1 * radius0


def test_trust_region_least_squares_matches_minpack_on_badly_scaled_problem():
    scipy_opt = pytest.importorskip("scipy.optimize")
    p0 = np.array([10.0, 0.01])
    ref = scipy_opt.least_squares(lambda v: v[0] * np.exp(-v[1] * X) - Y, p0, method="lm",
                                  xtol=1e-15, ftol=1e-15, gtol=1e-15)
    p, info = fo.least_squares(residual, torch.tensor(p0), rule=fo.TrustRegion())
    np.testing.assert_allclose(p.numpy(), ref.x, rtol=1e-9)
    with pytest.raises(ValueError, match="dense Jacobian"):
        fo.levenberg_marquardt(residual, rule=fo.TrustRegion(), solver="cg")


# ------------------------------------------------------------------ memory model, matrix-free


def test_memory_path_follows_the_model():
    from funcopt.least_squares import memory_path

    m, n, b = 200, 50, 8
    dense = (m * n + n * n) * b  # J and the normal matrix
    assert memory_path(m, n, b, None) == "dense"
    assert memory_path(m, n, b, dense) == "dense"
    assert memory_path(m, n, b, dense - 1) == "matrix-free"
    assert memory_path(30, 500, b, (30 * 500 + 30 * 30) * b) == "dense"  # dual: m^2
    assert memory_path(m, n, b, 4 * (m + n) * b) == "matrix-free"
    with pytest.raises(ValueError, match="below the matrix-free path"):
        memory_path(m, n, b, 4 * (m + n) * b - 1)


def _wide_problem():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(200, 50, generator=g, dtype=torch.float64) * torch.logspace(0, 2, 50)
    y = torch.randn(200, generator=g, dtype=torch.float64)
    return lambda p: torch.tanh(A @ p / 100) * 3 - y


def test_matrix_free_path_takes_the_dense_paths_steps():
    """CG with the column-norm Jacobi preconditioner (no J formed) against the dense Cholesky
    step with the same damping sequence (Nielsen, D = I), five updates."""
    fn = _wide_problem()
    p0 = torch.zeros(50, dtype=torch.float64)
    J, _ = fo.func.jacobian(fn, p0)
    lam0 = 1e-3 * float((J * J).sum(0).max())  # the dense path's tau * max diag(J^T J)
    dense = fo.levenberg_marquardt(fn, scaling=False, solver="cholesky")
    free = fo.levenberg_marquardt(fn, rule=fo.Nielsen(initial_damping=lam0),
                                  solver=fo.solvers.CG(tol=1e-12, preconditioner="jacobi"))
    pd = pf = p0
    sd, sf = dense.init(p0), free.init(p0)
    for _ in range(5):
        ud, sd = dense.update(None, sd, pd)
        uf, sf = free.update(None, sf, pf)
        torch.testing.assert_close(uf, ud, rtol=1e-8, atol=1e-12)
        pd, pf = pd + ud, pf + uf
    torch.testing.assert_close(sf.damping, sd.damping, rtol=1e-10, atol=0)


def test_least_squares_over_budget_goes_matrix_free_to_scipys_answer():
    so = pytest.importorskip("scipy.optimize")
    fn = _wide_problem()
    p0 = torch.zeros(50, dtype=torch.float64)
    p, info = fo.least_squares(fn, p0, memory_budget=50_000,
                               tolerances=fo.Tolerances(ftol=1e-12, xtol=1e-12))
    assert info.path == "matrix-free" and info.success, info.reason
    ref = so.least_squares(lambda v: fn(torch.tensor(v)).numpy(), p0.numpy(), method="lm",
                           xtol=1e-14, ftol=1e-14, gtol=1e-14)
    np.testing.assert_allclose(info.cost, ref.cost, rtol=1e-8)
    _, dense = fo.least_squares(fn, p0, memory_budget=10**9)
    assert dense.path == "dense"
