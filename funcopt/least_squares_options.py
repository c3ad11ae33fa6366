"""Options of the least-squares drivers (:func:`funcopt.least_squares`, its batched and
data-parallel forms): the stopping :class:`Tolerances`, the check that turns a keyword which
moved into an option object into a TypeError naming that object, and the stopping tests of
:func:`funcopt.least_squares` (MINPACK's, and the check that a test which held is not a
stall)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from funcopt.base import check_hyperparameter
from funcopt.func.jacobian import (
    gauss_newton_products,
    jacobian,
    ravel_params,
    residual_vector_fn,
)
from funcopt.solvers.base import scaled_norm
from funcopt.transforms.lm_damping import DampingRule, Nielsen, TrustRegion, _positive
from funcopt.transforms.lm_model import _gradient_cosine, column_norms_sq

__all__ = ["Tolerances", "check_driver_options"]


@dataclass(frozen=True)
class Tolerances:
    """MINPACK's stopping tolerances of :func:`least_squares` (and its batched and
    data-parallel drivers); each a number >= 0, ``ftol`` and ``gtol`` below 1 (at 1 their tests
    hold at any point: a cosine is at most 1, an accepted step's relative reductions too).

    ftol: ``|actual| <= ftol`` and ``predicted <= ftol`` (relative reductions of the cost,
    with ``rho <= 2``). xtol: ``||d * delta|| <= xtol * ||d * x||``. gtol: ``max_j |J_j^T r| /
    (||J_j|| ||r||) <= gtol``. Defaults 1e-14, 1e-12, 1e-14: reference-quality fits in float64
    (MINPACK's default is 1.5e-8 for each); 0 leaves only the machine-precision tests.

    Reference: Moré, Garbow & Hillstrom (1980), User Guide for MINPACK-1, ANL-80-74.
    """

    ftol: float = 1e-14
    xtol: float = 1e-12
    gtol: float = 1e-14

    def __post_init__(self) -> None:
        for name in ("ftol", "xtol", "gtol"):
            check_hyperparameter(f"Tolerances.{name}", getattr(self, name), low=0.0,
                                 high=None if name == "xtol" else 1.0, high_inclusive=False)


_MOVED = {
    "damping_rule": "rule=fo.Nielsen(), fo.Classic(...) or fo.TrustRegion(...)",
    "initial_damping": "rule=fo.Nielsen(initial_damping=...) (or fo.Classic(...))",
    "increase_factor": "rule=fo.Classic(increase_factor=...)",
    "decrease_factor": "rule=fo.Classic(decrease_factor=...)",
    "min_damping": "rule=fo.Nielsen(min_damping=...) (or fo.Classic(...))",
    "max_damping": "rule=fo.Nielsen(max_damping=...) (or fo.Classic(...))",
    "trust_radius_factor": "rule=fo.TrustRegion(radius_factor=...)",
    "geodesic_acceleration": "geodesic=fo.Geodesic() (None: off)",
    "geodesic_alpha": "geodesic=fo.Geodesic(alpha=...)",
    "geodesic_fd_step": "geodesic=fo.Geodesic(fd_step=...)",
    "ftol": "tolerances=fo.Tolerances(ftol=...)",
    "xtol": "tolerances=fo.Tolerances(xtol=...)",
    "gtol": "tolerances=fo.Tolerances(gtol=...)",
}
_PASSED_ON = ("scaling", "max_attempts", "accept_ratio", "form", "jacobian_mode", "chunk_size")


def check_driver_options(options: dict, tolerances: object, who: str) -> None:
    """TypeError for a keyword a driver does not take (naming the object that holds it now)
    or ``tolerances`` that are not a :class:`Tolerances`."""
    for name in options:
        if name in _MOVED:
            raise TypeError(f"{who}: {name}= is an option object's field now; pass "
                            f"{_MOVED[name]}")
        if name not in _PASSED_ON:
            raise TypeError(f"{who}: unknown option {name!r}; the keyword options are "
                            f"{list(_PASSED_ON)} (see fo.levenberg_marquardt)")
    if not isinstance(tolerances, Tolerances):
        raise TypeError(f"tolerances={tolerances!r}: pass fo.Tolerances(ftol=..., xtol=..., "
                        "gtol=...)")


def _matrix_free_options(m: int, n: int, dtype: torch.dtype, budget: int,
                         rule: DampingRule, options: dict) -> tuple[Any, DampingRule, dict]:
    """``(solver, rule, options)`` of the matrix-free path: CG with the Jacobi
    preconditioner ``1 / (diag(J^T J) + lambda D)``, MINPACK's scaling ``D`` from the same
    ``diag(J^T J)`` (unless ``scaling=False``), and ``Nielsen()`` in place of the
    trust region (which needs an SVD of J). CG's relative tolerance is ``max(1e-10, 100 eps)``
    (``eps`` of ``dtype``): 1e-10 in float64, 1.2e-5 in float32, where CG's true residual
    stalls near ``eps`` times the condition number and a tolerance of 1e-10 fails every
    solve. ``diag(J^T J)`` is exact, from ``min(m, n)`` products
    (:func:`funcopt.transforms.lm_model.column_norms_sq`) in chunks of ``k`` products, whose
    one-hot vectors and results take ``k (m + n)`` numbers: ``k`` is the largest number with
    ``(4 + k) (m + n)`` numbers within the budget, at most ``JACOBI_CHUNK`` (32), at least 1
    (the chunk's products also hold ``k`` times the intermediate values of one product,
    which the memory model does not count)."""
    from funcopt.solvers import CG
    from funcopt.transforms.lm_model import JACOBI_CHUNK

    itemsize = torch.finfo(dtype).bits // 8
    chunk = max(1, min(JACOBI_CHUNK, budget // ((m + n) * itemsize) - 4))
    rule = Nielsen() if isinstance(rule, TrustRegion) else rule
    tol = max(1e-10, 100 * torch.finfo(dtype).eps)
    return (CG(tol=tol, preconditioner="jacobi"), rule,
            {**options, "scaling": options.get("scaling") is not False,
             "chunk_size": options.get("chunk_size", chunk)})


# --------------------------------------------------------------------------- stopping tests


def _converged(h: dict, ftol: float, xtol: float, gtol: float, eps: float) -> str | None:
    """MINPACK's tests on the last update's statistics; ``None`` when none holds. They use
    only relative reductions and relative step lengths, so they do not depend on the scale of
    the residuals or the parameters."""
    actred, prered = h["actual_reduction"], h["predicted_reduction"]
    ratio_ok = 0.5 * h["gain_ratio"] <= 1.0
    f_ok = abs(actred) <= ftol and prered <= ftol and ratio_ok
    x_ok = h["step_norm"] <= xtol * h["x_norm"]
    if f_ok and x_ok:
        return "ftol and xtol: cost and parameters converged"
    if f_ok:
        return "ftol: relative reduction of the cost below ftol"
    if x_ok:
        return "xtol: relative step below xtol"
    if abs(actred) <= eps and prered <= eps and ratio_ok:
        return "ftol below machine precision: no further reduction possible"
    if h["step_norm"] <= eps * h["x_norm"]:
        return "xtol below machine precision: no further improvement possible"
    return None


def _stall_check(residual_fn, params, h: dict, tols, reason: str, size: int,
                 damped: tuple = (None, None)) -> tuple[str, bool]:
    """A tolerance test held: ``(reason, success)``. ``gnorm^2`` at the final point above
    ``ftol``, ``eps`` and the residuals' relative rounding (:func:`stationarity_floor`) means
    the test held for another reason than convergence: after an update that found no
    acceptable step, e.g. inexact CG on a badly scaled float32 problem; after an accepted
    step, a step that predicted almost no reduction because it moved along a Jacobian column
    that is near zero, while the gradient along another column is not (a saddle line). At a
    minimum reached by an ftol stop ``gnorm^2 <= ||P_J r||^2 / ||r||^2``, the Gauss-Newton
    step's predicted relative reduction there, which the last step's ``predicted <= ftol``
    bounds where that step was not damped; a damped step leaves more, by up to the margin of
    :func:`damping_margin` (from ``damped = (scale, rule)``, the final state's ``d`` and the
    damping rule), which an ftol stop after an accepted step gets on ``ftol``. The NIST StRD
    fits that stop on ftol end with ``gnorm^2`` at most ``3e-3 ftol`` (BoxBOD; both starts of
    all shipped problems, ftol 1e-14 to 1e-4, keep their success). The test is skipped only
    where its answer is known: the update was rejected (the final point is the update's) and
    its ``grad_cos``, over all columns, already passes. Its cost, for every other tolerance
    stop: ``diag(J^T J)`` from ``min(m, n)`` Jacobian products (or from ``J`` where the gain
    check formed it), three more products and six residual evaluations, once at the end.
    When a test "below machine precision" held (``m n <= GAIN_CHECK_SIZE``), the full Gauss-Newton step solved in
    float64 (:func:`gauss_newton_gain`) must not promise such a reduction by a move of more
    than 4 units of the parameters' resolution. ``J`` is formed at most once here: the gain
    check forms it, and ``gnorm`` (only needed when the update was not quiet) reads
    ``diag(J^T J)`` from it instead of ``min(m, n)`` more products. A stop on ``xtol`` (or
    ``ftol``) at or below ``eps`` gets the gain check too: it held where the machine-precision
    test would."""
    # a tolerance at or below eps that held is a machine-precision stop under its own name
    below = ("machine precision" in reason or ("xtol" in reason and tols[1] <= tols[3])
             or (reason.startswith(("ftol:", "ftol and xtol")) and tols[0] <= tols[3]))
    limit = below and size <= GAIN_CHECK_SIZE
    # xtol's relative step is norm-wise: it also holds where one parameter's |d x| is huge
    # and another would still move by all of itself, so a stop on xtol counts the columns
    # whose own Gauss-Newton move is above xtol |x_j|
    xtol = "xtol" in reason
    quiet = not h["accepted"] and h["grad_cos"] ** 2 <= max(tols[0], tols[3])
    if quiet and not limit:
        return reason, True
    J, r = jacobian(residual_fn, params) if limit else (None, None)
    rel = max(tols[1], tols[3]) if xtol else None
    cos, floor, col = stationarity_floor(residual_fn, params, gnorm=not quiet, J=J, rel=rel)
    bound = max(tols[0], tols[3], floor)
    margin = 1.0
    if h["accepted"] and not xtol and reason.startswith("ftol") and col is not None:
        scale, rule = damped
        margin = float(damping_margin(torch.tensor(h["damping"], dtype=col.dtype), scale, col,
                                      rule))
    gbound = max(bound, margin * tols[0])
    x = ravel_params(params)[0]
    gain, ulps = gauss_newton_gain(J, r, x) if J is not None and r is not None else (0.0, 0.0)
    if not quiet and math.isfinite(cos) and cos * cos > gbound:  # inf: unknown
        times = f" times the last step's damping margin {margin:.2g}" if margin > 1 else ""
        why = (f"grad_cos {cos:.2g}: a step along one column alone predicts {cos * cos:.2g}, "
               f"above the {gbound:.2g} that ftol{times} and rounding allow")
    elif gain > bound and ulps > 4:
        why = (f"the Gauss-Newton step, {ulps:.2g} units of x's resolution, predicts "
               f"{gain:.2g}, above the {bound:.2g} that ftol and rounding allow")
    else:
        return reason, True
    fix = ("the last accepted step predicted almost no reduction (a step along a Jacobian "
           "column near zero, as on a saddle line): start from another point"
           if h["accepted"] and reason.startswith("ftol") else "for an iterative solver use "
           "solver='pcg' with scaling=True, a dense solver, or float64")
    return (f"stalled: a tolerance test held ({reason}), but the point is not a minimum "
            f"({why}): a failure; {fix}"), False


def damping_margin(lam: torch.Tensor, scale: torch.Tensor, col: torch.Tensor,
                   rule: Any) -> torch.Tensor:
    """``kappa >= 1``: how much more than ``ftol`` an ftol stop after an accepted damped step
    may leave of ``gnorm^2`` at a minimum (per problem: ``lam`` ``(...)``, the final state's
    damping; ``scale`` ``(..., n)``, its ``d``, ``-1`` for ``D = I``; ``col`` ``||J_j||`` at
    the final point).

    Derivation. In the scaled variables ``z = d * delta`` (``Jt = J / d``) the step solves
    ``(Jt^T Jt + lambda I) z = -Jt^T r``, so the linear model's gradient at the new point is
    ``Jt^T r_new = -lambda z``, and the ftol test bounds ``predicted = (||Jt z||^2 + 2 lambda
    ||z||^2) / ||r||^2 <= ftol``. Column ``j``'s cosine there is ``lambda |z_j| / (c_j
    ||r_new||)`` with ``c_j = ||J_j|| / d_j``, so ``cos_j^2 <= lambda / (2 c_j^2) *
    predicted / (1 - actual)``: an undamped step (``lambda = 0``) leaves ``gnorm^2 <= ftol``
    (up to the model's curvature), a damped one up to ``lambda / (2 c_j^2)`` times more (a
    named Cholesky, which refuses the singular Gauss-Newton step of a rank-deficient ``J``,
    converges with ``lambda ~ 15``: ``gnorm^2`` up to ``3 ftol`` at its ftol stops). Here
    ``c = max(1, max_j c_j)``: a column that grew past its running maximum in the last step
    (the step moved onto a point where it is large) gets the smaller margin, and one that
    shrank far below it (a Jacobian that vanishes toward a saddle, where damped steps with
    ``predicted <= ftol`` creep on while a step along the column alone would still cut the
    cost by most of it) is not excused beyond the damping in units of ``d`` (``d_j = 1`` for
    a column zero so far, as the step had it). With ``D = I`` (``scale < 0``,
    ``scaling=False``) ``d_j = 1`` and ``lambda`` is absolute: the margin is the largest of
    the columns' margins, ``lambda / (2 min_k ||J_k||^2)`` over the nonzero columns (no false
    failure on a badly scaled fit such as NIST MGH09; a weaker check there). The state
    keeps the damping for the next step: the step's is at most ``rule.accepted_decrease``
    times it (1 under the trust region, 3 under Nielsen's rule, ``decrease_factor`` under
    the classic rule)."""
    undo = rule.accepted_decrease
    if not col.shape[-1]:
        return torch.ones_like(col[..., 0])
    lam, scale = lam.to(col.dtype), scale.to(col.dtype)
    d = torch.where(scale > 0, scale, 1.0)  # the step's d: 1 for a column zero so far
    c = torch.nan_to_num((col / d).amax(-1), nan=1.0).clamp(min=1.0)  # inf: no margin
    # D = I: lambda is in units of J^T J; the largest of the columns' margins
    small = torch.where(col > 0, col, torch.inf).amin(-1)
    unscaled = (scale < 0).all(-1)
    lam = torch.where(unscaled, lam / torch.where(small < torch.inf, small * small, 1.0), lam)
    c = torch.where(unscaled, 1.0, c)
    return torch.nan_to_num(torch.clamp(undo * lam / (2 * c * c), min=1.0), nan=1.0)


def stationarity_floor(residual_fn: Callable, params: Any, gnorm: bool = True,
                       J: torch.Tensor | None = None,
                       rel: float | None = None) -> tuple[float, float, torch.Tensor | None]:
    """``(gnorm, floor, col)`` at ``params``, for telling a minimum from a stall (``col``
    the column norms ``||J_j||``, None where not computed).

    ``gnorm = max_j |(J^T r)_j| / (||J_j|| ||r||)`` (MINPACK's) over the columns whose
    one-dimensional Gauss-Newton move ``|alpha_j| = |J_j^T r| / ||J_j||^2`` is at least one
    unit of ``x_j``'s resolution, ``eps |x_j|`` (``rel |x_j|`` when given): a smaller move
    cannot be represented, so its predicted reduction is none (the point is optimal within
    the dtype); ``inf`` where
    ``diag(J^T J)`` overflows (unknown); NaN (not computed) with ``gnorm=False``.
    ``diag(J^T J)`` comes from ``J`` (the Jacobian at ``params``) when given, else from
    ``min(m, n)`` Jacobian products (:func:`funcopt.transforms.lm_model.column_norms_sq`).
    ``floor``: the relative rounding of the residuals, ``4 ||r(x + h) - r(x) - J h|| /
    ||r(x)||`` for the steps ``h`` of :data:`ROUNDING_ULPS` ulps per parameter with alternating
    signs (the largest; ``J h`` is exact up to rounding, so the difference is the rounding noise of
    ``r``; a zero parameter moves at the scale :func:`rounding_steps` derives from ``||r|| /
    ||J_j||``): relative changes of the cost below it cannot be measured. Two Jacobian
    products (one more for ``gnorm``) and six evaluations of ``residual_fn``."""
    gn = gauss_newton_products(residual_fn, params)
    x, unravel = ravel_params(params)
    r = gn.residuals
    rnorm = scaled_norm(r)
    if float(rnorm) == 0.0:
        return 0.0, math.inf, None
    cos, col = math.nan, None
    if gnorm or J is not None:
        col2 = column_norms_sq(gn) if J is None else (J * J).sum(0)
        col = col2.sqrt() if J is None else scaled_norm(J, dim=0)
        if gnorm:
            cos = float(_gradient_cosine(gn, col2, rnorm, x, rel))
    f, noise = residual_vector_fn(residual_fn, unravel), 0.0
    for h in rounding_steps(x, rnorm, col):
        noise = max(noise, float(scaled_norm(f(x + h) - r - gn.jvp(h))))
    return cos, 4 * noise / float(_positive(rnorm)), col


ROUNDING_ULPS = (4, -16, 7, -11, 26, -5)
"""The steps of :func:`rounding_steps`, in ulps of each parameter (the first two are the zero
column probe's, :func:`funcopt.least_squares_probe.probe_zero_columns`)."""


def rounding_steps(x: torch.Tensor, rnorm: torch.Tensor | None = None,
                   col: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """The probe steps ``h`` of :func:`stationarity_floor` (and of the batched and
    data-parallel drivers' checks) along the last dimension of ``x``: :data:`ROUNDING_ULPS`
    ulps of each parameter with alternating signs. ``r(x + h) - r(x) - J h`` is the
    difference of two roundings, which can be small by chance at any one step (where ``r``
    is itself a unit of its rounding, as at an exact fit in float32, one step reads below a
    quarter of a unit about every other time): the largest over six steps is the estimate
    (a single-residual float32 fit that ends at its rounding level read as "not a minimum"
    in 9 of 300 random cases with two steps, 2 with four, 0 of 600 with six).

    A zero parameter has no ulp of its own: it moves by ulps of ``min(S, ||r|| / ||J_j||)``,
    ``S`` the largest ``|x_j|`` of its row (or 1), ``rnorm`` ``||r||`` (shape ``x``'s less its
    last dim) and ``col`` ``||J_j||`` (as ``x``; where zero, or not given: ``S``). That move
    changes ``r`` linearly by ``eps ||r||`` per ulp, so the term it adds to ``r`` is no larger
    than ``r``'s own rounding unit, and an error of ``J`` along it (or ``r``'s curvature)
    stays below the rounding it is there to measure. ``S`` alone is the problem's scale only
    when ``r`` is: at ``x = 0`` with ``||r|| = 7e-48`` and ``||J_j|| = 1``, ``4 eps S``
    changes ``r`` by ``1e32 ||r||``, and a wrong-sign Jacobian's error ``2 J_j h`` read as
    rounding (floor ``4e32``) would let the stall check call a non-stationary stop
    converged."""
    eps = torch.finfo(x.dtype).eps
    mag = x.abs()
    big = mag.amax(-1, keepdim=True) if x.shape[-1] else torch.ones_like(mag[..., :1])
    scale = torch.where(big > 0, big, 1.0).expand_as(mag)
    if rnorm is not None and col is not None:
        own = rnorm.to(x.dtype)[..., None] / torch.where(col > 0, col, 1.0).to(x.dtype)
        scale = torch.where((col > 0) & (own < scale), own, scale)  # NaN: S
    mag = torch.where(mag > 0, mag, scale)
    sign = 1.0 - 2.0 * (torch.arange(x.shape[-1], device=x.device) % 2).to(x.dtype)
    return tuple((x + k * eps * mag * sign) - x for k in ROUNDING_ULPS)


GAIN_CHECK_SIZE = 2**22
"""Largest ``m n`` for which :func:`gauss_newton_gain` runs (a float64 SVD of ``J``)."""


def gauss_newton_gain(J: torch.Tensor, r: torch.Tensor, x: torch.Tensor) -> tuple[float, float]:
    """``(gain, ulps)`` of the full Gauss-Newton step ``delta = -J^+ r`` at ``x``, solved in
    float64 from the dtype's ``J`` and ``r`` (an SVD of ``J`` with scaled columns, singular
    values below ``n eps_64 sigma_max`` dropped): ``gain = 1 - ||r + J delta||^2 /
    ||r||^2``, the linear model's relative reduction, and ``ulps = max_j |delta_j| / (eps
    |x_j|)`` (``eps`` of the parameters' dtype), how far it moves the parameters in units of
    their resolution. A ``gain`` above the rounding floor with ``ulps`` well above 1 means a
    step the dtype can represent still promises a reduction: the point is not a minimum."""
    Jd, rd = J.double(), r.double()
    c = Jd.norm(dim=0)
    c = torch.where(c > 0, c, 1.0)
    U, sv, Vh = torch.linalg.svd(Jd / c, full_matrices=False)
    keep = sv > sv.max() * max(Jd.shape) * torch.finfo(torch.float64).eps if sv.numel() else sv > 0
    coef = torch.where(keep, (U.T @ rd) / torch.where(keep, sv, 1.0), 0.0)
    delta = -(Vh.T @ coef) / c
    rnorm = rd.norm()
    gain = 1.0 - float((rd + Jd @ delta).norm() / rnorm) ** 2 if float(rnorm) > 0 else 0.0
    res = torch.finfo(x.dtype).eps * x.double().abs()
    ulps = delta.abs() / torch.where(res > 0, res, torch.finfo(x.dtype).tiny)
    return gain, float(ulps.max()) if ulps.numel() else 0.0


def _stationary(h: dict, tols) -> str | None:
    """The tests on the current point: a zero residual, or MINPACK's gtol."""
    gtol, eps = tols[2], tols[3]
    if h["residual_norm"] == 0.0:
        return "zero residual"
    if h["grad_cos"] <= max(gtol, eps):
        return "gtol: gradient orthogonal to the residuals" if h["grad_cos"] <= gtol \
            else "gtol below machine precision: gradient orthogonal to the residuals"
    return None


_EDGE_WINDOW = 5  # updates looked back on for trial points with non-finite residuals


def _outcome(h: dict, tols, limits, recent: list) -> tuple[str | None, bool]:
    """``(reason, success)`` after an update, ``(None, False)`` to go on. A tolerance test
    that holds while one of the ``recent`` updates met non-finite residuals at a trial point,
    and the gradient is not orthogonal to the residuals (``grad_cos > sqrt(eps)``), means the
    iterates ran into the edge of the region where ``residual_fn`` is finite: a failure."""
    ftol, xtol, gtol, eps = tols
    max_damping, trust, tiny = limits
    # an update rejected because its linear solve failed measured no step: no test applies
    reason = None if h["solve_failed"] else _converged(h, ftol, xtol, gtol, eps)
    edge = any(not u["trial_finite"] for u in recent) and h["grad_cos"] > eps ** 0.5
    if reason is not None and edge:
        return ("residual_fn was not finite at trial points near the current parameters, and "
                f"the steps shrank until a tolerance test held ({reason}) with the gradient "
                f"not orthogonal to the residuals (grad_cos {h['grad_cos']:.2g}): this is the "
                "edge of the region where residual_fn is finite, not a minimum; restrict or "
                "reparametrise the model so it is finite around the solution"), False
    if reason is not None:
        return reason, True
    if h["accepted"]:
        return None, False
    exhausted = h["damping"] >= max_damping or (trust and h["radius"] <= tiny)
    if exhausted and h["solve_failed"]:
        return ("the linear solver failed at every damping tried, up to the rule's limit: no "
                "step could be computed (failure; e.g. CG did not reach its tolerance within "
                "maxiter: raise maxiter or the tolerance, or use a direct solver)"), False
    if h["damping"] >= max_damping:
        return ("damping reached max_damping: no step reduces the cost (failure; check the "
                "residuals are finite and well scaled near the current parameters)"), False
    if trust and h["radius"] <= tiny:
        return "trust region vanished: no step reduces the cost (failure)", False
    return None, False
