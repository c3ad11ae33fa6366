"""Data-parallel least squares across processes (``torch.distributed``).

Each rank holds a shard of the residuals, ``r = [r_1; ...; r_P]``. Per update every rank forms
the Jacobian ``J_k`` of its shard and all-reduces (sums) ``J_k^T J_k`` (``n x n``),
``J_k^T r_k`` and ``||r_k||^2``; the damped solve (the trust-region damping and step from the
eigendecomposition of the scaled ``J^T J``, :func:`funcopt.transforms.lm_batched.gram_local_model`)
then runs on every rank with the same numbers, and each trial point costs one all-reduce of
``||r_k(x + delta)||^2``. The ranks take identical steps, equal to one process's with all the
residuals. Communication per update: ``n^2 + n + 1`` numbers, plus one per attempt.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from funcopt.base import PyTree
from funcopt.func.jacobian import jacobian, ravel_params, residual_vector_fn
from funcopt.least_squares_batched import (
    NOT_A_MINIMUM,
    SUCCESS_CODES,
    BatchedLeastSquaresInfo,
    run_batched,
)
from funcopt.least_squares_options import (
    GAIN_CHECK_SIZE,
    Tolerances,
    check_driver_options,
    rounding_steps,
)
from funcopt.least_squares_probe import noise_steps, probe_zero_columns, rounding_bound
from funcopt.least_squares_stalls import (
    StallModel,
    judge_stalls,
    stall_candidates,
    stop_margin,
)
from funcopt.transforms import lm_batched
from funcopt.transforms.levenberg_marquardt import lm_options
from funcopt.transforms.lm_damping import DampingRule, TrustRegion, resolve_scaling

__all__ = ["least_squares_parallel"]

Tensor = torch.Tensor


def _sum(t: Tensor, group: Any) -> Tensor:
    """``t`` summed over the ranks of ``group`` (itself without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return t
    t = t.clone()
    dist.all_reduce(t, group=group)
    return t


def least_squares_parallel(
    residual_fn: Callable[[PyTree], Tensor],
    params: PyTree,
    *,
    group: Any = None,
    max_steps: int = 1000,
    tolerances: Tolerances = Tolerances(),  # noqa: B008  (frozen, immutable)
    rule: DampingRule = TrustRegion(),  # noqa: B008
    **options: Any,
) -> tuple[PyTree, BatchedLeastSquaresInfo]:
    """Minimise ``0.5 sum_k ||r_k(params)||^2`` with the residual shards ``r_k`` spread over
    the ranks of ``group`` (MINPACK's tests, as :func:`funcopt.least_squares`).

    Args:
        residual_fn: ``params -> r_k``, this rank's 1-D shard of the residuals.
        params: the same starting parameters on every rank.
        group: the process group (default: the world; no process group: one process).
        max_steps, tolerances, rule: as :func:`funcopt.least_squares` (default
            ``Tolerances()`` and ``TrustRegion()``).
        **options: ``max_attempts``, ``accept_ratio``, ``scaling``, ``jacobian_mode`` of
            :func:`funcopt.levenberg_marquardt` (dense Jacobians, no geodesic acceleration).

    Returns:
        ``(params, info)`` with ``info`` a :class:`funcopt.least_squares_batched.
        BatchedLeastSquaresInfo` of one problem (fields of shape ``(1,)``), equal on every rank.

    Range: the sums of squares are all-reduced as they are, so ``||r||`` must stay below
    about ``1e154`` (float64; ``1e19`` float32), and a nonzero ``||r||`` at ``params`` below
    about ``1e-154`` (``1e-19``) raises a ValueError (its square underflows: the fit would
    stop at once as exact); the single-process drivers have no such limit.
    """
    check_driver_options(options, tolerances, "least_squares_parallel")
    o = lm_options(rule, **options)
    x0, unravel = ravel_params(params)

    def f(x: Tensor) -> Tensor:
        return residual_vector_fn(residual_fn, unravel)(x)

    with torch.no_grad():  # m decides D where scaling is None; ||r(x0)|| is checked
        r0 = f(x0).double()
        m, rr, nonzero = _sum(torch.stack([torch.tensor(float(r0.numel()), dtype=r0.dtype,
                                                        device=r0.device),
                                           r0 @ r0, (r0 != 0).sum().double()]), group).tolist()
    if nonzero > 0 and rr < torch.finfo(x0.dtype).tiny:  # 1e-154 in float64, 1e-19 float32
        raise ValueError(f"least_squares_parallel: ||r||^2 = {rr:.3g} at params (this rank's "
                         f"max |r_i| = {float(r0.abs().amax()):.3g}), too small for the "
                         f"all-reduced {x0.dtype} sums of squares (they underflow and the fit "
                         "would stop as exact); multiply residual_fn by a constant, e.g. 1 / "
                         "the size of its residuals")
    if o.scaling is None:  # the residuals of all ranks against the parameters decide D
        o = resolve_scaling(o, int(m), x0.numel())

    def model(x: Tensor, state) -> lm_batched.BatchedLocal:
        J, r = jacobian(residual_fn, unravel(x[0]), mode=o.jacobian_mode)
        if r.dtype != x.dtype:
            raise TypeError(f"residual_fn returned {r.dtype} residuals for {x.dtype} "
                            f"parameters; return r.to({x.dtype})")
        packed = _sum(torch.cat([(J.T @ J).reshape(-1), J.T @ r, (r @ r)[None]]), group)
        n = x.shape[1]
        G, g, rr = packed[:n * n].reshape(1, n, n), packed[n * n:-1][None], packed[-1:]
        return lm_batched.gram_local_model(G, g, torch.sqrt(rr), x, state, o)

    def trial_norm(x: Tensor) -> Tensor:
        with torch.no_grad():
            r = f(x[0])
        return torch.sqrt(_sum((r @ r)[None], group))

    t = tolerances
    tols = (t.ftol, t.xtol, t.gtol, torch.finfo(x0.dtype).eps)
    x, p = run_batched(trial_norm, x0[None], lm_batched.init_state(x0[None], o.rule.initial_damping), o,
                       (max_steps, tols), model)
    # this rank's (J_k, r_k) at the final x: formed at most once for both checks
    jac = functools.cache(lambda: jacobian(residual_fn, unravel(x[0]), mode=o.jacobian_mode))
    code = _check_stalls(residual_fn, unravel, x, (p.code, p.unsure), tols,
                         (group, jac, (p.last, o.rule)))
    code, probes = _check_maxima(residual_fn, unravel, x, code, (group, jac))
    rnorm = trial_norm(x).double()
    cost = torch.where(rnorm < 1e154, 0.5 * rnorm * rnorm, torch.full_like(rnorm, float("inf")))
    success = torch.isin(code, torch.tensor(SUCCESS_CODES, device=x.device))
    return unravel(x[0]), BatchedLeastSquaresInfo(p.steps, cost, code, success,
                                                  p.evaluations + probes, rnorm)


def _check_maxima(residual_fn: Callable[[PyTree], Tensor], unravel: Callable, x: Tensor,
                  code: Tensor, where: tuple) -> tuple[Tensor, Tensor]:
    """The batched driver's probe along zero Jacobian columns
    (:func:`funcopt.least_squares_batched._check_maxima`) on the all-reduced sums at the
    final ``x`` ``(1, n)``: one all-reduce (float64) of ``sum_i |J_k,ij|`` (zero exactly
    where the column is, no square to underflow), ``||J_k,j||^2`` and ``||r_k||^2``, then
    one of ``||r_k||^2`` per probe and one of the shards' parts of the rounding bound
    (:func:`funcopt.least_squares_probe.rounding_bound`). Every rank reads the same sums and
    probes the same columns, so the collectives match and the codes are equal on every rank;
    ``where = (group, jac)``, ``jac()`` this rank's ``(J_k, r_k)`` there."""
    candidates = torch.isin(code, torch.tensor(SUCCESS_CODES[1:], device=x.device))
    if not bool(candidates.any()):  # host sync: one, after the fit
        return code, torch.zeros_like(code)
    group, jac = where
    J, r = jac()
    Jd, rd = J.double(), r.double()
    n = x.shape[1]
    sums = _sum(torch.cat([Jd.abs().sum(0), (Jd * Jd).sum(0), (rd @ rd)[None]]), group)
    rnorm, col = torch.sqrt(sums[-1:]), torch.sqrt(sums[None, n:2 * n])
    f = residual_vector_fn(residual_fn, unravel)

    def norms(xb: Tensor) -> Tensor:
        with torch.no_grad():
            rk = f(xb[0]).double()
        return torch.sqrt(_sum((rk @ rk)[None], group))

    def noise(moving: Tensor) -> Tensor:  # the shards' parts of the bound, summed
        with torch.no_grad():
            ds = [(f(x[0] + v[0]) - r - J @ v[0])[None] for v in noise_steps(x, moving, rnorm,
                                                                              col)]
        return _sum(rounding_bound(r[None], ds, rnorm), group)

    falls, _, probes = probe_zero_columns(norms, x, sums[None, :n] == 0, rnorm, candidates,
                                          noise)
    return torch.where(falls, NOT_A_MINIMUM, code), probes


def _check_stalls(residual_fn: Callable[[PyTree], Tensor], unravel: Callable, x: Tensor,
                  stops: tuple[Tensor, Tensor], tols: tuple, where: tuple) -> Tensor:
    """The batched driver's stall check (:func:`funcopt.least_squares_stalls.judge_stalls`)
    on the all-reduced model at the final ``x`` ``(1, n)``; ``where = (group, jac, damped)``,
    ``jac()`` giving the shard's ``J_k`` and ``r_k`` (formed once, shared with
    :func:`_check_maxima`), ``damped = (state, rule)`` the final state (the same on every
    rank) and rule for the ftol margin (:func:`funcopt.least_squares_stalls.stop_margin`).
    One all-reduce (float64) sums ``||J_k,j||^2``, ``J_k^T r_k``, ``||r_k||^2`` and the
    shard sizes ``m_k``, a second the rounding probes' ``||r_k(x + h) -
    r_k - J_k h||^2`` (their steps, :func:`funcopt.least_squares_options.rounding_steps`,
    move a zero parameter at the scale of the summed ``||r|| / ||J_j||``); the Gauss-Newton
    gain (where tested and ``m n <= GAIN_CHECK_SIZE``) comes from the triangular factor of
    ``[J r]`` (:func:`_stacked_r`). Every rank reads the same sums, so the codes are equal on
    every rank. Nothing runs unless the fit stopped on a tolerance that is checked."""
    code, unsure = stops
    checked, limit = stall_candidates(code, unsure, tols)
    if not bool((checked | limit).any()):  # host sync: one, after the fit
        return code
    group, jac, damped = where
    J, r = jac()
    Jd, rd = J.double(), r.double()
    n = x.shape[1]
    sums = _sum(torch.cat([(Jd * Jd).sum(0), Jd.T @ rd, (rd @ rd)[None],
                           torch.tensor([float(r.numel())], dtype=torch.float64,
                                        device=rd.device)]), group)
    col, rnorm = torch.sqrt(sums[:n]), torch.sqrt(sums[2 * n])
    f = residual_vector_fn(residual_fn, unravel)
    with torch.no_grad():  # the steps need the summed ||r|| and ||J_j||: a second all-reduce
        noise = _sum(torch.stack([((f(x[0] + h) - r - J @ h).double() ** 2).sum()
                                  for h in rounding_steps(x[0], rnorm, col)]), group)
    g = sums[n:2 * n].abs() / (torch.where(col > 0, col, 1.0) * torch.where(rnorm > 0, rnorm, 1.0))
    floor = 4 * torch.sqrt(noise.amax()) / torch.where(rnorm > 0, rnorm, 1.0)
    gain = ulps = torch.zeros(1, dtype=torch.float64, device=rd.device)
    m = int(sums[-1])
    limit = limit & (m * n <= GAIN_CHECK_SIZE)
    if bool(limit.any()):
        R = _stacked_r(torch.cat([Jd, rd[:, None]], 1), group)
        gain, ulps = lm_batched.gauss_newton_gain(R[None, :n, :n], R[None, :n, n],
                                                  R[n, n].abs()[None], x, m)
    dt = x.dtype
    s = StallModel(g.to(dt)[None], col.to(dt)[None], rnorm.to(dt)[None], floor.to(dt)[None],
                   gain, ulps, stop_margin(code, damped, col.to(dt)[None]))
    return judge_stalls(code, checked, limit, s, x, tols)


def _stacked_r(A: Tensor, group: Any) -> Tensor:
    """The triangular factor ``R`` ``(k, k)`` of the rows of ``A`` ``(m_k, k)`` stacked over
    the ranks (a QR of the ``R_k`` of every rank's rows, gathered by one all-reduce of a
    zero-padded ``(P, k, k)`` block): ``R^T R = sum_k A_k^T A_k`` without forming it."""
    k = A.shape[1]
    Rk = torch.linalg.qr(A, mode="r")[1]
    world, rank = 1, 0
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(group), dist.get_rank(group)
    block = A.new_zeros(world, k, k)
    block[rank, :Rk.shape[0]] = Rk
    return torch.linalg.qr(_sum(block, group).reshape(world * k, k), mode="r")[1]
