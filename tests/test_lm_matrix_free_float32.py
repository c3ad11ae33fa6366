"""The matrix-free path of ``fo.least_squares`` in float32: CG's tolerance follows the dtype."""

import numpy as np
import pytest
import torch

import funcopt as fo


def _wide_problem(dtype):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(200, 50, generator=g, dtype=torch.float64) * torch.logspace(0, 2, 50)
    y = torch.randn(200, generator=g, dtype=torch.float64)
    A, y = A.to(dtype), y.to(dtype)
    return lambda p: torch.tanh(A @ p / 100) * 3 - y


def test_float32_matrix_free_path_reaches_scipys_cost():
    """With CG at a relative tolerance of 1e-10, out of float32's reach, every solve failed
    until the damping was ~1e7, and the fit stopped at cost 91.1 with a success flag; scipy's
    float64 answer is 70.99."""
    so = pytest.importorskip("scipy.optimize")
    fn = _wide_problem(torch.float32)
    p, info = fo.least_squares(fn, torch.zeros(50, dtype=torch.float32), memory_budget=20_000,
                               tolerances=fo.Tolerances(ftol=1e-6, xtol=1e-6, gtol=1e-6))
    assert info.path == "matrix-free" and info.success, info.reason
    fn64 = _wide_problem(torch.float64)
    ref = so.least_squares(lambda v: fn64(torch.tensor(v)).numpy(), np.zeros(50), method="lm",
                           xtol=1e-14, ftol=1e-14, gtol=1e-14)
    np.testing.assert_allclose(info.cost, ref.cost, rtol=1e-5)
    assert info.history[0]["attempts"] == 1  # the first solve already succeeds
