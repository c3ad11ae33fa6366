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
"""

from __future__ import annotations

from collections.abc import Callable
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


def probe_zero_columns(norms: Callable[[Tensor], Tensor], x: Tensor, col: Tensor,
                       rnorm: Tensor, candidates: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(falls, which, probes)`` for problems ``x`` ``(B, n)`` at their final points.

    A problem is probed along ``j`` (at most :data:`MAX_PROBED` columns) where ``candidates`` (``(B,)``, the fits about to end with
    success), ``col[b, j] == 0`` (``||J_j||``, ``(B, n)``) and ``rnorm[b]`` (``||r||``,
    float64) is positive and finite. Per probed column, two calls of ``norms`` (``(B, n)``
    points -> ``(B,)`` float64 residual norms), at ``x +- h e_j`` (:func:`probe_steps`) in
    the probed rows and at ``x`` in the others. ``falls``: some probe has ``||r_probe||^2 <
    (1 - FALL eps) ||r||^2``; ``which``: the first such ``j`` (-1: none); ``probes``: residual
    evaluations per problem (two per probed column). One host read, none of ``norms`` when
    no column is zero."""
    eps = torch.finfo(x.dtype).eps
    known = (rnorm > 0) & torch.isfinite(rnorm)  # an overflowed ||r|| has no ratio to test
    zero = candidates[:, None] & (col == 0) & known[:, None]
    B = x.shape[0]
    falls = torch.zeros(B, dtype=torch.bool, device=x.device)
    which = torch.full((B,), -1, dtype=torch.int64, device=x.device)
    h = probe_steps(x)
    safe = torch.where(rnorm > 0, rnorm, 1.0).double()
    cols = torch.nonzero(zero.any(0))[:, 0]  # the host read
    if len(cols) > MAX_PROBED:  # e.g. a network's dead units: evenly spaced ones
        cols = cols[torch.linspace(0, len(cols) - 1, MAX_PROBED).round().long()]
    zero = zero & torch.isin(torch.arange(zero.shape[1], device=x.device), cols)
    for j in cols.tolist():
        rows = zero[:, j]
        for sign in (1.0, -1.0):
            moved = x.clone()
            moved[:, j] = torch.where(rows, x[:, j] + sign * h[:, j], x[:, j])
            ratio = norms(moved).double() / safe
            fell = rows & (ratio * ratio < 1.0 - FALL * eps)  # NaN: not a fall
            which = torch.where(fell & ~falls, j, which)
            falls = falls | fell
    return falls, which, 2 * zero.sum(-1)


def zero_column_check(residual_fn: Callable[..., Tensor], params: Any, reason: str,
                      dense: dict | None) -> tuple[str, bool, int]:
    """The probe for :func:`funcopt.least_squares`, whose fit is about to end with success
    (``reason``) at ``params``: ``(reason, success, evaluations)``. The zero columns come
    from ``J`` as the fit forms it (:func:`funcopt.func.jacobian` with ``dense``'s
    ``jacobian_mode`` and ``chunk_size``), or with ``dense=None`` (matrix-free and row-block
    paths) from ``diag(J^T J)`` by ``min(m, n)`` products
    (:func:`funcopt.transforms.lm_model.column_norms_sq`); then :func:`probe_zero_columns`,
    whose evaluations are counted. A fall gives a failure naming the parameter (its index in
    the flat order of :func:`funcopt.func.ravel_params`)."""
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

    falls, which, probes = probe_zero_columns(norms, x[None], (~zero).to(x.dtype)[None],
                                              rnorm.reshape(1),
                                              torch.ones(1, dtype=torch.bool, device=x.device))
    if not bool(falls[0]):
        return reason, True, int(probes[0])
    j = int(which[0])
    return (f"a stationary point that is not a minimum: the Jacobian's column for parameter "
            f"{_name(params, j)} is zero here and the cost falls along it (at +- "
            f"{float(probe_steps(x[j])):.2g}), so Gauss-Newton cannot leave it although a "
            f"test held ({reason}): a failure; start from another point"), False, int(probes[0])


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
