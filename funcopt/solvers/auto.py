"""Choosing a solver: ``get``, the ``Auto`` solver, ``solve`` and ``damped_least_squares``."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from funcopt.base import replace
from funcopt.solvers.base import (
    DenseOperator,
    LinearOperator,
    LinearSolver,
    MatrixFreeOperator,
    Solution,
    _damping_tensor,
    _require_finite,
    finite_or_zero,
    gram,
    gram_dual,
)
from funcopt.solvers.dense import LU, QR, SVD, Cholesky, Lstsq
from funcopt.solvers.krylov import CG, _power_of_two

__all__ = ["Auto", "get", "solve", "damped_least_squares", "damped_least_squares_solver", "SOLVER_NAMES"]

SOLVER_NAMES = ("auto", "cholesky", "lu", "qr", "lstsq", "svd", "eigh", "cg", "pcg", "cupynumeric")
"""The names :func:`get` accepts for a solver (``solver="cholesky"`` ...)."""


def _robust(op: LinearOperator) -> LinearSolver:
    """The fallback that always returns a finite minimum-norm least-squares answer."""
    return Lstsq() if op.device.type == "cpu" else SVD(hermitian=op.symmetric)


@dataclass(frozen=True)
class Auto(LinearSolver):
    """Picks a solver from the operator's shape, tags, size and device, and falls back to a
    robust one when the first reports failure.

    Rules, in order:

    * matrix-free and positive definite: CG (Jacobi-free; pass ``solver="pcg"`` for Jacobi);
      other matrix-free operators are materialised when ``n <= dense_max``;
    * cuPyNumeric when ``use_cupynumeric`` is True, or when it is None (default), the program
      has already imported ``cupynumeric`` (it runs under Legate) and ``n >= cupynumeric_min_size``;
    * positive definite: Cholesky; other square: LU; rectangular: lstsq on the CPU, QR on GPUs;
    * on failure (not positive definite, numerically singular, CG not converged on a small
      system): lstsq (``gelsd``) on the CPU, eigh/SVD pseudo-inverse on GPUs, giving a finite
      minimum-norm least-squares answer.

    Reading the first solver's ``success`` costs one host sync.

    Args:
        use_cupynumeric: True, False or None (decide as above).
        cupynumeric_min_size: smallest n sent to cuPyNumeric when deciding by itself (8192).
        dense_max: largest matrix-free operator that is materialised for a direct solve (4096).
    """

    use_cupynumeric: bool | None = None
    cupynumeric_min_size: int = 8192
    dense_max: int = 4096
    name = "auto"

    def plan(self, op: LinearOperator) -> LinearSolver:
        """The first solver tried for ``op``."""
        n = op.shape[0]
        if isinstance(op, MatrixFreeOperator):
            if op.positive_definite:
                return CG()
            if n > self.dense_max:
                raise ValueError(
                    f"auto: no matrix-free solver for an operator of size {n} that is not tagged "
                    "positive definite; tag it (CG needs symmetric positive definite), pass a "
                    "dense operator, or choose a solver by name")
        if op.square and self._cupynumeric_wanted(n):
            from funcopt.solvers.cupynumeric import CuPyNumeric

            return CuPyNumeric()
        if op.positive_definite:
            return Cholesky()
        if op.square:
            return LU()
        return Lstsq() if op.device.type == "cpu" else QR()

    def _cupynumeric_wanted(self, n: int) -> bool:
        if self.use_cupynumeric is not None:
            return self.use_cupynumeric
        return "cupynumeric" in sys.modules and n >= self.cupynumeric_min_size

    def _solve(self, op: LinearOperator, b: Tensor) -> Solution:
        first = self.plan(op)
        sol = first.solve_unchecked(op, b)
        if bool(sol.success):
            return sol
        if isinstance(first, CG) and op.shape[0] > self.dense_max:
            return sol
        return _robust(op).solve_unchecked(op, b)


def get(name_or_solver: str | LinearSolver) -> LinearSolver:
    """A solver from its name, or the solver itself.

    Names: "auto" (:class:`Auto`), "cholesky", "lu", "qr", "lstsq", "svd" (pseudo-inverse;
    eigh for symmetric operators), "eigh", "cg", "pcg" (CG with a Jacobi preconditioner),
    "cupynumeric" (needs ``pip install funcopt[cupynumeric]``).
    """
    if isinstance(name_or_solver, LinearSolver):
        return name_or_solver
    table: dict[str, Callable[[], LinearSolver]] = {"auto": Auto, "cholesky": Cholesky, "lu": LU, "qr": QR, "lstsq": Lstsq, "svd": SVD,
             "eigh": lambda: SVD(hermitian=True), "cg": CG,
             "pcg": lambda: CG(preconditioner="jacobi")}
    if name_or_solver == "cupynumeric":
        from funcopt.solvers.cupynumeric import CuPyNumeric

        return CuPyNumeric()
    if name_or_solver not in table:
        raise ValueError(f"unknown solver {name_or_solver!r}; choose one of {', '.join(SOLVER_NAMES)} "
                         "or pass a LinearSolver object")
    return table[name_or_solver]()


def solve(operator: LinearOperator | Tensor, b: Tensor, solver: str | LinearSolver = "auto") -> Solution:
    """Solve ``A x = b`` for ``b`` of shape ``(n,)`` or ``(n, k)``.

    Args:
        operator: a LinearOperator (``dense``, ``gram``, ``matrix_free``, ``block_diagonal``) or
            a dense 2-D tensor (no structure tags).
        b: the right-hand side(s), same dtype and device as the operator.
        solver: a name (see :func:`get`) or a LinearSolver; default "auto".

    Raises:
        ValueError: non-finite operator or ``b``, mismatched shapes, dtypes or devices.
    """
    if isinstance(operator, Tensor):
        operator = DenseOperator(operator)
    return get(solver).solve(operator, b)


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


def damped_least_squares(J: Tensor, r: Tensor, damping: float | Tensor,
                         diag: Tensor | str | None = None, *, solver: str | LinearSolver = "auto",
                         form: str = "auto") -> Solution:
    """The damped Gauss-Newton (Levenberg-Marquardt) step: ``x`` solving

    .. math::  (J^T J + \\lambda D) x = J^T r

    * form "primal": the ``n x n`` normal equations, through :func:`gram`;
    * form "dual": ``(J J^T + \\lambda I) y = r``, ``x = J^T y`` (an ``m x m`` system, the same
      ``x`` because ``(J^T J + \\lambda I) J^T = J^T (J J^T + \\lambda I)``); with ``D = diag(d)``
      the columns are scaled first: ``\\tilde J = J S^{-1}``, ``S = diag(sqrt(d))``,
      ``x = S^{-1} \\tilde J^T (\\tilde J \\tilde J^T + \\lambda I)^{-1} r``;
    * form "auto" (default): dual when ``m < n``, else primal.

    Levenberg (1944), Marquardt (1963); the dual form as in e.g. Nocedal & Wright,
    *Numerical Optimization* (2nd ed.), section 10.3.

    Args:
        J: Jacobian, shape ``(m, n)``; ``J``: m residuals by n unknowns.
        r: residuals ``r``, shape ``(m,)`` or ``(m, k)``. The step that decreases
            ``||r(p)||^2`` is ``p - x`` when ``J = dr/dp``.
        damping: ``\\lambda >= 0``, float or 0-d tensor. A negative (or NaN) damping raises
            ValueError: a number or a CPU tensor at once; a tensor on another device when the
            operator is checked in :func:`solve` (the host sync it already makes).
        diag: ``D``: None (identity), a tensor ``d`` of shape ``(n,)`` with ``d >= 0``, or
            "marquardt" for ``diag(J^T J)``.
        solver: name or LinearSolver for the inner solve (default "auto"); "cg" stays matrix-free.
        form: "auto", "primal" or "dual".

    Returns:
        A :class:`Solution` with ``x`` of shape ``(n,)`` or ``(n, k)``; ``residual_norm``, when
        given, is that of the inner (primal or dual) system.
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
    returns ``step(damping, r) -> Solution``. The checks on ``J`` and ``diag``, the choice of
    form and the column scaling are done once, and the Gram matrix ``J^T J`` (or ``J J^T``) is
    formed at most once and shared between calls (see :meth:`GramOperator.with_damping`), as
    a Levenberg-Marquardt step that tries several dampings needs. ``r`` is not checked.

    Scaling: with ``gamma`` the power of two nearest below ``max |J|``, the system solved is
    ``(Jh^T Jh + (lambda / gamma^2) D) x = Jh^T (r / gamma)``, ``Jh = J / gamma`` (with
    Marquardt's ``D = diag(J^T J)`` the damping is unchanged), which is the same system
    multiplied by ``1 / gamma^2``: exact in floating point, and the Gram matrix neither
    overflows nor underflows for a Jacobian of any finite size. Where ``lambda / gamma^2``
    overflows (``max |J| < 2^-100`` and a damping that dominates ``J^T J`` beyond the range of
    the dtype) the answer is ``J^T r / (lambda d)`` to working precision and is returned as
    such (solver name "diagonal"); telling that case apart costs one host sync, only there.
    """
    if not isinstance(J, Tensor) or J.ndim != 2:
        raise ValueError(f"damped_least_squares: J must be a 2-D tensor; got {getattr(J, 'shape', J)!r}")
    if form not in ("auto", "primal", "dual"):
        raise ValueError(f"damped_least_squares: form must be 'auto', 'primal' or 'dual'; got {form!r}")
    _require_finite(J, "the Jacobian J")
    gamma = _power_of_two(J.abs().amax() if J.numel() else J.new_ones(()))
    Jh = J / gamma
    relative_damping = isinstance(diag, str)  # Marquardt's D scales with J^T J
    if isinstance(diag, str):
        if diag != "marquardt":
            raise ValueError(f"damped_least_squares: diag must be None, a tensor or 'marquardt'; got {diag!r}")
        diag = (Jh * Jh).sum(0)
    if diag is not None and isinstance(diag, Tensor) and bool((diag < 0).any()):
        raise ValueError("damped_least_squares: diag must be >= 0 (D = diag(diag) scales the damping)")
    inner = _unscaled_solver(Jh, diag, solver, form)
    tiny_J = bool(gamma < 2.0 ** -100)  # host sync, once per J

    def step(damping: float | Tensor, r: Tensor) -> Solution:
        lam = _damping_tensor(damping, J)  # ValueError for a negative number (or CPU tensor)
        lam_h = lam if relative_damping else lam / gamma / gamma
        if tiny_J and not relative_damping and bool(torch.isinf(lam_h) & torch.isfinite(lam)):
            return _damping_dominated(Jh, gamma, r, lam, diag)
        return inner(lam_h, r / gamma)

    return step


def _damping_dominated(Jh: Tensor, gamma: Tensor, r: Tensor, lam: Tensor,
                       diag: Tensor | None) -> Solution:
    """``x = J^T r / (lambda d)``: the damped step when ``lambda d`` exceeds ``J^T J`` by more
    than the dtype's range."""
    d = torch.ones_like(lam) if diag is None else diag.to(Jh)
    d = d if r.ndim == 1 or diag is None else d[:, None]
    x = (Jh.mT @ r) / (lam * d) * gamma
    x, success = finite_or_zero(x, torch.ones((), dtype=torch.bool, device=x.device))
    return Solution(x, success, "diagonal")


def _unscaled_solver(J: Tensor, diag: Tensor | None, solver: str | LinearSolver,
                     form: str) -> Callable[[float | Tensor, Tensor], Solution]:
    """``step(damping, r)`` solving ``(J^T J + damping D) x = J^T r`` as it is given."""
    m, n = J.shape
    use_dual = form == "dual" or (form == "auto" and m < n)
    scale = None
    if use_dual and diag is not None:
        scale = _dual_scale(J, diag.to(J), form)
        use_dual = scale is not None
    if not use_dual:
        primal = gram(J, 0.0, diag)
        return lambda damping, r: solve(primal.with_damping(damping), J.mT @ r, solver)
    Js = J if scale is None else J / scale
    dual = gram_dual(Js, 0.0)

    def step(damping: float | Tensor, r: Tensor) -> Solution:
        sol = solve(dual.with_damping(damping), r, solver)
        x = Js.mT @ sol.x
        if scale is not None:
            x = x / (scale if x.ndim == 1 else scale[:, None])
        return replace(sol, x=x)

    return step
