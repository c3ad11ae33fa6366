"""Step functions in HeavyBall's convention, where ``t`` is the 1-based step (``count + 1`` of
funcopt's 0-based counter): PaLM's ``beta2``, the linear learning-rate warm-ups of the
HeavyBall, Schedule-Free and PSGD recipes, and the preconditioner refresh probabilities of
PSGD and SOAP. They are plain functions (not :class:`~funcopt.schedules.Schedule` objects):
with a tensor step they compute with tensor ops (no host read), as the transforms call them.

Reference: HeavyBall 0.7.2 and 3.2.1 (https://github.com/HomebrewML/HeavyBall).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from funcopt.engine import check_hyperparameter
from funcopt.schedules.standard import palm_beta2 as palm_beta2_of_count

__all__ = ["palm_beta2", "warmup_factor", "linear_warmup", "host_linear_warmup",
           "psgd_warmup", "precond_update_prob_schedule", "precond_schedule_probability"]

Tensor = torch.Tensor


def palm_beta2(scale: float = 0.8) -> Callable[[Any], Any]:
    """PaLM's ``beta2(t) = 1 - t^{-scale}`` (t counted from 1; clamped at 1), as HeavyBall
    0.7.2 computes it from its 1-based step: ``palm_beta2(c)(t) ==
    funcopt.schedules.palm_beta2(c)(t - 1)``, through that function. A step counter tensor
    gives a float64 0-d tensor (no host read: it traces under torch.compile and torch.func);
    a number gives a number (computed in float64)."""
    check_hyperparameter("scale", scale, low=0.0, low_inclusive=False)
    of_count = palm_beta2_of_count(scale)

    def beta2(t: Any) -> Any:
        if isinstance(t, Tensor):
            return of_count(t.to(torch.float64) - 1, dtype=torch.float64)
        return of_count(float(t) - 1)

    return beta2


def warmup_factor(t: Any, warmup_steps: Any) -> Tensor:
    """``min(1, t / T_w)`` for a tensor step ``t`` (``T_w = 0``: ``t / 0 = inf`` gives 1)."""
    return torch.clamp(t / warmup_steps, max=1.0)


def linear_warmup(lr: float, warmup_steps: int, offset: int = 1) -> Any:
    """HeavyBall 0.7.2's ``lr * min(t / warmup_steps, 1)`` at ``t = count + offset``, a
    function of the counter tensor; ``lr`` itself when ``warmup_steps`` is 0."""
    check_hyperparameter("warmup_steps", warmup_steps, low=0.0)
    if warmup_steps <= 0:
        return lr
    return lambda c: lr * warmup_factor(c + offset, warmup_steps)


def host_linear_warmup(lr: float, warmup_steps: int) -> Any:
    """``lr * min(t / warmup_steps, 1)`` as a Python float of the step ``t`` (read on the
    host, as SOAP's learning rate is); ``lr`` itself when ``warmup_steps <= 0``."""
    return lr if warmup_steps <= 0 else (lambda t: lr * min(float(t) / warmup_steps, 1.0))


def psgd_warmup(lr: float | Tensor, warmup_steps: int) -> Callable[[Tensor], Tensor]:
    """HeavyBall 3.2.1 PSGD's ``lr * t / max(t, T_w + 1)`` at ``t = count + 1``."""
    def value(c: Tensor) -> Tensor:
        t = torch.as_tensor(c).to(torch.float64) + 1  # float64: int counters divide in float32
        return lr * t / torch.clamp(t, min=warmup_steps + 1)

    return value


def precond_update_prob_schedule(
    max_prob: float = 1.0, min_prob: float = 0.03, decay: float = 0.999, flat_start: float = 1000
) -> Callable[[Tensor], Tensor]:
    """Preconditioner-update probability ``p(t) = max(min_prob, max_prob * decay^max(t - s, 0))``.

    Flat at ``max_prob`` for ``flat_start`` (:math:`s`) steps, then an exponential anneal to
    ``min_prob`` (HeavyBall 3.2.1 ``precond_update_prob_schedule``; ``t`` counts from 1).
    """
    def prob(t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        return torch.clamp(max_prob * decay ** torch.clamp(t - flat_start, min=0.0), min=min_prob)

    return prob


def precond_schedule_probability(step: Tensor | float, a: float = 1 / 3, b: float = 9.0
                                 ) -> Tensor | float:
    """HeavyBall's refresh probability ``1 / (log10(max(step, 1)^a)^b + 1)``.

    The interval ``f = 1/p`` is 1.00005 at step 10, 1.026 at 100, 2 at 1,000, 14.3 at 10,000,
    100.2 at 100,000 and 513 at 1,000,000 (HeavyBall 0.7.2 README, ``precond_scheduler=(1/3, 9)``).
    """
    if isinstance(step, Tensor):
        s = torch.clamp(step.to(torch.float64), min=1.0)
        return 1.0 / ((a * torch.log10(s)) ** b + 1.0)
    return 1.0 / ((a * math.log10(max(step, 1))) ** b + 1.0)
