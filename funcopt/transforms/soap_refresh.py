"""SOAP's refresh rules: when the eigenbasis is recomputed (HeavyBall's schedule, every n).

A rule is ``refresh(step, seed) -> bool tensor``; random rules draw from a counter-based hash
of the seed kept in the optimizer state, so they need no generator and no host sync. Used by
:func:`funcopt.transforms.soap.scale_by_soap` and re-exported there and by ``funcopt``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from funcopt.base import Tensor, check_hyperparameter
from funcopt.schedules.one_based import precond_schedule_probability

__all__ = ["uniform_from_seed", "precond_schedule", "every_n_steps"]

RefreshFn = Callable[[Tensor, Tensor], Tensor]
_M32 = 0xFFFFFFFF


# --------------------------------------------------------------------------- refresh schedules


def _fmix32(h: Tensor) -> Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding values in [0, 2^32)."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def uniform_from_seed(seed: Tensor, count: Tensor) -> Tensor:
    """A reproducible uniform draw in [0, 1) from an int64 ``seed`` and step ``count``.

    A counter-based hash (MurmurHash3 finaliser of ``count + fmix(seed)``): pure tensor ops,
    no host sync, the same value for the same (seed, count) on every device.
    """
    key = _fmix32(seed.to(torch.int64) & _M32)
    h = _fmix32((count.to(torch.int64) + key) & _M32)
    return h.to(torch.float64) / 2.0**32


def precond_schedule(a: float = 1 / 3, b: float = 9.0) -> RefreshFn:
    """A SOAP/PSGD refresh rule: refresh with probability ``1/(log10(max(t,1)^a)^b + 1)``.

    Returns ``refresh(step, seed) -> bool tensor``; the draw is
    :func:`uniform_from_seed` (seed, step), so a run is reproducible from the seed in the
    optimizer state. Defaults ``a=1/3, b=9`` are HeavyBall 0.7.2's ``precond_scheduler``:
    about 738 refreshes in the first 1,000 steps.
    """
    check_hyperparameter("a", a, low=0.0, low_inclusive=False)
    check_hyperparameter("b", b, low=0.0, low_inclusive=False)

    def refresh(step: Tensor, seed: Tensor) -> Tensor:
        return uniform_from_seed(seed, step) < precond_schedule_probability(step, a, b)

    return refresh


def every_n_steps(n: int) -> RefreshFn:
    """Refresh when ``step % n == 0`` (SOAP's ``precondition_frequency``)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"precondition_frequency={n!r} must be a positive integer")
    return lambda step, seed: (step % n) == 0
