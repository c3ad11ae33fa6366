"""The stall check of the batched and data-parallel least-squares drivers: a stop on a
tolerance (xtol or ftol, or below machine precision) counts as a success only at a
stationary point, as
:func:`funcopt.least_squares`' own check decides for one fit. :func:`stall_candidates` says
which stops are checked and how, :func:`judge_stalls` decides from a :class:`StallModel` at
the final parameters, :func:`check_stalls` builds that model for a batch."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from funcopt.least_squares_options import GAIN_CHECK_SIZE, damping_margin, rounding_steps
from funcopt.transforms import lm_batched

__all__ = ["StallModel", "stall_candidates", "judge_stalls", "check_stalls", "rounding",
           "stop_margin", "STALLED"]

Tensor = torch.Tensor
STALLED = 15  # the failure code: the last of funcopt.least_squares_batched.REASONS


class StallModel(NamedTuple):
    """What the stall check reads at the final parameters, per problem (``(B, ...)``).

    g: ``|J_j^T r| / (||J_j|| ||r||)`` ``(B, n)``; col: ``||J_j||``; rnorm: ``||r||``;
    floor: the residuals' relative rounding (:func:`rounding`); gain, ulps: the float64
    Gauss-Newton step's (:func:`funcopt.transforms.lm_batched.gauss_newton_gain`; 0 where
    not computed); margin: the factor on ``ftol`` of the gnorm test (:func:`stop_margin`;
    None: 1)."""

    g: Tensor
    col: Tensor
    rnorm: Tensor
    floor: Tensor
    gain: Tensor
    ulps: Tensor
    margin: Tensor | None = None


def stop_margin(code: Tensor, damped: tuple, col: Tensor) -> Tensor | None:
    """Each problem's factor on ``ftol`` in the gnorm test: the damping margin
    (:func:`funcopt.least_squares_options.damping_margin`) for a stop on ftol alone (codes
    5, 7) after an accepted step, else 1; ``damped = (state, rule)``, the final state of
    every problem (None: no margin) and the damping rule."""
    state, rule = damped
    if state is None:
        return None
    kappa = damping_margin(state.damping, state.scale, col, rule)
    ftol_only = state.accepted & ((code == 5) | (code == 7))
    return torch.where(ftol_only, kappa, torch.ones_like(kappa))


def stall_candidates(code: Tensor, unsure: Tensor, tols: tuple) -> tuple[Tensor, Tensor]:
    """``(checked, limit)``: the problems whose stop on a tolerance gets the gnorm test
    (every stop on xtol, codes 4, 6, 8; a stop on ftol, codes 5, 7, flagged ``unsure``: the
    update that ended it accepted a step, so the final point is not the one its ``gnorm``
    was read at, or found no acceptable step while its ``gnorm^2`` was above ``max(ftol,
    eps)``; an accepted step with ``predicted <= ftol`` can end where the cost still falls
    along another column: a step along a near-zero column of a saddle line) and those that
    get the Gauss-Newton gain test: the stops below machine precision,
    codes 7 and 8, and the stops on xtol (ftol) when ``xtol <= eps`` (``ftol <= eps``), whose
    test then implies code 8's (7's) under another name."""
    ftol, xtol, _, eps = tols
    checked = _on_xtol(code) | (unsure & ((code == 5) | (code == 7)))
    limit = (code == 7) | (code == 8)
    if xtol <= eps:
        limit = limit | (code == 4) | (code == 6)
    if ftol <= eps:
        limit = limit | (code == 4) | (code == 5)
    return checked, limit


def _on_xtol(code: Tensor) -> Tensor:
    """The stops on xtol: codes 4 (with ftol), 6 and 8 (below machine precision)."""
    return (code == 4) | (code == 6) | (code == 8)


def judge_stalls(code: Tensor, checked: Tensor, limit: Tensor, s: StallModel, x: Tensor,
                 tols: tuple) -> Tensor:
    """``code`` with the stalled stops turned into :data:`STALLED`, as
    :func:`funcopt.least_squares`' stall check. With ``bound = max(ftol, eps, s.floor)``: a
    ``checked`` problem stalled where MINPACK's ``gnorm`` over the columns whose own
    Gauss-Newton move ``|J_j^T r| / ||J_j||^2`` exceeds ``rel |x_j|`` (``rel = max(xtol,
    eps)`` on xtol, else ``eps``: a smaller move is converged) has ``gnorm^2 > max(bound,
    s.margin ftol)`` (unknown, a number overflows: not stalled); a ``limit`` problem stalled
    where the full
    Gauss-Newton step predicts ``gain > bound`` by a move of more than 4 units of the
    parameters' resolution."""
    ftol, xtol, _, eps = tols
    safe = torch.where(s.col > 0, s.col, 1.0)
    rel = torch.where(_on_xtol(code), max(xtol, eps), eps).to(x.dtype)[:, None]
    live = (s.col > 0) & (s.g * (s.rnorm[:, None] / safe) > rel * x.abs())
    gnorm = torch.where(live, s.g, 0.0).amax(-1) if x.shape[1] else torch.zeros_like(s.rnorm)
    known = torch.isfinite(s.col).all(-1) & torch.isfinite(s.g).all(-1) & (s.rnorm > 0)
    bound = torch.clamp(s.floor, min=max(ftol, eps))
    gbound = bound if s.margin is None else torch.maximum(bound, ftol * s.margin.to(bound.dtype))
    stalled = (checked & known & (gnorm * gnorm > gbound)) | (
        limit & (s.gain > bound.double()) & (s.ulps > 4))
    return torch.where(stalled, torch.full_like(code, STALLED), code)


