"""Matrix-free conjugate gradients, optionally preconditioned.

Only ``operator.matvec`` is used, so the operator may be a Gram form (two products with
``J``), a Gauss-Newton-vector product from ``torch.func.jvp``/``vjp``, or a dense matrix.
Reference: Hestenes & Stiefel (1952), "Methods of conjugate gradients for solving linear
systems"; preconditioned form as in Saad, *Iterative Methods for Sparse Linear Systems*
(2nd ed.), Algorithm 9.1; the same defaults as ``scipy.sparse.linalg.cg`` (rtol 1e-5,
at most 10 n iterations).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from funcopt.solvers.base import (
    DenseOperator,
    LinearOperator,
    LinearSolver,
    Result,
    Solution,
    SolveStats,
    finished,
    result_code,
    scaled_norm,
    symmetric_within_tolerance,
)

__all__ = ["CG", "CGState"]

Preconditioner = Callable[[Tensor], Tensor] | LinearOperator | str | None


def _preconditioner(spec: Preconditioner, op: LinearOperator) -> Callable[[Tensor], Tensor]:
    if spec is None:
        return lambda r: r
    if isinstance(spec, LinearOperator):
        return spec.matvec
    if spec == "jacobi":
        d = op.diagonal()
        d = d / _power_of_two(d.abs().max())  # CG is invariant to a scalar factor of M^{-1}
        inv = torch.where(d > 0, 1.0 / torch.where(d > 0, d, torch.ones_like(d)), torch.ones_like(d))
        return lambda r: (inv if r.ndim == 1 else inv[:, None]) * r
    if callable(spec):
        return spec
    raise ValueError(f"CG: preconditioner must be None, 'jacobi', a callable r -> M^{{-1}} r or a "
                     f"LinearOperator; got {spec!r}")


class CGState(NamedTuple):
    """CG's state: the operator, the preconditioner ``r -> M^{-1} r`` (Jacobi's diagonal is
    formed once, in ``init``) and the :class:`~funcopt.solvers.base.Result` code of the
    checks made there (``not_symmetric`` for an untagged dense matrix that is not symmetric)."""

    operator: LinearOperator
    apply_m: Callable[[Tensor], Tensor]
    result: Tensor


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a.conj() * b).sum(0).real


@dataclass(frozen=True)
class CG(LinearSolver):
    """Preconditioned conjugate gradients for symmetric positive definite ``A``:

    .. math::
        r_0 = b - A x_0,\\ z_0 = M^{-1} r_0,\\ p_0 = z_0;\\quad
        \\alpha_k = \\frac{r_k^T z_k}{p_k^T A p_k},\\ x_{k+1} = x_k + \\alpha_k p_k,\\
        r_{k+1} = r_k - \\alpha_k A p_k,\\ z_{k+1} = M^{-1} r_{k+1},\\
        p_{k+1} = z_{k+1} + \\frac{r_{k+1}^T z_{k+1}}{r_k^T z_k} p_k

    run on every column of ``b`` at once until ``||r_k|| <= max(tol * ||b||, atol)`` for all
    columns. Converged columns are frozen. Result codes: ``max_steps`` when a column did not
    converge within ``maxiter``; ``not_positive_definite`` when a column met ``p^T A p < 0``,
    ``breakdown`` for ``p^T A p = 0``; ``stagnation`` when the true residual misses the
    tolerance after the restarts below; ``non_finite`` for a non-finite result;
    ``not_symmetric`` for a dense operator not tagged symmetric whose matrix is not symmetric
    (checked in ``init``; matrix-free operators are trusted). ``init`` builds the
    preconditioner; ``compute`` runs CG for one ``b``.
    ``Solution.residual_norm`` is the true relative residual ``||b - A x|| / ||b||``.

    Scaling: CG runs on ``(A / s) y = b / beta`` with ``beta_j`` and ``s`` powers of two near
    ``||b_j||`` and ``||A v|| / ||v||`` (from the first product), and returns
    ``x = beta y / s``; the scaling is exact, and norms are computed without overflow or
    underflow, so a system scaled by ``10^{+-300}`` converges as the unscaled one does.
    Success is decided on the true residual ``b - A x``: when the recursive residual meets the
    tolerance but the true one does not, CG restarts from the true one (at most 3 times).

    The loop decides when to stop on the host: one sync every ``check_every`` iterations.

    Args:
        tol: relative tolerance on the residual (default 1e-5).
        atol: absolute tolerance (default 0).
        maxiter: at most this many iterations (default ``10 n``).
        preconditioner: ``M^{-1}``: None (identity), ``"jacobi"`` (``1 / diag(A)``, from
            ``operator.diagonal()``), a callable ``r -> M^{-1} r`` taking ``r`` shaped like
            ``b``, or a LinearOperator (its ``matvec``).
        x0: starting point shaped like ``b`` (default zeros).
        check_every: test convergence every this many iterations (default 1).
    """

    tol: float = 1e-5
    atol: float = 0.0
    maxiter: int | None = None
    preconditioner: Preconditioner = None
    x0: Tensor | None = None
    check_every: int = 1
    name = "cg"

    def __post_init__(self):
        if not self.tol >= 0 or not self.atol >= 0:
            raise ValueError(f"CG: tol={self.tol} and atol={self.atol} must be >= 0")
        if self.maxiter is not None and self.maxiter < 0:
            raise ValueError(f"CG: maxiter={self.maxiter} must be >= 0")
        if self.check_every < 1:
            raise ValueError(f"CG: check_every={self.check_every} must be >= 1")

    def needs_symmetric(self, operator: LinearOperator) -> bool:
        return isinstance(operator, DenseOperator)

    def _init(self, op: LinearOperator) -> CGState:
        if not op.square:
            raise ValueError(f"CG needs a square operator; got shape {op.shape}")
        apply_m = _preconditioner(self.preconditioner, op)
        asym: Tensor | bool = False
        if isinstance(op, DenseOperator):
            asym = ~symmetric_within_tolerance(op, op.A)
        return CGState(op, apply_m, result_code([(asym, Result.not_symmetric)], op.device))

    def _compute(self, state: CGState, b: Tensor) -> Solution:
        op, apply_m = state.operator, state.apply_m
        B = b if b.ndim == 2 else b[:, None]
        if not op.symmetric and isinstance(op, DenseOperator) and bool(state.result):  # host sync
            x = torch.zeros_like(b)
            its = torch.zeros((), dtype=torch.int64, device=b.device)
            return Solution(x, state.result, SolveStats(its, None), self.name)
        beta = _power_of_two(scaled_norm(B, dim=0))  # b_hat = b / beta has norm in [1, 2)
        mv = _Normalised(lambda v: op.matvec(v if b.ndim == 2 else v[:, 0]).reshape(B.shape))
        pre = lambda r: apply_m(r if b.ndim == 2 else r[:, 0]).reshape(B.shape)
        Bh = B / beta
        if self.x0 is None:
            y, r = torch.zeros_like(B), Bh.clone()
        else:  # y = x0 * s / beta, with s fixed by this first product
            x0 = self.x0.reshape(B.shape).to(B)
            Ax0 = mv(x0)
            y = x0 * mv.scale / beta
            r = Bh - Ax0 / beta
        bnorm = scaled_norm(Bh, dim=0)  # in [1, 2), or 0 for a zero column
        thresh = torch.maximum(self.tol * bnorm, torch.full_like(beta, self.atol) / beta)
        maxiter = 10 * op.shape[0] if self.maxiter is None else self.maxiter
        y, r_true, (broken, negative), it = self._iterate(mv, pre, Bh, y, r, thresh, maxiter)
        rnorm = scaled_norm(r_true, dim=0)
        converged = (rnorm <= thresh) & ~broken
        x = y * beta / mv.scale
        x = x if b.ndim == 2 else x[:, 0]
        missed = ~converged.all()
        finite = torch.isfinite(x).all() & torch.isfinite(rnorm).all()
        result = result_code([(~mv.finite, Result.non_finite),  # the operator's first product
                              (negative.any(), Result.not_positive_definite),
                              (broken.any(), Result.breakdown),
                              (~finite, Result.non_finite),
                              (missed & (it >= maxiter), Result.max_steps),
                              (missed, Result.stagnation)], b.device)
        zero_b = torch.where(rnorm > 0, torch.full_like(rnorm, float("inf")), torch.zeros_like(rnorm))
        rel = torch.where(bnorm > 0, rnorm / torch.where(bnorm > 0, bnorm, 1.0), zero_b).max()
        iterations = torch.tensor(it, dtype=torch.int64, device=b.device)
        return finished(x, result, self.name, SolveStats(iterations, rel))

    def _iterate(self, mv, pre, Bh, y, r, thresh, maxiter):
        """CG iterations on the normalised system; when the recursive residual meets the
        threshold, the true residual ``b - A y`` replaces it (at most ``_RESTARTS`` times) and the
        iteration restarts from it, so success is decided on the true residual."""
        z = pre(r)
        p, rz = z, _dot(r, z)
        broken = torch.zeros(Bh.shape[1], dtype=torch.bool, device=Bh.device)
        negative = broken  # columns that met p^T A p < 0 (A not positive definite)
        it, restarts, r_true = 0, 0, None
        while True:
            active = (scaled_norm(r, dim=0) > thresh) & ~broken
            done = it % self.check_every == 0 and not bool(active.any())
            if done or it >= maxiter:
                r_true = Bh - mv(y)
                if it >= maxiter or restarts >= _RESTARTS or not bool(
                        ((scaled_norm(r_true, dim=0) > thresh) & ~broken).any()):
                    return y, r_true, (broken, negative), it
                restarts += 1
                r = r_true
                z = pre(r)
                p, rz = z, _dot(r, z)
                continue
            Ap = mv(p)
            pAp = _dot(p, Ap)
            broken = broken | (active & ~(pAp > 0))
            negative = negative | (active & (pAp < 0))
            step = active & (pAp > 0)
            alpha = torch.where(step, rz / torch.where(step, pAp, torch.ones_like(pAp)), 0.0)
            y = y + alpha.to(Bh.dtype) * p
            r = r - alpha.to(Bh.dtype) * Ap
            z = pre(r)
            rz_new = _dot(r, z)
            beta = torch.where(step & (rz > 0), rz_new / torch.where(rz > 0, rz, torch.ones_like(rz)), 0.0)
            p = torch.where(step, z + beta.to(Bh.dtype) * p, p)
            rz = torch.where(step, rz_new, rz)
            it += 1


_RESTARTS = 3


def _power_of_two(t: Tensor) -> Tensor:
    """``2^e <= t < 2^(e+1)`` elementwise (1 where ``t`` is 0 or not finite): scaling by it is
    exact in floating point."""
    ok = (t > 0) & torch.isfinite(t)
    _, e = torch.frexp(torch.where(ok, t, torch.ones_like(t)))
    return torch.where(ok, torch.ldexp(torch.ones_like(t), e - 1), torch.ones_like(t))


class _Normalised:
    """``v -> A v / s``, ``s`` a power of two fixed by the first product as ``||A v|| / ||v||``
    (largest over columns), so CG's iterates stay in range for a tiny or huge ``A``. When that
    first product overflows, it is taken again on ``v`` shrunk by a power of two."""

    def __init__(self, mv: Callable[[Tensor], Tensor]):
        self.mv, self._shrink = mv, 1.0
        self._scale: Tensor | None = None
        self.finite = torch.ones((), dtype=torch.bool)  # the first product is finite

    @property
    def scale(self) -> Tensor:
        assert self._scale is not None, "s is fixed by the first product"
        return self._scale

    def __call__(self, v: Tensor) -> Tensor:
        if self._scale is not None:
            return self.mv(v * self._shrink) / self._scale / self._shrink
        Av = self.mv(v)
        if not bool(torch.isfinite(Av).all()):  # host sync, first product only: A v overflowed
            self._shrink = 2.0 ** -(int(math.log2(torch.finfo(v.dtype).max)) // 4)
            Av = self.mv(v * self._shrink)
        self.finite = torch.isfinite(Av).all()
        ratio = scaled_norm(Av, dim=0) / scaled_norm(v * self._shrink, dim=0)
        ratio = torch.where(torch.isnan(ratio), 0.0, ratio).clamp(max=torch.finfo(v.dtype).max)
        self._scale = _power_of_two(ratio.max())
        return Av / self._scale / self._shrink
