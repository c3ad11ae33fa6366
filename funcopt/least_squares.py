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
from funcopt.transforms.levenberg_marquardt import levenberg_marquardt

__all__ = ["LeastSquaresInfo", "least_squares", "mse_residuals", "cross_entropy_residuals"]

Tensor = torch.Tensor


class LeastSquaresInfo(NamedTuple):
    """What :func:`least_squares` did.

    steps: updates run (Jacobian evaluations). cost: final ``0.5 ||r||^2``. reason: why it
    stopped (see :func:`least_squares`). success: a convergence test held (not the step limit).
    history: one dict per update (``cost``, ``new_cost``, ``damping``, ``gain_ratio``,
    ``step_norm``, ``grad_cos``, ``accepted``, ``attempts``). evaluations: residual evaluations.
    """

    steps: int
    cost: float
    reason: str
    success: bool
    history: list
    evaluations: int


def _check_residual_fn(residual_fn: Callable[[PyTree], Tensor], params: PyTree) -> None:
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


def _record(s) -> dict:
    return {
        "cost": float(s.cost), "new_cost": float(s.new_cost), "damping": float(s.damping),
        "radius": float(s.radius),
        "gain_ratio": float(s.gain_ratio), "step_norm": float(s.step_norm),
        "x_norm": float(s.x_norm), "grad_cos": float(s.grad_cos),
        "predicted": float(s.predicted), "accepted": bool(s.accepted), "attempts": int(s.attempts),
    }


def _converged(h: dict, ftol: float, xtol: float, gtol: float, eps: float) -> str | None:
    """MINPACK's tests on the last update's statistics; ``None`` when none holds."""
    cost = h["cost"]
    if cost == 0.0:
        return "zero residual"
    actred = (cost - h["new_cost"]) / cost if math.isfinite(h["new_cost"]) else -1.0
    prered = h["predicted"] / cost
    ratio_ok = 0.5 * h["gain_ratio"] <= 1.0
    f_ok = abs(actred) <= ftol and prered <= ftol and ratio_ok
    x_ok = h["step_norm"] <= xtol * h["x_norm"]
    if f_ok and x_ok:
        return "ftol and xtol: cost and parameters converged"
    if f_ok:
        return "ftol: relative reduction of the cost below ftol"
    if x_ok:
        return "xtol: relative step below xtol"
    if abs(actred) <= eps and prered <= eps and ratio_ok:
        return "ftol below machine precision: no further reduction possible"
    if h["step_norm"] <= eps * h["x_norm"]:
        return "xtol below machine precision: no further improvement possible"
    return None


