"""Levenberg-Marquardt: damped Gauss-Newton steps on a residual function.

For residuals ``r(x)`` (cost ``F(x) = 0.5 ||r(x)||^2``) with Jacobian ``J``, one step solves

    (J^T J + lambda D) delta = -J^T r

accepts ``x + delta`` when the gain ratio ``rho = (F(x) - F(x + delta)) / (L(0) - L(delta))``
(actual over predicted decrease of the linear model ``L``) exceeds a threshold, and adapts the
damping ``lambda`` from ``rho``. The linear system goes through :mod:`funcopt.solvers`, so any
solver (Cholesky, QR, CG, cuPyNumeric across GPUs ...) can be chosen by name.

Host synchronisation: the accept/reject decision is a Python ``if`` on the gain ratio, so each
attempt in :func:`levenberg_marquardt`'s ``update`` reads one boolean from the device, and the
finiteness check of the residuals at the current point reads one more.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch
from torch.func import jvp

from funcopt.base import (
    GradientTransformation, Params, PyTree, check_hyperparameter, increment, require_params,
    step_counter, tree_check_structure,
)
from funcopt.func.jacobian import jacobian, ravel_params, residual_vector_fn

__all__ = [
    "LevenbergMarquardtState",
    "levenberg_marquardt",
    "damped_gauss_newton_step",
    "mse_residuals",
    "cross_entropy_residuals",
]

Tensor = torch.Tensor
_RULES = ("nielsen", "classic")


class LevenbergMarquardtState(NamedTuple):
    """State of :func:`levenberg_marquardt`; statistics describe the last attempted step.

    count: updates done (int64). damping: ``lambda`` for the next step. nu: Nielsen's growth
    factor. scale: ``d``, running maximum of the Jacobian column norms (MINPACK's ``diag``;
    ones before the first step). cost: ``F(x)`` at the params given to the last update.
    new_cost: ``F`` after the returned step. predicted: ``L(0) - L(delta)``. gain_ratio: ``rho``.
    step_norm: ``||d * delta||``. x_norm: ``||d * x_new||``. grad_cos: MINPACK's ``gnorm``,
    ``max_j |J_j^T r| / (||J_j|| ||r||)`` at ``x``. accepted: the step was taken.
    attempts: solves in the last update (int64).
    """

    count: Tensor
    damping: Tensor
    nu: Tensor
    scale: Tensor
    cost: Tensor
    new_cost: Tensor
    predicted: Tensor
    gain_ratio: Tensor
    step_norm: Tensor
    x_norm: Tensor
    grad_cos: Tensor
    accepted: Tensor
    attempts: Tensor


def damped_gauss_newton_step(
    J: Tensor, r: Tensor, damping: Tensor | float, diag: Tensor | None = None, *,
    solver: Any = "auto", form: str = "auto",
) -> tuple[Tensor, Tensor]:
    """``delta = -(J^T J + damping * diag(diag))^{-1} J^T r`` through :mod:`funcopt.solvers`.

    Returns ``(delta, success)`` (``success`` a 0-d bool tensor). ``diag=None`` means ``D = I``;
    otherwise ``diag`` must be positive. The system is solved in scaled variables
    ``z = S delta``, ``S = diag(sqrt(diag))``: ``(Jt^T Jt + damping I) z = -Jt^T r`` with
    ``Jt = J S^{-1}`` (as MINPACK), which keeps the normal equations well conditioned when
    the columns of ``J`` differ in scale by many orders of magnitude. The inner solve is
    :func:`funcopt.solvers.damped_least_squares` with ``solver`` and ``form``.
    """
    if diag is None:
        return _solve(J, r, damping, None, solver, form)
    if not bool((diag > 0).all()):  # host sync, public entry point only
        raise ValueError("diag must be positive; pass None for D = I")
    return _solve(J, r, damping, torch.sqrt(diag), solver, form)


def _solve(J, r, damping, scale, solver, form):
    """The step in scaled variables (``scale`` = ``sqrt(diag(D))`` or None for ``D = I``)."""
    from funcopt import solvers

    Js = J if scale is None else J / scale
    if hasattr(solvers, "damped_least_squares"):
        sol = solvers.damped_least_squares(Js, r, damping, None, solver=solver, form=form)
        z, ok = sol.x.to(J.dtype), sol.success
    else:  # solver layer not installed
        z, ok = _fallback_solve(Js, r, damping)
    return -(z if scale is None else z / scale), ok


def _fallback_solve(J: Tensor, r: Tensor, damping: Tensor | float):
    """QR least squares on the augmented system ``[J; sqrt(lambda) I] x = [r; 0]``."""
    n = J.shape[1]
    lam = torch.as_tensor(damping, dtype=J.dtype, device=J.device)
    A = torch.cat([J, torch.sqrt(lam) * torch.eye(n, dtype=J.dtype, device=J.device)])
    b = torch.cat([r, torch.zeros(n, dtype=r.dtype, device=r.device)])
    q, rr = torch.linalg.qr(A)
    x = torch.linalg.solve_triangular(rr, (q.T @ b)[:, None], upper=True)[:, 0]
    ok = torch.isfinite(x).all()
    return torch.where(ok, x, torch.zeros_like(x)), ok


def _geodesic_acceleration(f, x, delta, J, damping, scale, solver, form):
    """Transtrum-Sethna second-order correction ``a`` for step ``delta``.

    ``r_vv`` is the exact second directional derivative of the residuals along ``delta``
    (forward-over-forward mode); ``a`` solves ``(J^T J + lambda D) a = -J^T r_vv``.
    """
    def directional(y: Tensor) -> Tensor:
        return jvp(f, (y,), (delta,))[1]

    rvv = jvp(directional, (x,), (delta,))[1]
    return _solve(J, rvv.detach(), damping, scale, solver, form)


def _evaluate(f: Callable[[Tensor], Tensor], x_new: Tensor, shape: torch.Size) -> Tensor:
    """``F(x_new)``; ``inf`` when the residuals are not finite. Checks the residual shape."""
    with torch.no_grad():
        r_new = f(x_new)
    if r_new.shape != shape:
        raise ValueError(
            f"residual_fn returned {tuple(r_new.shape)} residuals at a candidate point but "
            f"{tuple(shape)} at the current one; it must return the same number every call"
        )
    cost = 0.5 * torch.dot(r_new, r_new)
    return torch.where(torch.isfinite(cost), cost, torch.full_like(cost, float("inf")))


def _adapt(rule, damping, nu, rho, accepted, factors, bounds):
    """Next ``(lambda, nu)``: Nielsen's gain-ratio rule or classic multiply/divide factors."""
    up, down = factors
    if rule == "nielsen":
        if accepted:
            shrink = torch.clamp(1.0 - (2.0 * rho - 1.0) ** 3, min=1.0 / 3.0)
            damping, nu = damping * shrink, torch.full_like(nu, 2.0)
        else:
            damping, nu = damping * nu, nu * 2.0
    else:
        damping = damping / down if accepted else damping * up
    return torch.clamp(damping, bounds[0], bounds[1]), nu


