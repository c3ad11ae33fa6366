"""The solver layer's lineax-shaped API: ``init`` factorises once, ``compute`` returns a
Solution with a result code; references are numpy float64 and call counts of the
factorisations."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
from torch import Tensor

import funcopt as fo
from funcopt.transforms.levenberg_marquardt import damped_gauss_newton_step
from funcopt.transforms.natural_gradient.kfac import _damped_inverse

S = fo.solvers
R = S.Result
F64 = torch.float64
NAMES = ["cholesky", "lu", "qr", "lstsq", "svd", "eigh", "cg", "pcg", "auto"]


def _spd():
    rng = np.random.default_rng(0)
    Q = np.linalg.qr(rng.standard_normal((4, 4)))[0]
    return (Q * np.array([1.0, 2.0, 5.0, 10.0])) @ Q.T


def _case(kind):
    """(operator, b, the numpy float64 answer a solver that succeeds must give)."""
    if kind == "spd":
        A = _spd()
        A = (A + A.T) / 2
        b = np.arange(1.0, 5.0)
        return S.dense(torch.tensor(A), positive_definite=True), b, np.linalg.solve(A, b)
    if kind == "indefinite":  # b^T A b = -1: CG's first curvature is negative
        A, b = np.diag([1.0, -4.0, 2.0]), np.ones(3)
        return S.dense(torch.tensor(A), symmetric=True), b, np.linalg.solve(A, b)
    if kind == "singular":  # an exactly zero pivot / eigenvalue; the pseudo-inverse answer
        A, b = np.diag([2.0, 0.0, 3.0]), np.ones(3)
        return S.dense(torch.tensor(A), symmetric=True), b, np.linalg.pinv(A) @ b
    if kind == "non_finite":
        A = np.eye(3)
        A[1, 1] = np.nan
        return S.dense(torch.tensor(A), positive_definite=True), np.ones(3), None
    A, b = np.array([[2.0, 5.0], [0.0, 2.0]]), np.ones(2)  # unsymmetric, not tagged
    return S.dense(torch.tensor(A)), b, np.linalg.solve(A, b)


OK = {R.success}
EXPECTED = {  # kind -> solver -> the codes allowed
    "spd": dict.fromkeys(NAMES, OK),
    "indefinite": {**dict.fromkeys(NAMES, OK), "cholesky": {R.not_positive_definite},
                   "cg": {R.not_positive_definite}, "pcg": {R.not_positive_definite}},
    "singular": {"cholesky": {R.not_positive_definite}, "lu": {R.singular}, "qr": {R.singular},
                 "lstsq": OK, "svd": OK, "eigh": OK, "auto": OK,
                 # CG's iterates run off along the null space: any of its failure codes
                 "cg": {R.breakdown, R.max_steps, R.stagnation, R.not_positive_definite},
                 "pcg": {R.breakdown, R.max_steps, R.stagnation, R.not_positive_definite}},
    "non_finite": dict.fromkeys(NAMES, {R.non_finite}),
    "unsymmetric": {**dict.fromkeys(NAMES, OK), "cholesky": {R.not_symmetric},
                    "eigh": {R.not_symmetric}, "cg": {R.not_symmetric},
                    "pcg": {R.not_symmetric}},
}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", list(EXPECTED))
def test_result_codes_against_numpy(kind, name):
    op, b64, ref = _case(kind)
    solver = S.get(name)
    sol = solver.compute(solver.init(op), torch.tensor(b64))  # failure is a value: no raise
    code = sol.reason()
    assert code in EXPECTED[kind][name], (kind, name, code)
    assert bool(sol.success) == (code == R.success) and sol.result.dtype == torch.int64
    if code == R.success:
        np.testing.assert_allclose(sol.value.numpy(), ref, rtol=1e-9, atol=1e-12)
    else:
        assert torch.equal(sol.value, torch.zeros_like(sol.value))  # no NaN leaks


@pytest.mark.parametrize("name", NAMES)
def test_solve_still_raises_on_bad_input(name):
    """``solve`` (init + compute with checks) keeps raising where init/compute report."""
    op, b, _ = _case("non_finite")
    with pytest.raises(ValueError, match="NaN or inf"):
        S.get(name).solve(op, torch.tensor(b))
    op, b, _ = _case("unsymmetric")
    if EXPECTED["unsymmetric"][name] == {R.not_symmetric}:
        with pytest.raises(ValueError, match="not tagged symmetric"):
            S.get(name).solve(op, torch.tensor(b))


FACTORISATIONS = {"cholesky": "cholesky_ex", "auto": "cholesky_ex", "lu": "lu_factor_ex",
                  "qr": "qr", "svd": "eigh", "eigh": "eigh"}


def _count(monkeypatch, fn_name):
    calls = []
    real = getattr(torch.linalg, fn_name)

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, fn_name, counted)
    return calls


@pytest.mark.parametrize("name", NAMES)
def test_init_once_compute_many_equals_separate_solves(name, monkeypatch):
    op, _, _ = _case("spd")
    rng = np.random.default_rng(1)
    rhs = [torch.tensor(rng.standard_normal(4)), torch.tensor(rng.standard_normal((4, 3))),
           torch.tensor(rng.standard_normal(4))]
    separate = [S.get(name).solve(op, b) for b in rhs]
    calls = _count(monkeypatch, FACTORISATIONS.get(name, "cholesky_ex"))
    solver = S.get(name)
    state = solver.init(op)
    for b, ref in zip(rhs, separate):
        sol = solver.compute(state, b)
        assert torch.equal(sol.value, ref.value) and sol.solver == ref.solver
        np.testing.assert_allclose(sol.value.numpy(), np.linalg.solve(op.A.numpy(), b.numpy()),
                                   rtol=1e-8)
    assert len(calls) == (1 if name in FACTORISATIONS else 0)


def test_block_diagonal_state_reports_the_first_failing_block():
    blocks = [torch.eye(2, dtype=F64), -torch.eye(1, dtype=F64), torch.zeros(1, 1, dtype=F64)]
    op = S.block_diagonal([S.dense(x, symmetric=True) for x in blocks])
    chol = S.Cholesky()
    state = chol.init(op)
    assert int(state.result) == R.not_positive_definite
    sol = chol.compute(state, torch.ones(4, dtype=F64))
    assert sol.reason() == R.not_positive_definite and not bool(sol.value.any())
    lu = S.LU().compute(S.LU().init(op), torch.ones(4, dtype=F64))
    assert lu.reason() == R.singular  # the zero block


def test_gram_operators_hold_no_shared_mutable_cache():
    """A Gram operator is immutable: ``as_matrix`` stores nothing, and operators made by
    ``with_damping`` share only tensors (the Gram matrix ``with_gram`` formed, explicitly)."""
    g = torch.Generator().manual_seed(5)
    J = torch.randn(6, 3, generator=g, dtype=F64)
    op = S.gram(J, 0.5)
    before = dict(vars(op))
    torch.testing.assert_close(op.as_matrix(), J.T @ J + 0.5 * torch.eye(3, dtype=F64))
    assert vars(op) == before and op.gram is None
    for other in (op.with_damping(2.0), op.with_gram().with_damping(2.0)):
        assert all(isinstance(v, (Tensor, str, bool, tuple, torch.dtype, torch.device, type(None)))
                   for v in vars(other).values())
        np.testing.assert_allclose(other.as_matrix().numpy(),
                                   J.numpy().T @ J.numpy() + 2.0 * np.eye(3), rtol=1e-14)


def test_cg_reports_max_steps_and_stats():
    op, b, ref = _case("spd")
    short = S.CG(maxiter=1).compute(S.CG(maxiter=1).init(op), torch.tensor(b))
    assert short.reason() == R.max_steps and int(short.stats.iterations) == 1
    full = S.CG(tol=1e-12).solve(op, torch.tensor(b))
    assert full.reason() == R.success and float(full.stats.residual_norm) <= 1e-12
    np.testing.assert_allclose(full.value.numpy(), ref, rtol=1e-10)


@pytest.mark.parametrize("eager", [True, False])
def test_fallback_cholesky_then_eigh(eager):
    """Cholesky where it works, the eigh pseudo-inverse where it fails; eager and
    torch.where picking give the same numbers."""
    solver = S.Fallback(S.Cholesky(), S.SVD(hermitian=True), eager=eager)
    for kind in ("spd", "singular"):
        op, b, ref = _case(kind)
        op = S.dense(op.A, symmetric=True, positive_definite=True)
        sol = solver.compute(solver.init(op), torch.tensor(b))
        assert bool(sol.success)
        np.testing.assert_allclose(sol.value.numpy(), ref, rtol=1e-12, atol=1e-15)


def test_kfac_inverse_uses_the_layers_fallback(monkeypatch):
    """A singular undamped factor: eager and vmapped inverses are numpy's pseudo-inverse, and
    the inverse goes through the layer's Cholesky (counted) before its fallback."""
    v = torch.tensor([[1.0, 2.0, 0.0]], dtype=F64)
    m = v.T @ v  # rank 1
    zero = torch.zeros((), dtype=F64)
    calls = _count(monkeypatch, "cholesky_ex")

    def no_pinv(*args, **kwargs):
        raise AssertionError("KFAC inverts through the solver layer, not torch.linalg.pinv")

    monkeypatch.setattr(torch.linalg, "pinv", no_pinv)
    eager = _damped_inverse(m, zero)
    assert len(calls) == 1
    np.testing.assert_allclose(eager.numpy(), np.linalg.pinv(m.numpy(), hermitian=True),
                               rtol=1e-12, atol=1e-14)
    traced = torch.func.vmap(lambda a: _damped_inverse(a, zero))(m[None])[0]
    torch.testing.assert_close(traced, eager, rtol=1e-12, atol=1e-14)
    spd = m + torch.eye(3, dtype=F64)
    np.testing.assert_allclose(_damped_inverse(m, torch.tensor(1.0, dtype=F64)).numpy(),
                               np.linalg.inv(spd.numpy()), rtol=1e-12)