def least_squares(
    residual_fn: Callable[[PyTree], Tensor],
    params: PyTree,
    *,
    max_steps: int = 1000,
    ftol: float = 1e-14,
    xtol: float = 1e-12,
    gtol: float = 1e-14,
    solver: Any = "auto",
    damping_rule: str = "trust_region",
    geodesic_acceleration: bool = False,
    **lm_options: Any,
) -> tuple[PyTree, LeastSquaresInfo]:
    """Minimise ``0.5 ||residual_fn(params)||^2`` by Levenberg-Marquardt (MINPACK's tests).

    Stopping tests (MINPACK ``lmder``), checked after every update, with ``F`` the cost,
    ``delta`` the last step, ``d`` the scaling and ``x`` the parameters:

    * ``gtol``: ``max_j |J_j^T r| / (||J_j|| ||r||) <= gtol`` at the current point;
    * ``ftol``: ``|actual| <= ftol`` and ``predicted <= ftol`` and ``rho <= 2``, both relative
      reductions of ``F``;
    * ``xtol``: ``||d * delta|| <= xtol * ||d * x||``;
    * the same three with machine epsilon of the dtype ("no further reduction possible"), so
      ``ftol = xtol = gtol = 1e-15`` runs to the limit of the floating-point format;
    * the damping reached ``max_damping`` with every attempt rejected;
    * ``max_steps`` updates (reason "max_steps", ``success=False``).

    Args:
        residual_fn: ``params -> r``, a 1-D floating tensor of residuals. Per-sample
            residuals bound to their data (``per_sample_residuals(...).bind(batch)``, or an
            adapter's ``per_sample=True`` result ``.bind(batch)``) keep their per-sample
            Jacobian here.
        params: the starting parameter pytree (float64 for reference-quality fits).
        max_steps: limit on updates (Jacobian evaluations), default 1000.
        ftol, xtol, gtol: tolerances above (defaults 1e-14, 1e-12, 1e-14: reference-quality
            fits in float64; MINPACK's default is 1.5e-8 for each).
        solver: linear solver for the damped system (see :func:`levenberg_marquardt`).
        damping_rule: default ``"trust_region"`` here: MINPACK's trust-region control of the
            damping (Moré 1978) with ``Delta_0 = 10 ||d x_0||``; with it and the exact Jacobian
            all 27 NIST StRD problems are solved from both starts to 6 digits (``"nielsen"``
            and ``"classic"`` also work, see :func:`levenberg_marquardt`).
        geodesic_acceleration: Transtrum & Sethna's second-order correction (default False:
            with the trust-region rule it is not needed on NIST StRD, and its acceptance test
            shortens the long first steps MGH10 needs).
        **lm_options: any other option of :func:`levenberg_marquardt` (damping rule, scaling,
            geodesic acceleration, ...).

    Returns:
        ``(params, info)``: the final parameters (same tree, dtypes and devices) and a
        :class:`LeastSquaresInfo`.

    Reference: Moré, Garbow & Hillstrom (1980), User Guide for MINPACK-1, ANL-80-74.
    """
    for name, tol in (("ftol", ftol), ("xtol", xtol), ("gtol", gtol)):
        if not (isinstance(tol, (int, float)) and tol >= 0):
            raise ValueError(f"{name}={tol!r}: pass a number >= 0")
    if not isinstance(max_steps, int) or max_steps < 0:
        raise ValueError(f"max_steps={max_steps!r}: pass an int >= 0")
    _check_residual_fn(residual_fn, params)
    x, _ = ravel_params(params)
    eps, tiny = torch.finfo(x.dtype).eps, torch.finfo(x.dtype).tiny
    tx = levenberg_marquardt(residual_fn, solver=solver, damping_rule=damping_rule,
                             geodesic_acceleration=geodesic_acceleration, **lm_options)
    max_damping = lm_options.get("max_damping", 1e16)
    state = tx.init(params)
    history: list[dict] = []
    reason, evaluations = "max_steps", 1
    for _ in range(max_steps):
        updates, new_state = tx.update(None, state, params)
        h = _record(new_state)
        history.append(h)
        evaluations += h["attempts"] + 1
        if h["grad_cos"] <= max(gtol, eps):
            reason = "gtol: gradient orthogonal to the residuals" if h["grad_cos"] <= gtol \
                else "gtol below machine precision: gradient orthogonal to the residuals"
            break
        state = new_state
        if h["accepted"]:
            params = apply_updates(params, updates)
        reason = _converged(h, ftol, xtol, gtol, eps) or reason
        if reason != "max_steps":
            break
        if not h["accepted"] and (h["damping"] >= max_damping or (
                damping_rule == "trust_region" and h["radius"] <= tiny)):
            reason = "damping reached max_damping: no step reduces the cost" \
                if h["damping"] >= max_damping else "trust region vanished: no step reduces the cost"
            break
    cost = 0.5 * float(torch.linalg.vector_norm(residual_fn(params).double()) ** 2)
    return params, LeastSquaresInfo(
        len(history), cost, reason, reason != "max_steps", history, evaluations
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
            diff = (out - targets.to(out.dtype)).reshape(-1)
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
            loss = torch.logsumexp(logits, dim=0) - logits.gather(0, label[None].long())[0]
            return torch.sqrt(2.0 * loss.clamp(min=0.0) / num_samples + eps)[None]

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
