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

Rounding. A probe's fall counts only where it exceeds what the rounding of ``r`` can do to
``F`` (:func:`rounding_bound`): at a near-exact fit of a large model (``||r|| ~ 1e-9
||model||``) the model's rounding, ``eps`` relative to the model, moves ``F`` by up to ``~1e9
eps`` relative at any point, a probe's included, where ``F`` is exactly constant along the
zero column (``(a0 t + a1)(sin^2 b + cos^2 b) - y``). Only a probe that falls by more than
``FALL eps`` costs the measurement (two residual evaluations, in the problems with a nonzero
column), and one that falls by less than the bound is probed once more, :data:`REACH` farther
out, where a true quadratic fall has grown and rounding has not. Also missed so: a fall that
even there stays below the worst case of the rounding (the bound adds ``|r_i| rho_i`` over
the rows without the cancellation the actual rounding may have, as at a fit whose model is
in the span of ``J``: a residual ``3e-10 cos b`` beside a near-exact fit of 50 rows with
``||r|| = 7e-9``), and a fall that turns within that reach.
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
from funcopt.least_squares_options import rounding_steps
from funcopt.solvers.base import scaled_norm
from funcopt.transforms.lm_model import column_norms_sq

__all__ = ["probe_zero_columns", "zero_column_check", "noise_steps", "rounding_bound"]

Tensor = torch.Tensor

MAX_PROBED = 16
"""At most this many zero columns are probed (evenly spaced over them): a network with dead
units has thousands, and two evaluations each would cost more than the fit."""

PATTERNS = 4  # sign patterns of the combined probes: all +1 and the zero columns' rank bits
COMBINED = -2  # ``which`` for a fall along a combined direction (:func:`probe_zero_columns`)
NOISE_PROBES = 2  # evaluations of the rounding measurement (:func:`noise_steps`) per problem


REACH = 0.125
"""A probe whose fall is above ``FALL eps`` but below the rounding bound is repeated at
``eps^(-REACH)`` times its step (90 in float64, 7 in float32, 2 in float16): within
``eps^(1/8) max(1, |x_j|)`` of ``x``, where a quadratic fall has grown ``eps^(-1/4)`` times
and rounding, which does not grow with the step, is still within the bound."""

FALL = 8
"""A probe's cost must be below ``(1 - max(FALL eps, bound)) F(x)`` to count as a fall
(``bound``: :func:`rounding_bound`, the rounding of ``r``; the probe at ``h`` or, where only
the bound hid its fall, its repetition :data:`REACH` farther). The costs are
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


def noise_steps(x: Tensor, moving: Tensor, rnorm: Tensor,
                col: Tensor) -> tuple[Tensor, Tensor]:
    """The two steps (as ``x``) at which :func:`rounding_bound` measures the rounding of ``r``:
    :func:`funcopt.least_squares_options.rounding_steps` (4 and -16 ulps, a zero parameter at
    the scale of ``||r|| / ||J_j||``, ``rnorm`` and ``col``) on the columns ``moving`` (the
    nonzero columns of the problems probed), 0 on the others: a zero column does not move, so
    the probes' own quadratic change (or the curvature of a fall) is not read as rounding."""
    up, down = rounding_steps(x, rnorm, col)[:2]
    return torch.where(moving, up, 0.0), torch.where(moving, down, 0.0)


def rounding_bound(r: Tensor, ds: list[Tensor], rnorm: Tensor) -> Tensor:
    """How far the rounding of ``r`` ``(B, m)`` can move ``F = ||r||^2``, relative to
    ``rnorm^2`` (``||r||``, ``(B,)``; the data-parallel driver sums the shards' values):
    ``2 sum_i (2 |r_i| rho_i + rho_i^2) / ||r||^2``, float64, ``(B,)``.

    ``ds``: ``d = r(x + h) - r(x) - J h`` at the steps of :func:`noise_steps`; ``J h`` is
    the linear change, the curvature adds ``~h^2 = O(eps^2)``, so ``d`` is the difference of
    two roundings of ``r``; ``rho_i = max |d_i|`` over the steps (a non-finite ``d_i``: 0, no
    evidence). Derivation: a probe at ``p`` computes ``F(p)`` from ``r(p) + delta^p`` and
    compares it with ``F(x)`` from ``r(x) + delta^x`` (``delta``: the roundings). Their
    difference changes ``F(x) - F(p)`` by ``2 r . (delta^x - delta^p)`` and the squares of the
    ``delta``, up to the true change's ``O(h^2)`` share; ``delta^x - delta^p`` is a difference
    of two roundings like ``d``, about ``rho_i`` in row ``i``, so with every sign against
    ``r`` the change is at most ``sum_i (2 |r_i| rho_i + rho_i^2)``; the factor 2 covers a
    sample below its typical size. Rounding does not grow with the probe's step, a true fall
    grows as its square, and ``d`` does not hold the fall: the zero columns do not move in
    it, and a fitted column's change, however stiff, is in ``J h``. The bound counts the
    rounding row by row where ``r`` is, so a fall in rows of small terms (a residual ``1e-6
    cos b`` beside a near-exact fit) is still seen."""
    rho = torch.stack([torch.nan_to_num(d.double().abs(), nan=0.0, posinf=0.0)
                       for d in ds]).amax(0)
    safe = torch.where(rnorm > 0, rnorm, 1.0).double()[..., None]
    a, q = r.double().abs() / safe, rho / safe
    return torch.nan_to_num(2 * (2 * a * q + q * q).sum(-1), nan=0.0)


