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


# --------------------------------------------- the normal equations formed in cuPyNumeric


def _counted(blocks, seen):
    for b in blocks:
        seen.append(1)
        yield b


@pytest.mark.parametrize("size", [1, 7, 37, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normal_equations_from_row_blocks_equal_whole_J(size, dtype):
    """A = sum_k J_k^T J_k and g = sum_k J_k^T r_k, blocks read once from a generator, equal
    J^T J and J^T r of the whole J in float64."""
    g = torch.Generator().manual_seed(3)
    J = torch.randn(37, 9, generator=g, dtype=torch.float64)
    for r in (torch.randn(37, generator=g, dtype=torch.float64),
              torch.randn(37, 2, generator=g, dtype=torch.float64)):
        seen: list = []
        ne = S.normal_equations(_counted(S.row_blocks(J.to(dtype), r.to(dtype), size), seen))
        assert len(seen) == -(-37 // size) and ne.rows == 37 and ne.dtype == dtype
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        np.testing.assert_allclose(np.asarray(ne.A), (J.T @ J).numpy(), rtol=tol, atol=tol * 40)
        np.testing.assert_allclose(np.asarray(ne.g), (J.T @ r).numpy(), rtol=tol, atol=tol * 40)


def test_damped_step_equals_torch_solve_for_several_lambdas_without_reforming_A():
    g = torch.Generator().manual_seed(4)
    J = torch.randn(60, 8, generator=g, dtype=torch.float64) * torch.logspace(0, 3, 8, dtype=torch.float64)
    r = torch.randn(60, generator=g, dtype=torch.float64)
    seen: list = []
    ne = S.normal_equations(_counted(S.row_blocks(J, r, 16), seen))
    A, b = J.T @ J, J.T @ r
    d = torch.rand(8, generator=g, dtype=torch.float64) + 0.5
    for lam in (0.0, 1e-3, 1.0, 1e4):
        for diag, D in ((None, torch.ones(8, dtype=torch.float64)), (d, d), ("marquardt", A.diagonal())):
            sol = S.damped_step(S.factor_normal(ne, lam, diag))
            ref = torch.linalg.solve(A + lam * torch.diag(D), -b)
            assert bool(sol.success) and sol.solver == "cupynumeric-normal-cholesky"
            assert sol.x.dtype == torch.float64 and sol.x.device == J.device
            torch.testing.assert_close(sol.x, ref, rtol=1e-8, atol=1e-12)
    assert len(seen) == 4  # the four blocks were read once for all twelve factorisations
    u = torch.randn(60, 3, generator=g, dtype=torch.float64)  # another right-hand side
    sol = S.damped_step(S.factor_normal(ne, torch.tensor(0.5)), S.transposed_product(S.row_blocks(J, u, 25)))
    torch.testing.assert_close(sol.x, torch.linalg.solve(A + 0.5 * torch.eye(8, dtype=torch.float64), -J.T @ u))


@settings(max_examples=8, deadline=None)
@given(m=st.integers(1, 40), n=st.integers(1, 12), size=st.integers(1, 50), seed=st.integers(0, 2**31 - 1))
def test_normal_equations_any_blocking(m, n, size, seed):
    """Any row blocking (blocks of one row, one block, a last short block) gives J^T J, J^T r
    and the damped step of the whole J."""
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(m, n, generator=g, dtype=torch.float64)
    r = torch.randn(m, generator=g, dtype=torch.float64)
    ne = S.normal_equations(S.row_blocks(J, r, size))
    np.testing.assert_allclose(np.asarray(ne.A), (J.T @ J).numpy(), rtol=1e-12, atol=1e-12)
    sol = S.damped_step(S.factor_normal(ne, 0.3))
    ref = torch.linalg.solve(J.T @ J + 0.3 * torch.eye(n, dtype=torch.float64), -J.T @ r)
    assert bool(sol.success)
    torch.testing.assert_close(sol.x, ref, rtol=1e-9, atol=1e-12)


def test_normal_equations_partitioned():
    """Large enough for Legate to split A over its processors (--cpus 2 in CI)."""
    g = torch.Generator().manual_seed(10)
    J = torch.randn(1200, 300, generator=g, dtype=torch.float64)
    r = torch.randn(1200, generator=g, dtype=torch.float64)
    ne = S.normal_equations(S.row_blocks(J, r, 256))
    for lam in (1e-2, 10.0):
        sol = S.damped_step(S.factor_normal(ne, lam))
        ref = torch.linalg.solve(J.T @ J + lam * torch.eye(300, dtype=torch.float64), -J.T @ r)
        assert bool(sol.success)
        torch.testing.assert_close(sol.x, ref, rtol=1e-9, atol=1e-12)


def test_damped_step_float32_blocks_return_float32():
    g = torch.Generator().manual_seed(5)
    J = torch.randn(40, 5, generator=g, dtype=torch.float64)
    r = torch.randn(40, generator=g, dtype=torch.float64)
    sol = S.damped_step(S.factor_normal(S.normal_equations(S.row_blocks(J.float(), r.float(), 9)), 0.1))
    ref = torch.linalg.solve(J.T @ J + 0.1 * torch.eye(5, dtype=torch.float64), -J.T @ r)
    assert bool(sol.success) and sol.x.dtype == torch.float32
    torch.testing.assert_close(sol.x.double(), ref, rtol=1e-4, atol=1e-5)


def test_normal_factor_reports_not_positive_definite_and_non_finite():
    """A zero column of J makes A + lambda D singular (lambda = 0, or Marquardt's D = diag(A)):
    the result code says so and the step is zeros; NaN in a block gives non_finite."""
    g = torch.Generator().manual_seed(6)
    J = torch.randn(30, 4, generator=g, dtype=torch.float64)
    J[:, 2] = 0.0
    r = torch.randn(30, generator=g, dtype=torch.float64)
    ne = S.normal_equations(S.row_blocks(J, r, 8))
    for lam, diag in ((0.0, None), (1.0, "marquardt")):
        f = S.factor_normal(ne, lam, diag)
        sol = S.damped_step(f)
        assert f.factors is None and sol.reason() == S.Result.not_positive_definite
        assert not bool(sol.success) and torch.equal(sol.x, torch.zeros(4, dtype=torch.float64))
    ok = S.damped_step(S.factor_normal(ne, 1.0))  # the damping makes it definite again
    ref = torch.linalg.solve(J.T @ J + torch.eye(4, dtype=torch.float64), -J.T @ r)
    assert bool(ok.success)
    torch.testing.assert_close(ok.x, ref)
    J[5, 1] = float("nan")
    bad = S.damped_step(S.factor_normal(S.normal_equations(S.row_blocks(J, r, 8)), 1.0))
    assert bad.reason() == S.Result.non_finite and torch.equal(bad.x, torch.zeros(4, dtype=torch.float64))


def test_normal_equations_input_errors():
    J, r = torch.ones(6, 3, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    with pytest.raises(ValueError, match="no blocks"):
        S.normal_equations(iter(()))
    with pytest.raises(ValueError, match="block 1 .*same columns"):
        S.normal_equations([(J, r), (torch.ones(2, 4, dtype=torch.float64), r[:2])])
    with pytest.raises(ValueError, match="block 1 .*same columns, dtype"):
        S.normal_equations([(J, r), (J.float(), r.float())])
    with pytest.raises(ValueError, match="block 1: the residual blocks must all be given"):
        S.normal_equations([(J, r), (J, None)])
    with pytest.raises(ValueError, match="block 0: r_k must"):
        S.normal_equations([(J, r[:5])])
    with pytest.raises(TypeError, match="block 0 must be a pair"):
        S.normal_equations([J])
    with pytest.raises(ValueError, match="size=0"):
        next(S.row_blocks(J, r, 0))
    ne = S.normal_equations([(J, None)])
    with pytest.raises(ValueError, match="damping=-1.0"):
        S.factor_normal(ne, -1.0)
    with pytest.raises(ValueError, match="diag must be a tensor of shape"):
        S.factor_normal(ne, 1.0, -torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="hold no g"):
        S.damped_step(S.factor_normal(ne, 1.0))
    with pytest.raises(ValueError, match="row_block=0"):
        S.CuPyNumeric(row_block=0)
    with pytest.raises(ValueError, match="method='qr' cannot"):
        S.CuPyNumeric(method="qr", row_block=8)


def _exp_decay_problem():
    g = torch.Generator().manual_seed(9)
    t = torch.linspace(0, 4, 90, dtype=torch.float64)
    y = 2.5 * torch.exp(-1.3 * t) + 0.4 * torch.sin(2.0 * t) + 0.01 * torch.randn(90, generator=g, dtype=torch.float64)

    def residual(p):
        return p[0] * torch.exp(-p[1] * t) + p[2] * torch.sin(p[3] * t) - y

    return residual, torch.tensor([1.0, 1.0, 1.0, 1.8], dtype=torch.float64)


@pytest.mark.parametrize("rule, geodesic", [(fo.TrustRegion(), None), (fo.Nielsen(), fo.Geodesic())])
def test_least_squares_with_normal_equations_in_cupynumeric_equals_torch_path(rule, geodesic, monkeypatch):
    """fo.least_squares with CuPyNumeric(row_block=16): every step forms J^T J from row blocks
    in cuPyNumeric, and the fit equals the torch Cholesky path's, step for step."""
    from funcopt.solvers import cupynumeric_normal as cnn

    formed: list = []
    real = cnn.normal_equations
    monkeypatch.setattr(cnn, "normal_equations", lambda blocks: formed.append(1) or real(blocks))
    residual, p0 = _exp_decay_problem()
    ref, ref_info = fo.least_squares(residual, p0.clone(), rule=rule, geodesic=geodesic, solver="cholesky")
    got, info = fo.least_squares(residual, p0.clone(), rule=rule, geodesic=geodesic,
                                 solver=S.CuPyNumeric(row_block=16))
    assert ref_info.success and info.success and info.reason == ref_info.reason
    assert len(formed) == info.steps == ref_info.steps
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(info.cost, ref_info.cost, rtol=1e-10)


def test_nist_problem_with_normal_equations_in_cupynumeric():
    """A NIST StRD problem (Gauss1: 250 observations, 8 parameters): the block path's steps
    have the torch path's costs, and both stop at the certified values (the last test may
    hold one step apart: the sums of J^T J differ in rounding)."""
    from funcopt import nist

    problem = nist.load("Gauss1")
    b, info = fo.least_squares(nist.residual_fn(problem), problem.starts[0].clone(),
                               solver=S.CuPyNumeric(row_block=64))
    ref, ref_info = fo.least_squares(nist.residual_fn(problem), problem.starts[0].clone())
    assert info.success and ref_info.success and abs(info.steps - ref_info.steps) <= 1
    for h, h_ref in zip(info.history[:ref_info.steps - 1], ref_info.history):
        np.testing.assert_allclose(h["new_cost"], h_ref["new_cost"], rtol=1e-12)
    np.testing.assert_allclose(info.cost, ref_info.cost, rtol=1e-13)
    assert float(nist.significant_digits(b, problem.certified).min()) >= 8
    torch.testing.assert_close(b, ref, rtol=1e-8, atol=0)


def test_row_block_rejects_the_dual_form():
    residual, p0 = _exp_decay_problem()
    with pytest.raises(ValueError, match="primal n x n normal equations"):
        fo.least_squares(residual, p0, solver=S.CuPyNumeric(row_block=16), form="dual")


_DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))]


@pytest.mark.parametrize("device", _DEVICES)
def test_normal_equations_on_the_blocks_device(device):
    """Blocks on the CPU (through NumPy) or a GPU (through DLPack); the step comes back on
    their device, and a fit there equals the CPU torch path's."""
    g = torch.Generator().manual_seed(11)
    J = torch.randn(500, 40, generator=g, dtype=torch.float64)
    r = torch.randn(500, generator=g, dtype=torch.float64)
    ne = S.normal_equations(S.row_blocks(J.to(device), r.to(device), 128))
    sol = S.damped_step(S.factor_normal(ne, torch.tensor(0.1, device=device)))
    ref = torch.linalg.solve(J.T @ J + 0.1 * torch.eye(40, dtype=torch.float64), -J.T @ r)
    assert bool(sol.success) and sol.x.device.type == device
    torch.testing.assert_close(sol.x.cpu(), ref, rtol=1e-9, atol=1e-12)
    residual, p0 = _exp_decay_problem()
    t = torch.linspace(0, 4, 90, dtype=torch.float64, device=device)
    y = (-residual(torch.zeros(4, dtype=torch.float64))).to(device)  # the data: r(0) = -y

    def residual_on_device(p):
        return p[0] * torch.exp(-p[1] * t) + p[2] * torch.sin(p[3] * t) - y

    got, info = fo.least_squares(residual_on_device, p0.to(device), solver=S.CuPyNumeric(row_block=32))
    ref_p, _ = fo.least_squares(residual, p0.clone(), solver="cholesky")
    assert info.success and got.device.type == device
    torch.testing.assert_close(got.cpu(), ref_p, rtol=1e-8, atol=1e-10)


def test_the_solvers_guide_cupynumeric_blocks_run():
    """The blocks of docs/solvers.md marked ``# requires: cupynumeric`` (the main docs test
    skips them) run here, under Legate, in order, with their assertions."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "solvers.md").read_text()
    blocks = [b for b in re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)
              if b.startswith("# requires: cupynumeric")]
    assert len(blocks) == 2
    env: dict = {"torch": torch, "fo": fo}
    torch.manual_seed(0)
    for code in blocks:
        exec(compile(code, "solvers.md", "exec"), env)


def test_adversarial_normal_equations_nan_singular_and_spent_generator():
    """A NaN block gives non_finite and a zero step; an exactly singular A (two equal
    columns) at damping 0 is not reported as a successful step; a generator already read
    gives the 'no blocks' error, not zeros."""
    J = torch.ones(6, 2, dtype=torch.float64)
    r = torch.arange(6, dtype=torch.float64)
    bad = J.clone()
    bad[3, 1] = float("nan")
    sol = S.damped_step(S.factor_normal(S.normal_equations(S.row_blocks(bad, r, 4)), 0.1))
    assert int(sol.result) == int(fo.solvers.Result.non_finite) and not bool(sol.success)
    assert bool((sol.x == 0).all())
    sing = S.damped_step(S.factor_normal(S.normal_equations(S.row_blocks(J, r, 4)), 0.0))
    assert not bool(sing.success)
    gen = S.row_blocks(J, r, 4)
    S.normal_equations(gen)
    with pytest.raises(ValueError, match="no blocks were given"):
        S.normal_equations(gen)
