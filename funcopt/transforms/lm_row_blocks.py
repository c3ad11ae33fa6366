"""The Levenberg-Marquardt local model from row blocks of ``J``: the path of
``fo.solvers.CuPyNumeric(row_block=k)``, where ``J`` is formed ``k`` rows at a time
(:func:`funcopt.func.jacobian_row_blocks`) and never whole, its Gram sum built in cuPyNumeric
(:mod:`funcopt.solvers.cupynumeric_normal`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.func import jvp, vjp

from funcopt.func.row_blocks import jacobian_row_blocks
from funcopt.solvers.base import scaled_norm
from funcopt.solvers.krylov import _power_of_two
from funcopt.transforms.lm_damping import TrustRegion, _positive
from funcopt.transforms.lm_model import (
    _Local,
    _require_dtype,
    _require_finite_residuals,
    require_finite_columns,
    running_scale,
)

if TYPE_CHECKING:
    from funcopt.transforms.levenberg_marquardt import LMOptions

__all__: list[str] = []

Tensor = torch.Tensor


def linearize_row_blocks(residual_fn, params, args, state, o: LMOptions, x, f) -> _Local:
    """The dense model for ``CuPyNumeric(row_block=k)`` with ``J`` never whole in torch.

    :func:`funcopt.func.jacobian_row_blocks` forms ``k`` rows of ``J`` at a time (whole
    samples for per-sample residuals); each block, divided by a running power-of-two column
    scale ``c`` (:class:`_RowBlockPass`), goes to cuPyNumeric's Gram sum
    (:func:`funcopt.solvers.cupynumeric_normal.normal_equations`), adds to the
    column sums of squares and to ``J^T r / ||r||`` (the column norms for ``D`` and MINPACK's
    ``gnorm``, free of overflow as :func:`_column_stats_scaled`), and under the trust-region
    rule to a QR factor of ``[J | r / ||r||]`` (whose SVD gives :func:`_normalised_svd`'s
    numbers), then is dropped. ``J delta`` is one ``jvp`` of the residuals and ``J^T u``
    (other than ``u = r``) one ``vjp``. Raises on non-finite ``r`` or ``J``, as the dense path."""
    from funcopt.solvers import cupynumeric_normal as cnn

    if o.form == "dual":
        raise ValueError("CuPyNumeric(row_block=...) forms the primal n x n normal equations "
                         "J^T J; use form='auto' or 'primal', or a solver without row_block")
    r, blocks = jacobian_row_blocks(residual_fn, params, *args, rows=o.solver.row_block,
                                    mode=o.jacobian_mode)
    _require_dtype(r, x)
    _require_finite_residuals(torch.isfinite(r).all())
    rnorm = scaled_norm(r)
    acc = _RowBlockPass(x, r / _positive(rnorm), isinstance(o.rule, TrustRegion))
    normal = cnn.normal_equations(acc.feed(blocks))
    col, cos = acc.column_stats(rnorm)  # raises on a non-finite J
    lam = state.damping
    if o.scaling:
        d, kept = running_scale(state.scale, col, state.count == 0)
        S = d
    else:
        d, S = torch.ones_like(x), None
        start = o.rule.initial_damping * (col * col).max()
        lam = torch.where((state.count == 0) & (start > 0), start, lam)
    svd = acc.svd(d) if isinstance(o.rule, TrustRegion) else None
    top = acc.colmax if S is None else acc.colmax / S
    gamma = _power_of_two(top.max()) if top.numel() else x.new_ones(())
    t = acc.c / gamma if S is None else acc.c / S / gamma
    g_r = t * acc.gu * (rnorm / gamma)  # Jh^T (r / gamma), Jh = J S^{-1} / gamma

    def rhs(u: Tensor) -> Tensor:
        if u is r:
            return g_r
        v = vjp(f, x)[1](u / gamma)[0]
        return v / gamma if S is None else v / S / gamma

    factor, solve = cnn.gram_damped_solver(normal, t, gamma, S, rhs)
    jv = lambda v: jvp(f, (x,), (v,))[1]  # noqa: E731
    return _Local(x, f, r, rnorm, d, cos, lam, factor, solve, jv, svd,
                  scale=kept if o.scaling else -d, options=o)  # -1: "D = I" (lm_model)


class _RowBlockPass:
    """One pass over the row blocks ``J_k`` of :func:`linearize_row_blocks`, keeping
    ``n``-vectors only (and an ``(n + 1)``-column QR factor when ``qr``): the running column
    scale ``c`` (a power of two above ``max_i |J_ij|``, at most the dtype's largest power of
    two ``2^e_max``, so ``|J_ij / c_j| < 2``; 0 for a column all zero so far),
    ``colmax = max_i |J_ij|``, ``ssq = sum_i (J_ij / c_j)^2`` and ``gu = (J / c)^T u``.
    When a block raises ``c``, the sums so far are multiplied by ``f = c_old / c_new``
    (exact), as the Gram sum in cuPyNumeric is."""

    def __init__(self, x: Tensor, u: Tensor, qr: bool) -> None:
        n = x.numel()
        self.u, self.qr, self.row = u, qr, 0
        self.c, self.colmax, self.ssq, self.gu = (x.new_zeros(n) for _ in range(4))
        self.finite = torch.ones((), dtype=torch.bool, device=x.device)
        self.stack = x.new_zeros(0, n + 1)

    def feed(self, blocks):
        """Yields ``(J_k / c, None, f)`` for
        :func:`funcopt.solvers.cupynumeric_normal.normal_equations` (``f`` rescales its sum)."""
        top = _power_of_two(torch.full_like(self.c, torch.finfo(self.c.dtype).max))
        for J in blocks:
            a = J.abs().amax(0) if J.shape[0] else torch.zeros_like(self.c)
            ok = torch.isfinite(a)
            self.finite = self.finite & ok.all()
            a = torch.where(ok, a, 0.0)
            up = torch.minimum(2.0 * _power_of_two(a), top)  # 2 2^e_max would be inf
            c = torch.maximum(self.c, torch.where(a > 0, up, 0.0))
            f = torch.where(self.c > 0, self.c / torch.where(c > 0, c, 1.0), 1.0)
            B = J / torch.where(c > 0, c, 1.0)
            uk = self.u[self.row:self.row + J.shape[0]]
            self.ssq = self.ssq * (f * f) + (B * B).sum(0)
            self.gu = self.gu * f + uk @ B
            self.colmax, self.c, self.row = torch.maximum(self.colmax, a), c, self.row + J.shape[0]
            if self.qr:
                self._reduce(B, uk, f)
            yield B, None, f

    def _reduce(self, B: Tensor, uk: Tensor, f: Tensor) -> None:
        """``stack = [stack diag(f, 1); B, u_k]``, QR-reduced to its ``R`` once it holds more
        than ``2 (n + 1)`` rows (an ``(n + 1)``-column factor of ``[J / c | u]``)."""
        self.stack = torch.cat([self.stack * torch.cat([f, f.new_ones(1)]),
                                torch.cat([B, uk[:, None]], 1)])
        if self.stack.shape[0] > 2 * self.stack.shape[1]:
            self.stack = torch.linalg.qr(self.stack, mode="r").R

    def column_stats(self, rnorm: Tensor) -> tuple[Tensor, Tensor]:
        """Column norms ``c sqrt(ssq)`` and ``gnorm = max_j |gu_j| / sqrt(ssq_j)`` over the
        nonzero columns (as :func:`_column_stats_scaled`); raises on a non-finite ``J`` and,
        as the dense path, on a column whose norm exceeds the dtype (naming it)."""
        cs = self.ssq.sqrt()
        col = self.c * cs
        if not bool(self.finite & torch.isfinite(col).all()):  # host sync
            _require_finite_residuals(self.finite)
            require_finite_columns(col)
        cos = torch.where((col > 0) & (rnorm > 0), self.gu.abs() / torch.where(cs > 0, cs, 1.0),
                          0.0)
        return col, cos.max() if cos.numel() else torch.zeros_like(rnorm)

    def svd(self, d: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """:func:`_normalised_svd` of ``J / d`` and ``u`` from the QR factor ``[R | Q^T u]``
        of ``[J / c | u]``: ``J / d = Q R diag(c / d)``, so its singular values and
        ``U^T u`` are those of ``R diag(c / d)`` and ``U_R^T (Q^T u)``."""
        R = torch.linalg.qr(self.stack, mode="r").R
        n = d.numel()
        U, sv, _ = torch.linalg.svd(R[:, :n] * (torch.where(self.c > 0, self.c, 1.0) / d),
                                    full_matrices=False)
        sigma = _positive(sv.max() if sv.numel() else d.new_ones(()))
        sh = sv / sigma
        return sh, sh * (U.T @ R[:, n]), sigma
