"""Gradient filters and gates: centralisation, NaN zeroing, adaptive (unit-wise) clipping,
accumulation over k steps, freezing, and the skip predicates of optax's MultiSteps.
"""

# ruff: noqa: F405 (the names of the toolkit's star import)
from __future__ import annotations

from typing import Any, NamedTuple

import torch

from funcopt.compose import masked, partition, set_to_zero
from funcopt.transforms._toolkit import *  # noqa: F403

__all__ = [
    "ZeroNansState", "ApplyEveryState", "centralize", "zero_nans", "adaptive_grad_clip",
    "apply_every", "freeze", "selective_transform", "skip_not_finite", "skip_large_updates",
]


def centralize() -> GradientTransformation:
    r"""Gradient centralisation: subtract from every leaf of 2 or more dimensions its mean over
    all dimensions but the first, :math:`u_{i,\cdot} \leftarrow u_{i,\cdot} -
    \operatorname{mean}(u_{i,\cdot})`; vectors and scalars pass unchanged.

    Reference: Yong et al., "Gradient Centralization", ECCV 2020; optax ``centralize``.
    """

    def update(updates, state, params=None, **extra):
        u, treedef = _leaves(updates, params, "centralize")
        out = [x - x.mean(dim=tuple(range(1, x.dim())), keepdim=True) if x.dim() > 1 else x
               for x in u]
        return tree_unflatten(treedef, out), state

    return GradientTransformation(lambda params: EmptyState(), update)


class ZeroNansState(NamedTuple):
    """State of :func:`zero_nans`: per leaf, whether the last gradient held a NaN."""

    found_nan: Any


def zero_nans() -> GradientTransformation:
    r"""Replace NaN entries of the updates by 0; ``state.found_nan`` holds, per leaf, a 0-d bool
    tensor saying whether the last update had a NaN there (inf is kept).

    Reference: optax ``zero_nans``.
    """

    def init(params):
        return ZeroNansState([torch.zeros((), dtype=torch.bool, device=x.device)
                              for x in tree_leaves(params)])

    def update(updates, state, params=None, **extra):
        u, treedef = _leaves(updates, params, "zero_nans")
        nan = [torch.isnan(x) for x in u]
        out = [torch.where(m, torch.zeros_like(x), x) for m, x in zip(nan, u)]
        return tree_unflatten(treedef, out), ZeroNansState([m.any() for m in nan])

    return GradientTransformation(init, update)


def _unitwise_norm(x: Tensor, axis: Any) -> Tensor:
    """The l2 norm of each unit (output row/filter) of ``x``, broadcast to ``x``'s shape (optax's
    ``unitwise_norm``: all of a vector; dim 0 of a matrix or 3-d tensor; dims 0-2 of a 4-d
    convolution kernel in HWIO layout; dims 0-3 of a 5-d one)."""
    if axis is not None:
        dims: Any = axis
    elif x.squeeze().dim() <= 1:
        dims = tuple(range(x.dim()))
    elif x.dim() in (2, 3):
        dims = (0,)
    elif x.dim() in (4, 5):
        dims = tuple(range(x.dim() - 1))
    else:
        raise ValueError(f"adaptive_grad_clip: a leaf of shape {tuple(x.shape)} has no default "
                         "unit; pass axis= (the dimensions to take the norm over)")
    return torch.sqrt((x * x).sum(dim=dims, keepdim=True)).expand(x.shape)


def adaptive_grad_clip(clipping: float, eps: float = 1e-3, axis: Any = None) -> GradientTransformation:
    r"""Adaptive gradient clipping (unit-wise): clip each unit's gradient to a fraction of its
    parameter norm,

    .. math:: g_i \leftarrow g_i \cdot \frac{\lambda \max(\|w_i\|, \epsilon)}{\max(\|g_i\|,
        10^{-6})}\ \text{ where } \|g_i\| \ge \lambda\max(\|w_i\|, \epsilon),

    units as in :func:`_unitwise_norm` (or the dimensions ``axis``).

    Args:
      clipping: :math:`\lambda` >= 0. eps: :math:`\epsilon` >= 0 (default 1e-3).
      axis: dimensions of a unit's norm (default None: by the leaf's number of dimensions).

    Needs ``params``. Reference: Brock et al., "High-Performance Large-Scale Image Recognition
    Without Normalization", ICML 2021; optax ``adaptive_grad_clip``.
    """
    _check("clipping", clipping)
    _check("eps", eps)

    def update(updates, state, params=None, **extra):
        params = require_params(params, "adaptive_grad_clip")
        u, treedef = _leaves(updates, params, "adaptive_grad_clip")
        out = []
        for g, p in zip(u, _as(tree_leaves(params), u)):
            g_norm, limit = _unitwise_norm(g, axis), clipping * _unitwise_norm(p, axis).clamp_min(eps)
            out.append(torch.where(g_norm < limit, g, g * (limit / g_norm.clamp_min(1e-6))))
        return tree_unflatten(treedef, out), state

    return GradientTransformation(lambda params: EmptyState(), update)


