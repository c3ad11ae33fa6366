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

import torch
from torch import Tensor

from funcopt.solvers.base import LinearOperator, LinearSolver, Solution, finite_or_zero

__all__ = ["Cholesky", "LU", "QR", "Lstsq", "SVD"]


def _work(A: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The matrix and a 2-D right-hand side in a dtype torch.linalg supports, and whether the
    matrix is finite. A non-finite matrix (e.g. a Gram matrix ``J^T J`` formed from a matrix-free
    operator that overflows) is replaced by zeros, so LAPACK never sees NaN or inf; the caller
    reports failure through the flag (no host sync)."""
    if A.dtype in (torch.float16, torch.bfloat16):
        A, b = A.float(), b.float()
    finite = torch.isfinite(A).all()
    A = torch.where(finite, A, torch.zeros_like(A))
    return A, (b if b.ndim == 2 else b[:, None]), finite


def _require_symmetric(op: LinearOperator, A: Tensor, name: str) -> None:
    """Refuse an operator not tagged symmetric whose matrix is not symmetric to within
    ``sqrt(eps) * max |A|`` (one host sync, only for untagged operators): Cholesky and eigh read
    one triangle of ``A`` and would solve another system."""
    if op.symmetric:
        return
    asym, size = (A - A.mH).abs().max(), A.abs().max()
    if not bool(asym <= torch.finfo(A.dtype).eps ** 0.5 * size):
        raise ValueError(
            f"solver {name!r} needs a symmetric matrix (it reads one triangle of A), but the "
            f"operator is not tagged symmetric and max|A - A^T| = {float(asym):.3g} with "
            f"max|A| = {float(size):.3g}. Use solver='lu' (or 'auto') for a general square "
            "matrix, or tag a symmetric one: solvers.dense(A, symmetric=True) or "
            "positive_definite=True")


def _finish(x: Tensor, b: Tensor, success: Tensor, name: str) -> Solution:
    x = x.to(b.dtype)
    x = x if b.ndim == 2 else x[:, 0]
    x, success = finite_or_zero(x, success)
    return Solution(x, success, name)


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
    """``A = L L^T`` (``torch.linalg.cholesky_ex``), then two triangular solves.

    For symmetric positive definite ``A``; the symmetric tag is trusted (only the lower
    triangle is read). An operator not tagged symmetric is checked first (one host sync) and
    refused with a ValueError when ``max|A - A^T| > sqrt(eps) max|A|``. Fails (``success`` False) when the factorisation reports a non-positive
    pivot or when ``min_i L_ii^2 <= rcond * max_i L_ii^2``.

    Args:
        rcond: pivot-ratio threshold; default ``min(n, 100) * eps(dtype)``.
    """

    rcond: float | None = None
    name = "cholesky"

    def _solve(self, op: LinearOperator, b: Tensor) -> Solution:
        _require_square(op, self.name)
        A, B, finite = _work(op.as_matrix(), b)
        _require_symmetric(op, A, self.name)
        L, info = torch.linalg.cholesky_ex(A)
        d = torch.diagonal(L).real
        ok = finite & (info == 0) & _pivots_ok(d * d, _pivot_rcond(self.rcond, A))
        return _finish(torch.cholesky_solve(B, L), b, ok, self.name)


@dataclass(frozen=True)
class LU(LinearSolver):
    """``P A = L U`` with partial pivoting (``torch.linalg.lu_factor_ex``), for any square ``A``.

    Fails when a pivot is exactly zero or ``min_i |U_ii| <= rcond * max_i |U_ii|``.

    Args:
        rcond: pivot-ratio threshold; default ``min(n, 100) * eps(dtype)``.
    """

    rcond: float | None = None
    name = "lu"

    def _solve(self, op: LinearOperator, b: Tensor) -> Solution:
        _require_square(op, self.name)
        A, B, finite = _work(op.as_matrix(), b)
        LU_, piv, info = torch.linalg.lu_factor_ex(A)
        ok = finite & (info == 0) & _pivots_ok(torch.diagonal(LU_), _pivot_rcond(self.rcond, A))
        return _finish(torch.linalg.lu_solve(LU_, piv, B), b, ok, self.name)


@dataclass(frozen=True)
class QR(LinearSolver):
    """Householder QR (``torch.linalg.qr``). For ``A`` of shape ``(m, n)``:

    * ``m >= n``: ``A = Q R``, ``x = R^{-1} Q^T b`` (the least-squares solution when A has full
      column rank);
    * ``m < n``: ``A^T = Q R``, ``x = Q R^{-T} b`` (the minimum-norm solution when A has full
      row rank).

    Fails when ``min_i |R_ii| <= rcond * max_i |R_ii|`` (rank-deficient; use "lstsq" or "svd").

    Args:
        rcond: pivot-ratio threshold; default ``min(max(m, n), 100) * eps(dtype)``.
    """

    rcond: float | None = None
    name = "qr"

    def _solve(self, op: LinearOperator, b: Tensor) -> Solution:
        A, B, finite = _work(op.as_matrix(), b)
        m, n = A.shape
        if m >= n:
            Q, R = torch.linalg.qr(A)
            x = torch.linalg.solve_triangular(R, Q.mH @ B, upper=True)
        else:
            Q, R = torch.linalg.qr(A.mH)
            x = Q @ torch.linalg.solve_triangular(R.mH, B, upper=False)
        ok = finite & _pivots_ok(torch.diagonal(R), _pivot_rcond(self.rcond, A))
        return _finish(x, b, ok, self.name)


@dataclass(frozen=True)
class SVD(LinearSolver):
    """The pseudo-inverse solve ``x = A^+ b`` with a cutoff: singular values (eigenvalues for a
    symmetric operator, via ``torch.linalg.eigh``) at most ``rcond * sigma_max`` are dropped,
    giving the minimum-norm least-squares solution. Always succeeds on finite input. With
    ``hermitian=True`` an operator not tagged symmetric is checked as :class:`Cholesky` does.

    Args:
        rcond: relative cutoff; default ``max(m, n) * eps(dtype)``.
        hermitian: use ``eigh`` (True), ``svd`` (False) or decide from the operator's
            symmetric tag (None, the default).
    """

    rcond: float | None = None
    hermitian: bool | None = None
    name = "svd"

    def _solve(self, op: LinearOperator, b: Tensor) -> Solution:
        A, B, finite = _work(op.as_matrix(), b)
        rcond = _rcond(self.rcond, A)
        hermitian = op.symmetric if self.hermitian is None else self.hermitian
        if hermitian:
            _require_symmetric(op, A, "eigh")
            w, V = torch.linalg.eigh(A)
            keep = w.abs() > rcond * w.abs().max()
            inv = torch.where(keep, 1.0 / torch.where(keep, w, torch.ones_like(w)), 0.0)
            x = V @ (inv[:, None] * (V.mH @ B))
            return _finish(x, b, finite, "eigh")
        U, s, Vh = torch.linalg.svd(A, full_matrices=False)
        keep = s > rcond * s.max()
        inv = torch.where(keep, 1.0 / torch.where(keep, s, torch.ones_like(s)), 0.0)
        x = Vh.mH @ (inv[:, None] * (U.mH @ B))
        return _finish(x, b, finite, self.name)


@dataclass(frozen=True)
class Lstsq(LinearSolver):
    """Least squares ``min_x ||A x - b||`` (``torch.linalg.lstsq``), for any shape and rank.

    On the CPU it uses LAPACK ``gelsd`` (SVD-based: minimum-norm solution of rank-deficient
    systems, singular values below ``rcond * sigma_max`` treated as zero). On CUDA, where torch
    only offers ``gels`` (full rank only), it solves through :class:`SVD` instead.

    Args:
        rcond: relative cutoff; default ``max(m, n) * eps(dtype)``.
    """

    rcond: float | None = None
    name = "lstsq"

    def _solve(self, op: LinearOperator, b: Tensor) -> Solution:
        if op.device.type != "cpu":
            x, success, _, _, _ = SVD(self.rcond, hermitian=op.symmetric)._solve(op, b)
            return Solution(x, success, self.name)
        A, B, finite = _work(op.as_matrix(), b)
        x = torch.linalg.lstsq(A, B, rcond=_rcond(self.rcond, A), driver="gelsd").solution
        return _finish(x, b, finite, self.name)
