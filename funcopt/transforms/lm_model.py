"""The local Gauss-Newton model of :func:`funcopt.levenberg_marquardt` (eager path).

At ``x`` with residuals ``r`` and Jacobian ``J`` (dense, or products only on the matrix-free
path), ``(J^T J + lambda D) delta = -J^T r`` is factorised once per damping and solved through
:mod:`funcopt.solvers`; trial points and MINPACK's relative reductions of ``0.5 ||r||^2``."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch.func import jvp

from funcopt.func.jacobian import (
    _jacobian,
    gauss_newton_products,
    ravel_params,
    residual_vector_fn,
)
from funcopt.solvers import Auto, Lstsq, get
from funcopt.solvers.base import scaled_norm
from funcopt.solvers.damped import (
    DirectDamped,
    direct_damped,
    direct_damped_solve,
    direct_supported,
    matrix_free_factor,
    matrix_free_solve,
    wants_jacobi,
)
from funcopt.solvers.operators import max_and_norm
from funcopt.transforms import lm_damping
from funcopt.transforms.lm_damping import TrustRegion, _positive, power_of_two_host, read_host

if TYPE_CHECKING:
    from funcopt.transforms.levenberg_marquardt import LMOptions

__all__ = ["damped_gauss_newton_step", "column_norms_sq"]

Tensor = torch.Tensor


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
    factor, solve, _ = _damped_solver(J, None if diag is None else torch.sqrt(diag), solver,
                                      form)
    return solve(factor(damping), r)


def _damped_solver(J: Tensor, scale: Tensor | None, solver: Any, form: str,
                   bound: Tensor | None = None, overwrite: bool = False):
    """``(factor, solve, jv)`` for one ``J``: ``factor(lambda)`` factorises
    ``J^T J + lambda S^2`` once (``scale`` = ``S`` = ``sqrt(diag(D))``, None for ``D = I``),
    ``solve(state, u) = (-(J^T J + lambda S^2)^{-1} J^T u, success)`` reuses it, in the scaled
    variables ``z = S delta`` of :class:`funcopt.solvers.DampedLeastSquares` (which forms the
    Gram matrix once per ``J``), and ``jv(v) = J v``. ``bound`` and ``overwrite`` go to its
    ``plan``: with ``overwrite`` the plan divides ``J`` in place and ``jv`` multiplies its
    ``J S^{-1} / gamma`` by ``gamma S v``."""
    from funcopt import solvers

    if getattr(solver, "row_block", None) is not None:  # CuPyNumeric(row_block=k): J^T J there
        from funcopt.solvers.cupynumeric_normal import damped_normal_solver

        return (*damped_normal_solver(J, scale, solver.row_block, form), lambda v: J @ v)
    dls = solvers.DampedLeastSquares(solver, form)
    plan = dls.plan(J, scale=scale, bound=bound, overwrite=overwrite)

    def solve(state, u: Tensor) -> tuple[Tensor, Tensor]:
        return _negated(dls.compute(state, u), J.dtype)

    def jv(v: Tensor) -> Tensor:
        if not overwrite:
            return J @ v
        return plan.J @ (v if scale is None else scale * v) * plan.gamma

    return (lambda lam: dls.init(plan, lam)), solve, jv


def _negated(sol, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(-x, success)`` of a :class:`funcopt.solvers.Solution`, ``x`` in ``dtype``."""
    return -sol.value.to(dtype), sol.success


def _is_matrix_free(solver: Any) -> bool:
    """Whether ``solver`` only needs products with ``J`` (conjugate gradients)."""
    from funcopt import solvers

    return solver in ("cg", "pcg") or isinstance(solver, solvers.CG)


