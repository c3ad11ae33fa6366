"""The trust-region rule's Gauss-Newton step (``lambda = 0``) where ``J`` is rank deficient.

``J^T J`` is then singular to working precision, and Cholesky either meets a non-positive
pivot or factors the rounding: a last pivot of a few ``eps`` of the largest passes the pivot
test and sends the step along ``J``'s null space. Which happens depends on the CPU's kernels
(on this rank-1 family about one start in six factors the rounding on an AVX2 CPU; an
AVX-512 one differs). The step must not: "auto" takes the minimum-norm step
``-pinv(J) r`` (the batched driver's, from its SVD model), and a named Cholesky rejects the
attempt (the trust region shrinks, ``lambda > 0``, the step stays in ``J``'s row space)."""

from __future__ import annotations

import pytest
import torch

import funcopt as fo

F64 = torch.float64
T = torch.linspace(0, 1, 20, dtype=F64)
# starts where this CPU's Cholesky of the rank-1 J^T J passes its pivot test (and one where
# it does not): the answer must be the same for both kinds
STARTS = [(1.8802120072262123, 0.8312794575991518), (1.1842344333619526, -0.5281191826820573),
          (1.1420946279820448, 0.6639769875479087), (2.0, 0.1)]


def _product(a):  # J = [a1 t, a0 t]: rank 1 everywhere
    return a[..., :1] * a[..., 1:] * T - 2 * T + 0.05 * torch.sin(5 * T)


def _pinv_step(x0):
    J = torch.func.jacrev(_product)(x0)
    return x0 - torch.linalg.pinv(J) @ _product(x0)


@pytest.mark.parametrize("start", STARTS)
def test_the_first_step_is_the_minimum_norm_gauss_newton_step(start):
    x0 = torch.tensor(start, dtype=F64)
    xs, info = fo.least_squares(_product, x0.clone(), max_steps=1, scaling=False)
    assert info.history[0]["damping"] == 0.0 and info.history[0]["attempts"] == 1
    torch.testing.assert_close(xs, _pinv_step(x0), rtol=1e-10, atol=1e-12)
    xb, _ = fo.least_squares(_product, x0[None].clone(), batched=True, max_steps=1,
                             scaling=False)
    torch.testing.assert_close(xb[0], xs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("start", STARTS)
def test_a_named_cholesky_rejects_the_singular_gauss_newton_step(start):
    """No step along the null space: the accepted step is a multiple of J's row (a1, a0)."""
    x0 = torch.tensor(start, dtype=F64)
    xs, info = fo.least_squares(_product, x0.clone(), max_steps=1, scaling=False,
                                solver="cholesky")
    step = xs - x0
    row = torch.stack([x0[1], x0[0]])
    assert info.history[0]["attempts"] >= 2 and info.history[0]["damping"] > 0
    cross = step[0] * row[1] - step[1] * row[0]
    assert abs(float(cross)) <= 1e-12 * float(step.norm() * row.norm()), (step, row)


@pytest.mark.parametrize("start", [s for s in STARTS if s[0] * s[1] > 0])
def test_the_fit_ends_on_the_solution_curve_with_success(start):
    """From a start with ``a0 a1 > 0`` (from one below 0 the fit crosses the saddle line
    ``a0 a1 = 0``, where ``J`` is zero along one column and the path is rounding's)."""
    x0 = torch.tensor(start, dtype=F64)
    for solver in ("auto", "cholesky"):
        xs, info = fo.least_squares(_product, x0.clone(), solver=solver)
        ref = torch.linalg.lstsq(T[:, None], (2 * T - 0.05 * torch.sin(5 * T))[:, None])
        assert info.success, info.reason
        torch.testing.assert_close(xs[0] * xs[1], ref.solution[0, 0], rtol=1e-7, atol=0)


def test_an_ftol_stop_on_the_saddle_line_is_not_success():
    """From (1.18, -0.53) with solver='cholesky' the fit crosses to the saddle line a0 a1 = 0
    and ends at a0 = 4.4e-16, a1 = 0.747 on MINPACK's ftol test (an accepted step along a1,
    whose column a0 t is ~0, predicts a relative reduction below ftol), though a step along a0
    alone cuts the cost: the stall check judges an ftol stop too (a deterministic start onto
    such a point, in every driver: tests/test_lm_ftol_stall.py)."""
    x0 = torch.tensor(STARTS[1], dtype=F64)
    xs, info = fo.least_squares(_product, x0.clone(), solver="cholesky")
    if not (abs(float(xs[0])) < 1e-12 and abs(float(xs[1])) > 0.1 and "ftol" in info.reason):
        pytest.skip(f"this CPU's path ends elsewhere ({xs.tolist()}, {info.reason[:40]})")
    g = torch.func.jacrev(_product)(xs).T @ _product(xs)
    assert abs(float(g[0])) > 1.0  # the point is not stationary ...
    assert not info.success, info.reason  # ... so it must not be a success
