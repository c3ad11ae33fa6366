"""The dense Levenberg-Marquardt step on a large Jacobian (more than ``COLUMN_BLOCK``
numbers): column statistics read in blocks of rows, ``J`` scaled in place with ``gamma`` from
the column norms, and the Gram matrix from its lower blocks. Each is checked against float64
references computed here with plain torch.linalg."""

from __future__ import annotations

import pytest
import torch
from _lm_stats import column_stats as _column_stats

import funcopt as fo
from funcopt.solvers import DampedLeastSquares
from funcopt.solvers.operators import _gram_matrix
from funcopt.transforms import lm_model
from funcopt.transforms.lm_model import COLUMN_BLOCK, _damped_solver

F64 = torch.float64


def _close_in_norm(got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    """``||got - want|| <= rtol ||want||`` (steps of ill-conditioned systems agree in norm;
    their small components carry the conditioning)."""
    err = float(torch.linalg.vector_norm(got - want))
    assert err <= rtol * float(torch.linalg.vector_norm(want)), (err, rtol)


def _reference_stats(J: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Column norms and MINPACK's gnorm in float64 (J and r of moderate size)."""
    J, r = J.to(F64), r.to(F64)
    col = torch.linalg.vector_norm(J, dim=0)
    g = (J.T @ r).abs() / (col * torch.linalg.vector_norm(r))
    return col, torch.where(col > 0, g, 0.0).max()


def _big(m: int, n: int, dtype=torch.float32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    J = torch.randn(m, n, generator=gen, dtype=F64) * torch.logspace(-2, 2, n, dtype=F64)
    return J.to(dtype), torch.randn(m, generator=gen, dtype=F64).to(dtype)


def test_the_blocked_statistics_match_float64():
    J, r = _big(300, 1000)
    assert J.numel() > COLUMN_BLOCK
    col, cos = _column_stats(J, r, torch.linalg.vector_norm(r))
    want_col, want_cos = _reference_stats(J, r)
    torch.testing.assert_close(col.to(F64), want_col, rtol=1e-5, atol=0)
    torch.testing.assert_close(cos.to(F64), want_cos, rtol=1e-4, atol=0)


@pytest.mark.parametrize("column_scale", [1e30, 1e-25, 0.0])
def test_columns_whose_squares_overflow_underflow_or_vanish_are_measured_exactly(column_scale):
    """float32 squares of 1e30 overflow and of 1e-25 underflow; a zero column has no scale:
    those columns are measured again with the scaled formula."""
    J, r = _big(300, 1000)
    J[:, 7] = column_scale * torch.linspace(-1, 1, 300)
    col, cos = _column_stats(J, r, torch.linalg.vector_norm(r))
    want_col, want_cos = _reference_stats(J, r)
    torch.testing.assert_close(col.to(F64), want_col, rtol=1e-5, atol=0)
    torch.testing.assert_close(cos.to(F64), want_cos, rtol=1e-4, atol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_large_jacobian_raises(bad):
    J, r = _big(300, 1000)
    J[123, 456] = bad
    with pytest.raises(ValueError, match="non-finite residuals or Jacobian"):
        _column_stats(J, r, torch.linalg.vector_norm(r))


@pytest.mark.parametrize("shape", [(3, 5), (64, 9), (65, 7), (200, 50), (513, 130)])
def test_the_gram_matrix_from_its_lower_blocks(shape):
    A = torch.randn(*shape, dtype=F64)
    G = _gram_matrix(A)
    assert torch.equal(G, G.T)
    torch.testing.assert_close(G, A @ A.T, rtol=1e-13, atol=1e-12)
    torch.testing.assert_close(_gram_matrix(A.T.contiguous().T), G, rtol=1e-13, atol=1e-12)


@pytest.mark.parametrize("m,n", [(200, 600), (600, 200)])  # dual and primal form
def test_a_bound_and_overwrite_give_the_same_step(m, n):
    """``gamma`` from a bound differs from the one from ``max |J / s|`` by a power of two:
    the same numbers. ``overwrite`` divides the caller's ``J`` in place (no copy)."""
    J, r = _big(m, n, F64, seed=1)
    s = torch.linalg.vector_norm(J, dim=0)
    dls = DampedLeastSquares("cholesky")
    want = dls.compute(dls.init(dls.plan(J, scale=s), 1e-2), r).value
    bound = (s / s).max() * 7.0  # any bound b with max|J/s| <= b works up to rounding
    Jc = J.clone()
    plan = dls.plan(Jc, scale=s, bound=bound, overwrite=True)
    assert plan.J.data_ptr() == Jc.data_ptr()
    got = dls.compute(dls.init(plan, 1e-2), r).value
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    A = J.T @ J + 1e-2 * torch.diag(s * s)
    torch.testing.assert_close(got, torch.linalg.solve(A, J.T @ r), rtol=1e-9, atol=0)


def test_jv_of_an_overwritten_jacobian_is_j_times_v():
    J, _ = _big(200, 600, F64, seed=2)
    s = torch.linalg.vector_norm(J, dim=0)
    v = torch.randn(600, dtype=F64, generator=torch.Generator().manual_seed(5))
    want = J @ v
    _, _, jv = _damped_solver(J.clone(), s, "auto", "auto", s.div(s).max(), overwrite=True)
    # a sum of 600 products: within 600 eps (|J| |v|) of J v entry by entry (a relative
    # tolerance on J v itself fails where the sum cancels)
    bound = 600 * torch.finfo(F64).eps * (J.abs() @ v.abs())
    assert bool(((jv(v) - want).abs() <= bound).all())


def _mlp_problem(m: int, width: int, scale: float = 1.0):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(m, 4, generator=gen, dtype=F64)
    y = torch.sin(x.sum(1, keepdim=True))
    params = {"w1": 0.5 * torch.randn(4, width, generator=gen, dtype=F64),
              "w2": 0.5 * torch.randn(width, width, generator=gen, dtype=F64),
              "w3": 0.5 * torch.randn(width, 1, generator=gen, dtype=F64)}

    def residual(p):
        h = torch.tanh(torch.tanh(x @ p["w1"]) @ p["w2"])
        return scale * (h @ p["w3"] - y).reshape(-1)

    return residual, params


@pytest.mark.parametrize("m,width", [(160, 40), (900, 18)])  # m < n: dual form; m > n: primal
def test_first_step_on_a_large_jacobian_equals_float64_normal_equations(m, width):
    residual, params = _mlp_problem(m, width)
    x, unravel = fo.func.ravel_params(params)
    J = torch.func.jacrev(lambda v: residual(unravel(v)))(x)
    assert J.numel() > COLUMN_BLOCK
    r = residual(params)
    d = torch.linalg.vector_norm(J, dim=0)
    lam = fo.Nielsen().initial_damping
    want = -torch.linalg.solve(J.T @ J + lam * torch.diag(d * d), J.T @ r)
    tx = fo.levenberg_marquardt(residual, scaling=True)  # the default only where m >= n
    upd, state = tx.update(None, tx.init(params), params)
    got, _ = fo.func.ravel_params(upd)
    assert bool(state.accepted) and int(state.attempts) == 1
    _close_in_norm(got, want, 1e-10)
    torch.testing.assert_close(state.scale, d, rtol=1e-12, atol=0)
    _, want_cos = _reference_stats(J, r)
    torch.testing.assert_close(state.grad_cos, want_cos, rtol=1e-10, atol=0)


@pytest.mark.parametrize("scale", [1e160, 1e-160])
def test_steps_on_a_large_jacobian_do_not_depend_on_the_scale_of_the_residuals(scale):
    """Squares of ``1e160 J`` overflow float64 and those of ``1e-160 J`` underflow: the
    column statistics fall back to the scaled formula, and the steps are those at scale 1."""
    def run(s):
        residual, params = _mlp_problem(160, 40, s)
        tx = fo.levenberg_marquardt(residual, scaling=True)  # D's statistics at every scale
        state, out = tx.init(params), []
        for _ in range(3):
            upd, state = tx.update(None, state, params)
            params = fo.apply_updates(params, upd)
            out.append(fo.func.ravel_params(params)[0])
        return torch.stack(out), state

    want, s1 = run(1.0)
    got, s2 = run(scale)
    for a, b in zip(got, want):
        _close_in_norm(a, b, 1e-10)
    assert int(s1.attempts) == int(s2.attempts)


def test_the_large_path_is_taken_by_the_mlp_problem(monkeypatch):
    """The problems above reach the blocked statistics (not only the scaled fallback)."""
    calls = []
    monkeypatch.setattr(lm_model, "_column_stats_scaled",
                        lambda *a: calls.append(1) or pytest.fail("fallback taken"))
    for m, width in [(160, 40), (900, 18)]:
        residual, params = _mlp_problem(m, width)
        tx = fo.levenberg_marquardt(residual)
        tx.update(None, tx.init(params), params)
    assert not calls