def column_norms_sq(gn, chunk: int | None = None) -> Tensor:
    """``diag(J^T J)`` exactly, from the cheaper side, never forming ``J``.

    With ``m`` residuals and ``n`` parameters: when ``m < n``, ``diag(J^T J) = sum_i
    (J^T e_i)^2`` from the ``m`` rows of ``J`` (vector-Jacobian products); otherwise
    ``diag(J^T J)_j = ||J e_j||^2`` from the ``n`` columns (Jacobian-vector products). So it
    costs ``min(m, n)`` products. They run vectorised, ``chunk`` at a time (None:
    :data:`JACOBI_CHUNK`): a chunk holds its one-hot vectors and its products, ``chunk (m +
    n)`` numbers, and ``chunk`` times the intermediate values of one product (which the memory
    model of :func:`funcopt.least_squares` does not count for CG's products either); only the
    chunk's one-hot vectors are built, never an identity of size ``n``.
    """
    m, n = gn.residuals.numel(), gn.size
    dtype, dev = gn.residuals.dtype, gn.residuals.device
    rows = m < n
    side, product = (m, gn.vjp) if rows else (n, gn.jvp)
    k = max(1, min(JACOBI_CHUNK if chunk is None else chunk, side))
    out = torch.zeros(n, dtype=dtype, device=dev)
    for s in range(0, side, k):
        c = min(k, side - s)
        idx = torch.arange(c, device=dev)
        onehot = torch.zeros(c, side, dtype=dtype, device=dev)
        onehot[idx, idx + s] = 1.0
        p = torch.func.vmap(product)(onehot)  # (c, n) rows or (c, m) columns
        if rows:
            out += (p * p).sum(0)
        else:
            out[s:s + c] = (p * p).sum(1)
    return out


JACOBI_CHUNK = 32
"""Products per vectorised chunk of :func:`column_norms_sq` by default. On the MLP of
``benchmarks/lm_scale.py`` (n = 2041, m = 512, CPU, one thread) the 512 rows took 653 ms one
at a time, 223 ms in chunks of 8, 186 ms in chunks of 32, 240 ms of 128 and 343 ms all at once."""


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
    factor: Callable[[Any], Any] | None  # None with ``direct``
    solve: Callable[[Any, Tensor], tuple[Tensor, Tensor]] | None
    jv: Callable[[Tensor], Tensor]
    svd: tuple[Tensor, Tensor, Tensor] | None = None  # trust-region rule, see _normalised_svd
    host: list | None = None  # (||r||, lambda, nu, radius, first step), see read_host
    direct: DirectDamped | None = None  # the Cholesky solve with no host read
    gamma: float = 1.0  # the power of two that scales J for ``direct``
    unravel: Callable[[Tensor], Any] | None = None  # of ravel_params(params)
    scale: Tensor | None = None  # the running maximum kept in the state (see running_scale)
    options: Any = None  # the LMOptions, scaling decided (resolve_scaling)


def running_scale(scale: Tensor, col: Tensor, first: Tensor) -> tuple[Tensor, Tensor]:
    """MINPACK's ``diag`` as ``(d, kept)``: ``kept`` the column norms ``col`` on the first
    step, else the running maximum ``max(scale, col)`` (``scale`` the state's ``kept``);
    ``d`` the same with 1 for a column zero so far. MINPACK keeps the 1 in its maximum, so a
    column that is zero at the start and then stays below 1 (residuals of a small scale) kept
    the scale 1 and a step too short for it; here the maximum runs over the norms alone."""
    kept = torch.where(first, col, torch.maximum(scale, col))
    return torch.where(kept > 0, kept, 1.0), kept


def check_state(scale: Tensor, x: Tensor) -> None:
    """ValueError unless the state's ``scale`` (one number per parameter) fits the raveled
    params ``x`` in number and dtype: a state of another dtype failed deep inside the step
    (a RuntimeError of mixed dtypes) or, where they promote, gave a state of another dtype."""
    if scale.shape != x.shape:
        raise ValueError(
            f"state holds {scale.numel()} parameters but params have {x.numel()}; "
            "pass the state made by init for these params")
    if scale.dtype != x.dtype:
        raise ValueError(
            f"levenberg_marquardt got a {scale.dtype} state for {x.dtype} params; pass the "
            "state made by init for these params (or cast the state's floating-point tensors)")


def _require_finite_residuals(ok: Tensor) -> None:
    if not bool(ok):  # host sync
        raise ValueError(
            "residual_fn gave non-finite residuals or Jacobian at the current parameters; "
            "start from parameters where the model is finite"
        )


