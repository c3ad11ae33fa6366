"""Jacobians and Gauss-Newton products against torch.autograd and analytic formulas."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from funcopt.func import gauss_newton_products, jacobian, jacobian_chunk_size, ravel_params

DEFAULT_DTYPE = torch.float64  # applied per test by tests/conftest.py


def _residual(params, x):
    """r_i = a * exp(-b x_i) + c_i * x_i - 1: mixes a dict of leaves of several shapes."""
    return params["a"] * torch.exp(-params["b"] * x) + params["c"] * x - 1.0


def _params():
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.tensor(1.5),
        "b": torch.rand(1, generator=g),
        "c": torch.randn(7, generator=g),
        "n": torch.tensor(3),  # integer leaf: held fixed, no column
    }


def _analytic_jacobian(params, x):
    """dr/d(a, b, c) written out by hand, in tree order (a, b, c)."""
    a, b = params["a"], params["b"]
    e = torch.exp(-b * x)
    return torch.cat([e[:, None], (-a * x * e)[:, None], torch.diag(x)], dim=1)


@pytest.mark.parametrize("mode", ["auto", "forward", "reverse"])
@pytest.mark.parametrize("chunk_size", [None, 1, 3])
def test_jacobian_matches_analytic(mode, chunk_size):
    x = torch.linspace(0.1, 2.0, 7)
    params = _params()
    J, r = jacobian(_residual, params, x, mode=mode, chunk_size=chunk_size)
    assert J.shape == (7, 1 + 1 + 7)
    torch.testing.assert_close(J, _analytic_jacobian(params, x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r, _residual(params, x))


@settings(max_examples=6, deadline=None)
@given(m=st.integers(1, 9), n=st.integers(1, 9), seed=st.integers(0, 1000))
def test_jacobian_matches_autograd(m, n, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(m, n, generator=g)
    p = torch.randn(n, generator=g)

    def fn(w):
        return torch.tanh(A @ w) * w.sum()

    expected = torch.autograd.functional.jacobian(fn, p)
    for mode in ("forward", "reverse"):
        J, _ = jacobian(fn, p, mode=mode, chunk_size=2)
        torch.testing.assert_close(J, expected)


def test_gauss_newton_products():
    x = torch.linspace(0.1, 2.0, 7)
    params = _params()
    J = _analytic_jacobian(params, x)
    gn = gauss_newton_products(_residual, params, x)
    v = torch.randn(J.shape[1], generator=torch.Generator().manual_seed(1))
    u = torch.randn(J.shape[0], generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(gn.jvp(v), J @ v)
    torch.testing.assert_close(gn.vjp(u), J.T @ u)
    torch.testing.assert_close(gn.gnvp(v), J.T @ (J @ v))
    assert gn.size == J.shape[1]


def test_ravel_params_roundtrip_keeps_dtypes_and_integer_leaves():
    params = {"w": torch.randn(2, 3, dtype=torch.float32), "b": torch.randn(3), "k": torch.tensor(5)}
    flat, unravel = ravel_params(params)
    assert flat.dtype == torch.float64 and flat.shape == (9,)
    back = unravel(flat)
    assert back["w"].dtype == torch.float32 and back["k"] is params["k"]
    torch.testing.assert_close(back["w"], params["w"])
    torch.testing.assert_close(back["b"], params["b"])
    with pytest.raises(ValueError, match="shape"):
        unravel(flat[:3])


def test_errors_are_clear():
    with pytest.raises(ValueError, match="no floating-point leaves"):
        ravel_params({"n": torch.tensor([1, 2])})
    with pytest.raises(TypeError, match="floating point"):
        jacobian(lambda p: (p > 0).long(), torch.ones(3))
    with pytest.raises(TypeError, match="must return a tensor"):
        jacobian(lambda p: [p], torch.ones(3))
    with pytest.raises(ValueError, match="mode"):
        jacobian(lambda p: p, torch.ones(3), mode="central")


def test_chunk_size_from_memory_bound():
    item = 8
    k = jacobian_chunk_size(1000, 24, torch.float64, torch.device("cpu"), max_memory=4 * 1024 * item * 10)
    assert k == 10
    assert jacobian_chunk_size(5, 5, torch.float64, torch.device("cpu"), max_memory=1) == 1
    assert jacobian_chunk_size(50, 7, torch.float64, torch.device("cpu")) == 50
    assert math.isfinite(k)
