"""Levenberg-Marquardt: damped Gauss-Newton steps on a residual function.

For residuals ``r(x)`` (cost ``F(x) = 0.5 ||r(x)||^2``) with Jacobian ``J``, one step solves

    (J^T J + lambda D) delta = -J^T r

accepts ``x + delta`` when the gain ratio ``rho = (F(x) - F(x + delta)) / (L(0) - L(delta))``
(actual over predicted decrease of the linear model ``L``) exceeds a threshold, and adapts the
damping ``lambda`` from ``rho``. The linear system goes through :mod:`funcopt.solvers`, so any
solver (Cholesky, QR, CG, cuPyNumeric across GPUs ...) can be chosen by name.

The Jacobian is either formed densely (:func:`funcopt.func.jacobian`) or, with a matrix-free
solver (``solver="cg"``), used only through Jacobian-vector and vector-Jacobian products
(:func:`funcopt.func.gauss_newton_products`).

Host synchronisation: in eager mode the accept/reject decision is a Python ``if`` on the gain
ratio, so each attempt in :func:`levenberg_marquardt`'s ``update`` reads one boolean from the
device, and the finiteness check of the residuals (and Jacobian) at the current point reads one
more; the solver layer adds its own checks (see :mod:`funcopt.solvers`). Under ``torch.func``
transforms (``vmap`` over independent problems) and ``torch.compile`` the update takes the
sync-free path of :mod:`funcopt.transforms.lm_batched` instead: the same steps up to rounding,
every decision a ``torch.where``, a fixed number of attempts with finished ones masked.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch
from torch.func import jacrev, jvp

from funcopt.base import (
    GradientTransformation,
    Params,
    PyTree,
    check_hyperparameter,
    increment,
    require_params,
    step_counter,
    tree_check_structure,
)
from funcopt.engine import is_tracing
from funcopt.func.jacobian import (
    gauss_newton_products,
    jacobian,
    ravel_params,
    residual_vector_fn,
)
from funcopt.solvers.base import scaled_norm

__all__ = ["LevenbergMarquardtState", "levenberg_marquardt", "damped_gauss_newton_step", "lm_options"]

Tensor = torch.Tensor
_RULES = ("nielsen", "classic", "trust_region")


class LevenbergMarquardtState(NamedTuple):
    """State of :func:`levenberg_marquardt`; statistics describe the last attempted step.

    count: updates done (int64). damping: ``lambda`` for the next step (with the trust-region
    rule: of the last attempt). nu: Nielsen's growth factor. radius: ``Delta``, the trust-region
    radius on ``||d * delta||`` (trust-region rule; 0 before the first step). scale: ``d``, running maximum of the Jacobian column norms (MINPACK's ``diag``;
    ones before the first step). cost: ``F(x)`` at the params given to the last update.
    new_cost: ``F`` after the returned step. predicted: ``L(0) - L(delta)``. gain_ratio: ``rho``.
    step_norm: ``||d * delta||``. x_norm: ``||d * x_new||``. grad_cos: MINPACK's ``gnorm``,
    ``max_j |J_j^T r| / (||J_j|| ||r||)`` at ``x``. accepted: the step was taken.
    attempts: solves in the last update (int64). residual_norm: ``||r(x)||``, computed without
    overflow or underflow (``cost`` and ``new_cost`` are ``0.5 ||r||^2`` and can overflow to inf
    or underflow to 0 where the norm does not). actual_reduction, predicted_reduction:
    MINPACK's scale-free ``1 - (||r_new|| / ||r||)^2`` (``-1`` when ``||r_new|| >= 10 ||r||``
    or not finite) and ``(L(0) - L(delta)) / F(x)``; ``gain_ratio`` is their quotient.
    trial_finite: the residuals were finite at every point tried in the last update.
    """

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count by design (optax's name)
    damping: Tensor
    nu: Tensor
    radius: Tensor
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
    residual_norm: Tensor
    actual_reduction: Tensor
    predicted_reduction: Tensor
    trial_finite: Tensor


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
    :class:`funcopt.solvers.DampedLeastSquares` with ``solver``, ``form`` and
    ``scale=sqrt(diag)``.
    """
    if diag is not None and not bool((diag > 0).all()):  # host sync, public entry point only
        raise ValueError("diag must be positive; pass None for D = I")
    factor, solve = _damped_solver(J, None if diag is None else torch.sqrt(diag), solver, form)
    return solve(factor(damping), r)