def _lm_reference(J, r, lam, d):
    J, r = J.numpy(), r.numpy()
    return -np.linalg.solve(J.T @ J + lam * np.diag(d.numpy()), J.T @ r)


def test_damped_least_squares_init_once_compute_many(monkeypatch):
    """One damping, several right-hand sides: one factorisation, the answers of separate
    solves (bit for bit) and of numpy float64."""
    g = torch.Generator().manual_seed(3)
    J = torch.randn(9, 4, generator=g, dtype=F64)
    rs = [torch.randn(9, generator=g, dtype=F64) for _ in range(3)]
    d = torch.rand(4, generator=g, dtype=F64) + 0.5
    separate = [S.damped_least_squares(J, r, 0.3, d, solver="cholesky") for r in rs]
    dls = S.DampedLeastSquares(solver="cholesky")
    plan = dls.plan(J, d)
    calls = _count(monkeypatch, "cholesky_ex")
    state = dls.init(plan, 0.3)
    for r, ref in zip(rs, separate):
        sol = dls.compute(state, r)
        assert torch.equal(sol.value, ref.value)
        np.testing.assert_allclose(sol.value.numpy(), -_lm_reference(J, r, 0.3, d), rtol=1e-10)
    assert len(calls) == 1


@pytest.mark.parametrize("form", ["primal", "dual"])
def test_lm_step_is_the_layers_column_scaled_damped_least_squares(form):
    """LM's step and the public API's ``scale=`` are one computation (bit for bit), and
    equal the numpy float64 step with D = diag(s^2)."""
    g = torch.Generator().manual_seed(4)
    J = torch.randn(5, 8, generator=g, dtype=F64) * torch.logspace(-3, 3, 8, dtype=F64)
    r = torch.randn(5, generator=g, dtype=F64)
    diag = (J * J).sum(0)
    delta, ok = damped_gauss_newton_step(J, r, 0.1, diag, form=form)
    dls = S.DampedLeastSquares(form=form)
    sol = dls.compute(dls.init(dls.plan(J, scale=torch.sqrt(diag)), 0.1), r)
    assert bool(ok) and torch.equal(delta, -sol.value)
    np.testing.assert_allclose(delta.numpy(), _lm_reference(J, r, 0.1, diag), rtol=1e-8)