def _column_stats(J: Tensor, r: Tensor):
    """Column norms of ``J``, gradient ``g = J^T r`` and MINPACK's ``gnorm``."""
    col = torch.linalg.vector_norm(J, dim=0)
    g = J.T @ r
    rnorm = torch.linalg.vector_norm(r)
    denom = col * rnorm
    cos = torch.where(denom > 0, g.abs() / torch.where(denom > 0, denom, 1.0), 0.0)
    return col, g, cos.max() if cos.numel() else torch.zeros((), dtype=J.dtype)


def levenberg_marquardt(
    residual_fn: Callable[..., Tensor],
    *,
    initial_damping: float = 1e-3,
    damping_rule: str = "nielsen",
    increase_factor: float = 10.0,
    decrease_factor: float = 10.0,
    scaling: bool = True,
    min_damping: float = 1e-15,
    max_damping: float = 1e16,
    max_attempts: int = 10,
    accept_ratio: float = 1e-4,
    geodesic_acceleration: bool = False,
    geodesic_alpha: float = 0.75,
    solver: Any = "auto",
    form: str = "auto",
    jacobian_mode: str = "auto",
    chunk_size: int | None = None,
) -> GradientTransformation:
    r"""Levenberg-Marquardt as a pure transform whose ``updates`` are the accepted step.

    .. math::
        (J^\top J + \lambda D)\,\delta = -J^\top r, \qquad
        \rho = \frac{F(x) - F(x+\delta)}{\tfrac12\|J\delta\|^2 + \lambda\,\delta^\top D\delta},

    with ``r = residual_fn(params, batch)`` flattened, ``J = dr/dx`` over the floating
    parameter leaves (integer leaves get zero updates), ``F = 0.5 ||r||^2``. The step is
    accepted when ``rho > accept_ratio``; otherwise ``lambda`` grows and the step is solved
    again, up to ``max_attempts`` times per update (a zero update when all fail).

    Args:
        residual_fn: ``(params) -> r`` or ``(params, batch) -> r`` (given when ``batch`` is
            passed to ``update``); any shape, flattened.
        initial_damping: ``lambda_0`` (default 1e-3). With ``scaling`` it is relative to
            ``D``; without, ``lambda_0 = tau * max diag(J^T J)`` with ``tau = initial_damping``
            (Nielsen 1999).
        damping_rule: ``"nielsen"`` (default): accept: ``lambda *= max(1/3, 1-(2 rho-1)^3)``,
            ``nu = 2``; reject: ``lambda *= nu``, ``nu *= 2``. ``"classic"`` (Marquardt 1963):
            accept: ``lambda /= decrease_factor``; reject: ``lambda *= increase_factor``.
        increase_factor, decrease_factor: the classic rule's factors (10, 10).
        scaling: Marquardt/MINPACK scaling (default True): ``D = diag(d^2)``, ``d_j`` the running
            maximum over steps of the norm of column ``j`` of ``J`` (1 for a zero column).
            False: ``D = I``.
        min_damping, max_damping: bounds on ``lambda`` (1e-15, 1e16).
        max_attempts: solves per update before giving up with a zero step (10).
        accept_ratio: smallest gain ratio accepted (1e-4, as MINPACK).
        geodesic_acceleration: add Transtrum & Sethna's second-order correction ``a/2``,
            ``(J^T J + lambda D) a = -J^T r_vv`` with ``r_vv`` the second directional derivative
            of ``r`` along ``delta`` (exact, by nested jvp); a step with
            ``2 ||a||_D / ||delta||_D > geodesic_alpha`` (0.75) is rejected.
        solver, form: passed to :func:`funcopt.solvers.damped_least_squares` (``"auto"``:
            primal ``J^T J`` or dual ``J J^T`` form by shape, dense or CG; or any named solver).
        jacobian_mode, chunk_size: passed to :func:`funcopt.func.jacobian`.

    ``update(updates, state, params, *, batch=None)``: ``updates`` is not read (LM computes
    its own step; pass the gradients or ``None``); ``params`` is required. Host syncs: one per
    attempt (accept/reject) and one finiteness check of ``r`` and ``J``.

    References: Levenberg (1944); Marquardt (1963), SIAM J. Appl. Math. 11(2); Moré (1978),
    "The Levenberg-Marquardt algorithm: implementation and theory" (MINPACK); Nielsen (1999),
    "Damping parameter in Marquardt's method", IMM-REP-1999-05; Transtrum & Sethna (2012),
    "Improvements to the Levenberg-Marquardt algorithm for nonlinear least-squares minimization".
    """
    if damping_rule not in _RULES:
        raise ValueError(f"damping_rule={damping_rule!r}: use one of {_RULES}")
    check_hyperparameter("initial_damping", initial_damping, low=0.0, low_inclusive=False)
    check_hyperparameter("increase_factor", increase_factor, low=1.0, low_inclusive=False)
    check_hyperparameter("decrease_factor", decrease_factor, low=1.0, low_inclusive=False)
    check_hyperparameter("min_damping", min_damping, low=0.0)
    check_hyperparameter("max_damping", max_damping, low=min_damping, low_inclusive=False)
    check_hyperparameter("accept_ratio", accept_ratio, low=0.0, high=1.0, high_inclusive=False)
    check_hyperparameter("geodesic_alpha", geodesic_alpha, low=0.0, low_inclusive=False)
    if not isinstance(max_attempts, int) or max_attempts < 1:
        raise ValueError(f"max_attempts={max_attempts!r}: pass an int >= 1")
    opts = dict(rule=damping_rule, factors=(increase_factor, decrease_factor),
                bounds=(min_damping, max_damping), scaling=scaling, tau=initial_damping,
                attempts=max_attempts, accept=accept_ratio, geodesic=geodesic_acceleration,
                alpha=geodesic_alpha, solver=solver, form=form, mode=jacobian_mode,
                chunk=chunk_size)

    def init(params: Params) -> LevenbergMarquardtState:
        x, _ = ravel_params(params)
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        return LevenbergMarquardtState(
            step_counter(params), zero + initial_damping, zero + 2.0, torch.ones_like(x),
            zero, zero, zero, zero, zero, zero, zero,
            torch.zeros((), dtype=torch.bool, device=x.device), step_counter(params),
        )

    def update(updates: Any, state: LevenbergMarquardtState, params: Params | None = None,
               *, batch: Any = None, **extra: Any):
        params = require_params(params, "levenberg_marquardt")
        if updates is not None:
            tree_check_structure(updates, params, ("updates", "params"))
        args = () if batch is None else (batch,)
        delta, new_state = _step(residual_fn, params, args, state, opts)
        return _to_tree(delta, params), new_state

    return GradientTransformation(init, update)