def _damped_solver(J: Tensor, scale: Tensor | None, solver: Any, form: str):
    """``(factor, solve)`` for one ``J``: ``factor(lambda)`` factorises
    ``J^T J + lambda S^2`` once (``scale`` = ``S`` = ``sqrt(diag(D))``, None for ``D = I``) and
    ``solve(state, u) = (-(J^T J + lambda S^2)^{-1} J^T u, success)`` reuses it, in the scaled
    variables ``z = S delta`` of :class:`funcopt.solvers.DampedLeastSquares` (which forms the
    Gram matrix once per ``J``)."""
    from funcopt import solvers

    dls = solvers.DampedLeastSquares(solver, form)
    plan = dls.plan(J, scale=scale)

    def solve(state, u: Tensor) -> tuple[Tensor, Tensor]:
        sol = dls.compute(state, u)
        return -sol.value.to(J.dtype), sol.success

    return (lambda lam: dls.init(plan, lam)), solve


def _is_matrix_free(solver: Any) -> bool:
    """Whether ``solver`` only needs products with ``J`` (conjugate gradients)."""
    from funcopt import solvers

    return solver in ("cg", "pcg") or isinstance(solver, solvers.CG)


def _wants_jacobi(solver: Any) -> bool:
    from funcopt import solvers

    return solver == "pcg" or (isinstance(solver, solvers.CG) and solver.preconditioner == "jacobi")


def column_norms_sq(gn, chunk: int | None = None) -> Tensor:
    """``diag(J^T J)_j = ||J e_j||^2`` from Jacobian-vector products, ``chunk`` columns per
    vectorised batch (memory ``chunk * m`` numbers; None: all at once), never forming ``J``."""
    n = gn.size
    x_dtype, dev = gn.residuals.dtype, gn.residuals.device
    k = n if chunk is None else max(1, min(chunk, n))
    out = []
    for s in range(0, n, k):
        eye = torch.eye(n, dtype=x_dtype, device=dev)[s:s + k]
        cols = torch.func.vmap(gn.jvp)(eye)  # (k, m)
        out.append((cols * cols).sum(-1))
    return torch.cat(out)


def _matrix_free_factor(gn, damping, solver, col2=None):
    """CG's state for ``v -> J^T (J v) + lambda v`` (the solver and its state); with
    ``col2 = diag(J^T J)`` (Jacobi) the preconditioner is ``1 / (col2 + lambda)``."""
    from funcopt import solvers

    dtype, device = gn.residuals.dtype, gn.residuals.device
    op = solvers.matrix_free(lambda v: gn.gnvp(v) + damping * v, gn.size, dtype=dtype,
                             device=device, symmetric=True, positive_definite=True)
    cg = solvers.get(solver)
    if col2 is not None:
        diag = col2 + damping
        inv = torch.where(diag > 0, 1.0 / torch.where(diag > 0, diag, 1.0), 1.0)
        cg = solvers.CG(tol=cg.tol, atol=cg.atol, maxiter=cg.maxiter,
                        preconditioner=lambda r: inv * r, check_every=cg.check_every)
    return cg, cg.init(op)


def _matrix_free_solve(gn, factored, rhs):
    """``delta = -(J^T J + lambda I)^{-1} J^T rhs`` with the CG state of
    :func:`_matrix_free_factor`."""
    cg, state = factored
    sol = cg.compute(state, gn.vjp(rhs))
    return -sol.value, sol.success


class _Local(NamedTuple):
    """The Gauss-Newton model at ``x``: ``factor(lambda)`` factorises ``J^T J + lambda D``
    once, ``solve(factored, u) = -(J^T J + lambda D)^{-1} J^T u`` reuses it, and
    ``jv(v) = J v``; ``d`` the scaling (``D = diag(d^2)``), ``cos`` MINPACK's ``gnorm``."""

    x: Tensor
    f: Callable[[Tensor], Tensor]
    r: Tensor
    rnorm: Tensor
    d: Tensor
    cos: Tensor
    damping: Tensor
    factor: Callable[[Tensor], Any]
    solve: Callable[[Any, Tensor], tuple[Tensor, Tensor]]
    jv: Callable[[Tensor], Tensor]
    svd: tuple[Tensor, Tensor, Tensor] | None = None  # trust-region rule, see _normalised_svd


def _require_finite_residuals(ok: Tensor) -> None:
    if not bool(ok):  # host sync
        raise ValueError(
            "residual_fn gave non-finite residuals or Jacobian at the current parameters; "
            "start from parameters where the model is finite"
        )