class ApplyEveryState(NamedTuple):
    """State of :func:`apply_every`: the step ``count`` and the gradients accumulated since
    the last emitted update (``grad_acc``)."""

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count by design (optax's name)
    grad_acc: Any


def apply_every(k: int = 1) -> GradientTransformation:
    r"""Accumulate (sum) the updates and emit the sum every ``k``-th step, 0 on the others.

    ``count`` runs 0..k-1. Unlike :func:`funcopt.multi_steps`, transforms chained before it
    still update their state every step. Args: ``k`` >= 1 (default 1).

    Reference: optax ``apply_every``.
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"apply_every: k={k!r} must be an int >= 1")

    def init(params):
        return ApplyEveryState(step_counter(params), _zeros(tree_leaves(params), None))

    def update(updates, state, params=None, **extra):
        g, treedef = _leaves(updates, params, "apply_every", state.grad_acc)
        count = (state.count + 1) % k
        if not g:
            return updates, ApplyEveryState(count, state.grad_acc)
        c, dt = state.count % k, scalar_dtype(g)
        acc = ops.add(ops.mul(_as(state.grad_acc, g), (c != 0).to(dt)), g)
        out = ops.mul(acc, (c == k - 1).to(dt))
        return tree_unflatten(treedef, _as(out, g)), ApplyEveryState(count, _as(acc, state.grad_acc))

    return GradientTransformation(init, update)


def freeze(mask: Any) -> GradientTransformation:
    """Zero the updates of the leaves where ``mask`` is True: ``masked(set_to_zero(), mask)``.

    Args: ``mask``: True/False for all, or a tree of bools with the params' structure (or a
    prefix), or a callable ``params -> such a tree``. Reference: optax ``freeze``.
    """
    return masked(set_to_zero(), mask)


def selective_transform(optimizer: GradientTransformation, *, freeze_mask: Any) -> GradientTransformation:
    """Run ``optimizer`` on the leaves where ``freeze_mask`` is False and zero the others:
    ``partition({"train": optimizer, "freeze": set_to_zero()}, labels)``; ``optimizer`` keeps
    state for the trained leaves only.

    Args: ``optimizer``: the transform; ``freeze_mask``: a tree of bools (True = frozen) with
    the params' structure. Reference: optax ``selective_transform``.
    """
    labels = tree_map(lambda m: "freeze" if m else "train", freeze_mask)
    return partition({"train": optimizer, "freeze": set_to_zero()}, labels)


def skip_not_finite(updates: Any, gradient_step: Any, params: Any) -> tuple[Tensor, dict[str, Tensor]]:
    """A skip predicate: ``(should_skip, {"should_skip", "num_not_finite"})``, skipping when any
    entry of ``updates`` is NaN or inf (0-d tensors, no host sync). ``gradient_step`` and
    ``params`` are ignored (optax's ``should_skip_update_fn`` signature).

    Reference: optax ``skip_not_finite``.
    """
    leaves = tree_leaves(updates)
    count = torch.stack([(~torch.isfinite(x)).sum() for x in leaves]).sum() if leaves else (
        torch.zeros((), dtype=torch.int64))
    skip = count > 0
    return skip, {"should_skip": skip, "num_not_finite": count}


def skip_large_updates(
    updates: Any, gradient_step: Any, params: Any, max_squared_norm: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """A skip predicate: skip when :math:`\\|u\\|^2 \\ge` ``max_squared_norm`` (or it is NaN);
    returns ``(should_skip, {"should_skip", "norm_squared"})``. Bind ``max_squared_norm`` with
    ``functools.partial``. Reference: optax ``skip_large_updates``.
    """
    leaves = tree_leaves(updates)
    sq = torch.stack([(x * x).sum() for x in leaves]).sum() if leaves else torch.zeros(())
    skip = ~(sq < max_squared_norm)
    return skip, {"should_skip": skip, "norm_squared": sq}
