"""Direct solvers on dense matrices, from ``torch.linalg``.

Each solver materialises the operator (``operator.as_matrix()``), factorises it and solves for
every column of ``b`` at once. Half-precision inputs are solved in float32 and returned in
their own dtype. Besides the factorisation's own failure code, a solver reports failure when the
pivots of its triangular factor span more than ``1 / rcond`` (a lower bound on the condition
number, so the system is numerically singular), when the materialised matrix is not finite (it
is not handed to LAPACK), or the result is not finite; a failed ``x`` is zeros. Reading ``success`` for a decision costs one host sync.

References: Golub & Van Loan, *Matrix Computations* (4th ed.), ch. 3 (LU), 4.2 (Cholesky),
5.2-5.5 (QR, least squares, SVD); LAPACK ``potrf``/``getrf``/``geqrf``/``gelsd``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from funcopt.solvers.base import (
    LinearOperator,
    LinearSolver,
    Result,
    Solution,
    finished,
    result_code,
    symmetric_within_tolerance,
)

__all__ = ["Cholesky", "LU", "QR", "Lstsq", "SVD", "DenseState"]


class DenseState(NamedTuple):
    """A direct solver's state: the operator, its factors (solver-specific tensors), the
    factorisation's :class:`~funcopt.solvers.base.Result` code and the name reported."""

    operator: LinearOperator
    factors: tuple
    result: Tensor
    name: str


def _work(A: Tensor) -> tuple[Tensor, Tensor]:
    """The matrix in a dtype torch.linalg supports, and whether it is finite (``max |A|`` is
    NaN or inf exactly when ``A`` is not: two reductions, no temporaries). The non-finite
    entries of a non-finite matrix (e.g. a Gram matrix ``J^T J`` formed from a matrix-free
    operator that overflows) are replaced by zeros, so LAPACK never sees NaN or inf; the
    caller reports ``non_finite`` through the flag (no host sync)."""
    if A.dtype in (torch.float16, torch.bfloat16):
        A = A.float()
    if A.numel() == 0:
        return A, torch.ones((), dtype=torch.bool, device=A.device)
    big = A.abs().amax() if A.is_complex() else torch.maximum(A.amax(), -A.amin())
    return torch.nan_to_num(A, nan=0.0, posinf=0.0, neginf=0.0), torch.isfinite(big)


def _rhs(b: Tensor, dtype: torch.dtype) -> Tensor:
    """``b`` as a 2-D right-hand side in the factors' dtype."""
    b = b.to(dtype)
    return b if b.ndim == 2 else b[:, None]


def _finish(x: Tensor, b: Tensor, result: Tensor, name: str) -> Solution:
    x = x.to(b.dtype)
    x = x if b.ndim == 2 else x[:, 0]
    return finished(x, result, name)


def _rcond(rcond: float | None, A: Tensor) -> float:
    return rcond if rcond is not None else max(A.shape) * torch.finfo(A.dtype).eps


def _pivot_rcond(rcond: float | None, A: Tensor) -> float:
    """Pivot spreads are far below the condition number; cap the size factor at 100 so large
    float32 systems with moderate conditioning are not flagged."""
    return rcond if rcond is not None else min(max(A.shape), 100) * torch.finfo(A.dtype).eps


def _pivots_ok(d: Tensor, rcond: float) -> Tensor:
    """``min |d| > rcond * max |d|`` for the diagonal ``d`` of a triangular factor."""
    d = d.abs()
    return d.min() > rcond * d.max()


def _require_square(op: LinearOperator, name: str) -> None:
    if not op.square:
        raise ValueError(f"{name} needs a square operator; got shape {op.shape}. "
                         "Use solver 'lstsq', 'qr' or 'svd' for rectangular systems.")


