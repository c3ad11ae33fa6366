"""Weight averaging as torch.optim.swa_utils does it: an exponential moving average (EMA) or
the equal-weight stochastic weight average (SWA) of the parameters, kept in the state."""

# ruff: noqa: F405 (the names of the toolkit's star import)
from __future__ import annotations

from typing import Any, NamedTuple

import torch

from funcopt.engine import check_number
from funcopt.transforms._toolkit import *  # noqa: F403

__all__ = ["AveragedParamsState", "ema_params", "swa", "averaged_params"]


class AveragedParamsState(NamedTuple):
    """State of :func:`ema_params` and :func:`swa`: ``count`` (0-d int64 steps seen),
    ``n_averaged`` (0-d int64 parameter sets averaged so far) and ``averaged``, the average
    (a tree like the parameters; read it with :func:`averaged_params`)."""

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count by design (optax's name)
    n_averaged: Tensor
    averaged: Any


def _averager(name: str, weight_fn, start: int, every: int) -> GradientTransformation:
    """The updates pass unchanged; on steps ``t`` (1-based) with ``t > start`` and
    ``(t - start) % every == 0`` the new parameters ``params + updates`` are averaged in:
    the first one is copied, later ones enter as ``lerp(avg, new, weight_fn(n_averaged))``."""

    def init(params):
        count = step_counter(params)
        return AveragedParamsState(count, count, tree_map(torch.zeros_like, params))

    def update(updates, state, params=None, **extra):
        expect_state(state, AveragedParamsState, name)
        params = require_params(params, name)
        u, treedef = _leaves(updates, params, name)
        count = increment(state.count)
        due = (count > start) & ((count - start) % every == 0)
        first = state.n_averaged == 0
        weight = weight_fn(state.n_averaged)
        out = []
        for a, p, d in zip(tree_leaves(state.averaged), tree_leaves(params), u):
            new = p + d
            mixed = torch.where(first, new, torch.lerp(a, new, weight.to(a.dtype)))
            out.append(torch.where(due, mixed, a))
        n = torch.where(due, increment(state.n_averaged), state.n_averaged)
        return updates, AveragedParamsState(count, n, tree_unflatten(treedef, out))

    return GradientTransformation(init, update)


def _check_schedule(name: str, start: Any, every: Any) -> None:
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"{name}: start={start!r} must be an int >= 0")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"{name}: every={every!r} must be an int >= 1")


def ema_params(decay: float = 0.999, start: int = 0, every: int = 1) -> GradientTransformation:
    r"""Keep an exponential moving average of the parameters (not of the updates):

    .. math:: \bar\theta_1 = \theta_1, \quad
        \bar\theta_{n+1} = \text{decay}\,\bar\theta_n + (1 - \text{decay})\,\theta

    taken after each update (``theta = params + updates``; place it LAST in a chain so it sees
    the final updates, which it passes on unchanged). Read the average for evaluation with
    :func:`averaged_params`.

    Args:
      decay: in [0, 1] (default 0.999).
      start: steps to skip before averaging (default 0).
      every: average every ``every``-th step after ``start`` (default 1).

    Reference: torch.optim.swa_utils.AveragedModel with ``get_ema_multi_avg_fn(decay)``,
    ``update_parameters`` called after each ``optimizer.step()``.
    """
    check_number("ema_params: decay", decay)
    if not 0.0 <= float(decay) <= 1.0:
        raise ValueError(f"ema_params: decay={decay!r} must lie in [0, 1]")
    _check_schedule("ema_params", start, every)
    d = float(decay)
    return _averager("ema_params",
                     lambda n: torch.tensor(1 - d, dtype=torch.float64, device=n.device),
                     start, every)


def swa(start: int = 0, every: int = 1) -> GradientTransformation:
    r"""Stochastic weight averaging: keep the equal-weight mean of the parameters taken after
    the updates of steps ``start + every, start + 2 every, ...``:

    .. math:: \bar\theta_{n+1} = \bar\theta_n + \frac{\theta - \bar\theta_n}{n + 1}

    Place it LAST in a chain (it passes the updates on unchanged); read the mean with
    :func:`averaged_params`. Pair it with a schedule that holds the learning rate up (e.g.
    :func:`funcopt.schedules.join_schedules` with a constant) as SWA's SWALR does.

    Args:
      start: steps before the first averaged one (default 0).
      every: steps between averaged ones (default 1; torch's recipe averages once an epoch).

    Reference: Izmailov et al., "Averaging Weights Leads to Wider Optima and Better
    Generalization", UAI 2018; torch.optim.swa_utils.AveragedModel (default averaging).
    Batch-norm statistics are not parameters: recompute them (torch's ``update_bn``).
    """
    _check_schedule("swa", start, every)
    return _averager("swa", lambda n: 1.0 / (n.to(torch.float64) + 1), start, every)


def averaged_params(state: Any) -> Any:
    """The averaged parameters of the first :class:`AveragedParamsState` found in ``state``
    (the state of :func:`ema_params` / :func:`swa`, or of a chain holding one). Before any
    step was averaged they are zeros; ``state.n_averaged`` says how many were.

    Raises ValueError when ``state`` holds no such state.
    """
    stack = [state]
    while stack:
        node = stack.pop(0)
        if isinstance(node, AveragedParamsState):
            return node.averaged
        if isinstance(node, (tuple, list)):
            stack[:0] = list(node)
        elif isinstance(node, dict):
            stack[:0] = list(node.values())
    raise ValueError("averaged_params: state holds no AveragedParamsState; pass the state of "
                     "fo.ema_params(...) / fo.swa(...) or of a chain containing it")