@pytest.mark.parametrize("solver", ["auto", "cholesky"])
def test_lm_geodesic_correction_reuses_the_factorisation(solver, monkeypatch):
    """With geodesic acceleration each attempt factorises J^T J + lambda D once and solves
    for both r and r_vv (before: twice)."""
    t = torch.linspace(0, 2, 20, dtype=F64)
    y = 2.0 * torch.exp(-1.5 * t)
    fn = lambda p: p[0] * torch.exp(-p[1] * t) - y  # noqa: E731
    tx = fo.levenberg_marquardt(fn, geodesic=fo.Geodesic(), solver=solver)
    p = torch.tensor([1.0, 0.3], dtype=F64)
    state = tx.init(p)
    calls = _count(monkeypatch, "cholesky_ex")
    for _ in range(4):
        before = len(calls)
        step, state = tx.update(None, state, p)
        p = p + step
        assert len(calls) - before == int(state.attempts)
    assert float(state.residual_norm) < float(torch.linalg.vector_norm(fn(torch.tensor([1.0, 0.3], dtype=F64))))


def test_auto_never_picks_cupynumeric_because_it_was_imported(monkeypatch):
    """A program that imported cupynumeric (here a stand-in module) gets torch's solvers from
    Auto; only ``use_cupynumeric=True`` asks for the cuPyNumeric backend."""
    monkeypatch.setitem(sys.modules, "cupynumeric", types.ModuleType("cupynumeric"))
    monkeypatch.setitem(sys.modules, "funcopt.solvers.cupynumeric", None)  # importing it fails
    big = S.gram(torch.zeros(1, 9000, dtype=F64), 1.0)  # 9000 x 9000, never formed here
    assert isinstance(S.Auto().plan(big), S.Cholesky)
    assert isinstance(S.Auto(cupynumeric_min_size=1).plan(big), S.Cholesky)
    op, b, ref = _case("spd")
    sol = S.solve(op, torch.tensor(b))
    assert sol.solver == "cholesky"
    np.testing.assert_allclose(sol.value.numpy(), ref, rtol=1e-10)
    with pytest.raises(ImportError):
        S.Auto(use_cupynumeric=True).plan(big)  # asked for: the backend is imported
    with pytest.raises(TypeError, match="use_cupynumeric"):
        S.Auto(use_cupynumeric=None)  # type: ignore[arg-type]
