"""The cuPyNumeric (Legate) solver gives the torch solvers' answers.

Runs in a process of its own (``make test-cupynumeric``, i.e. ``.ci/cupynumeric.sh``): importing
cupynumeric starts the Legate runtime, which on a machine without GPUs needs the no-device
libcuda stand-in and ``LEGATE_CONFIG="--cpus 2 --gpus 0"``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import funcopt as fo

pytestmark = [pytest.mark.cupynumeric, pytest.mark.filterwarnings("ignore:(?s).*Seeding the random")]
S = fo.solvers
EPS = {torch.float32: np.finfo(np.float32).eps, torch.float64: np.finfo(np.float64).eps}


@pytest.fixture(scope="module", autouse=True)
def _legate():
    pytest.importorskip("cupynumeric", reason="pip install funcopt[cupynumeric]", exc_type=ImportError)


def _spd(rng, n, cond):
    U = np.linalg.qr(rng.standard_normal((n, n)))[0]
    return (U * np.geomspace(1.0, cond, n)) @ U.T


@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 16), dtype=st.sampled_from([torch.float32, torch.float64]),
       k=st.sampled_from([None, 3]), method=st.sampled_from(["auto", "cholesky", "solve", "qr", "svd"]),
       seed=st.integers(0, 2**31 - 1))
def test_cupynumeric_matches_torch_solvers(n, dtype, k, method, seed):
    rng = np.random.default_rng(seed)
    cond = 50.0
    A = torch.tensor(_spd(rng, n, cond), dtype=dtype)
    A = (A + A.T) / 2
    b = torch.tensor(rng.standard_normal(n if k is None else (n, k)), dtype=dtype)
    op = S.dense(A, positive_definite=True)
    sol = S.solve(op, b, S.CuPyNumeric(method=method))
    torch_sol = S.solve(op, b, "cholesky")
    assert bool(sol.success) and sol.x.dtype == dtype and sol.x.shape == b.shape
    assert sol.solver.startswith("cupynumeric")
    tol = 50 * n * cond * EPS[dtype]
    err = torch.linalg.vector_norm((sol.x - torch_sol.x).double()) / torch.linalg.vector_norm(torch_sol.x.double())
    assert float(err) <= tol


@pytest.mark.parametrize("form", ["primal", "dual"])
def test_cupynumeric_damped_least_squares_matches_torch(form):
    g = torch.Generator().manual_seed(0)
    J = torch.randn(12, 20, generator=g, dtype=torch.float64)
    r = torch.randn(12, 2, generator=g, dtype=torch.float64)
    sol = S.damped_least_squares(J, r, 0.1, solver="cupynumeric", form=form)
    ref = S.damped_least_squares(J, r, 0.1, solver="lu", form="primal")
    assert bool(sol.success)
    torch.testing.assert_close(sol.x, ref.x, rtol=1e-9, atol=1e-11)


def test_cupynumeric_rectangular_qr_is_least_squares():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(15, 6, generator=g, dtype=torch.float64)
    b = torch.randn(15, generator=g, dtype=torch.float64)
    for method in ("auto", "qr", "svd"):
        sol = S.solve(S.dense(A), b, S.CuPyNumeric(method=method))
        torch.testing.assert_close(sol.x, S.solve(S.dense(A), b, "lstsq").x, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cupynumeric_single_unknown(dtype):
    """One unknown (a 1 x 1 system, or a single-column least-squares problem) for every
    method, with one and with several right-hand sides, against torch's lstsq."""
    g = torch.Generator().manual_seed(2)
    for m in (1, 4):
        A = (torch.rand(m, 1, generator=g, dtype=torch.float64) + 0.5).to(dtype)
        for b in (torch.randn(m, generator=g, dtype=torch.float64).to(dtype),
                  torch.randn(m, 3, generator=g, dtype=torch.float64).to(dtype)):
            ref = S.solve(S.dense(A), b, "lstsq").x
            methods = ("auto", "qr", "svd") + (("cholesky", "solve") if m == 1 else ())
            for method in methods:
                sol = S.solve(S.dense(A, positive_definite=m == 1), b, S.CuPyNumeric(method=method))
                assert bool(sol.success) and sol.x.shape == ref.shape, (m, method, tuple(b.shape))
                torch.testing.assert_close(sol.x, ref, rtol=1e-5, atol=1e-6)


