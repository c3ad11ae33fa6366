"""funcopt.solvers against NumPy/LAPACK float64 references."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import funcopt as fo

S = fo.solvers
EPS = {torch.float32: np.finfo(np.float32).eps, torch.float64: np.finfo(np.float64).eps}
SPD_SOLVERS = ["cholesky", "lu", "qr", "lstsq", "svd", "eigh", "auto", "cg", "pcg"]
GENERAL_SOLVERS = ["lu", "qr", "lstsq", "svd", "auto"]


def _matrix(rng, n, cond, spd):
    """A float64 matrix with singular values spread over [1, cond]."""
    s = np.geomspace(1.0, cond, n) if n > 1 else np.ones(1)
    U = np.linalg.qr(rng.standard_normal((n, n)))[0]
    if spd:
        return (U * s) @ U.T
    V = np.linalg.qr(rng.standard_normal((n, n)))[0]
    return (U * s) @ V.T


def _rhs(rng, n, k):
    return rng.standard_normal(n) if k is None else rng.standard_normal((n, k))


def _rel_err(x, ref):
    return np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-300)


def _solver(name, dtype):
    if name in ("cg", "pcg"):  # tolerance tight enough to resolve the dtype
        tol = 1e-5 if dtype == torch.float32 else 1e-11
        return S.CG(tol=tol, preconditioner="jacobi" if name == "pcg" else None)
    return S.get(name)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 24), dtype=st.sampled_from([torch.float32, torch.float64]),
       k=st.sampled_from([None, 1, 3]), spd=st.booleans(), cond=st.sampled_from([1.0, 10.0, 100.0]),
       seed=st.integers(0, 2**31 - 1), data=st.data())
def test_solvers_match_float64_reference(n, dtype, k, spd, cond, seed, data):
    rng = np.random.default_rng(seed)
    name = data.draw(st.sampled_from(SPD_SOLVERS if spd else GENERAL_SOLVERS))
    A64 = _matrix(rng, n, cond, spd)
    A = torch.tensor(A64, dtype=dtype)
    if spd:
        A = (A + A.T) / 2
    b = torch.tensor(_rhs(rng, n, k), dtype=dtype)
    A_before, b_before = A.clone(), b.clone()
    sol = S.solve(S.dense(A, positive_definite=spd), b, _solver(name, dtype))
    assert torch.equal(A, A_before) and torch.equal(b, b_before)  # pure
    assert sol.x.shape == b.shape and sol.x.dtype == dtype and bool(sol.success)
    ref = np.linalg.solve(A.double().numpy(), b.double().numpy())
    cg_tol = (1e-5 if dtype == torch.float32 else 1e-11) * cond * 10 if name in ("cg", "pcg") else 0
    assert _rel_err(sol.x.double().numpy(), ref) <= 50 * n * cond * EPS[dtype] + cg_tol


@settings(max_examples=20, deadline=None)
@given(m=st.integers(1, 20), n=st.integers(1, 20), dtype=st.sampled_from([torch.float32, torch.float64]),
       k=st.sampled_from([None, 2]), seed=st.integers(0, 2**31 - 1),
       name=st.sampled_from(["qr", "lstsq", "svd", "auto"]))
def test_rectangular_least_squares_and_minimum_norm(m, n, dtype, k, seed, name):
    rng = np.random.default_rng(seed)
    A64 = rng.standard_normal((m, n)) + 3 * np.eye(m, n)  # full rank, modest condition number
    A, b = torch.tensor(A64, dtype=dtype), torch.tensor(_rhs(rng, m, k), dtype=dtype)
    sol = S.solve(S.dense(A), b, name)
    ref = np.linalg.pinv(A.double().numpy()) @ b.double().numpy()
    cond = np.linalg.cond(A.double().numpy())
    assert bool(sol.success) and sol.x.shape == ((n,) if k is None else (n, k))
    assert _rel_err(sol.x.double().numpy(), ref) <= 50 * max(m, n) * cond**2 * EPS[dtype]


def _lm_reference(J, r, lam, d):
    J, r = J.double().numpy(), r.double().numpy()
    D = np.eye(J.shape[1]) if d is None else np.diag(d.double().numpy())
    return np.linalg.solve(J.T @ J + lam * D, J.T @ r)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 16), n=st.integers(1, 16), k=st.sampled_from([None, 2]),
       lam=st.sampled_from([1e-2, 1.0]), use_diag=st.sampled_from(["none", "vector", "marquardt"]),
       form=st.sampled_from(["primal", "dual", "auto"]),
       name=st.sampled_from(["auto", "cholesky", "lu", "svd", "cg"]), seed=st.integers(0, 2**31 - 1))
def test_damped_least_squares_primal_and_dual_match_reference(m, n, k, lam, use_diag, form, name, seed):
    rng = np.random.default_rng(seed)
    J = torch.tensor(rng.standard_normal((m, n)))
    r = torch.tensor(_rhs(rng, m, k))
    d = {"none": None, "vector": torch.tensor(rng.uniform(0.5, 2.0, n)), "marquardt": "marquardt"}[use_diag]
    solver = S.CG(tol=1e-12) if name == "cg" else name
    sol = S.damped_least_squares(J, r, lam, d, solver=solver, form=form)
    dref = (J * J).sum(0) if use_diag == "marquardt" else d
    if use_diag == "marquardt":
        dref = torch.where(dref > 0, dref, torch.zeros_like(dref))
    ref = _lm_reference(J, r, lam, dref)
    assert bool(sol.success) and sol.x.shape == ((n,) if k is None else (n, k))
    np.testing.assert_allclose(sol.x.numpy(), ref, rtol=1e-7, atol=1e-9)


def test_dual_form_gives_the_primal_step_with_few_residuals():
    g = torch.Generator().manual_seed(1)
    J = torch.randn(8, 300, generator=g, dtype=torch.float64)
    r = torch.randn(8, generator=g, dtype=torch.float64)
    primal = S.damped_least_squares(J, r, 0.1, form="primal")
    dual = S.damped_least_squares(J, r, 0.1, form="dual")
    torch.testing.assert_close(dual.x, primal.x, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(dual.x, torch.tensor(_lm_reference(J, r, 0.1, None)))


def test_cholesky_reports_failure_and_auto_falls_back_to_least_squares():
    g = torch.Generator().manual_seed(2)
    J = torch.randn(20, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 6, generator=g, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    op = S.gram(J, 0.0)  # rank 3 of 6: singular
    chol = S.solve(op, b, "cholesky")
    assert not bool(chol.success) and torch.equal(chol.x, torch.zeros(6, dtype=torch.float64))
    auto = S.solve(op, b)
    assert bool(auto.success) and auto.solver != "cholesky" and bool(torch.isfinite(auto.x).all())
    ref = np.linalg.lstsq(op.as_matrix().numpy(), b.numpy(), rcond=None)[0]
    np.testing.assert_allclose(auto.x.numpy(), ref, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", ["cholesky", "lu", "qr"])
def test_direct_solvers_report_singular_and_indefinite(name):
    A = torch.tensor([[1.0, 2.0], [2.0, 4.0]], dtype=torch.float64)  # singular
    sol = S.solve(S.dense(A, symmetric=True), torch.ones(2, dtype=torch.float64), name)
    assert not bool(sol.success) and bool(torch.isfinite(sol.x).all())
    if name == "cholesky":
        indefinite = torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))
        assert not bool(S.solve(S.dense(indefinite), torch.ones(2, dtype=torch.float64), name).success)


def test_auto_on_singular_general_matrix_returns_minimum_norm_answer():
    A = torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)
    sol = S.solve(A, b)
    assert bool(sol.success) and sol.solver == "lstsq"
    np.testing.assert_allclose(sol.x.numpy(), np.linalg.pinv(A.numpy()) @ b.numpy(), atol=1e-12)


@pytest.mark.parametrize("where", ["A", "b"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_raises(where, bad):
    A, b = torch.eye(3), torch.ones(3)
    (A if where == "A" else b)[1] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        S.solve(S.dense(A, positive_definite=True), b)
    with pytest.raises(ValueError, match="NaN or inf"):
        S.damped_least_squares(A, b, 1.0)


def test_matrix_free_non_finite_rhs_raises_and_bad_shapes_are_named():
    op = S.matrix_free(lambda v: 2 * v, 3, dtype=torch.float32, device="cpu", positive_definite=True)
    with pytest.raises(ValueError, match="right-hand side"):
        S.solve(op, torch.tensor([1.0, float("nan"), 0.0]))
    with pytest.raises(ValueError, match="shape"):
        S.solve(op, torch.ones(4))
    with pytest.raises(ValueError, match="dtype"):
        S.solve(op, torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="damping"):
        S.gram(torch.ones(2, 2), -1.0)


def test_cg_reports_non_convergence_and_indefiniteness():
    g = torch.Generator().manual_seed(3)
    A = torch.tensor(_matrix(np.random.default_rng(3), 30, 1e3, True))
    b = torch.randn(30, generator=g, dtype=torch.float64)
    short = S.solve(S.dense(A, positive_definite=True), b, S.CG(maxiter=2))
    assert not bool(short.success) and int(short.iterations) == 2 and float(short.residual_norm) > 1e-5
    full = S.solve(S.dense(A, positive_definite=True), b, S.CG(tol=1e-10))
    assert bool(full.success) and float(full.residual_norm) <= 1e-9
    indefinite = torch.diag(torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64))
    sol = S.solve(S.dense(indefinite), torch.ones(3, dtype=torch.float64), "cg")
    assert not bool(sol.success) and bool(torch.isfinite(sol.x).all())


def test_gauss_newton_operator_is_the_damped_gram_matrix():
    g = torch.Generator().manual_seed(4)
    W = torch.randn(12, 5, generator=g, dtype=torch.float64)
    fn = lambda p: torch.tanh(W @ p) - 0.3
    p = torch.randn(5, generator=g, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(fn, p)
    op = S.gauss_newton(fn, p, 0.5)
    torch.testing.assert_close(op.as_matrix(), J.T @ J + 0.5 * torch.eye(5, dtype=torch.float64))
    r = fn(p)
    sol = S.solve(op, J.T @ r)
    assert sol.solver == "cg" and bool(sol.success)
    np.testing.assert_allclose(sol.x.numpy(), _lm_reference(J, r, 0.5, None), rtol=1e-4)


def test_gram_with_damping_shares_the_formed_gram_matrix():
    """Operators from ``with_damping`` equal freshly built ones (float64 math) and share the
    ``J^T J`` / ``J J^T`` that ``with_gram`` formed once (an explicit field, no cache)."""
    g = torch.Generator().manual_seed(6)
    J = torch.randn(7, 4, generator=g, dtype=torch.float64)
    d = torch.rand(4, generator=g, dtype=torch.float64) + 0.5
    for plain, fresh, G in ((S.gram(J, 0.0, d), lambda lam: S.gram(J, lam, d), J.T @ J),
                            (S.gram_dual(J, 0.0), lambda lam: S.gram_dual(J, lam), J @ J.T)):
        base = plain.with_gram()
        assert plain.gram is None and base.with_gram() is base  # operators never change
        first = base.with_damping(0.1)
        formed = first.as_matrix()
        for lam in (0.1, 2.5):
            op = base.with_damping(torch.tensor(lam, dtype=torch.float64))
            torch.testing.assert_close(op.as_matrix(), fresh(lam).as_matrix(), rtol=1e-14, atol=0)
            assert op.gram is first.gram is base.gram  # formed once, shared
        damp = torch.diag(0.1 * (d if G.shape[0] == 4 else torch.ones(7, dtype=torch.float64)))
        torch.testing.assert_close(formed, G + damp, rtol=1e-14, atol=1e-15)


def test_block_diagonal_solves_each_block_and_reports_any_failure():
    rng = np.random.default_rng(5)
    blocks = [torch.tensor(_matrix(rng, n, 10.0, True)) for n in (3, 1, 4)]
    b = torch.tensor(rng.standard_normal((8, 2)))
    op = S.block_diagonal([S.dense(x, positive_definite=True) for x in blocks])
    ref = np.linalg.solve(scipy.linalg.block_diag(*[x.numpy() for x in blocks]), b.numpy())
    for name in ("cholesky", "auto", "lu"):
        sol = S.solve(op, b, name)
        assert bool(sol.success)
        np.testing.assert_allclose(sol.x.numpy(), ref, rtol=1e-10, atol=1e-12)
    bad = S.block_diagonal([blocks[0], -torch.eye(2, dtype=torch.float64)])
    assert not bool(S.solve(bad, torch.ones(5, dtype=torch.float64), "cholesky").success)


def test_auto_plan_follows_tags_and_shape():
    auto = S.Auto()
    A = torch.eye(4)
    assert isinstance(auto.plan(S.dense(A, positive_definite=True)), S.Cholesky)
    assert isinstance(auto.plan(S.dense(A)), S.LU)
    assert isinstance(auto.plan(S.dense(torch.ones(5, 3))), S.Lstsq)
    mf = S.matrix_free(lambda v: v, 4, dtype=torch.float32, device="cpu", positive_definite=True)
    assert isinstance(auto.plan(mf), S.CG)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_keeps_dtype(dtype):
    A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=dtype)
    b = torch.tensor([1.0, 2.0], dtype=dtype)
    sol = S.solve(S.dense(A, positive_definite=True), b)
    assert sol.x.dtype == dtype and bool(sol.success)
    ref = np.linalg.solve(A.double().numpy(), b.double().numpy())
    np.testing.assert_allclose(sol.x.double().numpy(), ref, rtol=2e-2)


def test_get_by_name_object_and_unknown():
    chol = S.Cholesky()
    assert S.get(chol) is chol
    assert isinstance(S.get("pcg"), S.CG) and S.get("pcg").preconditioner == "jacobi"
    with pytest.raises(ValueError, match="unknown solver"):
        S.get("gauss-seidel")


def test_missing_cupynumeric_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupynumeric", None)  # makes `import cupynumeric` fail
    with pytest.raises(ImportError, match=r"pip install funcopt\[cupynumeric\](?s:.*)stand-in") as e:
        S.get("cupynumeric")
    assert ".ci/" not in str(e.value)


def test_cupynumeric_that_fails_to_load_names_the_cause(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "cupynumeric":  # installed, but Legate's CUDA build finds no driver
            raise ImportError("libcuda.so.1: cannot open shared object file")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "cupynumeric", raising=False)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"installed but failed to load: libcuda.*stand-in "
                                          r"libcuda.so.1(?s:.*)cuInit(?s:.*)LEGATE_CONFIG") as e:
        S.get("cupynumeric")
    assert "pip install" not in str(e.value)
    assert ".ci" not in str(e.value) and ".c " not in str(e.value)  # no repository paths


def test_cg_warm_start_check_every_and_unvmappable_matvec():
    rng = np.random.default_rng(6)
    A = torch.tensor(_matrix(rng, 20, 50.0, True))
    b = torch.tensor(rng.standard_normal((20, 2)))
    ref = np.linalg.solve(A.numpy(), b.numpy())

    def matvec(v):  # float(...) cannot be traced by vmap: batches go column by column
        return A @ v * float(torch.ones(()))

    op = S.matrix_free(matvec, 20, dtype=torch.float64, device="cpu", positive_definite=True)
    x0 = torch.tensor(ref) + 1e-3
    sol = S.solve(op, b, S.CG(tol=1e-12, x0=x0, check_every=4))
    assert bool(sol.success) and int(sol.iterations) % 4 == 0
    np.testing.assert_allclose(sol.x.numpy(), ref, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(op.as_matrix(), A)