def _linearize(residual_fn, params, args, state, o) -> _Local:
    """The local model at ``params``; raises on non-finite ``r`` or ``J``."""
    x, unravel = ravel_params(params)
    if state.scale.shape != x.shape:
        raise ValueError(
            f"state holds {state.scale.numel()} parameters but params have {x.numel()}; "
            "pass the state made by init for these params"
        )
    f = residual_vector_fn(residual_fn, unravel, *args)
    if o["matrix_free"]:
        gn = gauss_newton_products(residual_fn, params, *args)
        _require_dtype(gn.residuals, x)
        _require_finite_residuals(torch.isfinite(gn.residuals).all())
        inf = torch.full((), float("inf"), dtype=x.dtype, device=x.device)
        col2 = column_norms_sq(gn, o["chunk"]) if _wants_jacobi(o["solver"]) else None
        factor = lambda lam: _matrix_free_factor(gn, lam, o["solver"], col2)
        solve = lambda factored, u: _matrix_free_solve(gn, factored, u)
        return _Local(x, f, gn.residuals, scaled_norm(gn.residuals), torch.ones_like(x), inf,
                      state.damping, factor, solve, gn.jvp)
    J, r = jacobian(residual_fn, params, *args, mode=o["mode"], chunk_size=o["chunk"])
    _require_dtype(r, x)
    _require_finite_residuals(torch.isfinite(r).all() & torch.isfinite(J).all())
    rnorm = scaled_norm(r)
    col, cos = _column_stats(J, r, rnorm)
    first = state.count == 0
    lam = state.damping
    if o["scaling"]:
        d = torch.where(first, col, torch.maximum(state.scale, col))
        d = torch.where(d > 0, d, torch.ones_like(d))
        S = d
    else:
        d, S = torch.ones_like(x), None
        start = o["tau"] * (col * col).max()
        lam = torch.where(first & (start > 0), start, lam)
    factor, solve = _damped_solver(J, S, o["solver"], o["form"])
    svd = _normalised_svd(J / d, r, rnorm) if o["rule"] == "trust_region" else None
    return _Local(x, f, r, rnorm, d, cos, lam, factor, solve, lambda v: J @ v, svd)


def _require_dtype(r: Tensor, x: Tensor) -> None:
    if r.dtype != x.dtype:
        raise TypeError(
            f"residual_fn returned {r.dtype} residuals for {x.dtype} parameters; the residuals "
            f"must have the parameters' dtype: return r.to({x.dtype}) or pass {r.dtype} parameters"
        )


def _positive(t: Tensor) -> Tensor:
    """``t`` where it is positive and finite, else 1 (a safe divisor)."""
    return torch.where((t > 0) & torch.isfinite(t), t, torch.ones_like(t))


