"""Matrix-free conjugate gradients, optionally preconditioned.

Only ``operator.matvec`` is used, so the operator may be a Gram form (two products with
``J``), a Gauss-Newton-vector product from ``torch.func.jvp``/``vjp``, or a dense matrix.
Reference: Hestenes & Stiefel (1952), "Methods of conjugate gradients for solving linear
systems"; preconditioned form as in Saad, *Iterative Methods for Sparse Linear Systems*
(2nd ed.), Algorithm 9.1; the same defaults as ``scipy.sparse.linalg.cg`` (rtol 1e-5,
at most 10 n iterations).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from funcopt.solvers.base import (
    LinearOperator,
    LinearSolver,
    Solution,
    finite_or_zero,
    relative_residual,
)

__all__ = ["CG"]

Preconditioner = Callable[[Tensor], Tensor] | LinearOperator | str | None


def _preconditioner(spec: Preconditioner, op: LinearOperator) -> Callable[[Tensor], Tensor]:
    if spec is None:
        return lambda r: r
    if isinstance(spec, LinearOperator):
        return spec.matvec
    if spec == "jacobi":
        d = op.diagonal()
        inv = torch.where(d > 0, 1.0 / torch.where(d > 0, d, torch.ones_like(d)), torch.ones_like(d))
        return lambda r: (inv if r.ndim == 1 else inv[:, None]) * r
    if callable(spec):
        return spec
    raise ValueError(f"CG: preconditioner must be None, 'jacobi', a callable r -> M^{{-1}} r or a "
                     f"LinearOperator; got {spec!r}")


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
    columns. Converged columns are frozen. ``success`` is False when a column did not converge
    within ``maxiter`` or met ``p^T A p <= 0`` (``A`` not positive definite).
    ``Solution.residual_norm`` is the true relative residual ``||b - A x|| / ||b||``.

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

    def _solve(self, op: LinearOperator, b: Tensor) -> Solution:
        if not op.square:
            raise ValueError(f"CG needs a square operator; got shape {op.shape}")
        apply_m = _preconditioner(self.preconditioner, op)
        B = b if b.ndim == 2 else b[:, None]
        mv = lambda v: op.matvec(v if b.ndim == 2 else v[:, 0]).reshape(B.shape)
        pre = lambda r: apply_m(r if b.ndim == 2 else r[:, 0]).reshape(B.shape)
        x = torch.zeros_like(B) if self.x0 is None else self.x0.reshape(B.shape).to(B)
        r = B - mv(x) if self.x0 is not None else B.clone()
        z = pre(r)
        p, rz = z, _dot(r, z)
        thresh = torch.clamp(self.tol * torch.linalg.vector_norm(B, dim=0), min=self.atol)
        broken = torch.zeros(B.shape[1], dtype=torch.bool, device=B.device)
        maxiter = 10 * op.shape[0] if self.maxiter is None else self.maxiter
        it = 0
        while True:
            active = (torch.linalg.vector_norm(r, dim=0) > thresh) & ~broken
            if it >= maxiter or (it % self.check_every == 0 and not bool(active.any())):
                break
            Ap = mv(p)
            pAp = _dot(p, Ap)
            broken = broken | (active & ~(pAp > 0))
            step = active & (pAp > 0)
            alpha = torch.where(step, rz / torch.where(step, pAp, torch.ones_like(pAp)), 0.0)
            x = x + alpha.to(B.dtype) * p
            r = r - alpha.to(B.dtype) * Ap
            z = pre(r)
            rz_new = _dot(r, z)
            beta = torch.where(step & (rz > 0), rz_new / torch.where(rz > 0, rz, torch.ones_like(rz)), 0.0)
            p = torch.where(step, z + beta.to(B.dtype) * p, p)
            rz = torch.where(step, rz_new, rz)
            it += 1
        converged = (torch.linalg.vector_norm(r, dim=0) <= thresh) & ~broken
        x = x if b.ndim == 2 else x[:, 0]
        x, success = finite_or_zero(x, converged.all())
        iterations = torch.tensor(it, dtype=torch.int64, device=b.device)
        return Solution(x, success, self.name, iterations, relative_residual(op, x, b))
