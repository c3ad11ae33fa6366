"""Adversarial inputs to the matrix-free Levenberg-Marquardt path, the row-block helpers of the
cuPyNumeric normal equations (argument checks that need no Legate) and the bench's batched fits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import funcopt as fo
from funcopt.solvers import cupynumeric_normal as cnn


def _scaled_linear(m=200, scales=(1e-6, 1.0, 1e6, 1.0, 1.0), seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(m, 5, generator=g, dtype=torch.float64) * torch.tensor(scales, dtype=torch.float64)
    b = torch.randn(m, generator=g, dtype=torch.float64)
    return A, b


def test_memory_budget_refuses_a_solver_it_would_ignore():
    """m=200, n=5 in float64: 7000 bytes fit the matrix-free path only; solver='cholesky'
    used to be replaced by CG silently."""
    A, b = _scaled_linear()
    with pytest.raises(ValueError, match="solver='cholesky' would be ignored"):
        fo.least_squares(lambda x: A @ x - b, torch.zeros(5, dtype=torch.float64),
                         memory_budget=7000, solver="cholesky")


@pytest.mark.parametrize("scaling", [True, False])
def test_memory_budget_honours_scaling(scaling):
    """scaling=True was overwritten by the matrix-free path's D = I (then refused); now the
    path honours both: in float64 it takes the dense path's steps with the same rule and
    scaling (the same damping sequence, costs equal to CG's tolerance; without scaling the
    matrix-free lambda_0 is absolute, so it gets the dense path's tau max diag(J^T J))."""
    A, b = _scaled_linear(scales=(1e-3, 1.0, 1e3, 1.0, 1.0))
    fn = lambda x: torch.tanh(A @ x) - 0.5 * torch.tanh(b)
    x0 = torch.zeros(5, dtype=torch.float64)
    kw = dict(scaling=scaling, max_steps=8, tolerances=fo.Tolerances(ftol=0.0, xtol=0.0, gtol=0.0))
    J, _ = fo.func.jacobian(fn, x0)  # without scaling the dense lambda_0 is tau max diag(J^T J)
    lam0 = 1e-3 if scaling else 1e-3 * float((J * J).sum(0).max())
    _, dense = fo.least_squares(fn, x0, rule=fo.Nielsen(), **kw)
    _, free = fo.least_squares(fn, x0, memory_budget=7000, rule=fo.Nielsen(initial_damping=lam0), **kw)
    assert free.path == "matrix-free" and dense.path == "dense"
    for hd, hf in zip(dense.history, free.history, strict=True):
        assert hd["accepted"] == hf["accepted"]
        np.testing.assert_allclose(hf["damping"], hd["damping"], rtol=1e-6)
        np.testing.assert_allclose(hf["new_cost"], hd["new_cost"], rtol=1e-7)
        np.testing.assert_allclose(hf["grad_cos"], hd["grad_cos"], rtol=1e-6)


def test_memory_budget_rank_deficient_and_zero_size_leaf_match_numpy():
    """A duplicated column (rank 4 of 5) and a zero-size leaf: the matrix-free fit reaches
    numpy's least-squares cost."""
    A, b = _scaled_linear(scales=(1.0,) * 5)
    A[:, 4] = A[:, 3]
    p0 = {"a": torch.zeros(5, dtype=torch.float64), "b": torch.zeros(0, dtype=torch.float64)}
    p, info = fo.least_squares(lambda p: A @ torch.cat([p["a"], p["b"]]) - b, p0, memory_budget=7000)
    ref = np.linalg.lstsq(A.numpy(), b.numpy(), rcond=None)[0]
    ref_cost = 0.5 * np.sum((A.numpy() @ ref - b.numpy()) ** 2)
    assert info.path == "matrix-free" and info.success and p["b"].shape == (0,)
    np.testing.assert_allclose(info.cost, ref_cost, rtol=1e-12)


def test_matrix_free_float32_badly_scaled_success_means_optimal():
    """Columns scaled 1e-6, 1, 1e6: dense float32 reaches numpy's optimum. The matrix-free
    path (then D = I, grad_cos unknown) stopped by ftol+xtol after a rejected update with
    damping 1e13, 1% above the optimum, with success; with D from diag(J^T J) it reaches it."""
    A, b = _scaled_linear()
    ref = np.linalg.lstsq(A.numpy(), b.numpy(), rcond=None)[0]
    ref_cost = 0.5 * np.sum((A.numpy() @ ref - b.numpy()) ** 2)
    _, dense = fo.least_squares(lambda x: A.float() @ x - b.float(), torch.zeros(5))
    assert dense.success and abs(dense.cost - ref_cost) <= 1e-5 * ref_cost
    _, info = fo.least_squares(lambda x: A.float() @ x - b.float(), torch.zeros(5), memory_budget=3500)
    assert info.path == "matrix-free"
    assert not info.success or abs(info.cost - ref_cost) <= 1e-4 * ref_cost


def test_row_blocks_refuses_residuals_longer_than_J():
    """J of 8 rows with r of 12 in blocks of 4: r's last 4 rows used to be dropped silently."""
    J, r = torch.ones(8, 3), torch.ones(12)
    with pytest.raises(ValueError, match="r must have J's 8 rows"):
        cnn.row_blocks(J, r, 4)


@pytest.mark.parametrize("size", [0, -1, True, 2.0])
def test_row_blocks_checks_size_at_the_call(size):
    """Bad sizes raise when row_blocks is called, not later when the blocks are read."""
    with pytest.raises(ValueError, match="size="):
        cnn.row_blocks(torch.ones(4, 2), None, size)


@pytest.mark.parametrize("k", [0, -3, True, 4.0])
def test_cupynumeric_row_block_rejects_bad_k_without_legate(k):
    with pytest.raises(ValueError, match="row_block="):
        fo.solvers.CuPyNumeric(row_block=k)


def test_batched_fits_count_only_fits_whose_reference_succeeded(monkeypatch):
    """The converged count must not count a fit whose reference fit failed (docstring: 'a
    reference fit that succeeded'); it used to compare with every reference cost."""
    from funcopt.bench import problems

    real = problems.fo.least_squares

    def half_failed(*a, **k):
        p, info = real(*a, **k)
        info.success[::2] = False
        return p, info

    monkeypatch.setattr(problems.fo, "least_squares", half_failed)
    monkeypatch.setattr(problems, "_REFERENCE", {})
    prob = problems.batched_decay_fits(10, 123, torch.device("cpu"), steps=3)
    monkeypatch.setattr(problems.fo, "least_squares", real)
    p, _ = real(lambda q: prob.residual_fn(q, prob.batches(0)), prob.params, batched=True)
    out = prob.evaluate(p)
    assert out["reference_successes"] == 5 and out["converged"] == 5


@pytest.mark.parametrize("kw", [dict(solver="cg"), dict(solver="cg", scaling=True),
                                dict(solver="pcg", scaling=False)],
                         ids=["cg", "cg-scaled", "pcg-unscaled"])
def test_iterative_solver_stall_is_not_success(kw):
    """Plain CG (or D = I) in float32 on columns scaled 1e-6..1e6: the inexact steps stopped
    1.3-1.7% above numpy's optimum and ftol/xtol reported success; now either the optimum
    or a failure that says the steps stalled with the gradient not orthogonal."""
    A, b = _scaled_linear()
    ref = np.linalg.lstsq(A.numpy(), b.numpy(), rcond=None)[0]
    ref_cost = 0.5 * np.sum((A.numpy() @ ref - b.numpy()) ** 2)
    _, info = fo.least_squares(lambda x: A.float() @ x - b.float(), torch.zeros(5),
                               rule=fo.Nielsen(), **kw)
    if info.success:
        assert abs(info.cost - ref_cost) <= 1e-4 * ref_cost
    else:  # which stop the inexact steps end on (xtol with the gnorm test, or ftol below
        # machine precision with the Gauss-Newton gain test) depends on the CPU's rounding
        assert info.reason.startswith("stalled")
        assert "grad_cos" in info.reason or "Gauss-Newton" in info.reason, info.reason


@pytest.mark.parametrize("noise", [1e-7, 1e-6, 1e-5, 1e-3])
def test_float32_near_zero_residual_fits_keep_their_success(noise):
    """A float32 exponential fit whose residuals are near rounding level ends with grad_cos
    far above sqrt(eps) (rounding in r dominates J^T r): the stall check must see that
    rounding explains it and keep the success; the fit equals float64 math's to float32
    accuracy."""
    t = torch.linspace(0, 4, 100, dtype=torch.float64)
    y = 2.5 * torch.exp(-1.3 * t) + 0.5 + noise * torch.randn(100, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fn = lambda p, t=t, y=y: p[0] * torch.exp(-p[1] * t) + p[2] - y
    ref, rinfo = fo.least_squares(fn, torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64))
    p, info = fo.least_squares(lambda p: fn(p, t.float(), y.float()), torch.tensor([1.0, 1.0, 0.0]))
    assert rinfo.success and info.success, info.reason
    np.testing.assert_allclose(p.double().numpy(), ref.numpy(), rtol=0, atol=max(30 * noise, 1e-5))


@pytest.mark.parametrize("dtype, c, x0", [
    (torch.float32, [2.0**24, 2.0**24 + 2], 1.0e7),
    (torch.float64, [1.0, 1.0 + 2**-52], 0.5)])
def test_optimum_between_representable_numbers_is_a_success(dtype, c, x0):
    """The minimiser (the mean of c) lies between two representable numbers and r = x - c is
    exact: gnorm stays large, but the move it asks for is below one ulp of x, so the point is
    optimal within the dtype (it was reported 'stalled')."""
    ct = torch.tensor(c, dtype=dtype)
    p, info = fo.least_squares(lambda x: x - ct, torch.tensor([x0], dtype=dtype))
    assert info.success, info.reason
    mean = sum(c) / 2
    assert abs(float(p) - mean) <= float(torch.finfo(dtype).eps) * abs(mean)


@pytest.mark.parametrize("solver", ["cg", "pcg", fo.solvers.CG(tol=1e-12)])
def test_matrix_free_solver_without_a_rule_takes_nielsen(solver):
    """least_squares' default rule is the trust region, which needs J's SVD: with a
    matrix-free solver and no rule given it used to raise; it takes Nielsen() (an explicit
    TrustRegion() still raises)."""
    t = torch.linspace(0, 4, 50, dtype=torch.float64)
    y = 2.5 * torch.exp(-1.3 * t)
    fn = lambda p: p[0] * torch.exp(-p[1] * t) - y
    p, info = fo.least_squares(fn, torch.tensor([1.0, 1.0], dtype=torch.float64), solver=solver)
    assert info.success, info.reason
    np.testing.assert_allclose(p.numpy(), [2.5, 1.3], rtol=1e-6)
    with pytest.raises(ValueError, match="TrustRegion"):
        fo.least_squares(fn, torch.zeros(2, dtype=torch.float64), solver=solver,
                         rule=fo.TrustRegion())


@pytest.mark.parametrize("solver", ["cholesky", "lu"])
def test_trust_region_with_a_singular_gram_takes_damped_steps(solver):
    """A zero column (an unused parameter) makes J^T J singular: the trust region's damping 0
    fails a Cholesky/LU solve, whose zero-length step used to set the radius to 0 and end the
    fit after one update. The radius now shrinks by itself, so a damped (regular) system is
    solved and the fit reaches the full-rank fit's cost."""
    t = torch.linspace(0, 4, 50, dtype=torch.float64)
    y = 2.5 * torch.exp(-1.3 * t) + 0.01 * torch.sin(7 * t)
    full = lambda p: p[0] * torch.exp(-p[1] * t) + p[2] - y
    _, ref = fo.least_squares(full, torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64))
    _, info = fo.least_squares(lambda p: full(p[:3]) + 0 * p[3],
                               torch.tensor([1.0, 1.0, 0.0, 5.0], dtype=torch.float64),
                               solver=solver)
    assert ref.success and info.success, info.reason
    np.testing.assert_allclose(info.cost, ref.cost, rtol=1e-9)


