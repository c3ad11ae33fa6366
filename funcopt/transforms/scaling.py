"""Scaling and momentum: ``scale``, ``scale_by_schedule``, ``scale_by_learning_rate``,
``scale_by_sign``, ``trace`` (heavy-ball / Nesterov momentum) and ``ema``.

Each function builds one :class:`~funcopt.base.GradientTransformation` over the list of leaves
with ``torch._foreach_*`` ops (helpers in :mod:`funcopt.transforms.leaf_math`). All names are
re-exported by :mod:`funcopt.transforms.first_order` and by ``funcopt``.
"""

# ruff: noqa: F405 (the names of the toolkit's star import)
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from funcopt.base import (
    current_learning_rate,
    mark_if_schedule_value,
    register_hyperparameters,
    resolve,
)
from funcopt.engine import check_schedule_value, host_number, one_minus_pow
from funcopt.transforms._toolkit import *  # noqa: F403
from funcopt.transforms.leaf_math import _is_schedule

__all__ = [
    "ScaleByScheduleState", "ScaleByLearningRateState", "TraceState", "EmaState",
    "scale", "scale_by_schedule", "scale_by_learning_rate", "trace", "ema", "scale_by_sign",
]


class ScaleByScheduleState(NamedTuple):
    """State of :func:`scale_by_schedule`: ``count``, the 0-d int64 step at which the schedule
    is evaluated."""

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count by design (optax's name)


class ScaleByLearningRateState(NamedTuple):
    """State of :func:`scale_by_learning_rate`: ``count``, the step t, and ``learning_rate``, a
    0-d tensor: for a number learning rate it is the value used (writing it changes the next
    update)."""

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count by design (optax's name)
    learning_rate: Tensor


register_hyperparameters(ScaleByLearningRateState, "learning_rate")


def scale(step_size: float | Tensor) -> GradientTransformation:
    """Multiply the updates by a constant: ``u <- step_size * u``.

    Args:
      step_size: the factor (a number or 0-d tensor). For a value that changes with the step
        use :func:`scale_by_schedule`.

    Reference: optax ``scale``.
    """
    if _is_schedule(step_size):
        raise TypeError("scale takes a number; for a schedule use scale_by_schedule(fn)")
    _check("step_size", step_size, low=None)

    def scaled(leaves):
        s = step_size.to(leaves[0].device) if isinstance(step_size, Tensor) else step_size
        return ops.mul(leaves, s)

    return leafwise("scale", scaled)


def scale_by_schedule(step_size_fn: Callable[[Tensor], Any]) -> GradientTransformation:
    """Multiply the updates by ``step_size_fn(count)``, ``count`` = 0, 1, 2, ... (0-d int64).

    Args:
      step_size_fn: a schedule ``count -> factor`` (number or 0-d tensor).

    Reference: optax ``scale_by_schedule``.
    """
    if not callable(step_size_fn):
        raise TypeError("scale_by_schedule takes a function count -> factor; for a number use scale")

    def init(params):
        return ScaleByScheduleState(step_counter(params))

    def update(updates, state, params=None, **extra):
        expect_state(state, ScaleByScheduleState, "scale_by_schedule")
        leaves, treedef = _leaves(updates, params, "scale_by_schedule")
        if leaves:
            leaves = _as(ops.mul(leaves, _hp(step_size_fn, state.count)), leaves)
        return tree_unflatten(treedef, leaves), ScaleByScheduleState(increment(state.count))

    return GradientTransformation(init, update)


def scale_by_learning_rate(
    learning_rate: ScalarOrSchedule, *, flip_sign: bool = True
) -> GradientTransformation:
    """Multiply the updates by ``-learning_rate`` (or ``+learning_rate``): ``u <- -eta_t u``.

    The state holds the current learning rate ``eta_t`` as a 0-d float tensor. When
    ``learning_rate`` is a number (or 0-d tensor) update() reads it from the state, so writing
    ``state.learning_rate`` changes it; when it is a schedule, update() uses
    ``learning_rate(count)`` and stores that value in the state for inspection.

    Args:
      learning_rate: ``eta``, a non-negative number, 0-d tensor or schedule ``count -> eta``.
      flip_sign: multiply by ``-eta`` (default True: descent) or by ``+eta``.

    Reference: optax ``scale_by_learning_rate``.
    """
    _check("learning_rate", learning_rate, low=0.0)
    sign = -1.0 if flip_sign else 1.0

    def init(params):
        leaves = tree_leaves(params)
        count = step_counter(params)
        lr0 = resolve(learning_rate, count)
        if callable(learning_rate):  # checked before it becomes a tensor
            check_schedule_value(learning_rate, lr0)
        lr = torch.as_tensor(lr0, dtype=scalar_dtype(leaves), device=count.device).clone()
        # a schedule's value (or inject_hyperparams' record of one) is a record: update
        # evaluates the schedule (uses the given tensor)
        return ScaleByLearningRateState(count, mark_if_schedule_value(lr, learning_rate))

    def update(updates, state, params=None, **extra):
        expect_state(state, ScaleByLearningRateState, "scale_by_learning_rate")
        leaves, treedef = _leaves(updates, params, "scale_by_learning_rate")
        lr = current_learning_rate(learning_rate, state.learning_rate, state.count)
        if leaves:
            leaves = _as(ops.mul(leaves, host_number(lr) * sign), leaves)
        return tree_unflatten(treedef, leaves), ScaleByLearningRateState(
            increment(state.count), lr
        )

    return GradientTransformation(init, update)


def scale_by_sign() -> GradientTransformation:
    """``u <- sign(u)`` element-wise (signSGD; Bernstein et al. 2018). Reference: optax."""

    return leafwise("scale_by_sign", ops.sign)


# --------------------------------------------------------------------------- momentum


class TraceState(NamedTuple):
    """State of :func:`trace`: ``count``, the step t, and ``trace``, the momentum buffer (a tree
    like the params)."""

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count by design (optax's name)
    trace: Any


class EmaState(NamedTuple):
    r"""State of :func:`ema`: ``count``, the 0-d int64 step, and ``ema``, the moving average
    :math:`\bar g_t` (a tree like the params)."""

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count by design (optax's name)
    ema: Any


def trace(
    decay: ScalarOrSchedule, nesterov: bool = False, accumulator_dtype: torch.dtype | None = None,
    *, dampening: float = 0.0,
) -> GradientTransformation:
    """Heavy-ball momentum.

    ``t_k = decay * t_{k-1} + c_k g_k`` with ``t_0 = 0``, ``c_1 = 1`` and ``c_k = 1 - dampening``
    afterwards; the output is ``t_k``, or ``g_k + decay * t_k`` when ``nesterov``. With
    ``dampening=0`` this is optax ``trace`` and torch.optim.SGD's momentum buffer (whose first
    step ``buf = g`` equals ``0 * decay + g``); with ``dampening > 0`` it is torch's dampened
    buffer, first step undampened as torch does.

    Args:
      decay: the momentum ``mu`` (0 <= mu < 1 not required: any number >= 0), or a schedule.
      nesterov: use Nesterov's look-ahead ``g + mu t`` (default False).
      accumulator_dtype: dtype of the stored trace (default: the parameters' dtype).
      dampening: torch.optim.SGD's ``dampening`` (default 0).

    Reference: Polyak 1964; Sutskever et al. 2013; optax ``trace``; torch.optim.SGD.
    """
    _check("decay", decay)
    _check("dampening", dampening, high=1.0)

    def init(params):
        return TraceState(step_counter(params), _zeros(tree_leaves(params), accumulator_dtype))

    def step(g, state, count):
        mu = _hp(decay, state.count)
        prev = _as(state.trace, g)
        scaled = g
        if _is_schedule(dampening) or isinstance(dampening, Tensor) or dampening != 0:
            one = torch.ones((), dtype=scalar_dtype(g), device=state.count.device)
            c = torch.where(state.count == 0, one, one - _hp(dampening, state.count))
            scaled = ops.mul(g, c)
        new = _axpy(mu, prev, scaled)
        out = _axpy(mu, new, g) if nesterov else new
        return out, TraceState(count, _as(new, state.trace))

    return GradientTransformation(init, counted_update("trace", TraceState, step, "trace"))


def ema(
    decay: ScalarOrSchedule, debias: bool = True, accumulator_dtype: torch.dtype | None = None
) -> GradientTransformation:
    """Exponential moving average: ``e_t = decay e_{t-1} + (1 - decay) g_t``, ``e_0 = 0``.

    Outputs ``e_t / (1 - decay^t)`` when ``debias`` (default True), else ``e_t``.

    Args:
      decay: the averaging factor in [0, 1) (number, tensor or schedule).
      debias: divide by ``1 - decay^t`` to remove the bias towards ``e_0 = 0``.
      accumulator_dtype: dtype of the stored average (default: the parameters' dtype).

    Reference: optax ``ema``.
    """
    if not callable(decay):
        _check_beta("decay", decay)

    def init(params):
        return EmaState(step_counter(params), _zeros(tree_leaves(params), accumulator_dtype))

    def step(g, state, count):
        d = _hp(decay, state.count)
        new = _moment(_as(state.ema, g), g, d)
        out = ops.div(new, one_minus_pow(d, _steps(count, g))) if debias else new
        return out, EmaState(count, _as(new, state.ema))

    return GradientTransformation(init, counted_update("ema", EmaState, step, "ema"))