@dataclass(frozen=True)
class Cholesky(LinearSolver):
    """``A = L L^T`` (``torch.linalg.cholesky_ex``) in ``init``, two triangular solves per
    right-hand side in ``compute``.

    For symmetric positive definite ``A``; the symmetric tag is trusted (only the lower
    triangle is read). For an operator not tagged symmetric, ``init`` checks
    ``max|A - A^T| <= sqrt(eps) max|A|`` (``not_symmetric`` otherwise; ``solve`` raises a
    ValueError then). Result codes: ``not_positive_definite`` when the factorisation meets a
    non-positive pivot, ``singular`` when ``min_i L_ii^2 <= rcond * max_i L_ii^2``,
    ``non_finite`` for a non-finite matrix or result.

    Args:
        rcond: pivot-ratio threshold; default ``min(n, 100) * eps(dtype)``.
    """

    rcond: float | None = None
    name = "cholesky"

    def needs_symmetric(self, operator: LinearOperator) -> bool:
        return True

    def _init(self, op: LinearOperator) -> DenseState:
        _require_square(op, self.name)
        A, finite = _work(op.as_matrix())
        sym = symmetric_within_tolerance(op, A)
        L, info = torch.linalg.cholesky_ex(A)
        d = torch.diagonal(L).real
        result = result_code([(~finite, Result.non_finite), (~sym, Result.not_symmetric),
                              (info != 0, Result.not_positive_definite),
                              (~_pivots_ok(d * d, _pivot_rcond(self.rcond, A)), Result.singular)],
                             A.device)
        return DenseState(op, (L,), result, self.name)

    def _compute(self, state: DenseState, b: Tensor) -> Solution:
        (L,) = state.factors
        return _finish(torch.cholesky_solve(_rhs(b, L.dtype), L), b, state.result, state.name)


@dataclass(frozen=True)
class LU(LinearSolver):
    """``P A = L U`` with partial pivoting (``torch.linalg.lu_factor_ex``) in ``init``, for any
    square ``A``; ``torch.linalg.lu_solve`` per right-hand side.

    ``singular`` when a pivot is exactly zero or ``min_i |U_ii| <= rcond * max_i |U_ii|``.

    Args:
        rcond: pivot-ratio threshold; default ``min(n, 100) * eps(dtype)``.
    """

    rcond: float | None = None
    name = "lu"

    def _init(self, op: LinearOperator) -> DenseState:
        _require_square(op, self.name)
        A, finite = _work(op.as_matrix())
        LU_, piv, info = torch.linalg.lu_factor_ex(A)
        ok = (info == 0) & _pivots_ok(torch.diagonal(LU_), _pivot_rcond(self.rcond, A))
        result = result_code([(~finite, Result.non_finite), (~ok, Result.singular)], A.device)
        return DenseState(op, (LU_, piv), result, self.name)

    def _compute(self, state: DenseState, b: Tensor) -> Solution:
        LU_, piv = state.factors
        x = torch.linalg.lu_solve(LU_, piv, _rhs(b, LU_.dtype))
        return _finish(x, b, state.result, state.name)


@dataclass(frozen=True)
class QR(LinearSolver):
    """Householder QR (``torch.linalg.qr``) in ``init``. For ``A`` of shape ``(m, n)``:

    * ``m >= n``: ``A = Q R``, ``x = R^{-1} Q^T b`` (the least-squares solution when A has full
      column rank);
    * ``m < n``: ``A^T = Q R``, ``x = Q R^{-T} b`` (the minimum-norm solution when A has full
      row rank).

    ``singular`` when ``min_i |R_ii| <= rcond * max_i |R_ii|`` (rank-deficient; use "lstsq" or
    "svd").

    Args:
        rcond: pivot-ratio threshold; default ``min(max(m, n), 100) * eps(dtype)``.
    """

    rcond: float | None = None
    name = "qr"

    def _init(self, op: LinearOperator) -> DenseState:
        A, finite = _work(op.as_matrix())
        m, n = A.shape
        Q, R = torch.linalg.qr(A if m >= n else A.mH)
        ok = _pivots_ok(torch.diagonal(R), _pivot_rcond(self.rcond, A))
        result = result_code([(~finite, Result.non_finite), (~ok, Result.singular)], A.device)
        return DenseState(op, (Q, R), result, self.name)

    def _compute(self, state: DenseState, b: Tensor) -> Solution:
        Q, R = state.factors
        B = _rhs(b, R.dtype)
        m, n = state.operator.shape
        if m >= n:
            x = torch.linalg.solve_triangular(R, Q.mH @ B, upper=True)
        else:
            x = Q @ torch.linalg.solve_triangular(R.mH, B, upper=False)
        return _finish(x, b, state.result, state.name)