def _linearize(residual_fn, params, args, state, o: LMOptions) -> _Local:
    """The local model at ``params``; raises on non-finite ``r`` or ``J``. The dense path
    reads the numbers the step decides on (:func:`_read`) once, with the column statistics'
    check; with a Cholesky solver (or "auto") it solves with no other host read
    (:func:`funcopt.solvers.damped.direct_damped`)."""
    x, unravel = ravel_params(params)
    check_state(state.scale, x)
    f = residual_vector_fn(residual_fn, unravel, *args)
    if o.matrix_free:
        return _linearize_matrix_free(residual_fn, params, args, state, o, x, f)
    if getattr(o.solver, "row_block", None) is not None:  # CuPyNumeric(row_block=k)
        from funcopt.transforms.lm_row_blocks import linearize_row_blocks

        return linearize_row_blocks(residual_fn, params, args, state, o, x, f)
    J, r = _jacobian(residual_fn, params, args, o.jacobian_mode, o.chunk_size,
                     raveled=(x, unravel))
    _require_dtype(r, x)
    auto, o = o.scaling is None, lm_damping.resolve_scaling(o, r.numel(), x.numel())
    rmax, rnorm = max_and_norm(r)
    stats = _column_stats_unchecked(J, r, rnorm, rmax)
    first, plain = state.count == 0, (state.scale[:1] < 0).any()  # plain: D = I so far
    while True:
        col, cos, checks = stats
        d, S, lam, kept = _scaling(col, state, o, first)
        # max_j ||J_j|| / S_j bounds max |J S^{-1}| within sqrt(m)
        bound = (col if S is None else col / S).max() if col.numel() else col.new_ones(())
        smin, smax = torch.aminmax(S) if S is not None and S.numel() else (bound, bound)
        vals = read_host(rnorm, lam, state, o.rule, d, x, bound, smin, smax, rmax, plain,
                         *checks, scaling=bool(o.scaling), first=first)  # resolved above
        host, (bound_h, smin_h, smax_h, rmax_h, plain_h), checks_h = (vals[:5], vals[5:10],
                                                                      vals[10:])
        if auto and not host[4] and plain_h == o.scaling:  # keep the first step's choice
            o = replace(o, scaling=not plain_h)
            continue
        if _checks_hold(checks_h, rmax_h, J):
            break
        stats = (*_column_stats_scaled(J, r, rnorm), ())  # raises on a non-finite r or J
    gamma = power_of_two_host(bound_h)
    svd = _normalised_svd(J / d, r, rnorm) if isinstance(o.rule, TrustRegion) else None
    if J.requires_grad or not J.is_contiguous():
        J = J.detach().contiguous()  # no expanded (stride 0) rows
    if o.geodesic is None and direct_supported(o.solver, J):
        T, info = type(gamma), torch.finfo(J.dtype)
        one = S is None or (smin_h * gamma >= T(info.tiny) and smax_h * gamma <= T(info.max))
        rcond = getattr(get(o.solver), "rcond", None)
        dd = direct_damped(J, r, S, float(gamma), one, o.form, rcond, rmax_h)
        return _Local(x, f, r, rnorm, d, cos, lam, None, None, dd.jv, svd, host, dd,
                      float(gamma), unravel, kept, o)
    # J is ours to overwrite (then J v comes from the scaled J), except that geodesic
    # acceleration keeps it: its finite difference subtracts J v, reproduced to the last bit
    factor, solve, jv = _damped_solver(J, S, o.solver, o.form, bound,
                                       overwrite=o.geodesic is None)
    return _Local(x, f, r, rnorm, d, cos, lam, factor, solve, jv, svd, host, unravel=unravel,
                  scale=kept, options=o)


def _scaling(col: Tensor, state, o: LMOptions,
             first: Tensor) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """``(d, S, lambda, kept)``: the scaling ``d`` (MINPACK's running maximum of the column
    norms ``col``, or ones), the solver's column scale ``S`` (``d`` or None), the damping (the
    state's, or ``tau max diag(J^T J)`` on the first step without scaling) and the scale the
    state keeps (:func:`running_scale`); ``first`` is ``state.count == 0``."""
    if o.scaling:
        d, kept = running_scale(state.scale, col, first)
        return d, d, state.damping, kept
    start = o.rule.initial_damping * (col * col).max()
    ones = torch.ones_like(col)  # the state keeps -1: "D = I", read by scaling=None
    return ones, None, torch.where(first & (start > 0), start, state.damping), -ones


