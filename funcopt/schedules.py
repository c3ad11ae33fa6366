"""Schedules: functions ``step -> value`` for learning rates and other hyperparameters.

Every schedule takes the step count ``t`` (the number of updates already made: 0 on the
first update) as a Python int or a 0-d integer tensor. With a tensor it returns a 0-d float32
tensor on the step's device, computed with tensor ops only (no host sync; traces under
``torch.compile``); with a Python int it returns a Python float (computed in float64).
Names and formulas follow optax's schedules (``optax.linear_schedule`` -> :func:`linear` ...).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Union

import torch

Tensor = torch.Tensor
Value = Union[float, Tensor]
Schedule = Callable[[Union[int, Tensor]], Value]

__all__ = [
    "constant",
    "linear",
    "polynomial",
    "exponential_decay",
    "piecewise_constant",
    "cosine_decay",
    "warmup_cosine_decay",
    "warmup_cosine",
    "warmup_constant",
    "linear_onecycle",
    "join_schedules",
    "inverse_sqrt",
    "palm_beta2",
]


def _wrap(fn: Callable[[Tensor], Tensor]) -> Schedule:
    """Run ``fn`` on a float tensor step; return a float for int steps, a tensor for tensors."""

    def schedule(step):
        if isinstance(step, Tensor):
            if step.ndim != 0:
                raise ValueError(f"a schedule takes a 0-d step, got shape {tuple(step.shape)}")
            return fn(step.to(torch.float32))
        if isinstance(step, bool) or not isinstance(step, (int, float)):
            raise TypeError(f"a schedule takes an int or a 0-d tensor step, got {type(step)}")
        return float(fn(torch.tensor(float(step), dtype=torch.float64)))

    return schedule


def _check_steps(name: str, value: int, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} must be an int >= {low}")


def constant(value: float) -> Schedule:
    """``v(t) = value`` for every step."""
    return lambda step: value


def polynomial(init_value: float, end_value: float, power: float, transition_steps: int,
               transition_begin: int = 0) -> Schedule:
    """Polynomial decay from ``init_value`` to ``end_value`` over ``transition_steps`` steps.

    ``v(t) = (v0 - v1) (1 - s / T)^p + v1`` with ``s = clip(t - t0, 0, T)``; ``v0`` =
    ``init_value``, ``v1`` = ``end_value``, ``p`` = ``power``, ``T`` = ``transition_steps``
    (>= 1), ``t0`` = ``transition_begin`` (>= 0, default 0). Reference: optax.polynomial_schedule.
    """
    _check_steps("transition_steps", transition_steps)
    _check_steps("transition_begin", transition_begin, low=0)

    def fn(t):
        s = torch.clamp(t - transition_begin, 0, transition_steps)
        return (init_value - end_value) * (1 - s / transition_steps) ** power + end_value

    return _wrap(fn)


def linear(init_value: float, end_value: float, transition_steps: int,
           transition_begin: int = 0) -> Schedule:
    """Linear ramp: :func:`polynomial` with ``power=1``. Reference: optax.linear_schedule."""
    return polynomial(init_value, end_value, 1.0, transition_steps, transition_begin)


def exponential_decay(init_value: float, transition_steps: int, decay_rate: float,
                      transition_begin: int = 0, staircase: bool = False,
                      end_value: float | None = None) -> Schedule:
    """``v(t) = v0 r^{(t - t0) / T}`` for ``t > t0``, ``v0`` before.

    ``v0`` = ``init_value``; ``r`` = ``decay_rate`` (> 0); ``T`` = ``transition_steps`` (>= 1);
    ``t0`` = ``transition_begin`` (default 0); ``staircase`` (default False) floors the
    exponent; ``end_value`` (default None) bounds the value (a floor when ``r < 1``, a ceiling
    when ``r > 1``). Reference: optax.exponential_decay.
    """
    _check_steps("transition_steps", transition_steps)
    _check_steps("transition_begin", transition_begin, low=0)
    if not decay_rate > 0:
        raise ValueError(f"decay_rate={decay_rate} must be > 0")

    def fn(t):
        s = t - transition_begin
        p = torch.floor(s / transition_steps) if staircase else s / transition_steps
        v = torch.where(s <= 0, torch.full_like(t, init_value), init_value * decay_rate**p)
        if end_value is not None:
            bound = torch.full_like(t, end_value)
            v = torch.maximum(v, bound) if decay_rate < 1 else torch.minimum(v, bound)
        return v

    return _wrap(fn)


def piecewise_constant(init_value: float, boundaries_and_scales: dict[int, float]) -> Schedule:
    """``v(t) = v0 * prod_{b_i <= t} s_i``: multiply by ``s_i`` from step ``b_i`` on.

    ``v0`` = ``init_value``; ``boundaries_and_scales`` = ``{b_i: s_i}`` (scales >= 0).
    Reference: optax.piecewise_constant_schedule.
    """
    items = sorted((boundaries_and_scales or {}).items())
    if any(s < 0 for _, s in items):
        raise ValueError("piecewise_constant: scales must be >= 0")

    def fn(t):
        v = torch.full_like(t, init_value)
        for b, s in items:
            v = torch.where(t >= b, v * s, v)
        return v

    return _wrap(fn)


def cosine_decay(init_value: float, decay_steps: int, alpha: float = 0.0,
                 exponent: float = 1.0) -> Schedule:
    """``v(t) = v0 ((1 - alpha) c^e + alpha)``, ``c = (1 + cos(pi min(t, T) / T)) / 2``.

    ``v0`` = ``init_value``; ``T`` = ``decay_steps`` (>= 1); ``alpha`` (default 0) is the
    final fraction of ``v0``; ``e`` = ``exponent`` (default 1). Reference:
    Loshchilov & Hutter, SGDR, 2017; optax.cosine_decay_schedule.
    """
    _check_steps("decay_steps", decay_steps)

    def fn(t):
        c = 0.5 * (1 + torch.cos(math.pi * torch.clamp(t, max=decay_steps) / decay_steps))
        return init_value * ((1 - alpha) * c**exponent + alpha)

    return _wrap(fn)


def join_schedules(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Schedule ``i`` runs on ``[b_{i-1}, b_i)`` and sees the step ``t - b_{i-1}``.

    ``schedules``: n schedules; ``boundaries``: n - 1 increasing step numbers.
    Reference: optax.join_schedules.
    """
    if len(boundaries) != len(schedules) - 1:
        raise ValueError(
            f"join_schedules: {len(schedules)} schedules need {len(schedules) - 1} boundaries, "
            f"got {len(boundaries)}"
        )

    def schedule(step):
        out = schedules[0](step)
        for b, s in zip(boundaries, schedules[1:]):
            if isinstance(step, Tensor):
                out = torch.where(step < b, torch.as_tensor(out, device=step.device),
                                  torch.as_tensor(s(step - b), device=step.device))
                out = out.to(torch.float32)
            elif step >= b:
                out = s(step - b)
        return out if isinstance(step, Tensor) else float(out)

    return schedule


