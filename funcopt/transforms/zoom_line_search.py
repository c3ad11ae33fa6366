"""The zoom line search for the strong Wolfe conditions (Nocedal & Wright, Algorithms 3.5-3.6),
step for step as optax's ``scale_by_zoom_linesearch``.

A search runs as a small state machine over 0-d tensors (step sizes, values, slopes) and the
gradient at the current trial: first it grows the step until an interval holding a Wolfe
point is found, then it shrinks that interval by cubic or quadratic interpolation (bisection
as the fallback). Eager steps branch and stop on the host (one sync per trial); under
``torch.compile``/``torch.func`` every trial of both phases runs and the right one is kept.
"""

# ruff: noqa: F405 (the names of the toolkit's star import)
from __future__ import annotations

from typing import Any, NamedTuple

import torch

from funcopt.engine import is_tracing
from funcopt.transforms._toolkit import *  # noqa: F403
from funcopt.transforms.line_search import _call_value_fn, _vdot

__all__ = ["ZoomLinesearchInfo", "ScaleByZoomLinesearchState", "scale_by_zoom_linesearch"]


def _where(c: Tensor, a: Any, b: Any) -> Any:
    if isinstance(a, list):
        return [torch.where(c, x, y) for x, y in zip(a, b)]
    return torch.where(c, a, b)


def _select(c: Tensor, a: dict, b: dict) -> dict:
    return {k: _where(c, a[k], b[k]) for k in a}


def _cubicmin(a, fa, fpa, b, fb, c, fc):
    """The minimiser of the cubic through (a, fa, fpa), (b, fb), (c, fc) (NaN when none)."""
    db, dc = b - a, c - a
    denom = (db * dc) ** 2 * (db - dc)
    v1, v2 = fb - fa - fpa * db, fc - fa - fpa * dc
    big_a = (dc**2 * v1 - db**2 * v2) / denom
    big_b = (-(dc**3) * v1 + db**3 * v2) / denom
    return a + (-big_b + torch.sqrt(big_b * big_b - 3.0 * big_a * fpa)) / (3.0 * big_a)


def _quadmin(a, fa, fpa, b, fb):
    """The minimiser of the quadratic through (a, fa, fpa), (b, fb)."""
    db = b - a
    return a - fpa / (2.0 * ((fb - fa - fpa * db) / db**2))


class ZoomLinesearchInfo(NamedTuple):
    """What the last zoom line search did: its number of trial steps and how far the
    accepted step missed the sufficient-decrease and curvature (strong Wolfe) conditions."""

    num_linesearch_steps: Tensor
    decrease_error: Tensor
    curvature_error: Tensor


class ScaleByZoomLinesearchState(NamedTuple):
    """State of :func:`scale_by_zoom_linesearch`: the last step size, the objective's value
    and gradient at the accepted point, and the last search's :class:`ZoomLinesearchInfo`."""

    learning_rate: Tensor
    value: Tensor
    grad: Any
    info: ZoomLinesearchInfo


