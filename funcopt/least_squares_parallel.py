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

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from funcopt.base import PyTree
from funcopt.func.jacobian import jacobian, ravel_params, residual_vector_fn
from funcopt.least_squares_batched import SUCCESS_CODES, BatchedLeastSquaresInfo, run_batched
from funcopt.least_squares_options import Tolerances, check_driver_options
from funcopt.transforms import lm_batched
from funcopt.transforms.levenberg_marquardt import lm_options
from funcopt.transforms.lm_damping import DampingRule, TrustRegion

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
    about ``1e154`` (float64); the single-process drivers have no such limit.
    """
    check_driver_options(options, tolerances, "least_squares_parallel")
    o = lm_options(rule, **options)
    x0, unravel = ravel_params(params)

    def f(x: Tensor) -> Tensor:
        return residual_vector_fn(residual_fn, unravel)(x)

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
    rnorm = trial_norm(x).double()
    cost = torch.where(rnorm < 1e154, 0.5 * rnorm * rnorm, torch.full_like(rnorm, float("inf")))
    success = torch.isin(p.code, torch.tensor(SUCCESS_CODES, device=x.device))
    return unravel(x[0]), BatchedLeastSquaresInfo(p.steps, cost, p.code, success,
                                                  p.evaluations, rnorm)
