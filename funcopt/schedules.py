"""Schedules: functions ``step -> value`` for learning rates and other hyperparameters.

Every constructor here returns a :class:`Schedule`, a frozen callable ``schedule(t, dtype=None)``
with a short ``repr``; :func:`as_schedule` wraps a plain function ``step -> value`` in one. Test
"is this a schedule?" with ``isinstance(x, Schedule)``.

Steps: ``t`` is the number of updates already made (0 on the first update), a Python number or a
0-d tensor (usually the int64 step counter). A negative step counts as step 0, the schedule's
start (clamped with tensor ops, no host sync); a NaN or infinite Python step raises ValueError.

Values: with a tensor step a schedule returns a 0-d float32 tensor on the step's device, computed
with tensor ops only (no host sync; traces under ``torch.compile(fullgraph=True)`` and runs under
``torch.func`` transforms such as ``vmap``); with a Python step it returns a Python float
computed in float64. ``dtype`` (a floating torch dtype, default None) sets the dtype the formula
is computed in: ``schedule(count, dtype=torch.float64)`` gives a float64 tensor, exact for steps
past 2**24 where float32 is not. :func:`constant` returns its value as given for every step.

Arguments: values must be finite real numbers (not bools), step counts ints; out-of-range
arguments raise ValueError naming the argument and its range. A tensor argument is used as it is
and not checked (reading it would synchronise with its device).
Names and formulas follow optax's schedules (``optax.linear_schedule`` -> :func:`linear` ...).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import torch

Tensor = torch.Tensor
Value = Union[float, Tensor]
Step = Union[int, float, Tensor]
StepFn = Callable[[Step, Union[torch.dtype, None]], Any]

__all__ = [
    "Schedule",
    "as_schedule",
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


class Schedule:
    """A hyperparameter as a function of the step: ``schedule(t, dtype=None) -> value``.

    ``t``: a Python number or a 0-d tensor (see the module docstring for negative steps);
    ``dtype``: None (float32 for tensor steps, float64 for Python steps) or a floating torch
    dtype to compute in. A Python step gives a Python float, a tensor step a 0-d tensor.

    Attributes: ``name`` (the constructor's name) and ``args`` (its ``(name, value)`` argument
    pairs), shown by ``repr``. Instances are immutable; copies are the instance itself. Build
    them with this module's constructors or :func:`as_schedule`; ``Schedule(fn, name, args)``
    takes ``fn(step, dtype)`` with ``dtype`` None or a floating dtype.
    """

    __slots__ = ("_fn", "name", "args")
    _fn: StepFn
    name: str
    args: tuple[tuple[str, Any], ...]

    def __init__(self, fn: StepFn, name: str, args: Mapping[str, Any] | None = None):
        object.__setattr__(self, "_fn", fn)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "args", tuple((args or {}).items()))

    def __call__(self, count: Step, dtype: torch.dtype | None = None) -> Any:
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"{self.name}: dtype={dtype!r} must be None or a floating torch dtype "
                            "(e.g. torch.float64)")
        return self._fn(count, dtype)

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError(f"Schedule is immutable: cannot set {key!r}; build a new one")

    def __delattr__(self, key: str) -> None:
        raise AttributeError(f"Schedule is immutable: cannot delete {key!r}")

    def __copy__(self) -> Schedule:
        return self

    def __deepcopy__(self, memo: dict) -> Schedule:
        return self

    def __repr__(self) -> str:
        def show(v: Any) -> str:
            if callable(v) and not isinstance(v, Schedule):
                return getattr(v, "__qualname__", None) or repr(v)
            return repr(v)

        return f"{self.name}({', '.join(f'{k}={show(v)}' for k, v in self.args)})"


def as_schedule(fn: Callable[[Any], Any]) -> Schedule:
    """Wrap a plain callable ``fn(step) -> value`` as a :class:`Schedule` (a Schedule is
    returned as it is). ``fn`` sees the step unchanged (negative steps included); with
    ``dtype`` given, a tensor it returns is cast to ``dtype``, a number is returned as it is."""
    if isinstance(fn, Schedule):
        return fn
    if not callable(fn):
        raise TypeError(f"as_schedule: fn must be a callable step -> value, got "
                        f"{type(fn).__name__}; use constant(x) for a fixed number")

    def call(step: Step, dtype: torch.dtype | None) -> Any:
        v = fn(step)
        return v.to(dtype) if dtype is not None and isinstance(v, Tensor) else v

    return Schedule(call, "as_schedule", {"fn": fn})


# --------------------------------------------------------------------------- checks


def _check_step(step: Any) -> Any:
    """The step, validated, with a negative Python step replaced by 0 (the type kept)."""
    if isinstance(step, Tensor):
        if step.ndim != 0:
            raise ValueError(f"a schedule takes a 0-d step, got shape {tuple(step.shape)}")
        return step
    if isinstance(step, bool) or not isinstance(step, numbers.Real):
        raise TypeError(f"a schedule takes an int or a 0-d tensor step, got {type(step)}")
    if not math.isfinite(step):
        raise ValueError(f"a schedule takes a finite step, got {step}")
    number: Any = step
    return number if number >= 0 else type(number)(0)


def _check_steps(who: str, name: str, value: Any, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{who}: {name}={value!r} must be an int >= {low}")


def _check_number(who: str, name: str, value: Any, low: float = -math.inf,
                  high: float = math.inf, *, open_low: bool = False,
                  open_high: bool = False) -> None:
    """Raise ValueError unless ``value`` is a finite real number in the given interval
    (closed unless ``open_low`` / ``open_high``). Tensors are not checked."""
    if isinstance(value, Tensor):
        return
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    if ok:
        ok = (value > low if open_low else value >= low) and (
            value < high if open_high else value <= high)
    if not ok:
        where = "" if (low, high) == (-math.inf, math.inf) else (
            " in " + ("(" if open_low else "[") + f"{low}, {high}" + (")" if open_high else "]"))
        raise ValueError(f"{who}: {name}={value!r} must be a finite number{where}")


def _evaluate(formula: Callable[[Tensor], Tensor]) -> StepFn:
    """Run ``formula`` on the step as a float tensor (negative steps as 0); a float back for a
    Python step, a 0-d tensor for a tensor step."""

    def fn(step: Step, dtype: torch.dtype | None) -> Value:
        step = _check_step(step)
        if isinstance(step, Tensor):
            return formula(torch.clamp(step.to(dtype or torch.float32), min=0))
        return float(formula(torch.tensor(float(step), dtype=dtype or torch.float64)))

    return fn


def _renamed(schedule: Schedule, name: str, args: Mapping[str, Any]) -> Schedule:
    return Schedule(schedule._fn, name, args)


# --------------------------------------------------------------------------- schedules


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
