"""Clipping, constraints and gradient noise."""

# ruff: noqa: F405 (the names of the toolkit's star import)
from __future__ import annotations

from typing import NamedTuple

import torch

from funcopt.base import check_hyperparameter, tree_global_norm
from funcopt.transforms._toolkit import *  # noqa: F403
from funcopt.transforms.leaf_math import _is_schedule

__all__ = [
    "AddNoiseState", "clip", "clip_by_global_norm", "clip_by_block_rms",
    "keep_params_nonnegative", "add_noise",
]


def clip(max_delta: float) -> GradientTransformation:
    r"""Clip every element to :math:`[-\delta, \delta]`: :math:`u \leftarrow \min(\max(u,
    -\delta), \delta)`.

    Args:
      max_delta: :math:`\delta` >= 0.

    Reference: optax ``clip``.
    """
    check_hyperparameter("max_delta", max_delta, low=0.0)
    if isinstance(max_delta, Tensor) or _is_schedule(max_delta):
        raise TypeError("clip: max_delta must be a number")

    return leafwise("clip", lambda u: ops.clamp_max(ops.clamp_min(u, -max_delta), max_delta))


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    r"""Rescale the whole tree so its global l2 norm is at most ``max_norm``.

    .. math:: u \leftarrow u \cdot \min\left(1, \frac{c}{\|u\|_2}\right),\quad
        \|u\|_2 = \sqrt{\textstyle\sum_{leaves}\sum u_i^2}.

    The factor is a 0-d tensor chosen with ``torch.where`` (no host sync); a zero norm gives
    factor 1.

    Args:
      max_norm: :math:`c` > 0.

    Reference: Pascanu, Mikolov, Bengio, ICML 2013; optax ``clip_by_global_norm``;
    ``torch.nn.utils.clip_grad_norm_`` (which divides by ``norm + 1e-6``).
    """
    check_hyperparameter("max_norm", max_norm, low=0.0, low_inclusive=False)

    def clipped(u):
        norm = tree_global_norm(u)
        return ops.mul(u, torch.where(norm <= max_norm, 1.0, max_norm / norm))

    return leafwise("clip_by_global_norm", clipped)


def clip_by_block_rms(threshold: float) -> GradientTransformation:
    r"""Clip each leaf (block) to a root-mean-square of at most ``threshold``.

    .. math:: u_b \leftarrow u_b / \max\left(1, \operatorname{rms}(u_b)/\tau\right),\quad
        \operatorname{rms}(u_b) = \sqrt{\operatorname{mean}(u_b^2)}.

    Args:
      threshold: :math:`\tau` > 0.

    Reference: optax ``clip_by_block_rms``.
    """
    check_hyperparameter("threshold", threshold, low=0.0, low_inclusive=False)

    def clipped(u):
        sizes = [max(x.numel(), 1) ** 0.5 for x in u]
        rms = ops.div(ops.norm(u), sizes)
        return ops.div(u, ops.clamp_min(ops.div(rms, threshold), 1.0))

    return leafwise("clip_by_block_rms", clipped)


def keep_params_nonnegative() -> GradientTransformation:
    r"""Keep parameters non-negative: where :math:`\theta + u < 0` use :math:`u = -\theta`.

    The parameters then land exactly on 0 instead of going negative. Needs ``params``.

    Reference: optax ``keep_params_nonnegative``.
    """

    def init(params):
        return EmptyState()

    def update(updates, state, params=None, **extra):
        u, treedef, p = param_leaves(updates, params, "keep_params_nonnegative")
        if not u:
            return updates, state
        # theta + u < 0 exactly when u < -theta, so max(u, -theta) is the update
        out = ops.maximum(u, ops.neg(_as(p, u)))
        return tree_unflatten(treedef, out), state

    return GradientTransformation(init, update)


# --------------------------------------------------------------------------- noise

# A counter-based generator (SplitMix64's mixing function on int64 tensors, wrapping
# arithmetic): the noise depends only on (seed, step, element position), so it is the same on
# every device, needs no host-side generator and is saved with the state.
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_M1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_M2 = 0x94D049BB133111EB - (1 << 64)


def _shr(z: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 bit patterns."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _mix(z: Tensor) -> Tensor:
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    return z ^ _shr(z, 31)


def _normal(n: int, stream: Tensor, dtype: torch.dtype) -> Tensor:
    """``n`` standard normal values from the 0-d int64 ``stream`` (Box-Muller on one buffer)."""
    idx = torch.arange(n, dtype=torch.int64, device=stream.device)
    z = _mix(_mix(stream) + (idx + 1) * _GOLDEN)
    scale = 2.0**-24
    u1 = (_shr(z, 40).to(dtype) + 0.5) * scale
    u2 = ((z & ((1 << 24) - 1)).to(dtype) + 0.5) * scale
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * torch.pi * u2)


class AddNoiseState(NamedTuple):
    """State of :func:`add_noise`: ``count``, the 0-d int64 step t, and ``key``, the 0-d int64
    seed of the noise stream."""

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count by design (optax's name)
    key: Tensor


def add_noise(eta: float, gamma: float, seed: int = 0) -> GradientTransformation:
    r"""Add annealed Gaussian noise: :math:`u_t \leftarrow u_t + \sigma_t n_t`,
    :math:`n_t \sim \mathcal N(0, I)`, :math:`\sigma_t^2 = \eta / t^\gamma`, :math:`t = 1, 2, ...`

    The noise comes from a counter-based generator keyed by ``seed`` (kept in the state as a
    0-d int64 tensor), the step and the element's position in the flattened tree, drawn for
    all leaves in one buffer: runs are reproducible and a checkpointed state continues with the
    same noise. Its streams differ from JAX's, so values differ from optax.

    Args:
      eta: :math:`\eta` >= 0, the base variance.
      gamma: :math:`\gamma` >= 0, the annealing exponent (the paper uses 0.55).
      seed: the integer key of the noise stream (default 0).

    Reference: Neelakantan et al., "Adding Gradient Noise Improves Learning for Very Deep
    Networks", 2015; optax ``add_noise``.
    """
    check_hyperparameter("eta", eta, low=0.0)
    check_hyperparameter("gamma", gamma, low=0.0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"add_noise: seed must be an int, got {type(seed).__name__}")

    def init(params):
        count = step_counter(params)
        return AddNoiseState(count, torch.tensor(seed, dtype=torch.int64, device=count.device))

    def update(updates, state, params=None, **extra):
        expect_state(state, AddNoiseState, "add_noise")
        u, treedef = _leaves(updates, params, "add_noise")
        count = increment(state.count)
        if not u:
            return updates, AddNoiseState(count, state.key)
        dtype = torch.float64 if any(x.dtype == torch.float64 for x in u) else torch.float32
        std = torch.sqrt(eta / count.to(dtype) ** gamma)
        sizes = [x.numel() for x in u]
        noise = _normal(sum(sizes), _mix(_mix(state.key) ^ (count * _M1)), dtype) * std
        parts = [n.view(x.shape) for n, x in zip(torch.split(noise, sizes), u)]
        out = ops.add(u, _as(parts, u))
        return tree_unflatten(treedef, out), AddNoiseState(count, state.key)

    return GradientTransformation(init, update)