def _to_tree(delta: Tensor, params: PyTree) -> PyTree:
    """The flat step as a tree like ``params`` (zeros for integer leaves)."""
    _, unravel = ravel_params(params)
    tree = unravel(delta)
    return optree.tree_map(
        lambda u, p: u if p.is_floating_point() else torch.zeros_like(p), tree, params
    )


def _linearize(residual_fn, params, args, state, o):
    """``x, f, r, J``, the scaling ``d`` and the current damping; raises on non-finite r/J."""
    x, unravel = ravel_params(params)
    f = residual_vector_fn(residual_fn, unravel, *args)
    J, r = jacobian(residual_fn, params, *args, mode=o["mode"], chunk_size=o["chunk"])
    if not bool(torch.isfinite(r).all() & torch.isfinite(J).all()):  # host sync
        raise ValueError(
            "residual_fn gave non-finite residuals or Jacobian at the current parameters; "
            "start from parameters where the model is finite"
        )
    if state.scale.shape != x.shape:
        raise ValueError(
            f"state holds {state.scale.numel()} parameters but params have {x.numel()}; "
            "pass the state made by init for these params"
        )
    col, g, cos = _column_stats(J, r)
    first = state.count == 0
    if o["scaling"]:
        d = torch.where(first, col, torch.maximum(state.scale, col))
        d = torch.where(d > 0, d, torch.ones_like(d))
        lam = state.damping
    else:
        d = torch.ones_like(x)
        start = o["tau"] * (col * col).max()
        lam = torch.where(first & (start > 0), start, state.damping)
    return x, f, r, J, g, cos, d, lam