def probe_zero_columns(norms: Callable[[Tensor], Tensor], x: Tensor, zero_col: Tensor,
                       rnorm: Tensor, candidates: Tensor,
                       noise: Callable[[Tensor], Tensor] | None = None,
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """``(falls, which, probes)`` for problems ``x`` ``(B, n)`` at their final points.

    A problem's zero columns are the ``j`` with ``zero_col[b, j]`` (``J_j == 0``, ``(B, n)``)
    where ``candidates[b]`` (the fits about to end with success) and ``rnorm[b]`` (``||r||``,
    float64) is positive and finite. Each call of ``norms`` (``(B, n)`` points -> ``(B,)``
    float64 residual norms) moves the probed rows and leaves the others at ``x``: two per
    probed column (at most :data:`MAX_PROBED`, evenly spaced), at ``x +- h e_j``
    (:func:`probe_steps`); then, in the rows with two or more zero columns and no fall yet,
    two per pattern of :func:`sign_patterns`, at ``x +- sum_j s_j h_j e_j`` over all their zero
    columns.

    A probe's relative fall ``1 - ||r_probe||^2 / ||r||^2`` above ``cut = max(FALL eps,
    bound)`` (:data:`FALL`) is a fall. Where some probe falls by more than ``FALL eps``,
    ``noise`` (``moving`` ``(B, n)`` -> ``(B,)``: :func:`rounding_bound` at the steps
    :func:`noise_steps` gives for ``moving``) measures ``bound`` in those problems that have
    a nonzero column (``moving``: their nonzero columns), :data:`NOISE_PROBES` evaluations
    each; None, or no nonzero column: ``bound = 0``. A fall between ``FALL eps`` and ``cut``
    may be rounding or a true fall too shallow at ``h``: that probe is made once more,
    ``eps^(-REACH)`` times as far along the same direction (:data:`REACH`), and is a fall
    where the second one falls by more than ``cut``: a true quadratic fall has grown
    ``eps^(-2 REACH)`` times there, rounding is bounded by ``cut`` at any point. So every
    fall is one under ``FALL eps`` alone too, and a probe that falls by less costs nothing
    more.

    ``falls``: some probe fell; ``which``: such a ``j`` (the first of the probes at ``h``),
    :data:`COMBINED` for a combined direction (-1: none); ``probes``: residual evaluations per
    problem. One host read (two where a problem has two zero columns or more; where ``noise``
    applies, one more after each set of probes and another where one fell by more than
    ``FALL eps``), none of ``norms`` when no column is zero."""
    eps = torch.finfo(x.dtype).eps
    known = (rnorm > 0) & torch.isfinite(rnorm)  # an overflowed ||r|| has no ratio to test
    zero = candidates[:, None] & zero_col & known[:, None]
    (B, n), h = x.shape, probe_steps(x)
    falls = torch.zeros(B, dtype=torch.bool, device=x.device)
    which = torch.full((B,), -1, dtype=torch.int64, device=x.device)
    safe = torch.where(rnorm > 0, rnorm, 1.0).double()
    many = zero.sum(-1) >= 2
    moving = zero.any(-1, keepdim=True) & ~zero_col  # the fitted columns of the probed rows
    if noise is None:
        moving = torch.zeros_like(moving)
    hits = torch.nonzero(torch.cat([zero.any(0), many.any()[None], moving.any()[None]])
                         )[:, 0].cpu()  # host read
    cols, combined, noisy = hits[hits < n], bool((hits == n).any()), bool((hits > n).any())
    if len(cols) > MAX_PROBED:  # e.g. a network's dead units: evenly spaced ones
        cols = cols[torch.linspace(0, len(cols) - 1, MAX_PROBED).round().long()]
    probed = zero & torch.isin(torch.arange(n, device=x.device), cols.to(x.device))
    cut = torch.full_like(safe, FALL * eps)
    measured = torch.zeros_like(falls)  # the problems whose bound is in cut
    probes = torch.zeros(B, dtype=torch.int64, device=x.device)

    def fall(v: Tensor) -> Tensor:
        ratio = norms(x + v).double() / safe
        return 1.0 - ratio * ratio  # NaN: not a fall

    def judge(steps: list[tuple[int, Tensor, Tensor]], fs: list[Tensor]) -> list[Tensor]:
        """Mark the falls above ``cut``; the probes that fell by less than ``cut`` but more
        than ``FALL eps`` in problems without a fall."""
        nonlocal falls, which
        for (tag, rows, _), f in zip(steps, fs):
            sure = rows & (f > cut)
            which, falls = torch.where(sure & ~falls, tag, which), falls | sure
        return [rows & ~falls & (f > FALL * eps) for (_, rows, _), f in zip(steps, fs)]

    def stage(steps: list[tuple[int, Tensor, Tensor]]) -> None:
        """The probes ``(which, rows, step)``; where some fell by more than ``FALL eps``, the
        bound, then the second probes of the unsure ones (:data:`REACH`)."""
        nonlocal falls, which, cut, measured, probes
        fs = [fall(v) for _, _, v in steps]
        probes = probes + sum(rows.long() for _, rows, _ in steps)
        if not noisy:
            judge(steps, fs)  # cut is FALL eps: nothing is unsure
            return
        fell = [rows & (f > FALL * eps) for (_, rows, _), f in zip(steps, fs)]
        need = torch.stack(fell).any(0) & moving.any(-1) & ~measured
        flags = torch.stack([need.any()] + [c.any() for c in fell]).tolist()  # host read
        if not any(flags):
            return
        if flags[0] and noise is not None:
            bound = torch.clamp(noise(moving & need[:, None]).double(), min=FALL * eps)
            cut, measured = torch.where(need, bound, cut), measured | need
            probes = probes + NOISE_PROBES * need
        unsure = judge(steps, fs)
        again = torch.stack([u.any() for u in unsure]).tolist()  # host read
        for (tag, _, v), u, go in zip(steps, unsure, again):
            if go:
                sure = u & (fall(torch.where(u[:, None], v * eps ** -REACH, 0.0)) > cut)
                which, falls = torch.where(sure & ~falls, tag, which), falls | sure
                probes = probes + u

    singles = []
    for j in cols.tolist():
        rows = probed[:, j]
        for sign in (1.0, -1.0):
            v = torch.zeros_like(x)
            v[:, j] = torch.where(rows, sign * h[:, j], 0.0)
            singles.append((j, rows, v))
    stage(singles)
    rows = many & ~falls
    if combined and bool(rows.any()):  # the second host read
        moved = zero & rows[:, None]
        stage([(COMBINED, rows, torch.where(moved, sign * s * h, 0.0))
               for s in sign_patterns(zero, x.dtype) for sign in (1.0, -1.0)])
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
    path and index, :func:`_name`), or the zero columns' first three for a combined one. The
    rounding bound's ``J h`` comes from ``J`` or from a Jacobian-vector product."""
    if dense is None:
        gn = gauss_newton_products(residual_fn, params)
        r, col = gn.residuals, column_norms_sq(gn, None).sqrt()
        zero, linear = col == 0, gn.jvp
    else:
        J, r = jacobian(residual_fn, params, mode=dense.get("jacobian_mode", "auto"),
                        chunk_size=dense.get("chunk_size"))
        zero = J.abs().amax(0) == 0  # exact: no squares to underflow
        col, linear = scaled_norm(J, dim=0), lambda v: J @ v
    r = r.detach()
    rnorm = scaled_norm(r.double())
    if not bool(zero.any()) or float(rnorm) == 0.0:
        return reason, True, 0
    x, unravel = ravel_params(params)
    f = residual_vector_fn(residual_fn, unravel)

    def norms(xb: Tensor) -> Tensor:
        with torch.no_grad():
            return scaled_norm(f(xb[0]).double()).reshape(1)

    def noise(moving: Tensor) -> Tensor:
        with torch.no_grad():
            ds = [f(x + v[0]) - r - linear(v[0]) for v in noise_steps(x[None], moving, rnorm,
                                                                     col[None])]
        return rounding_bound(r[None], [d[None] for d in ds], rnorm.reshape(1))

    falls, which, probes = probe_zero_columns(norms, x[None], zero[None], rnorm.reshape(1),
                                              torch.ones(1, dtype=torch.bool, device=x.device),
                                              noise)
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
                 f"along it (probed at +- {float(probe_steps(x[j])):.2g}, and "
                 f"{torch.finfo(x.dtype).eps ** -REACH:.2g} times as far where rounding hid "
                 "a shallower fall)")
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
