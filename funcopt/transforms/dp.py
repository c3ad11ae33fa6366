"""Differentially private SGD (DP-SGD): per-example clipping and noisy aggregation.

The inputs here are per-example gradients, every leaf with a leading batch axis, as
:func:`funcopt.func.per_sample_grads` returns them; the outputs have the parameters' shapes.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from funcopt.base import (
    GradientTransformation,
    ScalarOrSchedule,
    Tensor,
    increment,
    step_counter,
    tree_flatten,
    tree_unflatten,
)
from funcopt.compose import chain, identity
from funcopt.engine import check_hyperparameter, check_number, expect_state
from funcopt.transforms.clipping import _M1, _mix, _normal

__all__ = [
    "per_example_global_norm_clip", "per_example_layer_norm_clip",
    "DifferentiallyPrivateAggregateState", "differentially_private_aggregate", "dpsgd",
]


def _batched_leaves(grads: Any, name: str) -> tuple[list[Tensor], Any]:
    leaves, treedef = tree_flatten(grads)
    if not leaves:
        raise ValueError(f"{name}: grads has no leaves")
    n = leaves[0].shape[0] if leaves[0].dim() else None
    if n is None or any(g.dim() < 1 or g.shape[0] != n for g in leaves):
        raise ValueError(
            f"{name} expects per-example gradients, every leaf with the same leading batch "
            f"axis (e.g. from funcopt.func.per_sample_grads); got shapes "
            f"{[tuple(g.shape) for g in leaves]}")
    return leaves, treedef


def _check_clip(name: str, value: Any) -> None:
    """A clipping norm: a number or 0-d tensor >= 0; ``inf`` (clip nothing) is allowed."""
    if not (isinstance(value, float) and value == math.inf):
        check_hyperparameter(name, value, low=0.0)


def _clip_sum(leaves: list[Tensor], clip: Any) -> tuple[list[Tensor], Tensor]:
    """Sum over the batch of each example's gradient scaled by ``min(1, clip / ||g_i||)``
    (the norm over all of ``leaves``; 1 where it is 0/0), and how many were scaled down."""
    parts = [(g.reshape(g.shape[0], -1) ** 2).sum(dim=1) for g in leaves]
    sq = parts[0]
    for part in parts[1:]:
        sq = sq + part
    norms = torch.sqrt(sq)
    mult = torch.nan_to_num(torch.clamp(clip / norms, max=1.0), nan=1.0)
    out = [torch.tensordot(mult.to(g.dtype), g, dims=1) for g in leaves]
    return out, (mult < 1.0).sum()


def per_example_global_norm_clip(grads: Any, l2_norm_clip: float) -> tuple[Any, Tensor]:
    r"""Clip each example's gradient to global norm ``C`` and sum over the batch:

    .. math:: \bar g = \sum_i g_i \min\left(1, \frac{C}{\|g_i\|}\right)

    (:math:`\|g_i\|` over all leaves of example ``i``; an all-zero example counts as
    unclipped). Args: ``grads``: a tree whose leaves all have a leading batch axis;
    ``l2_norm_clip``: ``C`` >= 0 (``inf`` clips nothing). Returns ``(summed tree, number of
    examples clipped)``. A function, not a transform, as in optax.

    Reference: Abadi et al., "Deep Learning with Differential Privacy", CCS 2016; optax
    ``per_example_global_norm_clip``.
    """
    _check_clip("per_example_global_norm_clip: l2_norm_clip", l2_norm_clip)
    leaves, treedef = _batched_leaves(grads, "per_example_global_norm_clip")
    out, count = _clip_sum(leaves, l2_norm_clip)
    return tree_unflatten(treedef, out), count


def per_example_layer_norm_clip(
    grads: Any, global_l2_norm_clip: float, uniform: bool = True
) -> tuple[Any, Any]:
    r"""Clip each example's gradient leaf by leaf and sum over the batch: leaf ``k`` of
    example ``i`` is scaled by :math:`\min(1, C_k / \|g_{i,k}\|)` with
    :math:`C_k = C/\sqrt{K}` (``uniform``, default; ``K`` leaves) or
    :math:`C_k = C\sqrt{D_k/D}` (``D_k`` entries of leaf ``k`` per example, ``D`` in all), so
    that :math:`\sum_k C_k^2 = C^2`.

    Args: ``grads`` (leaves with a leading batch axis); ``global_l2_norm_clip``: ``C`` >= 0;
    ``uniform``. Returns ``(summed tree, tree of per-leaf counts of clipped examples)``.

    Reference: McMahan et al., "Learning Differentially Private Recurrent Language Models",
    ICLR 2018; optax ``per_example_layer_norm_clip``.
    """
    _check_clip("per_example_layer_norm_clip: global_l2_norm_clip", global_l2_norm_clip)
    if not isinstance(uniform, bool):
        raise TypeError(f"per_example_layer_norm_clip: uniform={uniform!r} must be a bool")
    leaves, treedef = _batched_leaves(grads, "per_example_layer_norm_clip")
    total = sum(g[0].numel() for g in leaves)
    sums, counts = [], []
    for g in leaves:
        frac = 1.0 / len(leaves) if uniform else g[0].numel() / total
        (s,), c = _clip_sum([g], global_l2_norm_clip * frac**0.5)
        sums.append(s)
        counts.append(c)
    return tree_unflatten(treedef, sums), tree_unflatten(treedef, counts)


class DifferentiallyPrivateAggregateState(NamedTuple):
    """State of :func:`differentially_private_aggregate`: ``count`` (0-d int64 step) and
    ``key`` (0-d int64 seed of the noise stream)."""

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count by design (optax's name)
    key: Tensor


def differentially_private_aggregate(
    l2_norm_clip: float, noise_multiplier: float, key: int = 0
) -> GradientTransformation:
    r"""DP-SGD's aggregation: clip per example, sum, add Gaussian noise, average.

    .. math:: u = \frac{1}{B}\Big(\sum_{i=1}^B g_i \min\big(1, \tfrac{C}{\|g_i\|}\big)
        + \sigma C\, n\Big), \quad n \sim \mathcal N(0, I)

    The updates must be per-example gradients (leading batch axis ``B``); put this first in a
    chain. The noise comes from funcopt's counter-based generator keyed by ``key`` and the
    step (the same numbers on every device, saved with the state; not JAX's streams).

    Args:
      l2_norm_clip: ``C`` >= 0. noise_multiplier: :math:`\sigma` >= 0 (noise std over ``C``).
      key: int seed of the noise (default 0; optax takes a JAX key).

    Gradient accumulation (multi_steps, apply_every) must not wrap it. Reference: Abadi et
    al., "Deep Learning with Differential Privacy", CCS 2016; optax.contrib
    ``differentially_private_aggregate``.
    """
    check_hyperparameter("differentially_private_aggregate: l2_norm_clip", l2_norm_clip, low=0.0)
    check_hyperparameter("differentially_private_aggregate: noise_multiplier", noise_multiplier,
                         low=0.0)
    check_number("differentially_private_aggregate: l2_norm_clip", l2_norm_clip)
    if not isinstance(key, int) or isinstance(key, bool):
        raise TypeError(f"differentially_private_aggregate: key must be an int seed, got "
                        f"{type(key).__name__}")

    def init(params):
        count = step_counter(params)
        return DifferentiallyPrivateAggregateState(
            count, torch.tensor(key, dtype=torch.int64, device=count.device))

    def update(updates, state, params=None, **extra):
        expect_state(state, DifferentiallyPrivateAggregateState, "differentially_private_aggregate")
        leaves, treedef = _batched_leaves(updates, "differentially_private_aggregate")
        count = increment(state.count)
        clipped, _ = _clip_sum(leaves, l2_norm_clip)
        dtype = torch.float64 if any(x.dtype == torch.float64 for x in clipped) else torch.float32
        sizes = [x.numel() for x in clipped]
        noise = _normal(sum(sizes), _mix(_mix(state.key) ^ (count * _M1)), dtype)
        std, b = l2_norm_clip * noise_multiplier, leaves[0].shape[0]
        out = [(c + std * n.view(c.shape).to(c.dtype)) / b
               for c, n in zip(clipped, torch.split(noise, sizes))]
        return tree_unflatten(treedef, out), DifferentiallyPrivateAggregateState(count, state.key)

    return GradientTransformation(init, update)


def dpsgd(
    learning_rate: ScalarOrSchedule, l2_norm_clip: float, noise_multiplier: float, seed: int,
    momentum: float | None = None, nesterov: bool = False,
) -> GradientTransformation:
    r"""DP-SGD: ``chain(differentially_private_aggregate(C, sigma, seed), trace(momentum,
    nesterov) if momentum is not None, scale_by_learning_rate(learning_rate))``.

    Args: learning_rate :math:`\eta`; l2_norm_clip ``C``; noise_multiplier :math:`\sigma`;
    seed (int); momentum (default None: none); nesterov (default False). The updates are
    per-example gradients (leading batch axis). Reference: Abadi et al. 2016; optax.contrib
    ``dpsgd``.
    """
    from funcopt.transforms.scaling import scale_by_learning_rate, trace

    return chain(
        differentially_private_aggregate(l2_norm_clip, noise_multiplier, seed),
        trace(decay=momentum, nesterov=nesterov) if momentum is not None else identity(),
        scale_by_learning_rate(learning_rate),
    )
