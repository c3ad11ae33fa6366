"""Adaptive batch sizes: the norm test and the (augmented) inner-product test (AdAdaGrad).

AdAdaGrad (Lau, Liu, Kolar, "AdAdaGrad: Adaptive Batch Size Schemes for Adaptive Gradient
Methods", arXiv 2402.11215) grows the batch size b_k with a variance test on the per-sample
gradients g_i = grad l_i(w_k) of the current batch B_k, whose mean is g = grad F_{B_k}(w_k):

* norm test (Byrd, Chin, Nocedal, Wu 2012), eta > 0::

      sum_j Var_{i in B_k}(g_{i,j}) / b_k  <=  eta^2 ||g||^2

* inner-product test (Bollapragada, Byrd, Nocedal 2018), theta > 0::

      Var_{i in B_k}(<g_i, g>) / b_k  <=  theta^2 ||g||^4

* augmented inner-product test: the inner-product test and the orthogonality test, nu > 0::

      sum_j Var_{i in B_k}(g_i - (<g_i, g> / ||g||^2) g)_j / b_k  <=  nu^2 ||g||^2

Var is the unbiased sample variance (divide by b_k - 1). When a test fails, the next batch is
the smallest that would pass it: b_{k+1} = min(b_max, max(b_k, ceil(T_k))) with T_k the left
side times b_k over the right side, e.g. T_k = sum_j Var(g_{i,j}) / (eta^2 ||g||^2). All three
come from the sums in :class:`funcopt.func.PerSampleStats` (S2 = sum_i ||g_i||^2,
p_i = <g_i, g>): sum_j Var_j = (S2 - b ||g||^2) / (b - 1), Var(p) = (sum p_i^2 -
(sum p_i)^2 / b) / (b - 1), and the orthogonal part sums to (S2 - sum p_i^2 / ||g||^2 -
b ||g||^2 (1 - sum p_i / (b ||g||^2))^2) / (b - 1).

Differences from the reference code (github.com/timlautk/AdAdaGrad): inner products use the
whole gradient vector as in the paper (the code takes them leaf by leaf); the batch size is
exactly the test's ceil(T_k), split into micro-batches of unequal size where needed (the code
rounds it up to micro x ranks x accumulation steps); the linear decay goes from the peak down
to the minimum (the code's linear schedule rises).

Reference CLI knobs and their counterparts:

- ``--test_type norm/ip/ip+orth``: :func:`norm_test`, :func:`inner_product_test`,
  :func:`augmented_inner_product_test`
- ``--eta``, ``--theta``, ``--nu``: their ``eta``, ``theta``, ``nu`` (default 0.1 each, as the
  code)
- ``--batch_size``: ``batch_size`` of the test (initial global batch size)
- ``--max_batch_size``: ``max_batch_size`` of the test
- ``--test_interval``: ``test_interval`` of the test
- ``--max_micro_batch_size``: ``max_micro_batch_size`` of :func:`funcopt.batch_size_loop.fit_adaptive`
- ``--max_test_micro_batch_size``: ``chunk_size`` of fit_adaptive (per-sample statistics
  chunks)
- ``--gradient_accumulation_steps``: ``accumulation_steps`` of fit_adaptive (the minimum
  number of micro-batches per rank and step)
- ``--max_samples``: ``max_samples`` of fit_adaptive
- ``--learning_rate``, ``--min_lr``: ``peak_value``, ``end_value`` of the sample schedules
- ``--warmup_samples``, ``--lr_decay_samples``: :func:`warmup_cosine_samples`,
  :func:`warmup_linear_samples` arguments of the same names
- ``--scheduler multistep``, ``--milestones``, ``--gamma``: :func:`multistep_samples`
- ``--lr_decay_type sample``: :func:`scale_by_sample_schedule` (learning rate by samples seen)
- ``--optimizer``: chain with ``fo.scale_by_adam()``, ``fo.adagrad`` ... pieces
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from funcopt.base import (
    GradientTransformation,
    Params,
    Updates,
    check_hyperparameter,
    current_learning_rate,
    increment,
    mark_if_schedule_value,
    register_hyperparameters,
    resolve,
    step_counter,
    tree_unflatten,
)
from funcopt.engine import leaves, ops

__all__ = [
    "NormTestState",
    "InnerProductTestState",
    "norm_test",
    "inner_product_test",
    "augmented_inner_product_test",
    "norm_test_statistic",
    "inner_product_test_statistic",
    "orthogonality_test_statistic",
    "warmup_cosine_samples",
    "warmup_linear_samples",
    "multistep_samples",
    "SampleScheduleState",
    "scale_by_sample_schedule",
]

Tensor = torch.Tensor


class NormTestState(NamedTuple):
    """count: steps taken; statistic: the last T_k, clipped to [0, max_batch_size] (0 where it
    is undefined: fewer than 2 samples, or zero gradient and zero noise; 0 before the first
    step); batch_size: the batch size of the NEXT step
    (0-d int64); samples: samples seen so far (0-d int64)."""

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count by design (optax's name)
    statistic: Tensor
    batch_size: Tensor
    samples: Tensor


class InnerProductTestState(NamedTuple):
    """As :class:`NormTestState`, for the (augmented) inner-product test."""

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count by design (optax's name)
    statistic: Tensor
    batch_size: Tensor
    samples: Tensor


# --------------------------------------------------------------------------- statistics


def _unbiased(x: Tensor, b: Tensor) -> Tensor:
    """x / (b - 1), clamped at 0 (rounding), NaN when b < 2 (variance undefined)."""
    return torch.where(b > 1, x.clamp(min=0) / (b - 1).clamp(min=1), torch.full_like(x, math.nan))


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """num / den with 0/0 -> NaN (no decision) and x/0 -> +inf (grow to the maximum)."""
    undecided = torch.where(num > 0, torch.full_like(num, math.inf),
                            torch.full_like(num, math.nan))
    return torch.where(den > 0, num / den.clamp(min=torch.finfo(den.dtype).tiny), undecided)


def norm_test_statistic(stats, eta: Any) -> Tensor:
    """T = sum_j Var_i(g_{i,j}) / (eta^2 ||g||^2): the batch size the norm test asks for."""
    b, g2 = stats.count.to(stats.grad_sq_norm.dtype), stats.grad_sq_norm
    var = _unbiased(stats.sum_sq_norms - b * g2, b)
    return _ratio(var, eta**2 * g2)


def _need_inner(stats, who: str) -> None:
    if stats.sum_inner is None or stats.sum_sq_inner is None:
        raise ValueError(f"{who} needs per-sample inner products <g_i, g>: compute the stats "
                         "with inner products (fit_adaptive does so for this test; "
                         "stats_from_per_sample_grads(..., inner=True))")


def inner_product_test_statistic(stats, theta: Any) -> Tensor:
    """T = Var_i(<g_i, g>) / (theta^2 ||g||^4): the batch size the inner-product test asks for."""
    _need_inner(stats, "inner_product_test")
    b, g2 = stats.count.to(stats.grad_sq_norm.dtype), stats.grad_sq_norm
    var = _unbiased(stats.sum_sq_inner - stats.sum_inner.square() / b, b)
    return _ratio(var, theta**2 * g2.square())


def orthogonality_test_statistic(stats, nu: Any) -> Tensor:
    """T = sum_j Var_i(g_i - <g_i,g> g / ||g||^2)_j / (nu^2 ||g||^2) (orthogonality test)."""
    _need_inner(stats, "augmented_inner_product_test")
    b, g2 = stats.count.to(stats.grad_sq_norm.dtype), stats.grad_sq_norm
    safe = g2.clamp(min=torch.finfo(g2.dtype).tiny)
    mean_gap = 1 - stats.sum_inner / (b * safe)
    total = stats.sum_sq_norms - stats.sum_sq_inner / safe - b * g2 * mean_gap.square()
    return _ratio(_unbiased(total, b), nu**2 * g2)


# --------------------------------------------------------------------------- controllers


def _controller(name, state_cls, statistic_fn, batch_size, max_batch_size, test_interval):
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"{name}: batch_size={batch_size!r} must be a positive int")
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) \
            or max_batch_size < batch_size:
        raise ValueError(f"{name}: max_batch_size={max_batch_size!r} must be an int >= "
                         f"batch_size={batch_size}")
    if not isinstance(test_interval, int) or test_interval < 1:
        raise ValueError(f"{name}: test_interval={test_interval!r} must be a positive int")

    def init(params: Params):
        count = step_counter(params)
        dtype = torch.get_default_dtype()
        return state_cls(count, torch.zeros((), dtype=dtype, device=count.device),
                         torch.full_like(count, batch_size), torch.zeros_like(count))

    def update(updates: Updates, state, params: Params | None = None, *,
               per_sample_stats=None, **extra: Any):
        if per_sample_stats is None:
            raise ValueError(f"{name} needs the step's per-sample statistics: call "
                             "update(grads, state, params, per_sample_stats=stats) with stats "
                             "from funcopt.batch_size_loop.gradient_and_stats or funcopt.func")
        leaves(updates, params, name)
        t = statistic_fn(per_sample_stats, state.count)
        test_now = (state.count % test_interval == 0) & (state.batch_size < max_batch_size)
        # the stored statistic stays finite (apply_if_finite checks the state): undefined
        # (NaN: fewer than 2 samples, or 0/0) is 0, no growth; +inf is the maximum batch size
        t = torch.nan_to_num(t, nan=0.0, posinf=float(max_batch_size))
        t = t.clamp(max=float(max_batch_size))
        want = torch.ceil(t).to(torch.int64)
        grown = torch.maximum(state.batch_size, want).clamp(max=max_batch_size)
        new = state_cls(increment(state.count), t.to(state.statistic.dtype),
                        torch.where(test_now, grown, state.batch_size),
                        state.samples + per_sample_stats.count.to(torch.int64))
        return updates, new

    return GradientTransformation(init, update)


def norm_test(eta: Any = 0.1, batch_size: int = 64, max_batch_size: int = 50_000,
              test_interval: int = 1) -> GradientTransformation:
    """Grow the batch size with the norm test; the gradient passes through unchanged.

    With the step's per-sample statistics (``update(..., per_sample_stats=stats)``, a
    :class:`funcopt.func.PerSampleStats`) it sets::

        T_k     = sum_j Var_{i in B_k}(g_{i,j}) / (eta^2 ||g||^2)
        b_{k+1} = min(b_max, max(b_k, ceil(T_k)))     (b_{k+1} = b_k when T_k is undefined)

    Args:
        eta: eta, the relative variance allowed (float, 0-d tensor or schedule of the step;
            default 0.1, the reference code's).
        batch_size: b_0, the first global batch size (default 64).
        max_batch_size: b_max (default 50_000).
        test_interval: test every this many steps; in between b stays (default 1).

    State: :class:`NormTestState` (``batch_size`` is the next step's b, ``statistic`` T_k,
    ``samples`` the samples seen). No host synchronisation.

    Reference: Byrd et al., Math. Program. 134 (2012); AdAdaGrad, arXiv 2402.11215, Sec. 3.
    """
    check_hyperparameter("eta", eta, low=0.0, low_inclusive=False)
    return _controller("norm_test", NormTestState,
                       lambda s, c: norm_test_statistic(s, resolve(eta, c)),
                       batch_size, max_batch_size, test_interval)


def inner_product_test(theta: Any = 0.1, batch_size: int = 64, max_batch_size: int = 50_000,
                       test_interval: int = 1) -> GradientTransformation:
    """Grow the batch size with the inner-product test; the gradient passes unchanged.

    ::

        T_k     = Var_{i in B_k}(<g_i, g>) / (theta^2 ||g||^4)
        b_{k+1} = min(b_max, max(b_k, ceil(T_k)))

    Args: theta (theta, default 0.1; float, tensor or schedule), batch_size (b_0, default 64),
    max_batch_size (b_max, default 50_000), test_interval (default 1), as :func:`norm_test`.
    The statistics must carry the inner products (sum_inner, sum_sq_inner).

    Reference: Bollapragada, Byrd, Nocedal, SIAM J. Optim. 28 (2018); arXiv 2402.11215.
    """
    check_hyperparameter("theta", theta, low=0.0, low_inclusive=False)
    return _controller("inner_product_test", InnerProductTestState,
                       lambda s, c: inner_product_test_statistic(s, resolve(theta, c)),
                       batch_size, max_batch_size, test_interval)


def augmented_inner_product_test(theta: Any = 0.1, nu: Any = 0.1, batch_size: int = 64,
                                 max_batch_size: int = 50_000,
                                 test_interval: int = 1) -> GradientTransformation:
    """Grow the batch size with the augmented inner-product test; gradient unchanged.

    ::

        T_ip    = Var_i(<g_i, g>) / (theta^2 ||g||^4)
        T_orth  = sum_j Var_i(g_i - (<g_i, g> / ||g||^2) g)_j / (nu^2 ||g||^2)
        b_{k+1} = min(b_max, max(b_k, ceil(max(T_ip, T_orth))))

    Args: theta (theta, default 0.1), nu (nu, default 0.1), batch_size (b_0, default 64),
    max_batch_size (b_max, default 50_000), test_interval (default 1).

    Reference: Bollapragada, Byrd, Nocedal (2018), eq. (3.7)-(3.8); arXiv 2402.11215.
    """
    check_hyperparameter("theta", theta, low=0.0, low_inclusive=False)
    check_hyperparameter("nu", nu, low=0.0, low_inclusive=False)

    def stat(s, c):
        a = inner_product_test_statistic(s, resolve(theta, c))
        b = orthogonality_test_statistic(s, resolve(nu, c))
        return torch.where(torch.isnan(a) | torch.isnan(b), torch.fmax(a, b), torch.maximum(a, b))

    return _controller("augmented_inner_product_test", InnerProductTestState, stat,
                       batch_size, max_batch_size, test_interval)


# --------------------------------------------------------------------------- sample schedules


def _samples(n: Any) -> Tensor:
    return n.to(torch.float64) if isinstance(n, Tensor) else torch.tensor(float(n), dtype=torch.float64)


def _check_decay(peak_value, end_value, warmup_samples, lr_decay_samples, who):
    check_hyperparameter(f"{who}: warmup_samples", warmup_samples)
    if lr_decay_samples <= warmup_samples:
        raise ValueError(f"{who}: lr_decay_samples={lr_decay_samples} must exceed "
                         f"warmup_samples={warmup_samples}")
    check_hyperparameter(f"{who}: peak_value", peak_value)
    check_hyperparameter(f"{who}: end_value", end_value)


def _warmup_decay(peak_value, end_value, warmup_samples, lr_decay_samples, shape):
    def schedule(samples: Any) -> Tensor:
        n = _samples(samples)
        warm = peak_value * n / warmup_samples if warmup_samples > 0 else n * 0 + peak_value
        r = ((n - warmup_samples) / (lr_decay_samples - warmup_samples)).clamp(0.0, 1.0)
        decay = end_value + shape(r) * (peak_value - end_value)
        return torch.where(n < warmup_samples, warm, decay).to(torch.get_default_dtype())

    return schedule


def warmup_cosine_samples(peak_value: float, warmup_samples: int, lr_decay_samples: int,
                          end_value: float = 0.0) -> Callable[[Any], Tensor]:
    """Learning rate by samples seen n: linear warmup, then cosine decay.

    lr(n) = peak * n / n_w for n < n_w; else end + (peak - end) (1 + cos(pi r)) / 2 with
    r = min(1, (n - n_w) / (n_d - n_w)). peak_value: peak learning rate (``--learning_rate``);
    warmup_samples: n_w; lr_decay_samples: n_d; end_value: ``--min_lr`` (default 0).
    Reference: AdAdaGrad code, ``get_warmup_cosine_lr_sample``.
    """
    _check_decay(peak_value, end_value, warmup_samples, lr_decay_samples, "warmup_cosine_samples")
    return _warmup_decay(peak_value, end_value, warmup_samples, lr_decay_samples,
                         lambda r: 0.5 * (1 + torch.cos(math.pi * r)))


def warmup_linear_samples(peak_value: float, warmup_samples: int, lr_decay_samples: int,
                          end_value: float = 0.0) -> Callable[[Any], Tensor]:
    """Learning rate by samples seen n: linear warmup, then linear decay to ``end_value``.

    lr(n) = peak * n / n_w for n < n_w; else peak - (peak - end) r, r = min(1, (n - n_w) /
    (n_d - n_w)). Arguments as :func:`warmup_cosine_samples`.
    """
    _check_decay(peak_value, end_value, warmup_samples, lr_decay_samples, "warmup_linear_samples")
    return _warmup_decay(peak_value, end_value, warmup_samples, lr_decay_samples, lambda r: 1 - r)


def multistep_samples(init_value: float, milestones: Sequence[int], gamma: float = 0.1
                      ) -> Callable[[Any], Tensor]:
    """lr(n) = init_value * gamma^(number of milestones <= n), n the samples seen.

    init_value: ``--learning_rate``; milestones: sample counts, increasing; gamma: factor per
    milestone (default 0.1). Reference: AdAdaGrad code, ``get_multistep_lr_sample``.
    """
    check_hyperparameter("multistep_samples: init_value", init_value)
    if list(milestones) != sorted(milestones):
        raise ValueError(f"multistep_samples: milestones={list(milestones)} must be increasing")
    marks = torch.tensor([float(m) for m in milestones], dtype=torch.float64)

    def schedule(samples: Any) -> Tensor:
        n = _samples(samples)
        k = (marks.to(n.device) <= n).sum()
        return (init_value * torch.as_tensor(gamma, dtype=torch.float64) ** k).to(
            torch.get_default_dtype())

    return schedule


class SampleScheduleState(NamedTuple):
    """samples: samples seen before this step; learning_rate: the current learning rate."""

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count by design (optax's name)
    samples: Tensor
    learning_rate: Tensor


register_hyperparameters(SampleScheduleState, "learning_rate")


def scale_by_sample_schedule(learning_rate: Any) -> GradientTransformation:
    """u <- -lr(n) u, with n the samples seen before this step (a learning rate by samples).

    The step's sample count comes from ``update(..., per_sample_stats=stats)`` (its ``count``)
    or ``update(..., batch_size=b)``. ``learning_rate`` is a schedule of the samples seen
    (:func:`warmup_cosine_samples` ...), or a number, which update() then reads from the
    state's ``learning_rate`` field so that it can be changed by writing the state.
    """
    check_hyperparameter("learning_rate", learning_rate)

    def init(params: Params):
        count = step_counter(params)
        lr = learning_rate(torch.zeros((), dtype=torch.int64)) if callable(learning_rate) \
            else learning_rate
        lr = torch.as_tensor(lr, dtype=torch.get_default_dtype()).to(count.device).clone()
        # a schedule's value (or inject_hyperparams' record of one) is a record: update
        # evaluates the schedule at the samples seen (uses the given tensor)
        return SampleScheduleState(count, torch.zeros_like(count),
                                   mark_if_schedule_value(lr, learning_rate))

    def update(updates: Updates, state, params: Params | None = None, *,
               per_sample_stats=None, batch_size=None, **extra: Any):
        if per_sample_stats is None and batch_size is None:
            raise ValueError("scale_by_sample_schedule needs the step's sample count: pass "
                             "per_sample_stats=stats or batch_size=b to update")
        b = per_sample_stats.count if per_sample_stats is not None else batch_size
        lr = current_learning_rate(learning_rate, state.learning_rate, state.samples)
        u, treedef = leaves(updates, params, "scale_by_sample_schedule")
        out = ops.mul(u, -lr.to(u[0].dtype)) if u else u
        samples = state.samples + torch.as_tensor(b, device=state.samples.device).to(torch.int64)
        new = SampleScheduleState(increment(state.count), samples,
                                  lr.to(state.learning_rate.dtype))
        return tree_unflatten(treedef, out), new

    return GradientTransformation(init, update)