@dataclass(frozen=True)
class SVD(LinearSolver):
    """The pseudo-inverse solve ``x = A^+ b`` with a cutoff: singular values (eigenvalues for a
    symmetric operator, via ``torch.linalg.eigh``) at most ``rcond * sigma_max`` are dropped,
    giving the minimum-norm least-squares solution. The decomposition is made in ``init``.
    Always succeeds on finite input. With ``hermitian=True`` an operator not tagged symmetric is
    checked as :class:`Cholesky` does (``not_symmetric``).

    Args:
        rcond: relative cutoff; default ``max(m, n) * eps(dtype)``.
        hermitian: use ``eigh`` (True), ``svd`` (False) or decide from the operator's
            symmetric tag (None, the default).
    """

    rcond: float | None = None
    hermitian: bool | None = None
    name = "svd"

    def needs_symmetric(self, operator: LinearOperator) -> bool:
        return operator.symmetric if self.hermitian is None else self.hermitian

    def _init(self, op: LinearOperator) -> DenseState:
        A, finite = _work(op.as_matrix())
        rcond = _rcond(self.rcond, A)
        if self.needs_symmetric(op):
            sym = symmetric_within_tolerance(op, A)
            w, V = torch.linalg.eigh(A)
            keep = w.abs() > rcond * w.abs().max()
            inv = torch.where(keep, 1.0 / torch.where(keep, w, torch.ones_like(w)), 0.0)
            result = result_code([(~finite, Result.non_finite), (~sym, Result.not_symmetric)],
                                 A.device)
            return DenseState(op, (V, inv, V.mH), result, "eigh")
        U, s, Vh = torch.linalg.svd(A, full_matrices=False)
        keep = s > rcond * s.max()
        inv = torch.where(keep, 1.0 / torch.where(keep, s, torch.ones_like(s)), 0.0)
        return DenseState(op, (Vh.mH, inv, U.mH), result_code([(~finite, Result.non_finite)], A.device),
                          self.name)

    def _compute(self, state: DenseState, b: Tensor) -> Solution:
        return _pseudo_inverse_solve(state, b)


def _pseudo_inverse_solve(state: DenseState, b: Tensor) -> Solution:
    """``x = V diag(inv) U^H b`` for the factors ``(V, inv, U^H)`` of :class:`SVD` (``U = V``
    for eigh)."""
    V, inv, Uh = state.factors
    x = V @ (inv[:, None] * (Uh @ _rhs(b, V.dtype)))
    return _finish(x, b, state.result, state.name)


@dataclass(frozen=True)
class Lstsq(LinearSolver):
    """Least squares ``min_x ||A x - b||`` (``torch.linalg.lstsq``), for any shape and rank.

    On the CPU it uses LAPACK ``gelsd`` (SVD-based: minimum-norm solution of rank-deficient
    systems, singular values below ``rcond * sigma_max`` treated as zero); ``gelsd`` factorises
    with the right-hand side, so ``init`` only prepares the matrix and each ``compute`` runs
    it. On CUDA, where torch only offers ``gels`` (full rank only), it solves through
    :class:`SVD` instead (factorised once in ``init``).

    Args:
        rcond: relative cutoff; default ``max(m, n) * eps(dtype)``.
    """

    rcond: float | None = None
    name = "lstsq"

    def _init(self, op: LinearOperator) -> DenseState:
        if op.device.type != "cpu":
            st = SVD(self.rcond, hermitian=op.symmetric)._init(op)
            return st._replace(name=self.name)
        A, finite = _work(op.as_matrix())
        return DenseState(op, (A,), result_code([(~finite, Result.non_finite)], A.device), self.name)

    def _compute(self, state: DenseState, b: Tensor) -> Solution:
        if len(state.factors) == 3:
            return _pseudo_inverse_solve(state, b)
        (A,) = state.factors
        x = torch.linalg.lstsq(A, _rhs(b, A.dtype), rcond=_rcond(self.rcond, A), driver="gelsd").solution
        return _finish(x, b, state.result, state.name)