def _linearize_matrix_free(residual_fn, params, args, state, o: LMOptions, x, f) -> _Local:
    """The local model without ``J``: products by :func:`gauss_newton_products`. When the
    scaling or the Jacobi preconditioner asks for ``col2 = diag(J^T J)``
    (:func:`column_norms_sq`, ``min(m, n)`` products), it also gives the column norms for
    ``D`` (as the dense path's) and MINPACK's ``gnorm = max_j |(J^T r)_j| / (||J_j|| ||r||)``
    (one more product); without it ``D = I`` and ``gnorm`` is ``inf`` (unknown)."""
    gn = gauss_newton_products(residual_fn, params, *args)
    r = gn.residuals
    _require_dtype(r, x)
    _require_finite_residuals(torch.isfinite(r).all())
    rnorm = scaled_norm(r)
    cos = torch.full((), float("inf"), dtype=x.dtype, device=x.device)
    col2 = column_norms_sq(gn, o.chunk_size) if (o.scaling or wants_jacobi(o.solver)) else None
    d, kept = torch.ones_like(x), -torch.ones_like(x)  # -1: "D = I" (as _scaling's)
    if col2 is not None:
        col, cos = col2.sqrt(), _gradient_cosine(gn, col2, rnorm)
        if o.scaling:
            d, kept = running_scale(state.scale, col, state.count == 0)
            d = torch.where(torch.isfinite(d), d, torch.ones_like(d))  # col2 overflowed
            kept = torch.where(torch.isfinite(kept), kept, torch.zeros_like(kept))
    d2 = d * d
    factor = lambda lam_: matrix_free_factor(gn, lam_, o.solver, d2, col2)
    solve = lambda factored, u: matrix_free_solve(gn, factored, u)
    return _Local(x, f, r, rnorm, d, cos, state.damping, factor, solve, gn.jvp,
                  scale=kept, options=o)


def _gradient_cosine(gn, col2: Tensor, rnorm: Tensor, x: Tensor | None = None,
                     rel: float | None = None) -> Tensor:
    """MINPACK's ``gnorm = max_j |(J^T r)_j| / (||J_j|| ||r||)`` over the nonzero columns
    from ``col2 = diag(J^T J)`` and one product; ``inf`` (unknown) where a number overflows.
    With ``x``, only over the columns whose one-dimensional Gauss-Newton move ``|alpha_j| =
    |J_j^T r| / ||J_j||^2`` is at least ``rel |x_j|`` (default ``eps``; see
    :func:`stationarity_floor`)."""
    col = col2.sqrt()
    g = gn.vjp(gn.residuals / _positive(rnorm))  # J^T r / ||r||: no overflow for large r
    live = col > 0
    safe = torch.where(live, col, 1.0)
    if x is not None:  # |alpha_j| without overflow in J^T r
        rel = torch.finfo(x.dtype).eps if rel is None else rel
        live = live & ((g.abs() / safe) * (rnorm / safe) > rel * x.abs())
    ratio = torch.where(live, g.abs() / safe, 0.0)
    known = torch.isfinite(col).all() & torch.isfinite(ratio).all()
    top = ratio.max() if ratio.numel() else torch.zeros((), dtype=col.dtype, device=col.device)
    return torch.where(known, top, torch.full_like(top, float("inf")))


def _require_dtype(r: Tensor, x: Tensor) -> None:
    if r.dtype != x.dtype:
        raise TypeError(
            f"residual_fn returned {r.dtype} residuals for {x.dtype} parameters; the residuals "
            f"must have the parameters' dtype: return r.to({x.dtype}) or pass {r.dtype} parameters"
        )