def test_cupynumeric_reports_failure_and_auto_falls_back():
    indefinite = torch.diag(torch.tensor([2.0, -1.0, 3.0], dtype=torch.float64))
    b = torch.ones(3, dtype=torch.float64)
    sol = S.solve(S.dense(indefinite, positive_definite=True), b, S.CuPyNumeric(method="cholesky"))
    assert not bool(sol.success) and torch.equal(sol.x, torch.zeros(3, dtype=torch.float64))
    singular = torch.ones(3, 3, dtype=torch.float64)
    sol = S.solve(S.dense(singular), b, S.CuPyNumeric(method="solve"))
    assert not bool(sol.success) and bool(torch.isfinite(sol.x).all())
    auto = S.solve(S.dense(singular, positive_definite=True), b, S.Auto(use_cupynumeric=True))
    assert bool(auto.success)
    torch.testing.assert_close(auto.x, torch.full((3,), 1.0 / 3, dtype=torch.float64))


def test_auto_uses_cupynumeric_for_large_systems_when_asked():
    import cupynumeric  # noqa: F401  (the program runs under Legate)

    A = torch.eye(5, dtype=torch.float64) * 2
    op, b = S.dense(A, positive_definite=True), torch.ones(5, dtype=torch.float64)
    sol = S.solve(op, b, S.Auto(use_cupynumeric=True, cupynumeric_min_size=4))
    assert sol.solver == "cupynumeric-cholesky"
    torch.testing.assert_close(sol.x, torch.full((5,), 0.5, dtype=torch.float64))
    assert S.solve(op, b, S.Auto(cupynumeric_min_size=4)).solver == "cholesky"  # imported only
    small = S.solve(op, b, S.Auto(use_cupynumeric=True, cupynumeric_min_size=6))
    assert small.solver == "cholesky"


def test_cupynumeric_init_once_compute_many_and_result_codes():
    """One cho_factor for several right-hand sides; the result codes of the layer."""
    rng = np.random.default_rng(8)
    A = torch.tensor(_spd(rng, 12, 10.0))
    op = S.dense(A, positive_definite=True)
    solver = S.CuPyNumeric(method="cholesky")
    state = solver.init(op)
    for _ in range(3):
        b = torch.tensor(rng.standard_normal(12))
        sol = solver.compute(state, b)
        assert int(sol.result) == S.Result.success
        np.testing.assert_allclose(sol.x.numpy(), np.linalg.solve(A.numpy(), b.numpy()), rtol=1e-10)
    indefinite = S.dense(torch.diag(torch.tensor([2.0, -1.0, 3.0], dtype=torch.float64)),
                         positive_definite=True)
    bad = solver.compute(solver.init(indefinite), torch.ones(3, dtype=torch.float64))
    assert bad.reason() == S.Result.not_positive_definite and not bool(bad.x.any())
    unsym = S.dense(torch.tensor([[2.0, 5.0], [0.0, 2.0]], dtype=torch.float64))
    st = solver.init(unsym)
    assert int(st.result) == S.Result.not_symmetric
    with pytest.raises(ValueError, match="not tagged symmetric"):
        solver.solve(unsym, torch.ones(2, dtype=torch.float64))


def test_cupynumeric_partitioned_solve_matches_torch():
    """Large enough for Legate to split the arrays over its processors (--cpus 2 in CI)."""
    rng = np.random.default_rng(7)
    A = torch.tensor(_spd(rng, 400, 100.0))
    b = torch.tensor(rng.standard_normal((400, 2)))
    op = S.dense(A, positive_definite=True)
    ref = S.solve(op, b, "cholesky").x
    for method in ("cholesky", "solve"):
        sol = S.solve(op, b, S.CuPyNumeric(method=method))
        assert bool(sol.success)
        torch.testing.assert_close(sol.x, ref, rtol=1e-9, atol=1e-10)