def _step(residual_fn, params, args, state: LevenbergMarquardtState, o):
    """Propose, evaluate and accept/reject up to ``max_attempts`` times."""
    x, f, r, J, g, cos, d, lam = _linearize(residual_fn, params, args, state, o)
    S = d if o["scaling"] else None
    cost = 0.5 * torch.dot(r, r)
    nu = state.nu
    zero = torch.zeros_like(cost)
    for attempt in range(1, o["attempts"] + 1):
        delta, ok = _solve(J, r, lam, S, o["solver"], o["form"])
        Jd = J @ delta
        dn = torch.linalg.vector_norm(d * delta)
        predicted = 0.5 * torch.dot(Jd, Jd) + lam * dn * dn
        step = delta
        if o["geodesic"]:
            a, ok_a = _geodesic_acceleration(f, x, delta, J, lam, S, o["solver"], o["form"])
            small = 2.0 * torch.linalg.vector_norm(d * a) <= o["alpha"] * dn
            ok = ok & ok_a & small
            step = delta + 0.5 * a
        new_cost = _evaluate(f, x + step, r.shape)
        rho = torch.where(predicted > 0, (cost - new_cost) / torch.where(predicted > 0, predicted, 1.0),
                          torch.full_like(cost, -float("inf")))
        rho = torch.where(torch.isnan(rho), torch.full_like(rho, -float("inf")), rho)
        accepted = bool(ok & torch.isfinite(new_cost) & (rho > o["accept"]))  # host sync
        lam, nu = _adapt(o["rule"], lam, nu, rho, accepted, o["factors"], o["bounds"])
        if accepted or bool(lam >= o["bounds"][1]):
            break
    if not accepted:
        step = torch.zeros_like(x)
    x_new = x + step
    new_state = LevenbergMarquardtState(
        increment(state.count), lam, nu, d, cost, new_cost if accepted else cost,
        predicted, torch.where(torch.isfinite(rho), rho, torch.full_like(rho, -1e300)),
        torch.linalg.vector_norm(d * (x_new - x if accepted else delta)),
        torch.linalg.vector_norm(d * x_new), cos + zero,
        torch.tensor(accepted, device=x.device), torch.tensor(attempt, device=x.device),
    )
    return step, new_state