def scale_by_zoom_linesearch(
    max_linesearch_steps: int, max_learning_rate: float | None = None, tol: float = 0.0,
    increase_factor: float = 2.0, slope_rtol: float = 1e-4, curv_rtol: float = 0.9,
    approx_dec_rtol: float | None = 1e-6, stepsize_precision: float = 1e-5,
    initial_guess_strategy: str = "keep", verbose: bool = False,
) -> GradientTransformation:
    r"""Zoom line search: a step :math:`\eta` with the strong Wolfe conditions

    .. math:: f(w + \eta u) \le f(w) + c_1\eta\langle u, \nabla f(w)\rangle,\quad
        |\langle u, \nabla f(w + \eta u)\rangle| \le c_2 |\langle u, \nabla f(w)\rangle|

    (the first relaxed to Hager-Zhang's approximate decrease when ``approx_dec_rtol`` is set).
    Output :math:`\eta u`; when no Wolfe point is found within ``max_linesearch_steps`` trials
    the last step with sufficient decrease is used. ``update`` needs ``value``, ``grad`` and
    ``value_fn`` by keyword; the state keeps :math:`f` and :math:`\nabla f` at the new point.

    Args:
      max_linesearch_steps: the most trials (an int >= 1).
      max_learning_rate: the largest step tried (default None: unbounded).
      tol: tolerance on both conditions (default 0). increase_factor: growth of the step while
        searching (default 2). slope_rtol: :math:`c_1` (default 1e-4). curv_rtol: :math:`c_2`
        (default 0.9). approx_dec_rtol: the approximate-decrease tolerance (default 1e-6;
        None: exact Armijo). stepsize_precision: the shortest interval (default 1e-5).
      initial_guess_strategy: ``"keep"`` (the last accepted step, default) or ``"one"``.
      verbose: accepted for optax's signature; funcopt prints nothing (read ``state.info``).

    Reference: Nocedal & Wright, Numerical Optimization, Algorithms 3.5-3.6; Hager & Zhang
    2006; optax ``scale_by_zoom_linesearch``.
    """
    if not isinstance(max_linesearch_steps, int) or max_linesearch_steps < 1:
        raise ValueError(f"max_linesearch_steps={max_linesearch_steps!r} must be an int >= 1")
    if initial_guess_strategy not in ("keep", "one"):
        raise ValueError(f"initial_guess_strategy={initial_guess_strategy!r}: use 'keep' or 'one'")
    for name, v in (("tol", tol), ("slope_rtol", slope_rtol), ("curv_rtol", curv_rtol),
                    ("stepsize_precision", stepsize_precision)):
        _check(name, v)
    _check("increase_factor", increase_factor, low=1.0, low_inclusive=False)
    if max_learning_rate is not None:
        _check("max_learning_rate", max_learning_rate, low=0.0, low_inclusive=False)
    if approx_dec_rtol is not None:
        _check("approx_dec_rtol", approx_dec_rtol)

    def errors(step, value, slope, c):
        dec = value - c["value_init"] - slope_rtol * step * c["slope_init"]
        if approx_dec_rtol is not None:
            approx = slope - (2 * slope_rtol - 1.0) * c["slope_init"]
            delta = value - c["value_init"] - approx_dec_rtol * c["value_init"].abs()
            dec = torch.minimum(torch.maximum(approx, delta), dec)
        dec = torch.where(torch.isnan(dec), torch.inf, dec.clamp_min(0.0))
        curv = (slope.abs() - curv_rtol * c["slope_init"].abs()).clamp_min(0.0)
        curv = torch.where(torch.isnan(curv), torch.inf, curv)
        return dec, curv, torch.maximum(dec, curv)

    def trial(step, c):
        at = tree_unflatten(c["treedef"], _as(ops.add(c["params"], ops.mul(c["updates"], step)),
                                              c["params"]))
        grad, value = torch.func.grad_and_value(
            lambda q: _call_value_fn(c["value_fn"], q, c["extra"]))(at)
        grad = _as(tree_leaves(grad), c["params"])
        return torch.as_tensor(value).to(step.dtype), grad, _vdot(grad, c["updates"], step.dtype)

    def search(s, c):
        new = torch.where(s["count"] == 0, c["guess"], increase_factor * s["stepsize"])
        reached = torch.zeros((), dtype=torch.bool, device=new.device)
        if max_learning_rate is not None:
            reached, new = new >= max_learning_rate, new.clamp_max(max_learning_rate)
        value, grad, slope = trial(new, c)
        dec, curv, err = errors(new, value, slope, c)
        safe = dec <= tol
        high_new = (dec > 0.0) | ((value >= s["value"]) & (s["count"] > 0))
        low_new = (slope >= 0.0) & ~high_new
        lo = [_where(low_new, x, y) for x, y in zip(
            (new, value, slope, s["stepsize"], s["value"], s["slope"]),
            (s["stepsize"], s["value"], s["slope"], new, value, slope))]
        found = high_new | low_new | (err <= tol)
        done = (err <= tol) | (reached & ~found)
        return dict(
            count=s["count"] + 1, stepsize=new, value=value, grad=grad, slope=slope,
            decrease_error=dec, curvature_error=curv, error=err, interval_found=found, done=done,
            failed=(s["count"] + 1 >= max_linesearch_steps) & ~done, low=lo[0], value_low=lo[1],
            slope_low=lo[2], high=lo[3], value_high=lo[4], slope_high=lo[5], cubic_ref=lo[0],
            value_cubic_ref=lo[1], safe_stepsize=_where(safe, new, s["safe_stepsize"]),
            safe_value=_where(safe, value, s["safe_value"]),
            safe_grad=_where(safe, grad, s["safe_grad"]))

    def zoom(s, c):
        low, high = s["low"], s["high"]
        delta, left, right = (high - low).abs(), torch.minimum(high, low), torch.maximum(high, low)
        cubic = _cubicmin(low, s["value_low"], s["slope_low"], high, s["value_high"],
                          s["cubic_ref"], s["value_cubic_ref"])
        use_cubic = (cubic > left + 0.2 * delta) & (cubic < right - 0.2 * delta)
        quad = _quadmin(low, s["value_low"], s["slope_low"], high, s["value_high"])
        use_quad = ~use_cubic & (quad > left + 0.1 * delta) & (quad < right - 0.1 * delta)
        middle = torch.where(use_cubic, cubic, s["cubic_ref"])
        middle = torch.where(use_quad, quad, middle)
        middle = torch.where(~use_cubic & ~use_quad, (low + high) / 2.0, middle)
        value, grad, slope = trial(middle, c)
        dec, curv, err = errors(middle, value, slope, c)
        better = (dec <= tol) & (value < s["safe_value"])
        safe_step = torch.where(better, middle, s["safe_stepsize"])
        done = err <= tol
        to_middle = (dec > 0.0) | (value >= s["value_low"])
        high_to_low = (slope * (high - low) >= 0.0) & ~to_middle
        mid3, low3 = (middle, value, slope), (low, s["value_low"], s["slope_low"])
        hi = [_where(to_middle, m, h) for m, h in zip(mid3, (high, s["value_high"], s["slope_high"]))]
        hi = [_where(high_to_low, lw, h) for lw, h in zip(low3, hi)]
        lo = [_where(~to_middle, m, lw) for m, lw in zip(mid3, low3)]
        moved_high = to_middle | high_to_low
        failed = ((s["count"] + 1 >= max_linesearch_steps)
                  | ((delta <= stepsize_precision) & (safe_step > 0.0))) & ~done
        return dict(
            count=s["count"] + 1, stepsize=middle, value=value, grad=grad, slope=slope,
            decrease_error=dec, curvature_error=curv, error=err,
            interval_found=s["interval_found"], done=done, failed=failed, low=lo[0],
            value_low=lo[1], slope_low=lo[2], high=hi[0], value_high=hi[1], slope_high=hi[2],
            cubic_ref=torch.where(moved_high, high, low),
            value_cubic_ref=torch.where(moved_high, s["value_high"], s["value_low"]),
            safe_stepsize=safe_step, safe_value=torch.where(better, value, s["safe_value"]),
            safe_grad=_where(better, grad, s["safe_grad"]))

    def try_safe(s):
        use = (s["safe_stepsize"] > 0.0) | torch.isinf(s["decrease_error"])
        return {**s, "stepsize": torch.where(use, s["safe_stepsize"], s["stepsize"]),
                "value": torch.where(use, s["safe_value"], s["value"]),
                "grad": _where(use, s["safe_grad"], s["grad"])}

    def step(s, c):
        if is_tracing():
            new = _select(s["interval_found"], zoom(s, c), search(s, c))
            return _select(new["failed"], try_safe(new), new)
        new = zoom(s, c) if bool(s["interval_found"]) else search(s, c)
        return try_safe(new) if bool(new["failed"]) else new

    def init(params):
        leaves = tree_leaves(params)
        dt, dev = scalar_dtype(leaves), step_counter(params).device
        inf = torch.tensor(float("inf"), dtype=dt, device=dev)
        return ScaleByZoomLinesearchState(
            torch.ones((), dtype=dt, device=dev), inf.clone(), _zeros(leaves, None),
            ZoomLinesearchInfo(torch.zeros((), dtype=torch.int64, device=dev), inf.clone(),
                               inf.clone()))

    def update(updates, state, params=None, *, value=None, grad=None, value_fn=None, **extra):
        params = require_params(params, "scale_by_zoom_linesearch")
        if value is None or grad is None or value_fn is None:
            raise ValueError("scale_by_zoom_linesearch: update needs value=f(params), "
                             "grad=its gradient and value_fn=f (passed by keyword)")
        u, treedef = _leaves(updates, params, "scale_by_zoom_linesearch", state.grad)
        p, dt = tree_leaves(params), state.value.dtype
        g = _as(tree_leaves(grad), p)
        v0 = torch.as_tensor(value).to(dtype=dt, device=state.value.device)
        slope0 = _vdot(u, g, dt)
        zero, false = torch.zeros_like(v0), torch.zeros((), dtype=torch.bool, device=v0.device)
        guess = state.learning_rate if initial_guess_strategy == "keep" else torch.ones_like(v0)
        c = dict(params=p, updates=u, treedef=treedef, value_fn=value_fn, extra=extra,
                 guess=guess, value_init=v0, slope_init=slope0)
        s = dict(count=torch.zeros((), dtype=torch.int64, device=v0.device), stepsize=zero,
                 value=v0, grad=g, slope=slope0, decrease_error=zero + torch.inf,
                 curvature_error=zero + torch.inf, error=zero + torch.inf, interval_found=false,
                 done=false, failed=false, low=zero, value_low=v0, slope_low=slope0, high=zero,
                 value_high=v0, slope_high=slope0, cubic_ref=zero, value_cubic_ref=v0,
                 safe_stepsize=zero, safe_value=v0, safe_grad=g)
        for _ in range(max_linesearch_steps):
            active = ~(s["done"] | s["failed"])
            if not is_tracing():
                if not bool(active):
                    break
                s = step(s, c)
            else:
                s = _select(active, step(s, c), s)
        lr = s["stepsize"]
        return tree_unflatten(treedef, _as(ops.mul(u, lr), u)), ScaleByZoomLinesearchState(
            lr, s["value"], _as(s["grad"], state.grad),
            ZoomLinesearchInfo(s["count"], s["decrease_error"], s["curvature_error"]))

    return GradientTransformation(init, update)