@pytest.mark.parametrize("name, start", [("MGH10", 0), ("Lanczos3", 1)])
def test_float32_nist_success_means_the_certified_minimum(name, start):
    """In float32 these fits stopped by 'xtol below machine precision' after an accepted step
    with success at 1.6e7 (MGH10) and 270 (Lanczos3) times the certified cost; a float64
    Gauss-Newton step from there still promised most of the difference. Success now means
    the certified minimum (to float32's accuracy); otherwise the fit says it stalled."""
    from funcopt import nist

    problem = nist.load(name, dtype=torch.float32)
    _, info = fo.least_squares(nist.residual_fn(problem), problem.starts[start])
    certified = problem.certified_rss / 2
    if info.success:
        assert info.cost <= 1.01 * certified + 1e-9 * float(problem.y.double().pow(2).sum())
    else:
        assert info.reason.startswith("stalled") and "Gauss-Newton step" in info.reason


@pytest.mark.parametrize("dtype, big", [(torch.float64, 1.5e308), (torch.float32, 3e38)])
def test_a_jacobian_column_beyond_the_dtype_is_a_clear_error(dtype, big):
    """A parameter whose derivatives' norm exceeds the dtype's largest number: the damping
    became NaN and the error named 'damping=nan', an internal value. Now one ValueError names
    the column and the fix."""
    t = torch.linspace(0, 4, 20, dtype=dtype)
    y = 2.5 * torch.exp(-1.3 * t)
    fn = lambda p: p[0] * torch.exp(-p[1] * t) + p[2] * big - y
    with pytest.raises(ValueError, match="column 2 of the Jacobian has a norm beyond"):
        fo.least_squares(fn, torch.tensor([1.0, 1.0, 0.0], dtype=dtype))
