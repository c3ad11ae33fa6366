"""The least-squares drivers' last check: a probe of the cost along parameters whose Jacobian
column is zero.

Gauss-Newton's model ``0.5 ||r + J delta||^2`` has no curvature along a parameter ``j`` whose
column ``J_j`` is zero: its gradient ``J_j^T r`` is zero, the gtol test reads the column's
cosine ``0 / 0`` as zero, and no step moves ``x_j``, so MINPACK's tests hold at such a point
whether it is a minimum of the cost along ``e_j`` or a maximum (``r(a) = a^2 - 1`` at ``a =
0``; ``cos a`` at 0). Before a fit with ``r != 0`` ends with success, the drivers evaluate the
cost at ``x +- h e_j`` for each zero column, ``h = eps^(1/4) max(1, |x_j|)`` (``eps`` of the
dtype): where it falls, the point is not a minimum and the fit fails. Two residual evaluations
per zero column (at most :data:`MAX_PROBED` of them), none when no column is zero.

Where these find no fall and a problem has two or more zero columns ``Z``, it is probed at
``x +- v``, ``v = sum_{j in Z} s_j h_j e_j``, for :data:`PATTERNS` sign patterns ``s`` over
all of ``Z`` (not only the probed columns): all ``+1``, and ``(-1)^{bit_i(k)}`` for the
``k``-th column of ``Z`` in index order, ``i = 0, 1, 2`` (the same on every rank), so any two
of the first 8 zero columns have opposite signs in some pattern. ``2 PATTERNS = 8``
evaluations more, at most ``2 MAX_PROBED + 8`` per problem. With ``H``
the cost's Hessian on ``Z`` (``J_Z = 0``: ``H = sum_i r_i d^2 r_i``), a pattern sees the fall
``-(1/2) sum_jk s_j s_k h_j h_k H_jk``, the diagonal terms with weight 1 whatever the signs:

- a saddle across two zero columns: ``r = 1 + a b`` at 0 (``H_aa = H_bb = 0``, ``H_ab = 1``)
  falls along ``a = -b``; with two zero columns the patterns are ``+-(1, 1)`` and ``+-(1, -1)``,
  which see any ``2 h_a h_b |H_ab| > h_a^2 H_aa + h_b^2 H_bb``;
- a maximum along any zero column, probed or beyond :data:`MAX_PROBED`, whose fall
  ``h_j^2 |H_jj|`` outweighs the other columns' rises (and couplings) along ``v``.

Still missed: a negative direction far from every pattern (``r = 1 + a^2 + 100 b^2 - 25 a b``
falls only near ``b = a / 8``); a maximum along an unprobed column that the other zero
columns' rises outweigh (``1 + sum_j c_j a_j^2`` with one ``c_j = -1`` among 39 ``+1``: every
pattern sees ``sum_j c_j h^2 > 0``); a coupled pair beyond the first 8 zero columns that all
four patterns give the same relative sign; falls flatter than quadratic.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import optree
import torch

from funcopt.func.jacobian import (
    gauss_newton_products,
    jacobian,
    ravel_params,
    residual_vector_fn,
)
from funcopt.solvers.base import scaled_norm
from funcopt.transforms.lm_model import column_norms_sq

__all__ = ["probe_zero_columns", "zero_column_check"]

Tensor = torch.Tensor

MAX_PROBED = 16
"""At most this many zero columns are probed (evenly spaced over them): a network with dead
units has thousands, and two evaluations each would cost more than the fit."""

PATTERNS = 4  # sign patterns of the combined probes: all +1 and the zero columns' rank bits
COMBINED = -2  # ``which`` for a fall along a combined direction (:func:`probe_zero_columns`)

FALL = 8
"""A probe's cost must be below ``(1 - FALL eps) F(x)`` to count as a fall. The costs are
float64 sums of the dtype's residuals: each residual rounds to a relative ``eps / 2`` and its
square to ``eps``, so two evaluations of ``F`` at points where it is the same can differ by
``2 eps`` relative when ``residual_fn`` rounds its last operation only; ``8 eps`` leaves a
factor of 4 for a few operations more. At a maximum with ``c = -d^2 F / d x_j^2 > 0`` the
probe's fall is ``c h^2 / 2``, relative ``c h^2 / (2 F) ~ sqrt(eps) c / (2 F)`` (``|x_j| <=
1``), far above ``8 eps`` unless ``c / F < 16 sqrt(eps)``; maxima flatter than quadratic are not
seen."""


def probe_steps(x: Tensor) -> Tensor:
    """The probe lengths ``h = eps^(1/4) max(1, |x|)`` (``eps`` of ``x``'s dtype), as ``x``:
    long enough that a quadratic fall, ``~ sqrt(eps)`` relative, is far above rounding, and
    short enough to stay in the stationary point's neighbourhood."""
    return torch.finfo(x.dtype).eps ** 0.25 * x.abs().clamp(min=1.0)


def sign_patterns(zero: Tensor, dtype: torch.dtype) -> Iterator[Tensor]:
    """The :data:`PATTERNS` sign patterns ``s`` (``+-1``, ``dtype``, broadcastable to ``zero``'s
    ``(B, n)``) of the combined probes, one at a time: all ``+1``, then ``(-1)^{bit_i(k)}`` for
    the ``k``-th zero column of each row (``zero``), ``i = 0, 1, 2``: any two of the first 8
    zero columns get opposite signs in some pattern (their ranks differ in some bit)."""
    yield torch.ones(1, zero.shape[1], dtype=dtype, device=zero.device)
    rank = zero.long().cumsum(-1) - 1
    for i in range(PATTERNS - 1):
        yield (1 - 2 * ((rank >> i) & 1)).to(dtype)


def probe_zero_columns(norms: Callable[[Tensor], Tensor], x: Tensor, zero_col: Tensor,
                       rnorm: Tensor, candidates: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(falls, which, probes)`` for problems ``x`` ``(B, n)`` at their final points.

    A problem's zero columns are the ``j`` with ``zero_col[b, j]`` (``J_j == 0``, ``(B, n)``)
    where ``candidates[b]`` (the fits about to end with success) and ``rnorm[b]`` (``||r||``,
    float64) is positive and finite. Each call of ``norms`` (``(B, n)`` points -> ``(B,)``
    float64 residual norms) moves the probed rows and leaves the others at ``x``: two per
    probed column (at most :data:`MAX_PROBED`, evenly spaced), at ``x +- h e_j``
    (:func:`probe_steps`); then, in the rows with two or more zero columns and no fall yet,
    two per pattern of :func:`sign_patterns`, at ``x +- sum_j s_j h_j e_j`` over all their zero
    columns. ``falls``: some probe has ``||r_probe||^2 < (1 - FALL eps)
    ||r||^2`` (:data:`FALL`); ``which``:
    the first such ``j``, :data:`COMBINED` for a combined direction (-1: none); ``probes``:
    residual evaluations per problem. One host read (two where a problem has two zero
    columns or more), none of ``norms`` when no column is zero."""
    eps = torch.finfo(x.dtype).eps
    known = (rnorm > 0) & torch.isfinite(rnorm)  # an overflowed ||r|| has no ratio to test
    zero = candidates[:, None] & zero_col & known[:, None]
    (B, n), h = x.shape, probe_steps(x)
    falls = torch.zeros(B, dtype=torch.bool, device=x.device)
    which = torch.full((B,), -1, dtype=torch.int64, device=x.device)
    safe = torch.where(rnorm > 0, rnorm, 1.0).double()
    many = zero.sum(-1) >= 2
    hits = torch.nonzero(torch.cat([zero.any(0), many.any()[None]]))[:, 0].cpu()  # host read
    cols, combined = hits[hits < n], bool(len(hits)) and int(hits[-1]) == n
    if len(cols) > MAX_PROBED:  # e.g. a network's dead units: evenly spaced ones
        cols = cols[torch.linspace(0, len(cols) - 1, MAX_PROBED).round().long()]
    probed = zero & torch.isin(torch.arange(n, device=x.device), cols.to(x.device))

    def fell(moved: Tensor, rows: Tensor) -> Tensor:
        ratio = norms(moved).double() / safe
        return rows & (ratio * ratio < 1.0 - FALL * eps)  # NaN: not a fall

    for j in cols.tolist():
        rows = probed[:, j]
        for sign in (1.0, -1.0):
            moved = x.clone()
            moved[:, j] = torch.where(rows, x[:, j] + sign * h[:, j], x[:, j])
            f = fell(moved, rows)
            which, falls = torch.where(f & ~falls, j, which), falls | f
    probes = 2 * probed.sum(-1)
    rows = many & ~falls
    if combined and bool(rows.any()):  # the second host read
        moving = zero & rows[:, None]
        for s in sign_patterns(zero, x.dtype):
            for sign in (1.0, -1.0):
                f = fell(torch.where(moving, x + sign * s * h, x), rows)
                which, falls = torch.where(f & ~falls, COMBINED, which), falls | f
        probes = probes + 2 * PATTERNS * rows
    return falls, which, probes


def zero_column_check(residual_fn: Callable[..., Tensor], params: Any, reason: str,
                      dense: dict | None) -> tuple[str, bool, int]:
    """The probe for :func:`funcopt.least_squares`, whose fit is about to end with success
    (``reason``) at ``params``: ``(reason, success, evaluations)``. The zero columns come
    from ``J`` as the fit forms it (:func:`funcopt.func.jacobian` with ``dense``'s
    ``jacobian_mode`` and ``chunk_size``), or with ``dense=None`` (matrix-free and row-block
    paths) from ``diag(J^T J)`` by ``min(m, n)`` products
    (:func:`funcopt.transforms.lm_model.column_norms_sq`); then :func:`probe_zero_columns`,
    whose evaluations are counted. A fall gives a failure naming the parameter (its leaf's
    path and index, :func:`_name`), or the zero columns' first three for a combined one."""
    if dense is None:
        gn = gauss_newton_products(residual_fn, params)
        r, zero = gn.residuals, column_norms_sq(gn, None) == 0
    else:
        J, r = jacobian(residual_fn, params, mode=dense.get("jacobian_mode", "auto"),
                        chunk_size=dense.get("chunk_size"))
        zero = J.abs().amax(0) == 0  # exact: no squares to underflow
    rnorm = scaled_norm(r.detach().double())
    if not bool(zero.any()) or float(rnorm) == 0.0:
        return reason, True, 0
    x, unravel = ravel_params(params)
    f = residual_vector_fn(residual_fn, unravel)

    def norms(xb: Tensor) -> Tensor:
        with torch.no_grad():
            return scaled_norm(f(xb[0]).double()).reshape(1)

    falls, which, probes = probe_zero_columns(norms, x[None], zero[None], rnorm.reshape(1),
                                              torch.ones(1, dtype=torch.bool, device=x.device))
    if not bool(falls[0]):
        return reason, True, int(probes[0])
    j = int(which[0])
    if j == COMBINED:
        names = [_name(params, k) for k in torch.nonzero(zero)[:3, 0].tolist()]
        where = (f"columns for the {int(zero.sum())} parameters {', '.join(names)}"
                 f"{', ...' if zero.sum() > 3 else ''} are zero here and the cost falls along "
                 f"a combination of them (+- h_j each)")
    else:
        where = (f"column for parameter {_name(params, j)} is zero here and the cost falls "
                 f"along it (at +- {float(probe_steps(x[j])):.2g})")
    return (f"a stationary point that is not a minimum: the Jacobian's {where}, so "
            f"Gauss-Newton cannot leave it although a test held ({reason}): a failure; start "
            "from another point"), False, int(probes[0])


def _name(params: Any, j: int) -> str:
    """Element ``j`` of :func:`funcopt.func.ravel_params`' vector as its leaf's path and index,
    e.g. ``['c'][1]`` (the floating leaves in optree's order, each flattened)."""
    paths, leaves, _ = optree.tree_flatten_with_path(params)
    for path, leaf in zip(paths, leaves):
        if isinstance(leaf, Tensor) and leaf.is_floating_point():
            if j < leaf.numel():
                at = [int(i) for i in torch.unravel_index(torch.tensor(j), leaf.shape)]
                return "".join(f"[{k!r}]" for k in path) + "".join(f"[{i}]" for i in at)
            j -= leaf.numel()
    return f"[{j}]"