def warmup_cosine_decay(init_value: float, peak_value: float, warmup_steps: int,
                        decay_steps: int, end_value: float = 0.0,
                        exponent: float = 1.0) -> Schedule:
    """Linear warmup from ``init_value`` to ``peak_value`` over ``warmup_steps``, then cosine
    decay to ``end_value`` at step ``decay_steps`` (the total, warmup included; must exceed
    ``warmup_steps``); ``exponent`` as in :func:`cosine_decay`.
    Reference: optax.warmup_cosine_decay_schedule.
    """
    _check_steps("warmup_steps", warmup_steps, low=0)
    if decay_steps <= warmup_steps:
        raise ValueError(f"decay_steps={decay_steps} must exceed warmup_steps={warmup_steps}")
    alpha = 0.0 if peak_value == 0 else end_value / peak_value
    decay = cosine_decay(peak_value, decay_steps - warmup_steps, alpha, exponent)
    if warmup_steps == 0:
        return decay
    return join_schedules([linear(init_value, peak_value, warmup_steps), decay], [warmup_steps])


def warmup_cosine(peak_value: float, warmup_steps: int, decay_steps: int,
                  init_value: float = 0.0, end_value: float = 0.0) -> Schedule:
    """:func:`warmup_cosine_decay` with the peak first and warmup from 0 by default."""
    return warmup_cosine_decay(init_value, peak_value, warmup_steps, decay_steps, end_value)


