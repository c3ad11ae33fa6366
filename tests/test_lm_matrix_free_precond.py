"""The matrix-free path's Jacobi preconditioner: ``diag(J^T J)`` exactly, from the cheaper
side of ``J``, in chunks, never through an identity of size ``n``."""

import pytest
import torch

import funcopt as fo
from funcopt.func import gauss_newton_products
from funcopt.least_squares_options import _matrix_free_options
from funcopt.transforms.lm_model import column_norms_sq


def _problem(m, n):
    g = torch.Generator().manual_seed(m * 1000 + n)
    A = torch.randn(m, n, generator=g, dtype=torch.float64) * torch.logspace(-2, 2, n, dtype=torch.float64)
    y = torch.randn(m, generator=g, dtype=torch.float64)
    p = torch.randn(n, generator=g, dtype=torch.float64) / 10
    return (lambda v: torch.tanh(A @ v) - y), p


@pytest.mark.parametrize("m,n", [(7, 40), (40, 7), (9, 9)])
@pytest.mark.parametrize("chunk", [None, 1, 3, 1000])
def test_column_norms_sq_is_the_dense_diagonal(m, n, chunk):
    fn, p = _problem(m, n)
    J = torch.func.jacrev(fn)(p)
    got = column_norms_sq(gauss_newton_products(fn, p), chunk)
    torch.testing.assert_close(got, (J * J).sum(0), rtol=1e-12, atol=0)


def test_column_norms_sq_uses_min_m_n_products_and_no_identity(monkeypatch):
    """m = 5 rows against n = 300 columns: 5 vector-Jacobian products and no forward ones,
    and no ``torch.eye`` (an identity of size n is n^2 numbers: 40 GB at n = 10^5)."""
    fn, p = _problem(5, 300)
    gn = gauss_newton_products(fn, p)
    seen = {"jvp": 0, "vjp": 0}

    def counted(name, f):
        def g(v):
            seen[name] += 1
            return f(v)
        return g

    gn = gn._replace(jvp=counted("jvp", gn.jvp), vjp=counted("vjp", gn.vjp))
    monkeypatch.setattr(torch, "eye", lambda *a, **k: pytest.fail("torch.eye was called"))
    J = torch.func.jacrev(fn)(p)
    got = column_norms_sq(gn, 2)  # chunks of 2, 2 and 1: three vectorised calls
    torch.testing.assert_close(got, (J * J).sum(0), rtol=1e-12, atol=0)
    assert seen == {"jvp": 0, "vjp": 3}


def test_matrix_free_chunk_keeps_the_memory_model():
    """(4 + k)(m + n) numbers within the budget, 1 <= k <= 32."""
    m, n = 512, 10_071
    for budget in (4 * (m + n) * 4, 10 * (m + n) * 4, 10**10):
        _, _, opts = _matrix_free_options(m, n, torch.float32, budget, fo.Nielsen(), {})
        k = opts["chunk_size"]
        assert 1 <= k <= 32
        assert k == 1 or (4 + k) * (m + n) * 4 <= budget
    assert _matrix_free_options(m, n, torch.float32, 10 * (m + n) * 4, fo.Nielsen(), {})[2][
        "chunk_size"] == 6


def test_preconditioned_matrix_free_step_matches_dense():
    """The Jacobi-preconditioned CG step equals the dense Cholesky step (m < n: rows)."""
    fn, p = _problem(12, 30)
    dense = fo.levenberg_marquardt(fn, scaling=False, solver="cholesky",
                                   rule=fo.Nielsen(initial_damping=1e-2))
    J = torch.func.jacrev(fn)(p)
    lam0 = 1e-2 * float((J * J).sum(0).max())
    free = fo.levenberg_marquardt(fn, rule=fo.Nielsen(initial_damping=lam0), chunk_size=4,
                                  solver=fo.solvers.CG(tol=1e-13, preconditioner="jacobi"))
    ud, _ = dense.update(None, dense.init(p), p)
    uf, _ = free.update(None, free.init(p), p)
    torch.testing.assert_close(uf, ud, rtol=1e-8, atol=1e-12)
