"""L-BFGS and the backtracking (Armijo) line search.

``update`` of a line search takes the objective at the current parameters by keyword, as
optax's: ``value`` (f at params), ``grad`` (its gradient) and ``value_fn`` (params -> f); these
travel through :func:`~funcopt.chain` to it. The L-BFGS memory is kept in chronological order
(oldest first), one stacked tensor per leaf, so no step indexes the state by a tensor.
"""

# ruff: noqa: F405 (the names of the toolkit's star import)
from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from funcopt.engine import is_tracing
from funcopt.transforms import first_order as fo
from funcopt.transforms._toolkit import *  # noqa: F403

__all__ = [
    "ScaleByLBFGSState", "BacktrackingLinesearchInfo", "ScaleByBacktrackingLinesearchState",
    "scale_by_lbfgs", "scale_by_backtracking_linesearch", "lbfgs",
]


def _vdot(a: list[Tensor], b: list[Tensor], dtype: torch.dtype) -> Tensor:
    """``sum_i <a_i, b_i>`` over the leaves, as a 0-d tensor in ``dtype``."""
    return torch.stack([torch.vdot(x.reshape(-1), y.reshape(-1)).to(dtype)
                        for x, y in zip(a, b)]).sum()


class ScaleByLBFGSState(NamedTuple):
    """State of :func:`scale_by_lbfgs`: the step count, the last parameters and updates, and
    the ring buffers of parameter and gradient differences with their weights (the L-BFGS
    memory)."""

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count by design (optax's name)
    params: Any
    updates: Any
    diff_params_memory: Any
    diff_updates_memory: Any
    weights_memory: Tensor


def _two_loop(u: list[Tensor], dw: list[Tensor], du: list[Tensor], rho: Tensor,
              gamma: Tensor) -> list[Tensor]:
    """``H u`` by Nocedal & Wright's two-loop recursion (Algorithm 7.4), memory oldest first."""
    dt, m = rho.dtype, rho.shape[0]
    vec, alphas = list(u), []
    for i in reversed(range(m)):
        alpha = rho[i] * _vdot([x[i] for x in dw], vec, dt)
        vec = _as(ops.sub(vec, ops.mul([x[i] for x in du], alpha)), u)
        alphas.append(alpha)
    vec = _as(ops.mul(vec, gamma), u)
    for i, alpha in zip(range(m), reversed(alphas)):
        beta = rho[i] * _vdot([x[i] for x in du], vec, dt)
        vec = _as(ops.add(vec, ops.mul([x[i] for x in dw], alpha - beta)), u)
    return vec


def _push(memory: list[Tensor], new: list[Tensor]) -> list[Tensor]:
    """Drop the oldest entry of each stacked memory and append ``new`` as the newest."""
    return [torch.cat([m[1:], x.unsqueeze(0).to(m.dtype)]) for m, x in zip(memory, new)]


def scale_by_lbfgs(memory_size: int = 10, scale_init_precond: bool = True) -> GradientTransformation:
    r"""The L-BFGS direction :math:`P_k u_k`.

    With :math:`\delta w_j = w_{j+1} - w_j`, :math:`\delta u_j = u_{j+1} - u_j` and
    :math:`\rho_j = 1/\langle\delta u_j, \delta w_j\rangle` (0 where that is 0) over the last
    ``memory_size`` steps, :math:`P_k` is the BFGS inverse-Hessian estimate built from
    :math:`\gamma_k I`, applied by the two-loop recursion:

    .. math:: \gamma_k = \frac{\langle\delta w_{k-1}, \delta u_{k-1}\rangle}{\|\delta u_{k-1}\|^2}
        \ (\text{scale\_init\_precond; else } 1),\quad \gamma_0 = \min(1, 1/\|u_0\|).

    Chain it with a line search (or a learning rate) and a sign flip: see :func:`lbfgs`.

    Args:
      memory_size: :math:`m` >= 1, the number of pairs kept (default 10).
      scale_init_precond: use :math:`\gamma_k` above instead of 1 (default True).

    Needs ``params``. State: memories of shape ``(m, *leaf.shape)``, oldest first.
    Reference: Nocedal & Wright, Numerical Optimization, Algorithms 7.4-7.5; Liu & Nocedal
    1989; optax ``scale_by_lbfgs``. torch.optim.LBFGS runs its own closure loop (and a
    different line search): funcopt follows optax.
    """
    if not isinstance(memory_size, int) or memory_size < 1:
        raise ValueError(f"scale_by_lbfgs: memory_size={memory_size!r} must be an int >= 1")

    def init(params):
        leaves = tree_leaves(params)
        mem = [torch.zeros((memory_size, *x.shape), dtype=x.dtype, device=x.device) for x in leaves]
        count = step_counter(params)
        return ScaleByLBFGSState(
            count, _zeros(leaves, None), _zeros(leaves, None), mem,
            [m.clone() for m in mem],
            torch.zeros(memory_size, dtype=scalar_dtype(leaves), device=count.device))

    def update(updates, state, params=None, **extra):
        params = require_params(params, "scale_by_lbfgs")
        u, treedef = _leaves(updates, params, "scale_by_lbfgs", state.params)
        if not u:
            return updates, state._replace(count=increment(state.count))
        p, dt = tree_leaves(params), state.weights_memory.dtype
        started = state.count > 0
        dw = [torch.where(started, x - y, 0.0) for x, y in zip(p, state.params)]
        du = [torch.where(started, x - y, 0.0) for x, y in zip(u, state.updates)]
        curv = _vdot(du, dw, dt)
        weight = torch.where(started & (curv != 0), 1.0 / torch.where(curv == 0, 1.0, curv), 0.0)
        dw_mem, du_mem = _push(state.diff_params_memory, dw), _push(state.diff_updates_memory, du)
        weights = torch.cat([state.weights_memory[1:], weight.reshape(1)])
        gamma = torch.ones((), dtype=dt, device=curv.device)
        if scale_init_precond:
            den = _vdot(du, du, dt)
            gamma = torch.where(den > 0, curv / torch.where(den > 0, den, 1.0), 1.0)
            norm = torch.sqrt(_vdot(u, u, dt)).detach()
            gamma = torch.where(started, gamma, torch.clamp_max(1.0 / norm, 1.0))
        out = _two_loop(u, dw_mem, du_mem, weights, gamma)
        return tree_unflatten(treedef, out), ScaleByLBFGSState(
            increment(state.count), _as(p, state.params), _as(u, state.updates), dw_mem, du_mem,
            weights)

    return GradientTransformation(init, update)


class BacktrackingLinesearchInfo(NamedTuple):
    """What the last backtracking line search did: its number of trial steps, how far the
    accepted step missed the sufficient-decrease condition, and the step size it chose."""

    num_linesearch_steps: Tensor
    decrease_error: Tensor


class ScaleByBacktrackingLinesearchState(NamedTuple):
    """State of :func:`scale_by_backtracking_linesearch`: the last step size, the
    objective's value and gradient at the accepted point, and the last search's
    :class:`BacktrackingLinesearchInfo`."""

    learning_rate: Tensor
    value: Tensor
    grad: Any
    info: BacktrackingLinesearchInfo


def _call_value_fn(value_fn: Callable[..., Any], params: Any, extra: dict[str, Any]) -> Any:
    """``value_fn(params, **kw)`` with the extra keyword arguments its signature accepts."""
    try:
        names = inspect.signature(value_fn).parameters
    except (TypeError, ValueError):
        return value_fn(params)
    if any(q.kind is inspect.Parameter.VAR_KEYWORD for q in names.values()):
        return value_fn(params, **extra)
    return value_fn(params, **{k: v for k, v in extra.items() if k in names})


def scale_by_backtracking_linesearch(
    max_backtracking_steps: int, slope_rtol: float = 1e-4, decrease_factor: float = 0.8,
    increase_factor: float = 1.5, max_learning_rate: float = 1.0, atol: float = 0.0,
    rtol: float = 0.0, store_grad: bool = False, verbose: bool = False,
) -> GradientTransformation:
    r"""Backtracking line search for the Armijo sufficient-decrease condition.

    Starting from :math:`\eta_0 = \min(c_{inc}\,\eta_{prev}, \eta_{max})`, try
    :math:`\eta_{i+1} = c_{dec}\,\eta_i` until

    .. math:: f(w + \eta_i u) \le (1 + r) f(w) + \eta_i\, c_1 \langle u, \nabla f(w)\rangle + a

    or ``max_backtracking_steps`` backtracks were made; output :math:`\eta_i u` (0 when the
    last trial value was NaN/inf). ``update`` needs ``value`` = f(w), ``grad`` = ∇f(w) and
    ``value_fn`` (params -> f; extra keyword arguments it names are passed on).

    Args:
      max_backtracking_steps: the most backtracks (an int >= 0).
      slope_rtol: :math:`c_1` (default 1e-4). decrease_factor: :math:`c_{dec}` (default 0.8).
      increase_factor: :math:`c_{inc}` (default 1.5). max_learning_rate: :math:`\eta_{max}`
        (default 1). atol: :math:`a` (default 0). rtol: :math:`r` (default 0).
      store_grad: keep :math:`\nabla f` at the accepted point in the state (one more gradient
        evaluation; default False).
      verbose: accepted for optax's signature; funcopt prints nothing (read ``state.info``).

    Eager steps stop at the first accepted trial (reading the condition on the host: one sync
    per trial); under ``torch.compile``/``torch.func`` every trial runs and the accepted one
    is kept (the same numbers). Reference: Armijo 1966; Nocedal & Wright, Algorithm 3.1; optax
    ``scale_by_backtracking_linesearch``.
    """
    if not isinstance(max_backtracking_steps, int) or max_backtracking_steps < 0:
        raise ValueError(f"max_backtracking_steps={max_backtracking_steps!r} must be an int >= 0")
    _check("decrease_factor", decrease_factor, low=0.0, high=1.0, low_inclusive=False)
    _check("increase_factor", increase_factor, low=1.0)
    _check("max_learning_rate", max_learning_rate, low=0.0, low_inclusive=False)
    for name, v in (("slope_rtol", slope_rtol), ("atol", atol), ("rtol", rtol)):
        _check(name, v)

    def init(params):
        leaves = tree_leaves(params)
        dt = scalar_dtype(leaves)
        dev = step_counter(params).device
        inf = torch.tensor(float("inf"), dtype=dt, device=dev)
        return ScaleByBacktrackingLinesearchState(
            torch.ones((), dtype=dt, device=dev), inf.clone(),
            _zeros(leaves, None) if store_grad else None,
            BacktrackingLinesearchInfo(torch.zeros((), dtype=torch.int64, device=dev), inf.clone()))

    def update(updates, state, params=None, *, value=None, grad=None, value_fn=None, **extra):
        params = require_params(params, "scale_by_backtracking_linesearch")
        if value is None or grad is None or value_fn is None:
            raise ValueError("scale_by_backtracking_linesearch: update needs value=f(params), "
                             "grad=its gradient and value_fn=f (passed by keyword)")
        u, treedef = _leaves(updates, params, "scale_by_backtracking_linesearch")
        p, dt = tree_leaves(params), state.value.dtype
        value = torch.as_tensor(value).to(dt)
        slope = _vdot(u, _as(tree_leaves(grad), u), dt)
        lr = torch.clamp_max(increase_factor * state.learning_rate, max_learning_rate)
        new_value, err = value, torch.full_like(value, float("inf"))
        done = torch.zeros((), dtype=torch.bool, device=value.device)
        steps = torch.zeros((), dtype=torch.int64, device=value.device)
        for i in range(max_backtracking_steps + 1):
            if not is_tracing() and bool(done):
                break
            trial = lr * decrease_factor if i > 0 else lr
            f = torch.as_tensor(_call_value_fn(
                value_fn, tree_unflatten(treedef, _as(ops.add(p, ops.mul(u, trial)), p)), extra)).to(dt)
            e = f - (1.0 + rtol) * value - trial * slope_rtol * slope
            e = torch.clamp_min(torch.where(torch.isnan(e), float("inf"), e), 0.0)
            lr, new_value, err = (torch.where(done, a, b) for a, b in ((lr, trial), (new_value, f), (err, e)))
            steps = steps + (~done).to(torch.int64)
            done = done | (err <= atol)
        lr = torch.where(torch.isinf(err), 0.0, lr)
        new_grad = None
        if store_grad:
            at = tree_unflatten(treedef, _as(ops.add(p, ops.mul(u, lr)), p))
            new_grad = tree_leaves(torch.func.grad(lambda q: _call_value_fn(value_fn, q, extra))(at))
        return tree_unflatten(treedef, _as(ops.mul(u, lr), u)), ScaleByBacktrackingLinesearchState(
            lr, new_value, new_grad, BacktrackingLinesearchInfo(steps, err))

    return GradientTransformation(init, update)


def lbfgs(
    learning_rate: ScalarOrSchedule | None = None, memory_size: int = 10,
    scale_init_precond: bool = True, linesearch: GradientTransformation | None | str = "zoom",
) -> GradientTransformation:
    r"""L-BFGS: ``chain(scale_by_lbfgs(memory_size, scale_init_precond),
    scale_by_learning_rate(lr) (or scale(-1) when lr is None), linesearch)``.

    .. math:: w_{k+1} = w_k - \eta_k P_k \nabla f(w_k)\quad(\text{see } scale\_by\_lbfgs),

    with :math:`\eta_k` from the line search. ``update`` needs ``value``, ``grad`` and
    ``value_fn`` by keyword (for the line search).

    Args:
      learning_rate: :math:`\eta` or None (default: no scaling; the line search sets it).
      memory_size: pairs kept (default 10). scale_init_precond: see :func:`scale_by_lbfgs`.
      linesearch: a line-search transform, or None for none. The default (``"zoom"``) is
        optax's: ``scale_by_zoom_linesearch(max_linesearch_steps=20,
        initial_guess_strategy="one")``; :func:`scale_by_backtracking_linesearch` is the
        cheaper alternative.

    Reference: Liu & Nocedal 1989; Nocedal & Wright, Chapter 7; optax ``lbfgs``.
    """
    if isinstance(linesearch, str):
        if linesearch != "zoom":
            raise ValueError(f"lbfgs: linesearch={linesearch!r}; pass a transform, None or 'zoom'")
        from funcopt.transforms.zoom_line_search import scale_by_zoom_linesearch

        linesearch = scale_by_zoom_linesearch(max_linesearch_steps=20, initial_guess_strategy="one")
    scaling = fo.scale(-1.0) if learning_rate is None else fo.scale_by_learning_rate(learning_rate)
    tail = () if linesearch is None else (linesearch,)
    return chain(scale_by_lbfgs(memory_size, scale_init_precond), scaling, *tail)
