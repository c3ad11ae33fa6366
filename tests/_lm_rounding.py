"""What rounding decides in a Levenberg-Marquardt fit, for the tests that compare two runs on
other kernels: another CPU (its vector units and its BLAS may add terms in another order),
``vmap``, the batched or the data-parallel driver against the single one, or numbers recorded
on another machine.

A step's gain ratio ``rho`` divides the measured relative reduction of the cost,
``1 - (||r_new|| / ||r||)^2``, by the model's ``predicted`` one. Each norm is rounded to some
``(m + kappa) eps``, where ``kappa = ||y|| / ||r||`` measures how much the residual cancels, so
the measured reduction is off by up to about ``4 (m + kappa) eps`` (:data:`NOISE`) and ``rho`` by
``NOISE / predicted``. Far from the solution that is nothing; at the solution, where the steps
predict 1e-15 of the cost and less, ``rho`` is rounding, and so are the steps accepted there,
the damping and trust radius that follow and the tolerance test that stops the fit: two runs
that agree to rounding agree there only on where they end (:func:`flip_radius`)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from funcopt.least_squares_batched import REASONS

NOISE = 1e-13
"""Bound on the rounding of a measured relative cost reduction in float64 on these tests' fits:
``4 (m + kappa) eps`` with ``m <= 40`` residuals and ``kappa <= 150`` is 8e-14. (Between two
CPUs, and between the batched, vmapped, data-parallel and single paths, ``|d rho| * predicted``
was at most 1e-14.)"""

RTOL = 1e-6
"""The relative tolerance to which the numbers of a :func:`resolved` step are compared."""

FLOOR_STOPS = REASONS[2:9]
"""The tolerance tests (gtol, ftol, xtol and their forms below machine precision): at the
solution the cost's rounding decides which of them holds first, and after how many updates."""


def resolved(predicted: float | torch.Tensor) -> bool:
    """Whether a step's gain ratio, and the damping, radius and decisions taken on it, are known
    to :data:`RTOL` on any machine: its predicted relative reduction is at least
    ``NOISE / RTOL`` (False for NaN, a step that was not solved)."""
    return float(predicted) >= NOISE / RTOL


def flip_radius(residual_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> float:
    """How far apart two runs that agree to rounding may be once rounding decides their steps,
    near a minimum ``x`` of ``residual_fn`` (float64): ``4 sqrt(NOISE) ||r|| / sigma_min(J)``.

    Rounding can flip the decision on a step only where ``rho``'s error ``NOISE / predicted``
    reaches the distance ~1/4 from ``rho ~ 1`` to the rules' thresholds, so where
    ``predicted <= 4 NOISE``. Such a step has ``||J delta||^2 / ||r||^2 <= predicted`` (the
    model's reduction is at least ``||J delta||^2 / 2``), so ``||delta|| <= 2 sqrt(NOISE) ||r||
    / sigma_min(J)``; twice that covers the steps one run takes and the other does not (their
    sizes fall geometrically at the solution)."""
    r = residual_fn(x)
    J = torch.func.jacrev(residual_fn)(x).reshape(r.numel(), -1)
    smin = torch.linalg.svdvals(J)[-1]
    return float(4 * math.sqrt(NOISE) * torch.linalg.vector_norm(r) / smin)


def assert_within(got: torch.Tensor, want: torch.Tensor, radius: float) -> None:
    """``||got - want|| <= radius``."""
    err = float(torch.linalg.vector_norm((got - want).double()))
    assert err <= radius, (err, radius)