# --------------------------------------------------------------------------- residual adapters


def mse_residuals(model_fn: Callable[[PyTree, Tensor], Tensor]) -> Callable[[PyTree, Any], Tensor]:
    """Residuals whose half squared norm is half the mean squared error.

    ``r = (model_fn(params, inputs) - targets).reshape(-1) / sqrt(N)`` with ``N`` the number of
    elements, so ``0.5 ||r||^2 = 0.5 * mean((f - y)^2)``. The returned function takes
    ``(params, batch)`` with ``batch = (inputs, targets)``.
    """

    def residual_fn(params: PyTree, batch: Any) -> Tensor:
        inputs, targets = batch
        out = model_fn(params, inputs)
        if out.shape != targets.shape:
            raise ValueError(
                f"model output {tuple(out.shape)} and targets {tuple(targets.shape)} differ in "
                "shape; reshape the targets to the model's output"
            )
        diff = (out - targets.to(out.dtype)).reshape(-1)
        return diff / diff.numel() ** 0.5

    return residual_fn


def cross_entropy_residuals(
    model_fn: Callable[[PyTree, Tensor], Tensor], eps: float = 1e-12
) -> Callable[[PyTree, Any], Tensor]:
    """Cross-entropy turned into one residual per sample.

    ``r_i = sqrt(2 * l_i / N + eps)``, ``l_i = logsumexp(z_i) - z_{i, y_i}`` the cross-entropy
    of sample ``i`` with logits ``z_i = model_fn(params, inputs)[i]`` and class ``y_i``, ``N``
    the batch size; so ``0.5 ||r||^2 = mean_i l_i + N eps / 2`` and the Gauss-Newton matrix
    ``J^T J`` is built from ``grad sqrt(l_i)`` (the square-root residual construction used by
    torch-levenberg-marquardt and cuPyLMA). ``eps`` (1e-12) keeps the derivative of the square
    root finite when a loss is exactly zero. ``batch = (inputs, labels)``, labels int64.
    """

    def residual_fn(params: PyTree, batch: Any) -> Tensor:
        inputs, labels = batch
        logits = model_fn(params, inputs)
        if logits.ndim != 2 or labels.shape != logits.shape[:1]:
            raise ValueError(
                f"cross_entropy_residuals needs logits (N, C) and labels (N,); got "
                f"{tuple(logits.shape)} and {tuple(labels.shape)}"
            )
        loss = torch.logsumexp(logits, dim=1) - logits.gather(1, labels[:, None].long())[:, 0]
        return torch.sqrt(2.0 * loss.clamp(min=0.0) / logits.shape[0] + eps)

    return residual_fn
