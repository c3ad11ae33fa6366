"""The schedules under optax's names (``optax.linear_schedule`` -> :func:`linear` ...) and
PaLM's ``beta2``, each a :class:`~funcopt.schedules.base.Schedule` of the 0-based step."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from funcopt.schedules.base import (
    Schedule,
    Step,
    StepFn,
    Tensor,
    _check_number,
    _check_step,
    _check_steps,
    _evaluate,
    _renamed,
    as_schedule,
)

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


def constant(value: float) -> Schedule:
    """``v(t) = value`` for every step, returned as given (a number stays a number).

    ``value``: a finite number (or a tensor, returned as it is). Reference: optax.constant_schedule.
    """
    _check_number("constant", "value", value)

    def fn(step: Step, dtype: torch.dtype | None) -> Any:
        _check_step(step)
        return value

    return Schedule(fn, "constant", {"value": value})


def _polynomial(init_value, end_value, power, transition_steps, transition_begin) -> StepFn:
    def fn(t):
        s = torch.clamp(t - transition_begin, 0, transition_steps)
        return (init_value - end_value) * (1 - s / transition_steps) ** power + end_value

    return _evaluate(fn)


def _check_polynomial(who, init_value, end_value, power, transition_steps, transition_begin):
    _check_number(who, "init_value", init_value)
    _check_number(who, "end_value", end_value)
    _check_number(who, "power", power, 0, open_low=True)
    _check_steps(who, "transition_steps", transition_steps)
    _check_steps(who, "transition_begin", transition_begin, low=0)


def polynomial(init_value: float, end_value: float, power: float, transition_steps: int,
               transition_begin: int = 0) -> Schedule:
    """Polynomial decay from ``init_value`` to ``end_value`` over ``transition_steps`` steps.

    ``v(t) = (v0 - v1) (1 - s / T)^p + v1`` with ``s = clip(t - t0, 0, T)``; ``v0`` =
    ``init_value``, ``v1`` = ``end_value``, ``p`` = ``power`` (> 0), ``T`` =
    ``transition_steps`` (>= 1), ``t0`` = ``transition_begin`` (>= 0, default 0).
    Reference: optax.polynomial_schedule.
    """
    args = dict(init_value=init_value, end_value=end_value, power=power,
                transition_steps=transition_steps, transition_begin=transition_begin)
    _check_polynomial("polynomial", **args)
    return Schedule(_polynomial(**args), "polynomial", args)


def linear(init_value: float, end_value: float, transition_steps: int,
           transition_begin: int = 0) -> Schedule:
    """Linear ramp: :func:`polynomial` with ``power=1``. Reference: optax.linear_schedule."""
    args = dict(init_value=init_value, end_value=end_value, transition_steps=transition_steps,
                transition_begin=transition_begin)
    _check_polynomial("linear", power=1.0, **args)
    return Schedule(_polynomial(power=1.0, **args), "linear", args)


def exponential_decay(init_value: float, transition_steps: int, decay_rate: float,
                      transition_begin: int = 0, staircase: bool = False,
                      end_value: float | None = None) -> Schedule:
    """``v(t) = v0 r^{(t - t0) / T}`` for ``t > t0``, ``v0`` before.

    ``v0`` = ``init_value``; ``r`` = ``decay_rate`` (> 0); ``T`` = ``transition_steps`` (>= 1);
    ``t0`` = ``transition_begin`` (>= 0, default 0); ``staircase`` (default False) floors the
    exponent; ``end_value`` (default None) bounds the value (a floor when ``r < 1``, a ceiling
    when ``r > 1``). Reference: optax.exponential_decay.
    """
    who = "exponential_decay"
    _check_number(who, "init_value", init_value)
    _check_steps(who, "transition_steps", transition_steps)
    _check_number(who, "decay_rate", decay_rate, 0, open_low=True)
    _check_steps(who, "transition_begin", transition_begin, low=0)
    if end_value is not None:
        _check_number(who, "end_value", end_value)

    def fn(t):
        s = t - transition_begin
        p = torch.floor(s / transition_steps) if staircase else s / transition_steps
        # r^p past the largest float is inf, and 0 * inf is NaN: cap it at the largest float
        grown = torch.clamp(decay_rate**p, max=torch.finfo(t.dtype).max)
        v = torch.where(s <= 0, torch.full_like(t, init_value), init_value * grown)
        if end_value is not None:
            bound = torch.full_like(t, end_value)
            v = torch.maximum(v, bound) if decay_rate < 1 else torch.minimum(v, bound)
        return v

    return Schedule(_evaluate(fn), who, dict(
        init_value=init_value, transition_steps=transition_steps, decay_rate=decay_rate,
        transition_begin=transition_begin, staircase=staircase, end_value=end_value))


def piecewise_constant(init_value: float,
                       boundaries_and_scales: Mapping[int, float] | None = None) -> Schedule:
    """``v(t) = v0 * prod_{b_i <= t} s_i``: multiply by ``s_i`` from step ``b_i`` on.

    ``v0`` = ``init_value``; ``boundaries_and_scales`` = ``{b_i: s_i}`` (steps ``b_i >= 0``,
    scales ``s_i >= 0``; default None: constant). Reference: optax.piecewise_constant_schedule.
    """
    who = "piecewise_constant"
    _check_number(who, "init_value", init_value)
    items = list((boundaries_and_scales or {}).items())
    for b, s in items:
        _check_number(who, "a boundary in boundaries_and_scales", b, 0)
        _check_number(who, f"boundaries_and_scales[{b!r}]", s, 0)
    items.sort()

    def fn(t):
        v = torch.full_like(t, init_value)
        for b, s in items:
            v = torch.where(t >= b, v * s, v)
        return v

    return Schedule(_evaluate(fn), who, dict(
        init_value=init_value, boundaries_and_scales=dict(items)))


def _cosine(init_value, decay_steps, alpha, exponent) -> StepFn:
    def fn(t):
        c = 0.5 * (1 + torch.cos(math.pi * torch.clamp(t, max=decay_steps) / decay_steps))
        return init_value * ((1 - alpha) * c**exponent + alpha)

    return _evaluate(fn)


def cosine_decay(init_value: float, decay_steps: int, alpha: float = 0.0,
                 exponent: float = 1.0) -> Schedule:
    """``v(t) = v0 ((1 - alpha) c^e + alpha)``, ``c = (1 + cos(pi min(t, T) / T)) / 2``.

    ``v0`` = ``init_value``; ``T`` = ``decay_steps`` (>= 1); ``alpha`` (finite, default 0) is
    the final fraction of ``v0``; ``e`` = ``exponent`` (> 0, default 1). Reference:
    Loshchilov & Hutter, SGDR, 2017; optax.cosine_decay_schedule.
    """
    who = "cosine_decay"
    _check_number(who, "init_value", init_value)
    _check_steps(who, "decay_steps", decay_steps)
    _check_number(who, "alpha", alpha)
    _check_number(who, "exponent", exponent, 0, open_low=True)
    args = dict(init_value=init_value, decay_steps=decay_steps, alpha=alpha, exponent=exponent)
    return Schedule(_cosine(**args), who, args)


def join_schedules(schedules: Sequence[Callable[[Any], Any]],
                   boundaries: Sequence[float]) -> Schedule:
    """Schedule ``i`` runs on ``[b_{i-1}, b_i)`` and sees the step ``t - b_{i-1}``.

    ``schedules``: n >= 1 schedules (plain callables are wrapped by :func:`as_schedule`);
    ``boundaries``: n - 1 non-decreasing steps ``b_i >= 0``. A negative step counts as 0.
    With a tensor step every schedule is evaluated and the active value selected (no host
    sync). Reference: optax.join_schedules.
    """
    who = "join_schedules"
    if isinstance(schedules, Schedule) or not isinstance(schedules, Sequence) or not schedules:
        raise ValueError(f"{who}: schedules must be a non-empty list of schedules")
    parts = []
    for i, s in enumerate(schedules):
        if not callable(s):
            raise TypeError(f"{who}: schedules[{i}] must be a schedule (step -> value), got "
                            f"{type(s).__name__}; use constant(x) for a fixed number")
        parts.append(as_schedule(s))
    if len(boundaries) != len(schedules) - 1:
        raise ValueError(f"{who}: {len(schedules)} schedules need {len(schedules) - 1} "
                         f"boundaries, got {len(boundaries)}")
    bounds = list(boundaries)
    for i, b in enumerate(bounds):
        _check_number(who, f"boundaries[{i}]", b, 0)
        if i and b < bounds[i - 1]:
            raise ValueError(f"{who}: boundaries must be non-decreasing, got {bounds}")

    def fn(step: Step, dtype: torch.dtype | None) -> Any:
        step = _check_step(step)
        if not isinstance(step, Tensor):
            out = parts[0](step, dtype)
            for b, s in zip(bounds, parts[1:]):
                if step >= b:
                    out = s(step - b, dtype)
            return float(out)
        step = torch.clamp(step, min=0)
        out, dt = parts[0](step, dtype), dtype or torch.float32
        for b, s in zip(bounds, parts[1:]):
            out = torch.where(step < b, torch.as_tensor(out, dtype=dt, device=step.device),
                              torch.as_tensor(s(step - b, dtype), dtype=dt, device=step.device))
        return out

    return Schedule(fn, who, {"schedules": parts, "boundaries": bounds})


def warmup_cosine_decay(init_value: float, peak_value: float, warmup_steps: int,
                        decay_steps: int, end_value: float = 0.0,
                        exponent: float = 1.0) -> Schedule:
    """Linear warmup from ``init_value`` to ``peak_value`` over ``warmup_steps`` (>= 0), then
    cosine decay to ``end_value`` (default 0) at step ``decay_steps`` (the total, warmup
    included; must exceed ``warmup_steps``); ``exponent`` (> 0, default 1) as in
    :func:`cosine_decay`. A ``peak_value`` of 0 needs ``end_value`` 0 (the decay scales the
    peak). Reference: optax.warmup_cosine_decay_schedule.
    """
    args = dict(init_value=init_value, peak_value=peak_value, warmup_steps=warmup_steps,
                decay_steps=decay_steps, end_value=end_value, exponent=exponent)
    return _renamed(_warmup_cosine("warmup_cosine_decay", **args), "warmup_cosine_decay", args)


def _warmup_cosine(who, init_value, peak_value, warmup_steps, decay_steps, end_value,
                   exponent) -> Schedule:
    for name, v in (("init_value", init_value), ("peak_value", peak_value),
                    ("end_value", end_value)):
        _check_number(who, name, v)
    _check_steps(who, "warmup_steps", warmup_steps, low=0)
    _check_steps(who, "decay_steps", decay_steps)
    _check_number(who, "exponent", exponent, 0, open_low=True)
    if decay_steps <= warmup_steps:
        raise ValueError(f"{who}: decay_steps={decay_steps} must exceed "
                         f"warmup_steps={warmup_steps}")
    if not isinstance(peak_value, Tensor) and peak_value == 0 and end_value != 0:
        raise ValueError(f"{who}: peak_value=0 cannot decay to end_value={end_value}; "
                         "pass a nonzero peak_value or end_value=0")
    alpha = 0.0 if not isinstance(peak_value, Tensor) and peak_value == 0 \
        else end_value / peak_value
    decay = Schedule(_cosine(peak_value, decay_steps - warmup_steps, alpha, exponent), "")
    if warmup_steps == 0:
        return decay
    warm = Schedule(_polynomial(init_value, peak_value, 1.0, warmup_steps, 0), "")
    return join_schedules([warm, decay], [warmup_steps])


def warmup_cosine(peak_value: float, warmup_steps: int, decay_steps: int,
                  init_value: float = 0.0, end_value: float = 0.0) -> Schedule:
    """:func:`warmup_cosine_decay` with the peak first and warmup from 0 by default."""
    args = dict(peak_value=peak_value, warmup_steps=warmup_steps, decay_steps=decay_steps,
                init_value=init_value, end_value=end_value)
    return _renamed(_warmup_cosine("warmup_cosine", exponent=1.0, **args), "warmup_cosine", args)


def warmup_constant(init_value: float, peak_value: float, warmup_steps: int) -> Schedule:
    """Linear warmup from ``init_value`` to ``peak_value`` over ``warmup_steps`` (>= 0), then
    constant ``peak_value`` (from the start when ``warmup_steps`` is 0).
    Reference: optax.warmup_constant_schedule."""
    who = "warmup_constant"
    _check_number(who, "init_value", init_value)
    _check_number(who, "peak_value", peak_value)
    _check_steps(who, "warmup_steps", warmup_steps, low=0)
    start = init_value if warmup_steps else peak_value
    return Schedule(_polynomial(start, peak_value, 1.0, max(warmup_steps, 1), 0), who,
                    dict(init_value=init_value, peak_value=peak_value, warmup_steps=warmup_steps))


def linear_onecycle(transition_steps: int, peak_value: float, pct_start: float = 0.3,
                    pct_final: float = 0.85, div_factor: float = 25.0,
                    final_div_factor: float = 1e4) -> Schedule:
    """One-cycle: linear from ``p / d`` up to ``p`` at ``pct_start T``, down to ``p / d`` at
    ``pct_final T``, then to ``p / (d D)`` at ``T``, constant after.

    ``p`` = ``peak_value``; ``T`` = ``transition_steps`` (>= 1); ``pct_start`` in (0, 1)
    (default 0.3); ``pct_final`` in (``pct_start``, 1] (default 0.85); ``d`` = ``div_factor``
    (> 0, default 25); ``D`` = ``final_div_factor`` (> 0, default 1e4). Reference: Smith &
    Topin, "Super-convergence", 2018; optax.linear_onecycle_schedule.
    """
    who = "linear_onecycle"
    _check_steps(who, "transition_steps", transition_steps)
    _check_number(who, "peak_value", peak_value)
    _check_number(who, "pct_start", pct_start, 0, 1, open_low=True, open_high=True)
    _check_number(who, "pct_final", pct_final, pct_start, 1, open_low=True)
    _check_number(who, "div_factor", div_factor, 0, open_low=True)
    _check_number(who, "final_div_factor", final_div_factor, 0, open_low=True)
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

    return Schedule(_evaluate(fn), who, dict(
        transition_steps=transition_steps, peak_value=peak_value, pct_start=pct_start,
        pct_final=pct_final, div_factor=div_factor, final_div_factor=final_div_factor))


def inverse_sqrt(peak_value: float, warmup_steps: int = 0) -> Schedule:
    """Linear warmup from 0, then decay as ``1 / sqrt(t)``.

    ``v(t) = p t / w`` for ``t < w``; ``v(t) = p sqrt(max(w, 1) / max(t, 1))`` after.
    ``p`` = ``peak_value``; ``w`` = ``warmup_steps`` (>= 0, default 0). Reference: Vaswani et
    al., "Attention is all you need", 2017; fairseq's ``inverse_sqrt`` scheduler (warmup from 0).
    """
    _check_number("inverse_sqrt", "peak_value", peak_value)
    _check_steps("inverse_sqrt", "warmup_steps", warmup_steps, low=0)
    w = max(warmup_steps, 1)

    def fn(t):
        decay = peak_value * torch.sqrt(w / torch.clamp(t, min=w))
        if warmup_steps == 0:
            return decay
        return torch.where(t < warmup_steps, peak_value * t / warmup_steps, decay)

    return Schedule(_evaluate(fn), "inverse_sqrt",
                    dict(peak_value=peak_value, warmup_steps=warmup_steps))


def palm_beta2(beta2_scale: float = 0.8) -> Schedule:
    """PaLM's second-moment decay ``beta2(k) = 1 - k^(-c)`` with ``k = t + 1``.

    ``c`` = ``beta2_scale`` (> 0, default 0.8). ``k`` is the 1-based step, as in HeavyBall
    3.2.1 (``palm_beta2`` in ``heavyball/chainable.py`` uses its step counter after
    incrementing it, so the first update has ``k = 1`` and ``beta2 = 0``). Here ``t`` is the
    0-based count. Reference: Chowdhery et al., "PaLM", 2022, section 5.
    """
    _check_number("palm_beta2", "beta2_scale", beta2_scale, 0, open_low=True)
    return Schedule(_evaluate(lambda t: 1 - (t + 1) ** (-beta2_scale)), "palm_beta2",
                    {"beta2_scale": beta2_scale})