def _normalised_svd(Jt: Tensor, r: Tensor, rnorm: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(s / sigma, (s / sigma) * U^T r / ||r||, sigma)`` for ``Jt = U diag(s) V^T`` and
    ``sigma = max s``: the trust-region damping is found on these O(1) numbers (see
    :func:`_trust_region_damping`), whatever the scale of ``J`` and ``r``."""
    U, sv, _ = torch.linalg.svd(Jt, full_matrices=False)
    sigma = _positive(sv.max() if sv.numel() else torch.ones((), dtype=Jt.dtype, device=Jt.device))
    sh = sv / sigma
    return sh, sh * (U.T @ (r / _positive(rnorm))), sigma


def _column_stats(J: Tensor, r: Tensor, rnorm: Tensor):
    """Column norms of ``J`` and MINPACK's ``gnorm = max_j |J_j^T r| / (||J_j|| ||r||)``,
    computed as ``|(J_j / ||J_j||)^T (r / ||r||)|`` so neither product under- nor overflows."""
    col = scaled_norm(J, dim=0)
    g = (J / _positive(col)).T @ (r / _positive(rnorm))
    cos = torch.where((col > 0) & (rnorm > 0), g.abs(), 0.0)
    return col, cos.max() if cos.numel() else torch.zeros((), dtype=J.dtype, device=J.device)


def _second_derivative(f, x, r, delta, Jd, h):
    """``r_vv``, the second directional derivative of ``r`` along ``delta``.

    ``h=None``: exact, forward over forward mode. Otherwise Transtrum & Sethna's finite
    difference ``r_vv = (2/h) ((r(x + h delta) - r(x)) / h - J delta)`` (one residual call).
    """
    if h is None:
        def directional(y: Tensor) -> Tensor:
            return jvp(f, (y,), (delta,))[1]

        return jvp(directional, (x,), (delta,))[1].detach()
    with torch.no_grad():
        rh = f(x + h * delta)
    return (2.0 / h) * ((rh - r) / h - Jd)


def _propose(loc: _Local, lam: Tensor, o):
    """The step (with the geodesic correction when asked), its ``J delta`` and success flag.
    ``J^T J + lambda D`` is factorised once; the correction reuses the factorisation."""
    factored = loc.factor(lam)
    delta, ok = loc.solve(factored, loc.r)
    Jd = loc.jv(delta)
    step = delta
    if o["geodesic"]:
        rvv = _second_derivative(loc.f, loc.x, loc.r, delta, Jd, o["fd_step"])
        finite = torch.isfinite(rvv).all()
        a, ok_a = loc.solve(factored, torch.where(finite, rvv, torch.zeros_like(rvv)))
        dn = scaled_norm(loc.d * delta)
        small = 2.0 * scaled_norm(loc.d * a) <= o["alpha"] * dn
        ok = ok & ok_a & finite & small
        step = delta + 0.5 * a
    return delta, step, Jd, ok


def _evaluate(f: Callable[[Tensor], Tensor], x_new: Tensor, shape: torch.Size) -> Tensor:
    """``||r(x_new)||``; ``inf`` when the residuals are not finite. Checks the residual shape."""
    with torch.no_grad():
        r_new = f(x_new)
    if r_new.shape != shape:
        raise ValueError(
            f"residual_fn returned {tuple(r_new.shape)} residuals at a candidate point but "
            f"{tuple(shape)} at the current one; it must return the same number every call"
        )
    n = scaled_norm(r_new)
    return torch.where(torch.isfinite(n), n, torch.full_like(n, float("inf")))


def _reductions(rnorm, new_rnorm, Jd, pnorm, lam):
    """MINPACK's scale-free relative reductions of ``F = 0.5 ||r||^2``:

    ``actual = 1 - (||r_new|| / ||r||)^2`` (``-1`` when ``||r_new|| >= 10 ||r||``),
    ``predicted = (||J delta|| / ||r||)^2 + 2 lambda (||d delta|| / ||r||)^2``, which is
    ``(L(0) - L(delta)) / F(x)``, and ``rho = actual / predicted`` (``-inf`` when undefined).
    Only ratios of norms appear, so the result does not depend on the scale of ``r``.
    """
    fn = _positive(rnorm)
    ratio = new_rnorm / fn
    actual = torch.where(0.1 * new_rnorm < rnorm, 1.0 - ratio * ratio, -1.0)
    t1, t2 = scaled_norm(Jd) / fn, pnorm / fn
    predicted = t1 * t1 + 2.0 * lam * t2 * t2
    pos = (predicted > 0) & (rnorm > 0)
    rho = torch.where(pos, actual / torch.where(pos, predicted, 1.0), -float("inf"))
    rho = torch.where(torch.isfinite(new_rnorm), rho, -float("inf"))
    return torch.where(torch.isnan(rho), torch.full_like(rho, -float("inf")), rho), actual, predicted


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


def _step(residual_fn, params, args, state: LevenbergMarquardtState, o):
    """Propose, evaluate and accept/reject up to ``max_attempts`` times."""
    loc = _linearize(residual_fn, params, args, state, o)
    x, d, lam, nu, radius, fn = loc.x, loc.d, loc.damping, state.nu, state.radius, loc.rnorm
    trust = o["rule"] == "trust_region"
    if trust:
        radius = torch.where(state.count == 0, _initial_radius(d, x, o["factor"]), radius)
    all_finite = torch.ones((), dtype=torch.bool, device=x.device)
    for attempt in range(1, o["attempts"] + 1):
        if trust:
            assert loc.svd is not None  # _linearize computes it under the trust-region rule
            lam = _trust_region_damping(*loc.svd, radius / _positive(fn))
        delta, step, Jd, ok = _propose(loc, lam, o)
        new_fn = _evaluate(loc.f, x + step, loc.r.shape)
        all_finite = all_finite & torch.isfinite(new_fn)
        pnorm = scaled_norm(d * delta)
        rho, actual, predicted = _reductions(fn, new_fn, Jd, pnorm, lam)
        accepted = bool(ok & torch.isfinite(new_fn) & (rho > o["accept"]))  # host sync
        if trust:
            if attempt == 1:
                radius = torch.where(state.count == 0, torch.minimum(radius, pnorm), radius)
            far = ~(0.1 * new_fn < fn)
            radius = _adapt_radius(radius, lam, (actual, predicted, far), pnorm / _positive(fn),
                                   pnorm, ok)
            if accepted or bool(radius <= torch.finfo(x.dtype).tiny):
                break
            continue
        lam, nu = _adapt(o["rule"], lam, nu, rho, accepted, o["factors"], o["bounds"])
        if accepted or bool(lam >= o["bounds"][1]):
            break
    return _finish_step(state, loc, lam, nu, radius, delta, step, (new_fn, all_finite), rho,
                        actual, predicted, accepted, attempt)


def _finish_step(state, loc, lam, nu, radius, delta, step, trial, rho, actual, predicted,
                 accepted, attempt):
    """The accepted step (zeros when every attempt failed) and the new state; ``trial`` is
    ``(||r|| at the last trial point, whether every trial point gave finite residuals)``."""
    x, d, fn = loc.x, loc.d, loc.rnorm
    new_fn, all_finite = trial
    if not accepted:
        step = torch.zeros_like(x)
    cost = 0.5 * fn * fn  # informational: may overflow or underflow where fn does not
    kept = new_fn if accepted else fn
    min_rho = torch.full_like(rho, torch.finfo(rho.dtype).min)
    new_state = LevenbergMarquardtState(
        increment(state.count), lam, nu, radius, d, cost, 0.5 * kept * kept, predicted * cost,
        torch.where(torch.isfinite(rho), rho, min_rho),
        scaled_norm(d * (step if accepted else delta)), scaled_norm(d * (x + step)),
        loc.cos + torch.zeros_like(cost), torch.tensor(accepted, device=x.device),
        torch.tensor(attempt, device=x.device), fn, actual, predicted, all_finite,
    )
    return step, new_state


# --------------------------------------------------------------------------- trust region (MINPACK)


def _initial_radius(d: Tensor, x: Tensor, factor: float) -> Tensor:
    """MINPACK's ``Delta_0 = factor * ||d * x_0||``, or ``factor`` when that is 0."""
    xn = scaled_norm(d * x)
    return torch.where(xn > 0, factor * xn, torch.full_like(xn, factor))


def _trust_region_damping(s: Tensor, w: Tensor, sigma: Tensor, radius: Tensor) -> Tensor:
    """``lambda >= 0`` with ``||z(lambda)|| <= 1.1 Delta`` (and ``>= 0.9 Delta`` when
    ``lambda > 0``), ``z(lambda) = (Jt^T Jt + lambda I)^{-1} Jt^T r`` for ``Jt = J / d``.

    From the SVD ``Jt = U diag(sigma s) V^T`` (``s`` normalised to ``max s = 1``):
    ``||z|| = (||r|| / sigma) phi(lambda / sigma^2)`` with ``phi(mu)^2 = sum_i w_i^2 /
    (s_i^2 + mu)^2``, ``w = s * U^T r / ||r||``. ``radius`` is ``Delta / ||r||``; Newton's method
    on ``1/phi - 1/(sigma Delta / ||r||)`` from ``mu = 0`` (Hebden; Moré 1978, section 5) increases
    monotonically to the root, and ``lambda = sigma^2 mu``. Only these O(1) numbers enter, so the
    damping does not depend on the scale of ``J`` or ``r``. One host sync per iteration;
    MINPACK's ``lmpar`` does the same with a QR factorisation.
    """
    radius = radius * sigma
    keep = s > torch.finfo(s.dtype).eps * max(s.numel(), 1)
    s2 = torch.where(keep, s * s, torch.ones_like(s))
    w2 = torch.where(keep, w * w, torch.zeros_like(w))
    mu = torch.zeros_like(radius)
    for _ in range(30):
        q = s2 + mu
        phi = torch.sqrt((w2 / (q * q)).sum())
        if bool(phi <= 1.1 * radius):  # host sync
            break
        mu = mu + (phi - radius) / radius * phi * phi / (w2 / (q * q * q)).sum()
    return mu * sigma * sigma


def _adapt_radius(radius, lam, reductions, t2, pnorm, ok):
    """MINPACK ``lmder``'s update of ``Delta`` from the ratio of actual to predicted reduction.

    ratio <= 1/4: ``Delta = mu * min(Delta, 10 ||D p||)``, ``mu`` from a quadratic fit in
    [0.1, 0.5]; ratio >= 3/4 or ``lambda = 0``: ``Delta = 2 ||D p||``. ``reductions`` is
    ``(actual, predicted, far)``: the relative reductions of :func:`_reductions` and whether
    ``||r_new|| >= 10 ||r||``; ``t2 = ||D p|| / ||r||``.
    """
    actual, predicted, far = reductions
    actred = torch.where(ok, actual, -1.0)
    lam_term = lam * t2 * t2
    dirder = -(predicted - lam_term)  # -(t1^2 + lambda t2^2)
    ratio = torch.where(predicted > 0, actred / torch.where(predicted > 0, predicted, 1.0), 0.0)
    mu = torch.where(actred >= 0, torch.full_like(ratio, 0.5),
                     0.5 * dirder / torch.where(dirder + 0.5 * actred != 0, dirder + 0.5 * actred, -1.0))
    mu = torch.where(far | (mu < 0.1) | ~torch.isfinite(mu), 0.1, mu)
    shrink = ratio <= 0.25
    grow = ~shrink & ((lam == 0) | (ratio >= 0.75))
    return torch.where(shrink, mu * torch.minimum(radius, pnorm / 0.1),
                       torch.where(grow, pnorm / 0.5, radius))



_DEFAULTS = dict(initial_damping=1e-3, damping_rule="nielsen", increase_factor=10.0,
                 decrease_factor=10.0, scaling=None, min_damping=1e-15, max_damping=1e16,
                 max_attempts=10, accept_ratio=1e-4, geodesic_acceleration=False,
                 geodesic_alpha=0.75, geodesic_fd_step=0.1, trust_radius_factor=10.0,
                 solver="auto", form="auto", jacobian_mode="auto", chunk_size=None)


def lm_options(**options: Any) -> dict:
    """The validated options of :func:`levenberg_marquardt` (same names and defaults) as the
    dict its step functions read; raises ValueError/TypeError naming a bad or unknown one."""
    unknown = sorted(set(options) - set(_DEFAULTS))
    if unknown:
        raise TypeError(f"unknown Levenberg-Marquardt option(s) {unknown}; the options are "
                        f"{sorted(_DEFAULTS)}")
    o = {**_DEFAULTS, **options}
    initial_damping, damping_rule = o["initial_damping"], o["damping_rule"]
    increase_factor, decrease_factor = o["increase_factor"], o["decrease_factor"]
    scaling, min_damping, max_damping = o["scaling"], o["min_damping"], o["max_damping"]
    max_attempts, accept_ratio = o["max_attempts"], o["accept_ratio"]
    geodesic_acceleration, geodesic_alpha = o["geodesic_acceleration"], o["geodesic_alpha"]
    geodesic_fd_step, trust_radius_factor = o["geodesic_fd_step"], o["trust_radius_factor"]
    solver, form, jacobian_mode, chunk_size = (o["solver"], o["form"], o["jacobian_mode"],
                                               o["chunk_size"])
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
    check_hyperparameter("trust_radius_factor", trust_radius_factor, low=0.0, low_inclusive=False)
    if geodesic_fd_step is not None:
        check_hyperparameter("geodesic_fd_step", geodesic_fd_step, low=0.0, low_inclusive=False)
    matrix_free = _is_matrix_free(solver)
    if scaling is None:
        scaling = not matrix_free
    if matrix_free and damping_rule == "trust_region":
        raise ValueError("damping_rule='trust_region' needs a dense Jacobian (an SVD of J / d); "
                         "use 'nielsen' or 'classic' with a matrix-free solver")
    if scaling and matrix_free:
        raise ValueError(
            f"scaling=True needs the column norms of a dense Jacobian, but solver={solver!r} is "
            "matrix-free; pass scaling=False (D = I) or a dense solver"
        )
    return dict(rule=damping_rule, factors=(increase_factor, decrease_factor),
                bounds=(min_damping, max_damping), scaling=scaling, tau=initial_damping,
                attempts=max_attempts, accept=accept_ratio, geodesic=geodesic_acceleration,
                alpha=geodesic_alpha, fd_step=geodesic_fd_step, solver=solver, form=form,
                mode=jacobian_mode, chunk=chunk_size, matrix_free=matrix_free,
                factor=trust_radius_factor)


def levenberg_marquardt(
    residual_fn: Callable[..., Tensor],
    *,
    initial_damping: float = 1e-3,
    damping_rule: str = "nielsen",
    increase_factor: float = 10.0,
    decrease_factor: float = 10.0,
    scaling: bool | None = None,
    min_damping: float = 1e-15,
    max_damping: float = 1e16,
    max_attempts: int = 10,
    accept_ratio: float = 1e-4,
    geodesic_acceleration: bool = False,
    geodesic_alpha: float = 0.75,
    geodesic_fd_step: float | None = 0.1,
    trust_radius_factor: float = 10.0,
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
            ``"trust_region"`` (Moré 1978, MINPACK ``lmder``): a radius ``Delta`` on
            ``||d * delta||`` (``Delta_0 = 100 ||d * x_0||``) is adapted from ``rho`` and
            ``lambda`` is the one whose step has that length (from an SVD of ``J / d``, so
            dense Jacobians only); ``initial_damping``, the factors and bounds are not used.
            It follows MINPACK's path; with ``trust_radius_factor=10`` it solves all 27 NIST
            StRD problems from both starts (see :func:`funcopt.least_squares`).
        increase_factor, decrease_factor: the classic rule's factors (10, 10).
        scaling: Marquardt/MINPACK scaling: ``D = diag(d^2)``, ``d_j`` the running maximum over
            steps of the norm of column ``j`` of ``J`` (1 for a zero column). False: ``D = I``.
            Default None: True with a dense Jacobian, False on the matrix-free path (which
            never forms the columns of ``J``; True there raises).
        min_damping, max_damping: bounds on ``lambda`` (1e-15, 1e16).
        max_attempts: solves per update before giving up with a zero step (10).
        accept_ratio: smallest gain ratio accepted (1e-4, as MINPACK).
        geodesic_acceleration: add Transtrum & Sethna's second-order correction ``a/2``,
            ``(J^T J + lambda D) a = -J^T r_vv`` with ``r_vv`` the second directional derivative
            of ``r`` along ``delta`` (exact, by nested jvp); a step with
            ``2 ||a||_D / ||delta||_D > geodesic_alpha`` (0.75) is rejected.
        geodesic_fd_step: ``h`` of the finite difference for ``r_vv`` (Transtrum & Sethna:
            ``r_vv = (2/h) ((r(x + h delta) - r(x)) / h - J delta)``, one residual call),
            default 0.1; None: exact, by forward-over-forward ``jvp`` (slower).
        trust_radius_factor: MINPACK's ``factor``: ``Delta_0 = factor * ||d * x_0||`` (10;
            MINPACK's default is 100, and it advises 0.1-100).
        solver, form: passed to :func:`funcopt.solvers.damped_least_squares` (``"auto"``:
            primal ``J^T J`` or dual ``J J^T`` form by shape; or any named solver).
            ``"cg"``, ``"pcg"`` or a :class:`funcopt.solvers.CG` object select the matrix-free
            path: ``J`` is never formed; CG runs on ``v -> J^T (J v) + lambda v`` built from
            :func:`funcopt.func.gauss_newton_products`, ``D = I``, ``lambda_0 =
            initial_damping`` and ``grad_cos`` (MINPACK's gtol test) is ``inf`` (unknown).
        jacobian_mode, chunk_size: passed to :func:`funcopt.func.jacobian` (dense path).
            Residuals declared per sample (:func:`funcopt.per_sample_residuals`, or the
            adapters' ``per_sample=True``) get their Jacobian sample by sample there, ``O(N)``
            instead of ``O(N^2)`` for ``N`` independent samples; ``chunk_size`` counts rows.

    Scale: the gain ratio, the trust-region damping and the statistics in the state use
    norms computed without overflow or underflow and only their ratios (as MINPACK), so a
    problem whose residuals are multiplied by ``10^k`` takes the same steps for any ``k`` the
    dtype can hold (with ``scaling``; with ``scaling=False`` the damping is absolute and
    ``lambda_0 = tau max diag(J^T J)`` can underflow). ``residual_fn`` must return the
    parameters' dtype (TypeError otherwise).

    ``update(updates, state, params, *, batch=None)``: ``updates`` is not read (LM computes
    its own step; pass the gradients or ``None``); ``params`` is required. Host syncs: one per
    attempt (accept/reject) and one finiteness check of ``r`` and ``J``.

    References: Levenberg (1944); Marquardt (1963), SIAM J. Appl. Math. 11(2); Moré (1978),
    "The Levenberg-Marquardt algorithm: implementation and theory" (MINPACK); Nielsen (1999),
    "Damping parameter in Marquardt's method", IMM-REP-1999-05; Transtrum & Sethna (2012),
    "Improvements to the Levenberg-Marquardt algorithm for nonlinear least-squares minimization".
    """
    opts = lm_options(
        initial_damping=initial_damping, damping_rule=damping_rule,
        increase_factor=increase_factor, decrease_factor=decrease_factor, scaling=scaling,
        min_damping=min_damping, max_damping=max_damping, max_attempts=max_attempts,
        accept_ratio=accept_ratio, geodesic_acceleration=geodesic_acceleration,
        geodesic_alpha=geodesic_alpha, geodesic_fd_step=geodesic_fd_step,
        trust_radius_factor=trust_radius_factor, solver=solver, form=form,
        jacobian_mode=jacobian_mode, chunk_size=chunk_size)

    def init(params: Params) -> LevenbergMarquardtState:
        x, _ = ravel_params(params)
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        false = torch.zeros((), dtype=torch.bool, device=x.device)
        return LevenbergMarquardtState(
            step_counter(params), zero + initial_damping, zero + 2.0, zero, torch.ones_like(x),
            zero, zero, zero, zero, zero, zero, zero, false, step_counter(params),
            zero, zero, zero, ~false,
        )

    def update(updates: Any, state: LevenbergMarquardtState, params: Params | None = None,
               *, batch: Any = None, **extra: Any):
        params = require_params(params, "levenberg_marquardt")
        if updates is not None:
            tree_check_structure(updates, params, ("updates", "params"))
            _check_shapes(updates, params)
        args = () if batch is None else (batch,)
        if is_tracing():
            delta, new_state = _traced_step(residual_fn, params, args, state, opts)
        else:
            delta, new_state = _step(residual_fn, params, args, state, opts)
        return _to_tree(delta, params), new_state

    return GradientTransformation(init, update)



def _traced_step(residual_fn, params, args, state: LevenbergMarquardtState, o):
    """The step with no host sync, for ``torch.func`` transforms and ``torch.compile``: the
    batched iteration of :mod:`funcopt.transforms.lm_batched` on a batch of one (``J`` by
    ``jacrev``, the damped system through an SVD of ``J / d``, every decision a
    ``torch.where``). It takes the steps of :func:`_step` up to rounding (the eager path solves
    by Cholesky of the Gram matrix)."""
    from funcopt.transforms import lm_batched

    if o["matrix_free"] or o["geodesic"]:
        what = "a matrix-free solver" if o["matrix_free"] else "geodesic_acceleration=True"
        raise ValueError(
            f"levenberg_marquardt with {what} cannot run under torch.func transforms or "
            "torch.compile: its CG loop and second-derivative acceptance decide on the host. "
            "Use a dense solver without geodesic acceleration there, or call update eagerly")
    x, unravel = ravel_params(params)
    if state.scale.shape != x.shape:
        raise ValueError(
            f"state holds {state.scale.numel()} parameters but params have {x.numel()}; "
            "pass the state made by init for these params")
    f = residual_vector_fn(residual_fn, unravel, *args)
    J, r = jacrev(lambda v: (f(v), f(v)), has_aux=True)(x)
    _require_dtype(r, x)
    batched = LevenbergMarquardtState(*(t[None] for t in state))

    def trial_norm(x_new: Tensor) -> Tensor:
        return _evaluate(f, x_new[0], r.shape)[None]

    loc = lm_batched.local_model(J[None], r.detach()[None], x[None], batched, o)
    step, new = lm_batched.iterate(loc, batched, trial_norm, o)
    return step[0], LevenbergMarquardtState(*(t[0] for t in new))



def _check_shapes(updates: PyTree, params: PyTree) -> None:
    """Leaf shapes of ``updates`` against ``params`` (metadata only; the values are unused)."""
    paths = optree.tree_paths(params)
    for path, u, p in zip(paths, optree.tree_leaves(updates), optree.tree_leaves(params)):
        if isinstance(u, torch.Tensor) and isinstance(p, torch.Tensor) and u.shape != p.shape:
            raise ValueError(
                f"levenberg_marquardt: leaf {list(path)} of the updates has shape "
                f"{tuple(u.shape)} but the parameter has {tuple(p.shape)}; pass gradients shaped "
                "like the parameters, or None (LM does not read them)")


def _to_tree(delta: Tensor, params: PyTree) -> PyTree:
    """The flat step as a tree like ``params`` (zeros for integer leaves)."""
    _, unravel = ravel_params(params)
    tree = unravel(delta)
    return optree.tree_map(
        lambda u, p: u if p.is_floating_point() else torch.zeros_like(p), tree, params
    )
