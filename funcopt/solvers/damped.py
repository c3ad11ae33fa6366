"""Damped least squares: the Levenberg-Marquardt linear step, in one place.

.. math::  (J^T J + \\lambda D) x = J^T r

:class:`DampedLeastSquares` owns the damping, the column scaling and the choice between the
primal (``n x n``) and dual (``m x m``) forms; :func:`damped_least_squares` (one solve) and
the Levenberg-Marquardt transform both use it. Three stages, as lineax's ``init``/``compute``
with the damping between them:

* ``plan(J, diag, scale=...)``: the checks on ``J`` and ``diag``, the scalings and the form,
  and the Gram matrix ``J^T J`` (or ``J J^T``) formed once (for a direct inner solver);
* ``init(plan, damping)``: the damped operator, factorised once by the inner solver;
* ``compute(state, r)``: ``x`` for one right-hand side ``r`` (call it for several).

References: Levenberg (1944), Marquardt (1963); the dual form as in Nocedal & Wright,
*Numerical Optimization* (2nd ed.), section 10.3; the column scaling as MINPACK (Moré 1978).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from funcopt.solvers.auto import get
from funcopt.solvers.base import (
    GramOperator,
    LinearSolver,
    Solution,
    SolveStats,
    finite_or_zero,
    gram,
    gram_dual,
    matrix_free,
)
from funcopt.solvers.krylov import CG, _power_of_two
from funcopt.solvers.operators import (
    _damping_tensor,
    _gram_matrix,
    _require_finite,
    _require_valid_damping,
)

__all__ = ["DampedLeastSquares", "DampedPlan", "DampedState", "damped_least_squares",
           "damped_least_squares_solver"]


class DampedPlan(NamedTuple):
    """What :meth:`DampedLeastSquares.plan` prepared for one ``J``.

    ``J``: ``J S^{-1} / gamma`` (``S`` the column scale, ``gamma`` a power of two near
    ``max |J S^{-1}|``); the operator is built on it (columns scaled again in the dual form). ``gamma``: that power of two. ``scale``: ``S`` or
    None. ``diag``: ``d`` of ``D = diag(d)`` for ``J`` as solved, or None. ``relative``: the
    damping scales with ``J^T J`` (Marquardt's ``D``). ``operator``: the undamped primal or
    dual Gram operator (holding its formed Gram matrix for a direct solver). ``dual_scale``:
    ``sqrt(d)`` of the column-scaled dual form, or None. ``tiny``: ``gamma < 2^-100``.
    """

    J: Tensor
    gamma: Tensor
    scale: Tensor | None
    diag: Tensor | None
    relative: bool
    operator: GramOperator
    dual_scale: Tensor | None
    tiny: bool


class DampedState(NamedTuple):
    """The plan at one damping: the inner solver's state (None when the damping dominates
    ``J^T J`` beyond the dtype's range, see :class:`DampedLeastSquares`) and the damping."""

    plan: DampedPlan
    inner: Any
    damping: Tensor


def _dual_scale(J: Tensor, diag: Tensor, form: str) -> Tensor | None:
    """``sqrt(diag)`` for the column-scaled dual form, or None when it cannot be used.

    A zero entry of ``diag`` is only allowed for an all-zero column of ``J`` (as Marquardt's
    ``diag(J^T J)`` gives); there the scale is set to 1 (the minimum-norm answer is 0).
    """
    bad = bool(((diag == 0) & (J != 0).any(0)).any())
    if bad:
        if form == "dual":
            raise ValueError("damped_least_squares: the dual form with a diag needs diag > 0 "
                             "wherever J's column is not zero; use form='primal'")
        return None
    return torch.sqrt(torch.where(diag > 0, diag, torch.ones_like(diag)))


def _scaled(J: Tensor, scale: Tensor | None, bound: Tensor | None,
            overwrite: bool) -> tuple[Tensor, Tensor]:
    """``(J S^{-1} / gamma, gamma)`` for :meth:`DampedLeastSquares.plan`, with one copy of
    ``J`` at most (none with ``overwrite``). Without ``bound``, ``gamma`` comes from ``max |J
    S^{-1}|`` (NaN or inf exactly when ``J`` is not finite: then ValueError); with it, from
    ``bound``, and ``J`` is divided once by ``s gamma`` (the same numbers as dividing by ``s``
    and then by the power of two ``gamma`` where ``s gamma`` is a normal number; one host sync
    tells, and two divisions are made where it is not)."""
    if bound is None:
        Js = J if scale is None else J.div_(scale) if overwrite else J / scale
        big = torch.maximum(Js.amax(), -Js.amin()) if J.numel() else J.new_ones(())
        if not bool(torch.isfinite(big)):
            _require_finite(Js, "the Jacobian J")
        gamma = _power_of_two(big)
        return (Js.div_(gamma) if Js is not J or overwrite else J / gamma), gamma
    gamma = _power_of_two(bound.to(J))
    if scale is None:
        return (J.div_(gamma) if overwrite else J / gamma), gamma
    div = scale * gamma
    info = torch.finfo(J.dtype)
    if bool(((div >= info.tiny) & (div <= info.max)).all()):  # host sync
        return (J.div_(div) if overwrite else J / div), gamma
    return (J.div_(scale) if overwrite else J / scale).div_(gamma), gamma


@dataclass(frozen=True)
class DampedLeastSquares:
    """The damped Gauss-Newton (Levenberg-Marquardt) step ``x`` solving

    .. math::  (J^T J + \\lambda D) x = J^T r

    * form "primal": the ``n x n`` normal equations, through :func:`gram`;
    * form "dual": ``(J J^T + \\lambda I) y = r``, ``x = J^T y`` (an ``m x m`` system, the same
      ``x`` because ``(J^T J + \\lambda I) J^T = J^T (J J^T + \\lambda I)``); with ``D = diag(d)``
      the columns are scaled first: ``\\tilde J = J S^{-1}``, ``S = diag(sqrt(d))``,
      ``x = S^{-1} \\tilde J^T (\\tilde J \\tilde J^T + \\lambda I)^{-1} r``;
    * form "auto" (default): dual when ``m < n``, else primal.

    Column scaling (``plan(J, scale=s)``, MINPACK's variables ``z = diag(s) x``): the system
    solved is ``(Jt^T Jt + \\lambda I) z = Jt^T r`` with ``Jt = J diag(s)^{-1}``, and
    ``x = z / s``; this is ``D = diag(s^2)``, better conditioned when the columns of ``J``
    differ in scale by many orders of magnitude.

    Scaling by ``gamma``, the power of two nearest below ``max |J|``: the system solved is
    ``(Jh^T Jh + (\\lambda / gamma^2) D) x = Jh^T (r / gamma)``, ``Jh = J / gamma`` (with
    Marquardt's ``D = diag(J^T J)`` the damping is unchanged), the same system times
    ``1 / gamma^2``: exact in floating point, and the Gram matrix neither overflows nor
    underflows for a Jacobian of any finite size. Where ``\\lambda / gamma^2`` overflows
    (``max |J| < 2^-100`` and a damping that dominates ``J^T J`` beyond the range of the
    dtype) the answer is ``J^T r / (\\lambda d)`` to working precision and is returned as such
    (solver name "diagonal"); telling that case apart costs one host sync, only there.

    Args:
        solver: name or LinearSolver for the inner solve (default "auto"); "cg" stays
            matrix-free (the Gram matrix is then never formed).
        form: "auto", "primal" or "dual".
    """

    solver: str | LinearSolver = "auto"
    form: str = "auto"

    def __post_init__(self) -> None:
        if self.form not in ("auto", "primal", "dual"):
            raise ValueError(f"damped_least_squares: form must be 'auto', 'primal' or 'dual'; "
                             f"got {self.form!r}")

    def plan(self, J: Tensor, diag: Tensor | str | None = None, *,
             scale: Tensor | None = None, bound: Tensor | None = None,
             overwrite: bool = False) -> DampedPlan:
        """Check ``J`` and ``diag``, scale, choose the form and form the Gram matrix once.

        Args:
            J: Jacobian, shape ``(m, n)``, finite (ValueError otherwise).
            diag: ``D``: None (identity), a tensor ``d`` of shape ``(n,)`` with ``d >= 0``, or
                "marquardt" for ``diag(J^T J)``.
            scale: column scale ``s > 0`` of shape ``(n,)`` (``D = diag(s^2)`` solved in the
                variables ``z = s x``), or None; not together with ``diag``.
            bound: None (default: ``gamma`` from ``max |J S^{-1}|``, one pass over ``J``
                that also checks it finite), or a finite 0-d tensor ``b`` with ``max |J
                S^{-1}| <= b <= sqrt(m) max |J S^{-1}|`` that the caller knows, e.g.
                ``max_j ||J_j|| / s_j`` from finite column norms: ``gamma`` is then the power
                of two nearest below ``b`` and ``J`` is taken as finite (not read again).
                ``|J S^{-1} / gamma| < 2`` holds either way.
            overwrite: ``J`` may be divided in place (default False: one copy of ``J``); the
                plan's ``J`` is then the caller's tensor, which no longer holds ``J``.
        """
        if not isinstance(J, Tensor) or J.ndim != 2:
            raise ValueError(f"damped_least_squares: J must be a 2-D tensor; got {getattr(J, 'shape', J)!r}")
        if scale is not None and diag is not None:
            raise ValueError("damped_least_squares: pass diag or scale, not both (scale s means "
                             "D = diag(s^2) solved in the variables z = s x)")
        Jh, gamma = _scaled(J, scale, bound, overwrite)
        relative = isinstance(diag, str)  # Marquardt's D scales with J^T J
        if isinstance(diag, str):
            if diag != "marquardt":
                raise ValueError(f"damped_least_squares: diag must be None, a tensor or 'marquardt'; got {diag!r}")
            diag = (Jh * Jh).sum(0)
        if diag is not None and isinstance(diag, Tensor) and bool((diag < 0).any()):
            raise ValueError("damped_least_squares: diag must be >= 0 (D = diag(diag) scales the damping)")
        operator, dual_scale = self._operator(Jh, diag)
        tiny = bool(gamma < 2.0 ** -100)  # host sync, once per J
        return DampedPlan(Jh, gamma, scale, diag, relative, operator, dual_scale, tiny)

    def _operator(self, J: Tensor, diag: Tensor | None):
        """The undamped Gram operator of the chosen form and the dual form's column scale."""
        m, n = J.shape
        use_dual = self.form == "dual" or (self.form == "auto" and m < n)
        scale = None
        if use_dual and diag is not None:
            scale = _dual_scale(J, diag.to(J), self.form)
            use_dual = scale is not None
        if use_dual:
            Js = J if scale is None else J / scale
            op = gram_dual(Js, 0.0)
        else:
            op = gram(J, 0.0, diag)
        if not isinstance(get(self.solver), CG):  # a direct solver reads the matrix: form it once
            op = op.with_gram()
        return op, scale

    def init(self, plan: DampedPlan, damping: float | Tensor) -> DampedState:
        """The operator at ``damping`` (``lambda >= 0``, float or 0-d tensor; ValueError for a
        negative or NaN one, on other devices at the operator check's host sync), factorised
        once by the inner solver. Raises ValueError when the damping or ``diag`` is not finite,
        or (dual form with a ``diag``, whose columns are divided by ``sqrt(diag)``) when the
        Gram matrix overflows; elsewhere the plan's checked, scaled ``J`` (``|J / gamma| < 2``)
        bounds every Gram entry by ``4 max(m, n)``, so ``J`` is not read again."""
        lam = _damping_tensor(damping, plan.J)  # ValueError for a negative number (or CPU tensor)
        lam_h = lam if plan.relative else lam / plan.gamma / plan.gamma
        if plan.tiny and not plan.relative and bool(torch.isinf(lam_h) & torch.isfinite(lam)):
            return DampedState(plan, None, lam)
        op = plan.operator.with_damping(lam_h)
        if plan.dual_scale is None and 4.0 * max(plan.J.shape) < torch.finfo(plan.J.dtype).max:
            # plan checked J, and |J / gamma| < 2 bounds every Gram entry by 4 max(m, n)
            _require_finite(lam_h, "the damping")
            _require_valid_damping(lam_h)
            if op.diag is not None:
                _require_finite(op.diag, "the scaling diag")
        else:  # the dual form's columns divided by sqrt(diag) may overflow
            op.check_finite()
        return DampedState(plan, get(self.solver).init(op), lam)

    def compute(self, state: DampedState, r: Tensor) -> Solution:
        """``x`` for residuals ``r`` of shape ``(m,)`` or ``(m, k)`` (ValueError when ``J^T r``
        is not finite); ``residual_norm``, when given, is that of the inner system."""
        plan = state.plan
        if state.inner is None:
            return self._unscale(plan, _damping_dominated(plan, r, state.damping))
        rh = r / plan.gamma
        inner = get(self.solver)
        if plan.operator.form == "primal":
            b = plan.operator.J.mT @ rh
            _require_finite(b, "the right-hand side b")
            return self._unscale(plan, inner.compute(state.inner, b))
        _require_finite(rh, "the right-hand side b")
        sol = inner.compute(state.inner, rh)
        x = plan.operator.J.mT @ sol.value
        if plan.dual_scale is not None:
            x = x / (plan.dual_scale if x.ndim == 1 else plan.dual_scale[:, None])
        return self._unscale(plan, sol._replace(value=x))

    @staticmethod
    def _unscale(plan: DampedPlan, sol: Solution) -> Solution:
        """``x = z / s`` for a column-scaled plan."""
        if plan.scale is None:
            return sol
        s = plan.scale if sol.value.ndim == 1 else plan.scale[:, None]
        return sol._replace(value=sol.value.to(s.dtype) / s)


def _damping_dominated(plan: DampedPlan, r: Tensor, lam: Tensor) -> Solution:
    """``x = J^T r / (lambda d)``: the damped step when ``lambda d`` exceeds ``J^T J`` by more
    than the dtype's range."""
    Jh, gamma, diag = plan.J, plan.gamma, plan.diag
    d = torch.ones_like(lam) if diag is None else diag.to(Jh)
    d = d if r.ndim == 1 or diag is None else d[:, None]
    x = (Jh.mT @ r) / (lam * d) * gamma
    x, result = finite_or_zero(x, torch.zeros((), dtype=torch.int64, device=x.device))
    return Solution(x, result, SolveStats(), "diagonal")


def damped_least_squares(J: Tensor, r: Tensor, damping: float | Tensor,
                         diag: Tensor | str | None = None, *, solver: str | LinearSolver = "auto",
                         form: str = "auto") -> Solution:
    """The damped Gauss-Newton (Levenberg-Marquardt) step: ``x`` solving
    ``(J^T J + lambda D) x = J^T r`` (see :class:`DampedLeastSquares` for the forms and the
    scaling); ``plan``, ``init`` and ``compute`` in one call.

    Args:
        J: Jacobian, shape ``(m, n)``; ``J``: m residuals by n unknowns.
        r: residuals ``r``, shape ``(m,)`` or ``(m, k)``. The step that decreases
            ``||r(p)||^2`` is ``p - x`` when ``J = dr/dp``.
        damping: ``lambda >= 0``, float or 0-d tensor. A negative (or NaN) damping raises
            ValueError: a number or a CPU tensor at once; a tensor on another device when the
            operator is checked (the host sync it already makes).
        diag: ``D``: None (identity), a tensor ``d`` of shape ``(n,)`` with ``d >= 0``, or
            "marquardt" for ``diag(J^T J)``.
        solver: name or LinearSolver for the inner solve (default "auto"); "cg" stays matrix-free.
        form: "auto", "primal" or "dual".

    Returns:
        A :class:`Solution` with ``value`` of shape ``(n,)`` or ``(n, k)``; ``residual_norm``,
        when given, is that of the inner (primal or dual) system.
    """
    if not isinstance(J, Tensor) or J.ndim != 2:
        raise ValueError(f"damped_least_squares: J must be a 2-D tensor; got {getattr(J, 'shape', J)!r}")
    if not isinstance(r, Tensor) or r.ndim not in (1, 2) or r.shape[0] != J.shape[0]:
        raise ValueError(f"damped_least_squares: r must have shape ({J.shape[0]},) or ({J.shape[0]}, k) "
                         f"for J of shape {tuple(J.shape)}; got {getattr(r, 'shape', r)!r}")
    _require_finite(r, "the residuals r")
    return damped_least_squares_solver(J, diag, solver=solver, form=form)(damping, r)


def damped_least_squares_solver(J: Tensor, diag: Tensor | str | None = None, *,
                                solver: str | LinearSolver = "auto",
                                form: str = "auto") -> Callable[[float | Tensor, Tensor], Solution]:
    """:func:`damped_least_squares` for one ``J`` and many dampings and right-hand sides:
    returns ``step(damping, r) -> Solution``, ``compute(init(plan, damping), r)`` of
    :class:`DampedLeastSquares` on one ``plan(J, diag)`` (the checks, scalings and the Gram
    matrix are done once). To solve several ``r`` at one damping with one factorisation, use
    the class's ``init`` and ``compute`` directly."""
    dls = DampedLeastSquares(solver, form)
    plan = dls.plan(J, diag)
    return lambda damping, r: dls.compute(dls.init(plan, damping), r)


class DirectDamped(NamedTuple):
    """The damped normal equations of one ``J`` for Cholesky solves with no host read (the
    eager Levenberg-Marquardt step); made by :func:`direct_damped`, solved by
    :func:`direct_damped_solve`. The numbers are those of :class:`DampedLeastSquares` with a
    ``scale`` and a ``bound`` and the :class:`~funcopt.solvers.Cholesky` solver.

    ``J``: ``J S^{-1} / gamma`` (the caller's tensor, divided in place); ``gram``: its Gram
    matrix, ``J^T J`` (primal) or ``J J^T`` (dual); ``rhs``: ``-J^T r / gamma`` (primal) or
    ``-r / gamma`` (dual) as one column (negated: the solve gives the step); ``finite``:
    ``rhs`` is finite (the check :meth:`DampedLeastSquares.compute` makes), a bool where the
    host knew it, else a 0-d bool tensor left to the caller to read; ``scale``: ``S`` or
    None; ``gamma``: the power of two; ``rcond``: Cholesky's pivot-ratio threshold; ``dual``:
    the form.
    """

    J: Tensor
    gram: Tensor
    rhs: Tensor
    finite: Tensor | bool
    scale: Tensor | None
    gamma: float
    rcond: float
    dual: bool

    def jv(self, v: Tensor) -> Tensor:
        """``J v`` for the unscaled ``J``, from ``(J S^{-1} / gamma) (gamma S v)``."""
        return self.J @ (v if self.scale is None else self.scale * v) * self.gamma

    def plan(self, tiny: bool) -> DampedPlan:
        """The same system as a :class:`DampedPlan` (for another solver, or a damping that
        :func:`direct_damped_solve` does not take); ``tiny``: ``gamma < 2^-100``."""
        op = GramOperator(self.J, 0.0, form="dual" if self.dual else "primal", gram=self.gram)
        gamma = torch.full((), self.gamma, dtype=self.J.dtype, device=self.J.device)
        return DampedPlan(self.J, gamma, self.scale, None, False, op, None, tiny)


def direct_damped(J: Tensor, r: Tensor, scale: Tensor | None, gamma: float, one_division: bool,
                  form: str, rcond: float | None, rmax: Any = None) -> DirectDamped:
    """:class:`DirectDamped` for a finite ``J`` (overwritten) and ``r``: ``gamma``, the power
    of two of :meth:`DampedLeastSquares.plan` for a ``bound``, and ``one_division``, whether
    ``scale * gamma`` is a normal number everywhere (then ``J`` is divided once by it, else by
    ``scale`` and then by ``gamma``, as :func:`_scaled`), are read by the caller beforehand;
    ``form`` as :class:`DampedLeastSquares`; ``rcond`` as :class:`~funcopt.solvers.Cholesky`'s;
    ``rmax``: ``max |r|`` as a numpy scalar of the dtype when the caller read it (see
    :func:`_rhs_finite`).
    """
    if scale is None:
        Jh = J.div_(gamma)
    else:
        Jh = J.div_(scale * gamma) if one_division else J.div_(scale).div_(gamma)
    m, n = Jh.shape
    dual = form == "dual" or (form == "auto" and m < n)
    gram = _gram_matrix(Jh if dual else Jh.mT)
    rhs = (r / -gamma)[:, None]
    rhs = rhs if dual else Jh.mT @ rhs
    if rcond is None:
        rcond = min(gram.shape[0], 100) * torch.finfo(J.dtype).eps
    finite = _rhs_finite(rhs, dual, rmax, gamma, m)
    return DirectDamped(Jh, gram, rhs, finite, scale, gamma, rcond, dual)


def _rhs_finite(rhs: Tensor, dual: bool, rmax: Any, gamma: float, m: int) -> Tensor | bool:
    """Whether :func:`direct_damped`'s ``rhs`` is finite: from the host number ``rmax = max
    |r|`` (None: unknown) where it decides, as a bool: dual, ``max |rhs| = rmax / gamma``
    (``gamma`` a power of two: exact, or inf); primal, ``|Jh^T r| / gamma <= 2 m rmax /
    gamma`` for the ``m`` rows of ``|Jh| < 2``, finite when twice that bound is at most the
    largest number (and ``m eps < 1/2`` bounds the rounding of the sums). Else a 0-d bool
    tensor (``max |rhs| <= max``, False for NaN), left to the caller to read."""
    info = torch.finfo(rhs.dtype)
    if rmax is not None:
        T = type(rmax)
        with np.errstate(over="ignore"):  # inf: not finite
            bound = rmax / T(gamma)
        if dual:
            return bool(bound <= T(info.max))
        if 4.0 * m * float(bound) <= info.max and m * info.eps < 0.5:
            return True
    return torch.linalg.vector_norm(rhs, float("inf")) <= info.max


def direct_damped_solve(dd: DirectDamped, damping: float) -> tuple[Tensor, Tensor]:
    """``(-x, success)`` for ``(J^T J + damping S^2) x = J^T r`` with the :class:`DirectDamped`
    ``dd`` of that ``J`` and ``r``, by Cholesky; ``damping`` is the scaled ``lambda / gamma^2``,
    a finite number ``>= 0``. ``success`` (0-d bool, not read here) is False where the
    factorisation meets a non-positive pivot, the squared pivots span more than ``1 / rcond``,
    or the solution is not finite; ``x`` is then zeros. The rest of the Gram matrix is finite
    by construction (``|J| < 2``, see :class:`DampedLeastSquares`)."""
    L, info = torch.linalg.cholesky_ex(
        torch.diagonal_scatter(dd.gram, dd.gram.diagonal() + damping))
    p = L.diagonal()
    lo, hi = torch.aminmax(p * p)
    y = torch.cholesky_solve(dd.rhs, L)
    finite = torch.linalg.vector_norm(y, float("inf")) <= torch.finfo(y.dtype).max  # NaN: no
    ok = (info == 0) & (lo > dd.rcond * hi) & finite
    y = torch.where(ok, y, ok)[:, 0]  # 0 (False promoted) where not ok: no 0-d zero to make
    x = dd.J.mT @ y if dd.dual else y
    return (x if dd.scale is None else x / dd.scale), ok


def direct_supported(solver: str | LinearSolver, J: Tensor) -> bool:
    """Whether :func:`direct_damped` solves the damped system of ``J`` for ``solver``:
    :class:`~funcopt.solvers.Cholesky`, or :class:`~funcopt.solvers.Auto` without cuPyNumeric
    (Cholesky is its first solver for the positive definite Gram operator), float32 or
    float64, and a dtype that holds the Gram matrix's bound ``4 max(m, n)``."""
    from funcopt.solvers.auto import Auto
    from funcopt.solvers.dense import Cholesky

    s = get(solver)
    return (J.dtype in (torch.float32, torch.float64)
            and 4.0 * max(J.shape) < torch.finfo(J.dtype).max
            and (type(s) is Cholesky or (type(s) is Auto and not s.use_cupynumeric)))


def wants_jacobi(solver: Any) -> bool:
    """Whether ``solver`` is CG with a Jacobi preconditioner (``"pcg"``)."""
    return solver == "pcg" or (isinstance(solver, CG) and solver.preconditioner == "jacobi")


def matrix_free_factor(gn, damping, solver, d2, col2=None):
    """CG's state for ``v -> J^T (J v) + lambda d2 v`` (the solver and its state; ``d2`` the
    diagonal of ``D``); with ``col2 = diag(J^T J)`` (Jacobi) the preconditioner is
    ``1 / (col2 + lambda d2)``."""
    dtype, device = gn.residuals.dtype, gn.residuals.device
    op = matrix_free(lambda v: gn.gnvp(v) + damping * d2 * v, gn.size, dtype=dtype,
                     device=device, symmetric=True, positive_definite=True)
    cg = get(solver)
    if col2 is not None and wants_jacobi(solver):
        diag = col2 + damping * d2
        inv = torch.where(diag > 0, 1.0 / torch.where(diag > 0, diag, 1.0), 1.0)
        cg = CG(tol=cg.tol, atol=cg.atol, maxiter=cg.maxiter,
                preconditioner=lambda r: inv * r, check_every=cg.check_every)
    return cg, cg.init(op)


def matrix_free_solve(gn, factored, rhs):
    """``delta = -(J^T J + lambda I)^{-1} J^T rhs`` with the CG state of
    :func:`matrix_free_factor`."""
    cg, state = factored
    sol = cg.compute(state, gn.vjp(rhs))
    return -sol.value, sol.success
