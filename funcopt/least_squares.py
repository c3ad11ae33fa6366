"""``least_squares``: a MINPACK-style driver around :func:`levenberg_marquardt`.

It runs the Levenberg-Marquardt transform until one of MINPACK's convergence tests holds
(Moré, Garbow & Hillstrom, MINPACK-1 ``lmder``) and returns ``(params, info)``. The residual
adapters :func:`mse_residuals` and :func:`cross_entropy_residuals` turn a model and a loss into
residuals, so networks train with Levenberg-Marquardt; with ``per_sample=True`` they declare the
residuals per sample (:func:`funcopt.per_sample_residuals`), and the Jacobian is built sample by
sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from funcopt.base import PyTree, apply_updates
from funcopt.func.jacobian import per_sample_residuals, ravel_params
from funcopt.least_squares_options import (
    _EDGE_WINDOW,
    Tolerances,
    _matrix_free_options,
    _outcome,
    _stall_check,
    _stationary,
    check_driver_options,
)
from funcopt.least_squares_probe import zero_column_check
from funcopt.solvers.base import scaled_norm
from funcopt.transforms.levenberg_marquardt import levenberg_marquardt, lm_options
from funcopt.transforms.lm_damping import (
    DampingRule,
    Geodesic,
    Nielsen,
    TrustRegion,
    check_geodesic,
    check_rule,
)
from funcopt.transforms.lm_model import _is_matrix_free

__all__ = ["LeastSquaresInfo", "Tolerances", "least_squares", "memory_path", "mse_residuals",
           "cross_entropy_residuals"]

Tensor = torch.Tensor


class LeastSquaresInfo(NamedTuple):
    """What :func:`least_squares` did.

    steps: updates run (Jacobian evaluations). cost: final ``0.5 ||r||^2`` in float64 (inf
    when it overflows float64, 0 when it underflows; ``residual_norm`` is exact there).
    reason: why it stopped (see :func:`least_squares`). success: a convergence test held; False
    for the step limit, a damping that reached its bound, residuals that were not finite at
    every trial point, a start point never left, or a stationary point that is not a minimum
    (a zero Jacobian column along which the cost falls). history: one dict per update (``cost``,
    ``new_cost``, ``damping``, ``gain_ratio``, ``actual_reduction``, ``predicted_reduction``,
    ``residual_norm``, ``step_norm``, ``grad_cos``, ``accepted``, ``attempts``,
    ``trial_finite``, ``solve_failed``). evaluations: residual evaluations. residual_norm: final ``||r||``,
    computed without overflow or underflow. path: ``"dense"`` or ``"matrix-free"`` (see
    :func:`memory_path`).
    """

    steps: int
    cost: float
    reason: str
    success: bool
    history: list
    evaluations: int
    residual_norm: float = float("nan")
    path: str = "dense"


def memory_path(m: int, n: int, itemsize: int, budget: int | None) -> str:
    """The path that fits ``budget`` bytes for ``m`` residuals and ``n`` parameters.

    Memory model, in numbers of ``itemsize`` bytes: the Jacobian ``m n``; the normal matrix
    ``n^2`` (primal form, ``m >= n``) or ``J J^T``, ``m^2`` (dual form, ``m < n``); the
    matrix-free path ``4 (m + n)`` (CG's vectors and one Jacobian-vector product; ``J`` is never
    formed). Returns ``"dense"`` when ``m n + min(m, n)^2`` fits (or ``budget`` is None),
    else ``"matrix-free"`` when ``4 (m + n)`` fits; raises ValueError when nothing fits.
    """
    if budget is None:
        return "dense"
    if not isinstance(budget, int) or budget <= 0:
        raise ValueError(f"memory_budget={budget!r}: pass a positive number of bytes or None")
    if (m * n + min(m, n) ** 2) * itemsize <= budget:
        return "dense"
    if 4 * (m + n) * itemsize <= budget:
        return "matrix-free"
    raise ValueError(f"memory_budget={budget} bytes is below the matrix-free path's "
                     f"4 (m + n) = {4 * (m + n) * itemsize} bytes for m={m}, n={n}; raise it")


def _check_residual_fn(residual_fn: Callable[[PyTree], Tensor], params: PyTree, x: Tensor) -> Tensor:
    r = residual_fn(params)
    if not isinstance(r, torch.Tensor) or r.ndim != 1:
        got = f"a {type(r).__name__}" if not isinstance(r, torch.Tensor) else f"shape {tuple(r.shape)}"
        raise ValueError(
            f"residual_fn(params) must return a 1-D tensor of residuals, got {got}; "
            "return r.reshape(-1)"
        )
    if not r.is_floating_point():
        raise TypeError(f"residual_fn returned a {r.dtype} tensor; residuals must be floating point")
    if r.numel() == 0:
        raise ValueError("residual_fn returned no residuals; there is nothing to fit")
    if r.dtype != x.dtype:
        raise TypeError(
            f"residual_fn returned {r.dtype} residuals for {x.dtype} parameters; the residuals "
            f"must have the parameters' dtype: return r.to({x.dtype}) from residual_fn, or pass "
            f"{r.dtype} parameters"
        )
    return r.detach()


def _record(s) -> dict:
    return {
        "cost": float(s.cost), "new_cost": float(s.new_cost), "damping": float(s.damping),
        "radius": float(s.radius),
        "gain_ratio": float(s.gain_ratio), "step_norm": float(s.step_norm),
        "x_norm": float(s.x_norm), "grad_cos": float(s.grad_cos),
        "predicted": float(s.predicted), "accepted": bool(s.accepted), "attempts": int(s.attempts),
        "residual_norm": float(s.residual_norm), "actual_reduction": float(s.actual_reduction),
        "predicted_reduction": float(s.predicted_reduction), "trial_finite": bool(s.trial_finite),
        "solve_failed": math.isnan(float(s.step_norm)),  # NaN: the last solve failed, no step
    }


def least_squares(
    residual_fn: Callable[[PyTree], Tensor],
    params: PyTree,
    *,
    max_steps: int = 1000,
    tolerances: Tolerances = Tolerances(),  # noqa: B008  (frozen, immutable)
    rule: DampingRule | None = None,
    geodesic: Geodesic | None = None,
    solver: Any = "auto",
    batched: bool = False,
    memory_budget: int | None = None,
    **options: Any,
) -> tuple[PyTree, Any]:
    """Minimise ``0.5 ||residual_fn(params)||^2`` by Levenberg-Marquardt (MINPACK's tests).

    Stopping tests (MINPACK ``lmder``), checked after every update, with ``F`` the cost,
    ``delta`` the last step, ``d`` the scaling and ``x`` the parameters. Every test is
    scale-free, as MINPACK's: it compares norms of ``r``, ``J`` and ``d * x`` only through
    their ratios (computed without overflow or underflow), so the same problem with its
    residuals multiplied by ``10^k`` stops at the same point for any ``k`` the dtype can hold.

    * ``residual_norm == 0``: "zero residual" (success);
    * ``gtol``: ``max_j |J_j^T r| / (||J_j|| ||r||) <= gtol`` at the current point (success);
    * ``ftol``: ``|actual| <= ftol`` and ``predicted <= ftol`` and ``rho <= 2``, with
      ``actual = 1 - (||r_new|| / ||r||)^2`` and ``predicted`` the relative reductions of
      ``F`` (success);
    * ``xtol``: ``||d * delta|| <= xtol * ||d * x||`` (success);
    * the same three with machine epsilon of the dtype ("no further reduction possible"), so
      ``ftol = xtol = gtol = 1e-15`` runs to the limit of the floating-point format;

    and the failures (``success=False``, the cause in ``reason``):

    * the damping reached ``max_damping`` (or the trust region vanished) with every attempt
      rejected;
    * a tolerance test held only because the steps shrank around trial points where
      ``residual_fn`` was not finite;
    * a test held but no step was ever accepted (the start point was never left, and neither
      the zero-residual nor the gtol test says it is a solution);
    * the linear solver failed (e.g. CG did not converge) at the last damping the rule
      allows: an update rejected because its solve failed has no step, so it never passes a
      tolerance test (its ``step_norm`` and ``predicted_reduction`` are NaN in ``history``);
    * a stationary point that is not a minimum: a test held (gtol reads a zero column's
      cosine ``0 / 0`` as 0) where a parameter's Jacobian column is zero and the cost falls
      along that parameter (two residual evaluations per zero column at the end of a fit,
      counted in ``evaluations``; see :mod:`funcopt.least_squares_probe`);
    * a tolerance test (ftol, xtol, or one below machine precision) that held where the
      final point is not stationary (reason "stalled: ..."): ``gnorm^2`` over the columns
      whose own Gauss-Newton move is representable is above ``max(ftol, eps)`` and the
      residuals' rounding (for an ftol stop after an accepted damped step, ``ftol`` times
      the step's damping margin), e.g. an accepted step along a near-zero Jacobian column
      that predicted no reduction on a saddle line (see
      :func:`funcopt.least_squares_options._stall_check`; its cost, once at the end of such
      a stop: ``diag(J^T J)`` from ``min(m, n)`` Jacobian products, three more, and six
      residual evaluations);
    * ``max_steps`` updates (reason "max_steps: ...", naming a failed last solve).

    ``residual_fn`` must return the parameters' dtype (TypeError otherwise, before any work).

    Args:
        residual_fn: ``params -> r``, a 1-D floating tensor of residuals. Per-sample
            residuals bound to their data (``per_sample_residuals(...).bind(batch)``, or an
            adapter's ``per_sample=True`` result ``.bind(batch)``) keep their per-sample
            Jacobian here.
        params: the starting parameter pytree (float64 for reference-quality fits).
        max_steps: limit on updates (Jacobian evaluations), default 1000.
        tolerances: :class:`Tolerances` ``(ftol, xtol, gtol)`` of the tests above (default
            ``Tolerances()``: 1e-14, 1e-12, 1e-14, reference-quality fits in float64; MINPACK's
            default is 1.5e-8 for each).
        rule: the damping rule object; default None: ``TrustRegion()``, MINPACK's
            trust-region control of the damping (Moré 1978) with ``Delta_0 = 10 ||d x_0||``
            (with it and the exact Jacobian all 27 NIST StRD problems are solved from both
            starts to 6 digits); from ``x_0 = 0`` with scaling, where MINPACK takes
            ``Delta_0 = factor``, a length that does not scale with the residuals, here
            ``Delta_0 = factor ||r(x_0)||`` (see :meth:`funcopt.TrustRegion.initial_radius`),
            or ``Nielsen()`` with a matrix-free solver (``"cg"``, ``"pcg"``,
            :class:`funcopt.solvers.CG`), where the trust region's SVD of ``J`` is
            not available. ``fo.Nielsen()`` and ``fo.Classic()`` also work, see
            :func:`levenberg_marquardt`.
        geodesic: None (default) or :class:`funcopt.Geodesic`, Transtrum & Sethna's
            second-order correction (off by default: with the trust-region rule it is not
            needed on NIST StRD, and its acceptance test shortens the long first steps MGH10
            needs).
        solver: linear solver for the damped system (see :func:`levenberg_marquardt`).
        batched: ``params`` carry a leading batch dimension ``B`` of independent problems and
            ``residual_fn`` returns ``(B, m)``; each problem is fitted with its own damping,
            tests and result, and ``info`` is a
            :class:`funcopt.least_squares_batched.BatchedLeastSquaresInfo` of ``(B,)`` tensors
            (see :mod:`funcopt.least_squares_batched`). Default False.
        memory_budget: bytes the linear algebra may use (None: no limit). The path follows
            :func:`memory_path`: dense while ``m n + min(m, n)^2`` numbers fit, else
            matrix-free (CG to a relative residual of ``max(1e-10, 100 eps)`` on
            Jacobian-vector products with a Jacobi preconditioner from the exact
            ``diag(J^T J)``, ``min(m, n)`` products per update in chunks that fit the budget,
            ``Nielsen()`` in place of ``TrustRegion()``, ``D`` from that ``diag(J^T J)``);
            ``info.path`` says which.
        **options: the other options of :func:`levenberg_marquardt`: ``scaling``,
            ``max_attempts``, ``accept_ratio``, ``form``, ``jacobian_mode``, ``chunk_size``.
            A keyword that moved into an option object (``damping_rule``, ``ftol`` ...) raises
            TypeError naming the object to pass.

    Returns:
        ``(params, info)``: the final parameters (same tree, dtypes and devices) and a
        :class:`LeastSquaresInfo`.

    Reference: Moré, Garbow & Hillstrom (1980), User Guide for MINPACK-1, ANL-80-74.
    """
    check_driver_options(options, tolerances, "least_squares")
    if rule is None:
        rule = Nielsen() if _is_matrix_free(solver) else TrustRegion()
    check_rule(rule)
    check_geodesic(geodesic)
    if not isinstance(max_steps, int) or max_steps < 0:
        raise ValueError(f"max_steps={max_steps!r}: pass an int >= 0")
    if batched:
        from funcopt.least_squares_batched import least_squares_batched

        if memory_budget is not None:
            raise ValueError("memory_budget applies to single problems; with batched=True "
                             "every problem's J (m x n) is formed")
        o = lm_options(rule, geodesic, solver=solver, **options)
        return least_squares_batched(residual_fn, params, max_steps, tolerances, o)
    x, _ = ravel_params(params)
    r0 = _check_residual_fn(residual_fn, params, x)
    m = r0.numel()
    path = memory_path(m, x.numel(), x.element_size(), memory_budget)
    if path == "matrix-free":
        assert memory_budget is not None
        if not (isinstance(solver, str) and solver == "auto"):
            raise ValueError(f"memory_budget={memory_budget} puts this problem (m={m}, "
                             f"n={x.numel()}) on the matrix-free path, which chooses its own CG; "
                             f"solver={solver!r} would be ignored: pass solver='auto', or a "
                             "CG solver without memory_budget")
        solver, rule, options = _matrix_free_options(m, x.numel(), x.dtype, memory_budget, rule,
                                                       options)
    tx = levenberg_marquardt(residual_fn, rule=rule, geodesic=geodesic, solver=solver,
                             **options)
    t = tolerances
    tols = (t.ftol, t.xtol, t.gtol, torch.finfo(x.dtype).eps)
    limits = (rule.max_damping, isinstance(rule, TrustRegion), torch.finfo(x.dtype).tiny)
    state = tx.init(params)
    history: list[dict] = []
    reason, success, moved, evaluations = "max_steps: the step limit was reached", False, False, 1
    for _ in range(max_steps):
        updates, new_state = tx.update(None, state, params)
        h = _record(new_state)
        history.append(h)
        evaluations += h["attempts"] + 1
        stop = _stationary(h, tols)
        if stop is not None:  # a test on the current point: the step is not taken
            reason, success = stop, True
            break
        state = new_state
        if h["accepted"]:
            params, moved = apply_updates(params, updates), True
        stop, success = _outcome(h, tols, limits, history[-_EDGE_WINDOW:])
        if stop is not None:
            reason = stop
            break
    if reason.startswith("max_steps") and history and history[-1]["solve_failed"]:
        reason += "; the last update's linear solves failed (e.g. CG did not converge)"
    if success and history and not reason.startswith(("zero residual", "gtol")):
        reason, success = _stall_check(residual_fn, params, history[-1], tols, reason,
                                       m * x.numel(), (state.scale, rule))
        if not success and not moved and isinstance(rule, TrustRegion):
            reason += (f"; no step from x0 was accepted: the trust region's first radius, "
                       f"radius_factor ||d x0|| (||r(x0)|| = {history[0]['residual_norm']:.2g}), "
                       "is too short to change the cost when x0 is far below the solution's "
                       "scale: start from x0 of that scale (or x0 = 0), or pass a larger "
                       "rule=fo.TrustRegion(radius_factor=...)")
    if success and not moved and not reason.startswith(("zero residual", "gtol")):
        reason, success = ("no step was accepted from the start point, so it is not a minimum "
                           f"of the cost although a test held ({reason})"), False
    if success and not reason.startswith("zero residual"):  # a zero Jacobian column?
        dense = not _is_matrix_free(solver) and getattr(solver, "row_block", None) is None
        reason, success, probes = zero_column_check(residual_fn, params, reason,
                                                    options if dense else None)
        evaluations += probes
    r = residual_fn(params).detach()
    rnorm = float(scaled_norm(r.double()))
    return params, LeastSquaresInfo(
        len(history), 0.5 * rnorm * rnorm if rnorm < 1e154 else math.inf, reason, success,
        history, evaluations, rnorm, path,
    )


# --------------------------------------------------------------------------- residual adapters


def _one_sample_output(model_fn: Callable[[PyTree, Tensor], Tensor], params: PyTree,
                       inputs: Tensor, who: str) -> Tensor:
    """``model_fn`` on a batch of one sample (``inputs`` unsqueezed), that batch dim removed."""
    out = model_fn(params, inputs.unsqueeze(0))
    if not isinstance(out, torch.Tensor) or out.ndim == 0 or out.shape[0] != 1:
        got = f"a {type(out).__name__}" if not isinstance(out, torch.Tensor) else f"shape {tuple(out.shape)}"
        raise ValueError(
            f"{who}(per_sample=True): model_fn on a batch of 1 sample returned {got}; it must "
            "return one output row per input sample (leading size 1 here). Samples must be "
            "independent: use the per_sample=False path for models that mix samples"
        )
    return out[0]


def _require_integer_labels(labels: Tensor) -> None:
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(
            f"cross_entropy_residuals: labels must be integer class indices, got {labels.dtype}; "
            "pass them as int64 (e.g. labels.long() after checking they are whole numbers)"
        )


def mse_residuals(
    model_fn: Callable[[PyTree, Tensor], Tensor], per_sample: bool = False
) -> Callable[..., Tensor]:
    """Residuals whose half squared norm is half the mean squared error.

    ``r = (model_fn(params, inputs) - targets).reshape(-1) / sqrt(N)`` with ``N`` the number of
    elements, so ``0.5 ||r||^2 = 0.5 * mean((f - y)^2)``. The returned function takes
    ``(params, batch)`` with ``batch = (inputs, targets)``.

    ``per_sample=True`` gives the same residuals as :func:`funcopt.per_sample_residuals`
    (sample ``i`` contributes ``(model_fn(params, inputs[i:i+1])[0] - targets[i]) / sqrt(N)``),
    so :func:`funcopt.func.jacobian` and Levenberg-Marquardt build ``J`` sample by sample at
    ``O(N)`` cost instead of ``O(N^2)``. This needs a ``model_fn`` that runs under
    ``torch.func.vmap`` (e.g. ``functional_call`` of Linear/Conv/activation layers) and
    independent samples: a model that mixes samples gets a batch of one and gives other
    residuals, silently unless it fails under ``vmap`` (see :func:`funcopt.per_sample_residuals`).
    """
    if per_sample:
        def sample_fn(params: PyTree, sample: Any, num_samples: int) -> Tensor:
            inputs, targets = sample
            out = _one_sample_output(model_fn, params, inputs, "mse_residuals")
            if out.shape != targets.shape:
                raise ValueError(
                    f"model output {tuple(out.shape)} and targets {tuple(targets.shape)} of one "
                    "sample differ in shape; reshape the targets to the model's output"
                )
            diff = out - targets.to(out.dtype)
            diff = diff if diff.ndim == 1 else diff.reshape(-1)  # a view op fewer per call
            return diff / (num_samples * diff.numel()) ** 0.5

        return per_sample_residuals(sample_fn, pass_num_samples=True)

    def residual_fn(params: PyTree, batch: Any) -> Tensor:
        inputs, targets = batch
        out = model_fn(params, inputs)
        if out.shape != targets.shape:
            raise ValueError(
                f"model output {tuple(out.shape)} and targets {tuple(targets.shape)} differ in "
                "shape; reshape the targets to the model's output"
            )
        diff = (out - targets.to(out.dtype)).reshape(-1)
        return diff / diff.numel() ** 0.5

    return residual_fn


def cross_entropy_residuals(
    model_fn: Callable[[PyTree, Tensor], Tensor], eps: float = 1e-12, per_sample: bool = False
) -> Callable[..., Tensor]:
    """Cross-entropy turned into one residual per sample.

    ``r_i = sqrt(2 * l_i / N + eps)``, ``l_i = logsumexp(z_i) - z_{i, y_i}`` the cross-entropy
    of sample ``i`` with logits ``z_i = model_fn(params, inputs)[i]`` and class ``y_i``, ``N``
    the batch size; so ``0.5 ||r||^2 = mean_i l_i + N eps / 2`` and the Gauss-Newton matrix
    ``J^T J`` is built from ``grad sqrt(l_i)`` (the square-root residual construction used by
    torch-levenberg-marquardt and cuPyLMA). ``eps`` (1e-12) keeps the derivative of the square
    root finite when a loss is exactly zero. ``batch = (inputs, labels)``, labels int64.

    ``per_sample=True``: the same residuals through :func:`funcopt.per_sample_residuals`
    (``r_i`` from ``model_fn(params, inputs[i:i+1])``), so Jacobians are taken sample by sample
    at ``O(N)`` cost; samples must be independent (see :func:`mse_residuals`).
    """

    if per_sample:
        def sample_fn(params: PyTree, sample: Any, num_samples: int) -> Tensor:
            inputs, label = sample
            logits = _one_sample_output(model_fn, params, inputs, "cross_entropy_residuals")
            if logits.ndim != 1 or label.ndim != 0:
                raise ValueError(
                    f"cross_entropy_residuals needs logits (N, C) and labels (N,); one sample "
                    f"gave logits {tuple(logits.shape)} and label {tuple(label.shape)}"
                )
            _require_integer_labels(label)
            # shape (1,): under vmap, a number times a 0-d tensor costs two more operations
            loss = (torch.logsumexp(logits, dim=0, keepdim=True)
                    - logits.gather(0, label[None].long()))
            return torch.sqrt(2.0 * loss.clamp(min=0.0) / num_samples + eps)

        return per_sample_residuals(sample_fn, pass_num_samples=True)

    def residual_fn(params: PyTree, batch: Any) -> Tensor:
        inputs, labels = batch
        logits = model_fn(params, inputs)
        if logits.ndim != 2 or labels.shape != logits.shape[:1]:
            raise ValueError(
                f"cross_entropy_residuals needs logits (N, C) and labels (N,); got "
                f"{tuple(logits.shape)} and {tuple(labels.shape)}"
            )
        _require_integer_labels(labels)
        loss = torch.logsumexp(logits, dim=1) - logits.gather(1, labels[:, None].long())[:, 0]
        return torch.sqrt(2.0 * loss.clamp(min=0.0) / logits.shape[0] + eps)

    return residual_fn