def check_stalls(f: Callable[[Tensor], Tensor], x: Tensor, stops: tuple[Tensor, Tensor],
                 m: int, tols: tuple, jac: Callable[[], tuple[Tensor, Tensor]],
                 damped: tuple = (None, None)) -> Tensor:
    """The reason codes ``stops[0]`` with the tolerance stops that are not stationary turned
    into the failure code :data:`STALLED` (:func:`stall_candidates` says which stops are
    checked and how, :func:`judge_stalls` decides), ``stops[1]`` the ``unsure`` flags. One
    batched Jacobian and six evaluations of ``f``, and a float64 SVD of the Jacobians of the
    problems with a gain test (``m n <= GAIN_CHECK_SIZE``), only when some problem stopped
    that way; ``jac()`` gives that ``(r, J)`` (shared with the zero-column probe, which
    forms it for every success anyway: an ftol stop after an accepted step adds the six
    evaluations). ``damped = (state, rule)``: :func:`stop_margin`'s."""
    code, unsure = stops
    checked, limit = stall_candidates(code, unsure, tols)
    limit = limit & (m * x.shape[1] <= GAIN_CHECK_SIZE)
    todo = torch.stack([(checked | limit).any(), limit.sum()]).tolist()  # host sync: one
    if not todo[0]:
        return code
    r, J = jac()
    rnorm = lm_batched.batched_norm(r)
    col = lm_batched.batched_norm(J.mT)
    safe = torch.where(col > 0, col, 1.0)
    g = (J.mT @ (r / torch.where(rnorm > 0, rnorm, 1.0)[:, None])[..., None])[..., 0].abs() / safe
    gain = ulps = torch.zeros_like(rnorm, dtype=torch.float64)
    if todo[1]:
        idx = torch.nonzero_static(limit, size=todo[1])[:, 0]
        part = lm_batched.gauss_newton_gain(J[idx], r[idx], torch.zeros_like(rnorm[idx]), x[idx],
                                            m)
        gain, ulps = (z.index_copy(0, idx, v) for z, v in zip((gain, ulps), part))
    s = StallModel(g, col, rnorm, rounding(f, x, r, J, rnorm, col), gain, ulps,
                   stop_margin(code, damped, col))
    return judge_stalls(code, checked, limit, s, x, tols)


def rounding(f: Callable[[Tensor], Tensor], x: Tensor, r: Tensor, J: Tensor,
             rnorm: Tensor, col: Tensor) -> Tensor:
    """Each problem's relative rounding of its residuals, ``4 ||r(x + h) - r(x) - J h|| /
    ||r||`` for the steps ``h`` of :data:`funcopt.least_squares_options.ROUNDING_ULPS` ulps
    per parameter with alternating signs (the largest; a zero parameter at the scale of ``||r|| / ||J_j||``, ``col`` the column norms:
    :func:`funcopt.least_squares_options.rounding_steps`), as
    :func:`funcopt.least_squares_options.stationarity_floor`: a predicted relative reduction
    below it cannot be told from rounding."""
    noise = torch.zeros_like(rnorm)
    with torch.no_grad():
        for h in rounding_steps(x, rnorm, col):
            d = f(x + h) - r - (J @ h[..., None])[..., 0]
            noise = torch.maximum(noise, lm_batched.batched_norm(d))
    return 4 * noise / torch.where(rnorm > 0, rnorm, 1.0)
