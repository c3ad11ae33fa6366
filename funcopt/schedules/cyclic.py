"""Cyclic and restarting schedules: optax's piecewise interpolation, cosine one-cycle, SGDR and
warmup + exponential decay; torch's CyclicLR and CosineAnnealingWarmRestarts (as functions of
the step, the same conventions as :mod:`funcopt.schedules`)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from funcopt.schedules.base import Schedule, _check_number, _check_steps, _evaluate
from funcopt.schedules.standard import (
    exponential_decay,
    join_schedules,
    linear,
    warmup_cosine_decay,
)

__all__ = [
    "piecewise_interpolate",
    "cosine_onecycle",
    "sgdr",
    "warmup_exponential_decay",
    "cyclic",
    "cosine_warm_restarts",
]


def piecewise_interpolate(interpolate_type: str, init_value: float,
                          boundaries_and_scales: Mapping[int, float] | None = None) -> Schedule:
    r"""Interpolate between values that change by factors at boundaries: with sorted
    boundaries :math:`b_1 < \dots < b_n` (and :math:`b_0 = 0`) and values
    :math:`v_0 = ` ``init_value``, :math:`v_i = v_{i-1} s_i`, on :math:`[b_{i-1}, b_i)` the
    value goes from :math:`v_{i-1}` to :math:`v_i` linearly (``"linear"``) or along
    :math:`v_i + (v_{i-1} - v_i)(1 + \cos(\pi p))/2` (``"cosine"``), ``p`` the fraction of the
    interval passed; :math:`v_n` after :math:`b_n`.

    ``boundaries_and_scales``: ``{step: scale}`` with steps >= 0 and scales >= 0 (default
    None: constant ``init_value``). Reference: optax.piecewise_interpolate_schedule.
    """
    who = "piecewise_interpolate"
    if interpolate_type not in ("linear", "cosine"):
        raise ValueError(f"{who}: interpolate_type={interpolate_type!r} must be 'linear' or "
                         "'cosine'")
    _check_number(who, "init_value", init_value)
    items = sorted((boundaries_and_scales or {}).items())
    for b, s in items:
        _check_steps(who, "a boundary", b, low=0)
        _check_number(who, f"the scale at step {b}", s, 0)
    bounds = [0] + [b for b, _ in items]
    values = [init_value]
    for _, s in items:
        values.append(values[-1] * s)

    def fn(t):
        v = torch.full_like(t, values[-1])
        for i in range(len(bounds) - 1, 0, -1):
            b0, b1, v0, v1 = bounds[i - 1], bounds[i], values[i - 1], values[i]
            p = (t - b0) / max(b1 - b0, 1)
            part = v0 + (v1 - v0) * p if interpolate_type == "linear" else \
                v1 + (v0 - v1) / 2.0 * (torch.cos(math.pi * p) + 1)
            v = torch.where((t >= b0) & (t < b1), part, v)
        return v

    return Schedule(_evaluate(fn), who, dict(interpolate_type=interpolate_type,
                                             init_value=init_value, boundaries_and_scales=items))


def cosine_onecycle(transition_steps: int, peak_value: float, pct_start: float = 0.3,
                    div_factor: float = 25.0, final_div_factor: float = 1e4) -> Schedule:
    r"""One-cycle with cosine ramps: from ``p / d`` up to ``p`` at ``int(pct_start T)``, then
    down to ``p / (d D)`` at ``T``, constant after (:func:`piecewise_interpolate`, ``"cosine"``).

    ``p`` = ``peak_value``; ``T`` = ``transition_steps`` (>= 1); ``pct_start`` in (0, 1)
    (default 0.3); ``d`` = ``div_factor`` (> 0, default 25); ``D`` = ``final_div_factor``
    (> 0, default 1e4). Reference: Smith & Topin, "Super-convergence", 2018;
    optax.cosine_onecycle_schedule (torch.optim.lr_scheduler.OneCycleLR's cosine shape).
    """
    who = "cosine_onecycle"
    _check_steps(who, "transition_steps", transition_steps)
    _check_number(who, "peak_value", peak_value)
    _check_number(who, "pct_start", pct_start, 0, 1, open_low=True, open_high=True)
    _check_number(who, "div_factor", div_factor, 0, open_low=True)
    _check_number(who, "final_div_factor", final_div_factor, 0, open_low=True)
    sched = piecewise_interpolate("cosine", peak_value / div_factor, {
        int(pct_start * transition_steps): div_factor,
        int(transition_steps): 1.0 / (div_factor * final_div_factor)})
    return Schedule(sched._fn, who, dict(
        transition_steps=transition_steps, peak_value=peak_value, pct_start=pct_start,
        div_factor=div_factor, final_div_factor=final_div_factor))


def sgdr(cosine_kwargs: Iterable[Mapping[str, Any]]) -> Schedule:
    """Stochastic gradient descent with warm restarts: one :func:`warmup_cosine_decay` per
    entry of ``cosine_kwargs`` (its keyword arguments: ``init_value``, ``peak_value``,
    ``warmup_steps``, ``decay_steps``, optionally ``end_value``, ``exponent``), run one after
    another, each for its ``decay_steps``; the last one continues past its end.

    Reference: Loshchilov & Hutter, "SGDR: Stochastic Gradient Descent with Warm Restarts",
    ICLR 2017; optax.sgdr_schedule.
    """
    kwargs = [dict(k) for k in cosine_kwargs]
    if not kwargs:
        raise ValueError("sgdr: cosine_kwargs must hold at least one dict of "
                         "warmup_cosine_decay arguments")
    parts, bounds, step = [], [], 0
    for k in kwargs:
        parts.append(warmup_cosine_decay(**k))
        step += k["decay_steps"]
        bounds.append(step)
    return Schedule(join_schedules(parts, bounds[:-1])._fn, "sgdr", {"cosine_kwargs": kwargs})


def warmup_exponential_decay(init_value: float, peak_value: float, warmup_steps: int,
                             transition_steps: int, decay_rate: float, transition_begin: int = 0,
                             staircase: bool = False, end_value: float | None = None) -> Schedule:
    """Linear warmup from ``init_value`` to ``peak_value`` over ``warmup_steps`` (>= 0), then
    :func:`exponential_decay` from ``peak_value`` (``transition_steps``, ``decay_rate``,
    ``transition_begin``, ``staircase``, ``end_value`` as there) on the steps after the
    warmup. Reference: optax.warmup_exponential_decay_schedule.
    """
    who = "warmup_exponential_decay"
    _check_number(who, "init_value", init_value)
    _check_steps(who, "warmup_steps", warmup_steps, low=0)
    decay = exponential_decay(peak_value, transition_steps, decay_rate, transition_begin,
                              staircase, end_value)
    joined = decay if warmup_steps == 0 else join_schedules(
        [linear(init_value, peak_value, warmup_steps), decay], [warmup_steps])
    return Schedule(joined._fn, who, dict(
        init_value=init_value, peak_value=peak_value, warmup_steps=warmup_steps,
        transition_steps=transition_steps, decay_rate=decay_rate,
        transition_begin=transition_begin, staircase=staircase, end_value=end_value))


def cyclic(base_lr: float, max_lr: float, step_size_up: int = 2000,
           step_size_down: int | None = None, mode: str = "triangular",
           gamma: float = 1.0) -> Schedule:
    r"""Cyclical learning rate: a triangle between ``base_lr`` and ``max_lr``.

    With :math:`L = u + d` (``step_size_up``, ``step_size_down``), cycle
    :math:`c = \lfloor 1 + t/L \rfloor`, :math:`x = 1 + t/L - c` and
    :math:`h = x / r` if :math:`x \le r = u / L` else :math:`(x - 1)/(r - 1)`:
    :math:`v(t) = b + (m - b)\, h\, \phi` with :math:`\phi = 1` (``"triangular"``),
    :math:`2^{1-c}` (``"triangular2"``) or :math:`\gamma^t` (``"exp_range"``).

    Args: base_lr ``b``; max_lr ``m``; step_size_up ``u`` (>= 1, default 2000);
    step_size_down ``d`` (default None: ``u``); mode (default "triangular"); gamma (> 0,
    default 1, used by "exp_range"). Reference: Smith, "Cyclical Learning Rates for Training
    Neural Networks", WACV 2017; torch.optim.lr_scheduler.CyclicLR (its ``last_epoch`` is
    ``t``; momentum cycling is a second schedule built the same way).
    """
    who = "cyclic"
    _check_number(who, "base_lr", base_lr)
    _check_number(who, "max_lr", max_lr)
    _check_steps(who, "step_size_up", step_size_up)
    down = step_size_up if step_size_down is None else step_size_down
    _check_steps(who, "step_size_down", down)
    if mode not in ("triangular", "triangular2", "exp_range"):
        raise ValueError(f"{who}: mode={mode!r} must be 'triangular', 'triangular2' or "
                         "'exp_range'")
    _check_number(who, "gamma", gamma, 0, open_low=True)
    total = float(step_size_up + down)
    ratio = step_size_up / total

    def fn(t):
        cycle = torch.floor(1 + t / total)
        x = 1.0 + t / total - cycle
        h = torch.where(x <= ratio, x / ratio, (x - 1) / (ratio - 1))
        if mode == "triangular":
            phi = torch.ones_like(t)
        elif mode == "triangular2":
            phi = 1 / 2.0 ** (cycle - 1)
        else:
            phi = gamma**t
        return base_lr + (max_lr - base_lr) * h * phi

    return Schedule(_evaluate(fn), who, dict(
        base_lr=base_lr, max_lr=max_lr, step_size_up=step_size_up, step_size_down=down,
        mode=mode, gamma=gamma))


def cosine_warm_restarts(init_value: float, t_0: int, t_mult: int = 1,
                         eta_min: float = 0.0) -> Schedule:
    r"""Cosine annealing with warm restarts whose periods grow by ``t_mult``:
    period ``i`` lasts :math:`T_i = T_0 m^i` steps and starts at
    :math:`S_i = T_0 (m^i - 1)/(m - 1)` (:math:`i T_0` when ``m = 1``); inside it
    :math:`v(t) = \eta_{min} + (v_0 - \eta_{min})(1 + \cos(\pi (t - S_i) / T_i)) / 2`.

    Args: init_value :math:`v_0`; t_0 :math:`T_0` (>= 1); t_mult ``m`` (int >= 1, default 1);
    eta_min (default 0). Reference: Loshchilov & Hutter, "SGDR", ICLR 2017;
    torch.optim.lr_scheduler.CosineAnnealingWarmRestarts (``T_0``, ``T_mult``, ``eta_min``)
    at integer epochs.
    """
    who = "cosine_warm_restarts"
    _check_number(who, "init_value", init_value)
    _check_steps(who, "t_0", t_0)
    _check_steps(who, "t_mult", t_mult)
    _check_number(who, "eta_min", eta_min)

    def fn(t):
        if t_mult == 1:
            start, period = torch.floor(t / t_0) * t_0, torch.full_like(t, float(t_0))
        else:
            # the period index from a logarithm, then corrected by one either way where rounding
            # put a boundary step in the wrong period
            i = torch.floor(torch.log(t / t_0 * (t_mult - 1) + 1) / math.log(t_mult))
            first = t_0 * (t_mult**i - 1) / (t_mult - 1)
            i = torch.where(first > t, i - 1, i)
            i = torch.where(t_0 * (t_mult ** (i + 1) - 1) / (t_mult - 1) <= t, i + 1, i)
            start, period = t_0 * (t_mult**i - 1) / (t_mult - 1), t_0 * t_mult**i
        return eta_min + (init_value - eta_min) * (1 + torch.cos(math.pi * (t - start) / period)) / 2

    return Schedule(_evaluate(fn), who, dict(init_value=init_value, t_0=t_0, t_mult=t_mult,
                                             eta_min=eta_min))