def _normalised_svd(Jt: Tensor, r: Tensor, rnorm: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(s / sigma, (s / sigma) * U^T r / ||r||, sigma)`` for ``Jt = U diag(s) V^T`` and
    ``sigma = max s``: the trust-region damping is found on these O(1) numbers (see
    :func:`funcopt.transforms.lm_damping.trust_region_damping`), whatever the scale of ``J`` and ``r``."""
    U, sv, _ = torch.linalg.svd(Jt, full_matrices=False)
    sigma = _positive(sv.max() if sv.numel() else torch.ones((), dtype=Jt.dtype, device=Jt.device))
    sh = sv / sigma
    return sh, sh * (U.T @ (r / _positive(rnorm))), sigma


def _column_stats_unchecked(J: Tensor, r: Tensor, rnorm: Tensor, rmax: Tensor
                            ) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
    """``(col, gnorm, checks)``: the column norms of ``J`` and MINPACK's
    ``gnorm = max_j |J_j^T r| / (||J_j|| ||r||)`` with no host read, good where
    :func:`_checks_hold` holds for the host values of ``checks`` and ``rmax = max |r|``. A
    ``J`` of more than :data:`COLUMN_BLOCK` numbers is read once, in blocks of rows
    (:func:`_rows_per_block`; squares summed, times ``r / ||r||``, no copy of ``J``);
    ``checks = (lo, hi)``, the extreme sums of squares of nonzero columns, which may have lost
    digits outside ``[m tiny / eps, max]``. Else ``checks = (ok,)`` of
    :func:`_column_stats_scaled`."""
    m, n = J.shape
    if J.numel() <= COLUMN_BLOCK:
        col, cos, ok = _column_stats_scaled(J, r, rnorm, check=False)
        return col, cos, (ok,)
    k = _rows_per_block(m, n, J.device)
    # r / _positive(rnorm) where the checks hold (r finite; 0 / 0 for r = 0), one op fewer
    u = (r / rnorm.nan_to_num(1.0, 1.0, 1.0)).nan_to_num(0.0)
    if k >= m:  # one block
        col2, big, g = (J * J).sum(0), torch.linalg.vector_norm(J, float("inf"), dim=0), u @ J
    else:
        col2, big, g = J.new_zeros(n), J.new_zeros(n), J.new_zeros(n)
        for i in range(0, m, k):
            block = J[i:i + k]
            col2 += (block * block).sum(0)
            big = torch.maximum(big, torch.linalg.vector_norm(block, float("inf"), dim=0))
            g += u[i:i + k] @ block
    # a zero column (big = 0) is measured exactly; NaN anywhere makes lo, hi or rmax NaN
    lo, hi = torch.aminmax(col2.masked_fill(big == 0, _lowest_sum(m, J.dtype)))
    col = col2.sqrt()
    # where the checks hold, col_j >= sqrt(m tiny / eps) > tiny or col_j = g_j = 0
    cos = torch.linalg.vector_norm(g / col.clamp_min(torch.finfo(J.dtype).tiny), float("inf"))
    return col, cos, (lo, hi)


def _rows_per_block(m: int, n: int, device: torch.device) -> int:
    """Rows per block: on the CPU :data:`COLUMN_BLOCK` numbers (>= m / 32 rows), else 2^23."""
    return max(1, COLUMN_BLOCK // n, -(-m // 32)) if device.type == "cpu" else max(1, 2**23 // n)


@functools.lru_cache(maxsize=64)
def _lowest_sum(m: int, dtype: torch.dtype) -> float:
    info = torch.finfo(dtype)  # m tiny / eps, rounded to dtype (as the device compares it)
    return float(torch.tensor(m * info.tiny / info.eps, dtype=dtype))


def _checks_hold(checks: list, rmax: Any, J: Tensor) -> bool:
    """Whether host values of :func:`_column_stats_unchecked`'s ``checks`` keep its numbers:
    ``[ok]``, ``[]`` (known good), or ``[lo, hi]`` with ``lo >= m tiny / eps`` and ``hi,
    rmax <= max``."""
    if len(checks) < 2:
        return all(checks)
    (lo, hi), T, top = checks, type(rmax), torch.finfo(J.dtype).max
    return bool(lo >= T(_lowest_sum(J.shape[0], J.dtype)) and hi <= T(top) and rmax <= T(top))


COLUMN_BLOCK = 2**17
"""Numbers of ``J`` per block of rows in :func:`_column_stats_unchecked` (512 KiB in float32):
on the MLP of ``benchmarks/lm_scale.py`` (m = 512, n = 10^4, float32, CPU) 3.5-3.9 ms a pass (3.0-4.2
in blocks of 13-64 rows) against 30-33 ms for :func:`_column_stats_scaled` (a copy of ``J``)."""


def require_finite_columns(col: Tensor) -> None:
    """ValueError naming the first column of ``J`` whose norm ``col_j`` is not finite (beyond
    the dtype's largest number) and the fix; one host sync."""
    bad = ~torch.isfinite(col)
    if bool(bad.any()):
        j = int(torch.nonzero(bad)[0])
        raise ValueError(
            f"column {j} of the Jacobian has a norm beyond the largest {col.dtype} number: the "
            "scaling, the damping and the stopping tests cannot be computed; rescale that "
            "parameter (or the residuals) so its derivatives are smaller")


def _column_stats_scaled(J: Tensor, r: Tensor, rnorm: Tensor, check: bool = True):
    """:func:`_column_stats_unchecked`'s numbers from a copy of ``J`` whose columns are
    divided by their largest magnitudes ``s_j`` first (as :func:`scaled_norm`): ``||J_j|| = s_j ||J_j / s_j||`` and
    ``gnorm_j = |(J_j / s_j)^T (r / ||r||)| / ||J_j / s_j||``, so no square or product
    overflows, and none that matters underflows. ``check=False``: no host read, and
    ``(col, gnorm, ok)`` with ``ok`` False where ``r`` or a column norm is not finite."""
    s = torch.linalg.vector_norm(J, float("inf"), dim=0) if J.shape[0] else J.new_zeros(J.shape[1])
    Js = J / torch.where(s > 0, s, 1.0)
    cs = (Js * Js).sum(0).sqrt()  # in [1, sqrt(m)] for a nonzero column
    col = cs * torch.where(s > 0, s, 1.0)
    ok = torch.isfinite(r).all() & torch.isfinite(col).all()  # col is NaN or inf where s is
    if check and not bool(ok):  # host sync
        _require_finite_residuals(torch.isfinite(r).all() & torch.isfinite(s).all())
        require_finite_columns(col)
    g = (r / _positive(rnorm)) @ Js / _positive(cs)
    cos = torch.where((col > 0) & (rnorm > 0), g.abs(), 0.0)
    cos = cos.max() if cos.numel() else torch.zeros((), dtype=J.dtype, device=J.device)
    return (col, cos) if check else (col, cos, ok)


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


def _propose(loc: _Local, lam: Any, o: LMOptions, generic: bool = False):
    """``(delta, step, J delta, ok, solved)``: the step at the damping ``lam`` (a host
    number), with the geodesic correction when asked; ``ok`` says it may be tried, ``solved``
    that its linear solves succeeded (``ok`` is also False for a geodesic correction that is
    too large or not finite). ``J^T J + lambda D`` is factorised once; the correction reuses
    the factorisation. ``generic``: solve ``loc.direct``'s system by the named solver."""
    factor, solve = loc.factor, loc.solve
    if loc.direct is not None or factor is None or solve is None:
        assert loc.direct is not None
        lam_h = lam / type(lam)(loc.gamma) / type(lam)(loc.gamma)
        singular = lam_h == 0 and lm_damping.singular_gauss_newton(loc.svd)
        if singular and not isinstance(get(o.solver), Auto):  # e.g. "cholesky": no step
            delta, no = torch.zeros_like(loc.x), torch.zeros_like(loc.rnorm, dtype=torch.bool)
            return delta, delta, loc.jv(delta), no, no
        if not generic and not singular and 0 <= lam_h < math.inf:
            delta, ok = direct_damped_solve(loc.direct, float(lam_h))
            return delta, delta, loc.jv(delta), ok, ok
        from funcopt.solvers import DampedLeastSquares

        dls = DampedLeastSquares(Lstsq() if singular else o.solver, o.form)
        plan = loc.direct.plan(loc.gamma < 2.0 ** -100)
        factor = lambda lam_: dls.init(plan, lam_)  # noqa: E731
        solve = lambda st, u: _negated(dls.compute(st, u), u.dtype)  # noqa: E731
    factored = factor(float(lam))
    delta, ok = solve(factored, loc.r)
    solved = ok
    Jd = loc.jv(delta)
    step = delta
    if o.geodesic is not None:
        rvv = _second_derivative(loc.f, loc.x, loc.r, delta, Jd, o.geodesic.fd_step)
        finite = torch.isfinite(rvv).all()
        a, ok_a = solve(factored, torch.where(finite, rvv, torch.zeros_like(rvv)))
        dn = scaled_norm(loc.d * delta)
        small = 2.0 * scaled_norm(loc.d * a) <= o.geodesic.alpha * dn
        solved = ok & ok_a
        ok = solved & finite & small
        step = delta + 0.5 * a
    return delta, step, Jd, ok, solved


def _evaluate(f: Callable[[Tensor], Tensor], x_new: Tensor, shape: torch.Size) -> Tensor:
    """``||r(x_new)||``, ``inf`` where the residuals are not finite (:func:`trial_residuals`)."""
    n = scaled_norm(trial_residuals(f, x_new, shape))
    return torch.where(torch.isfinite(n), n, torch.full_like(n, float("inf")))


def trial_residuals(f: Callable[[Tensor], Tensor], x_new: Tensor, shape: torch.Size) -> Tensor:
    """``r(x_new)`` (no gradient), checked to have the current residuals' ``shape``."""
    with torch.no_grad():
        r_new = f(x_new)
    if r_new.shape != shape:
        raise ValueError(
            f"residual_fn returned {tuple(r_new.shape)} residuals at a candidate point but "
            f"{tuple(shape)} at the current one; it must return the same number every call")
    return r_new