def warmup_constant(init_value: float, peak_value: float, warmup_steps: int) -> Schedule:
    """Linear warmup from ``init_value`` to ``peak_value`` over ``warmup_steps``, then constant.
    Reference: optax.warmup_constant_schedule."""
    return linear(init_value, peak_value, warmup_steps)


def linear_onecycle(transition_steps: int, peak_value: float, pct_start: float = 0.3,
                    pct_final: float = 0.85, div_factor: float = 25.0,
                    final_div_factor: float = 1e4) -> Schedule:
    """One-cycle: linear from ``p / d`` up to ``p`` at ``pct_start T``, down to ``p / d`` at
    ``pct_final T``, then to ``p / (d D)`` at ``T``, constant after.

    ``p`` = ``peak_value``; ``T`` = ``transition_steps``; ``d`` = ``div_factor`` (25);
    ``D`` = ``final_div_factor`` (1e4). Reference: Smith & Topin, "Super-convergence", 2018;
    optax.linear_onecycle_schedule.
    """
    _check_steps("transition_steps", transition_steps)
    bounds = [0, int(pct_start * transition_steps), int(pct_final * transition_steps),
              transition_steps]
    vals = [peak_value / div_factor, peak_value, peak_value / div_factor,
            peak_value / (div_factor * final_div_factor)]

    def fn(t):
        v = torch.full_like(t, vals[-1])
        for i in range(3):
            b0, b1 = bounds[i], bounds[i + 1]
            pct = (t - b0) / max(b1 - b0, 1)
            inside = (t >= b0) & (t < b1)
            v = torch.where(inside, vals[i] + (vals[i + 1] - vals[i]) * pct, v)
        return v

    return _wrap(fn)


def inverse_sqrt(peak_value: float, warmup_steps: int = 0) -> Schedule:
    """Linear warmup from 0, then decay as ``1 / sqrt(t)``.

    ``v(t) = p t / w`` for ``t < w``; ``v(t) = p sqrt(max(w, 1) / max(t, 1))`` after.
    ``p`` = ``peak_value``; ``w`` = ``warmup_steps`` (default 0). Reference: Vaswani et al.,
    "Attention is all you need", 2017; fairseq's ``inverse_sqrt`` scheduler (warmup from 0).
    """
    _check_steps("warmup_steps", warmup_steps, low=0)
    w = max(warmup_steps, 1)

    def fn(t):
        decay = peak_value * torch.sqrt(w / torch.clamp(t, min=w))
        if warmup_steps == 0:
            return decay
        return torch.where(t < warmup_steps, peak_value * t / warmup_steps, decay)

    return _wrap(fn)


def palm_beta2(beta2_scale: float = 0.8) -> Schedule:
    """PaLM's second-moment decay ``beta2(k) = 1 - k^(-c)`` with ``k = t + 1``.

    ``c`` = ``beta2_scale`` (default 0.8). ``k`` is the 1-based step, as in HeavyBall 3.2.1
    (``palm_beta2`` in ``heavyball/chainable.py`` uses its step counter after incrementing it,
    so the first update has ``k = 1`` and ``beta2 = 0``). Here ``t`` is the 0-based count.
    Reference: Chowdhery et al., "PaLM", 2022, section 5.
    """
    if not beta2_scale > 0:
        raise ValueError(f"beta2_scale={beta2_scale} must be > 0")
    return _wrap(lambda t: 1 - (t + 1) ** (-beta2_scale))
