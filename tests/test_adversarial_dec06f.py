"""Adversarial checks of the zero-column probe near overflow and stiff fitted columns (a
rounding-noise threshold from F's change over a few ulps of every parameter hid maxima in
both; the probe's bound now measures r(x + h) - r - J h with the zero columns fixed) and of
the batched driver's choice between the Gram and SVD models (``_spectral_model``)."""

from __future__ import annotations

import math

import pytest
import torch

import funcopt as fo

F64 = torch.float64
B0 = 709.782712893384 - 2e-13  # exp(B0) is finite; exp of B0 + 4 ulps overflows
E0 = math.exp(B0)


def _single(res, a, b, dtype=F64):
    p = {"a": torch.tensor(a, dtype=dtype), "b": torch.tensor(b, dtype=dtype)}
    return fo.least_squares(res, p)[1]


def _batched(res, a, b, dtype=F64):
    p = {"a": torch.tensor(a, dtype=dtype), "b": torch.tensor(b, dtype=dtype)}
    return fo.least_squares(res, p, batched=True)[1]


def _overflowing(p):
    """A maximum along ``a`` at 0 (``a^2 - 1``); ``b`` fitted exactly at ``B0``, where ``exp``
    overflows a few ulps higher."""
    return torch.stack([p["a"] ** 2 - 1, torch.exp(p["b"]) / E0 - 1], -1)


def test_overflow_at_noise_points_does_not_hide_a_maximum():
    """An inf residual a few ulps away must not hide the maximum along ``a``."""
    info = _single(_overflowing, 0.0, B0)
    assert not info.success and "not a minimum" in info.reason
    info = _batched(_overflowing, [0.0, 0.0], [B0, 700.0])
    assert info.success.tolist() == [False, False]


def _stiff(p):
    """A maximum along ``a`` at 0; ``b = 1e6`` fitted exactly, with ``k = 1e5``: 16 ulps of
    ``b`` move ``r_2`` by ~2e-4, ``F`` by ~4e-8 relative, above the probe's fall ``2 h^2``."""
    return torch.stack([p["a"] ** 2 - 1, 1e5 * (p["b"] - 1e6)], -1)


def test_stiff_fitted_parameter_does_not_hide_a_maximum_single():
    """A noise threshold from F's change over 16 ulps of every parameter counted the stiff
    column's quadratic rise as rounding and hid this maximum; the probe's rounding bound
    removes the fitted column's change (J h) and finds r's rounding there to be nil."""
    info = _single(_stiff, 0.0, 1e6)
    assert not info.success


def test_stiff_fitted_parameter_does_not_hide_a_maximum_batched():
    info = _batched(_stiff, [0.0, 0.0], [1e6, 1e6])
    assert not info.success.any()


@pytest.mark.parametrize("dtype,scales", [(F64, (1e-150, 1.0, 1e150)),
                                          (torch.float32, (1e-15, 1.0, 1e15))])
def test_maximum_found_at_every_scale_and_tolerance(dtype, scales):
    """Guard: the maximum along ``a`` is a failure at extreme residual scales, in float32,
    with loose tolerances, single and batched (rows at different ``b``)."""
    loose = fo.Tolerances(1e-3, 1e-3, 1e-3)
    for s in scales:
        def one(p, s=s):
            return s * torch.stack([p["a"] ** 2 - 1, torch.exp(p["b"]) - 3], -1)
        for tol in (fo.Tolerances(), loose):
            p = {"a": torch.tensor(0.0, dtype=dtype), "b": torch.tensor(0.0, dtype=dtype)}
            assert not fo.least_squares(one, p, tolerances=tol)[1].success
            pb = {"a": torch.zeros(3, dtype=dtype),
                  "b": torch.tensor([0.0, 1.0, math.log(3)], dtype=dtype)}
            info = fo.least_squares(one, pb, batched=True, tolerances=tol)[1]
            assert not info.success.any()


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("m,n,kinds", [
    (5, 3, ("ok", "rankdef", "zero", "ill")), (2, 4, ("ok", "ok")), (3, 1, ("ok", "zero")),
    (1, 3, ("ok",)), (4, 4, ("ok", "rankdef", "ill", "zerocol"))])
def test_mixed_batch_matches_single_driver(dtype, m, n, kinds):
    """Guard: a batch mixing well-conditioned, rank-deficient, nearly dependent, zero-column,
    all-zero and wide rows ends every row as the single driver does (success and cost)."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(len(kinds), m, n, dtype=F64, generator=g)
    for i, k in enumerate(kinds):
        if k == "rankdef":
            A[i, :, -1] = A[i, :, 0]
        elif k == "ill":
            A[i, :, -1] = A[i, :, 0] * (1 + 1e-9)
        elif k == "zerocol":
            A[i, :, 1 % n] = 0
        elif k == "zero":
            A[i] = 0
    y = torch.randn(len(kinds), m, dtype=F64, generator=g).to(dtype)
    A = A.to(dtype)

    def res(Ai, yi, x):
        z = Ai @ x[..., None]
        return (torch.tanh(z) + 0.1 * z)[..., 0] - yi

    _, info = fo.least_squares(lambda p: res(A, y, p["x"]),
                               {"x": torch.zeros(len(kinds), n, dtype=dtype)}, batched=True)
    tol = 1e-10 if dtype == F64 else 1e-4
    for i in range(len(kinds)):
        _, one = fo.least_squares(lambda p, i=i: res(A[i], y[i], p["x"]),
                                  {"x": torch.zeros(n, dtype=dtype)})
        assert bool(info.success[i]) == one.success
        assert float(info.cost[i]) == pytest.approx(float(one.cost), rel=tol, abs=tol)


def test_nan_row_leaves_other_rows_alone():
    """Guard: a row whose residuals are NaN fails without changing its neighbours' fits."""
    y = torch.tensor([[1.0, 2.0], [float("nan"), 1.0], [3.0, -1.0]], dtype=F64)

    def res(p):
        return torch.stack([p["x"] ** 2, p["x"] + p["c"]], -1) - y

    p = {"x": torch.ones(3, dtype=F64), "c": torch.zeros(3, dtype=F64)}
    _, info = fo.least_squares(res, p, batched=True)
    assert info.success.tolist() == [True, False, True]
    assert float(info.cost[0]) < 1e-20 and float(info.cost[2]) < 1e-20
