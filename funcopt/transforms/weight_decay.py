"""Weight decay as a transform: add ``lambda * params`` to the updates."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import optree

from funcopt.base import (
    GradientTransformation,
    Params,
    ScalarOrSchedule,
    Tensor,
    check_hyperparameter,
    increment,
    resolve,
    step_counter,
    tree_check_structure,
    tree_unflatten,
)
from funcopt.engine import expect_state, ops
from funcopt.transforms._toolkit import param_leaves

__all__ = ["AddDecayedWeightsState", "add_decayed_weights"]


class AddDecayedWeightsState(NamedTuple):
    """State of :func:`add_decayed_weights`: ``count``, the 0-d int64 step (the weight-decay
    schedule's argument)."""

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count by design (optax's name)


def _mask_leaves(mask: Any, params: Params) -> list[bool]:
    """The mask as one Python bool per parameter leaf, checked against the params' structure."""
    tree = mask(params) if callable(mask) else mask
    leaves = optree.tree_leaves(tree)
    tree_check_structure(tree, params, ("mask", "params"))
    for x in leaves:
        if not isinstance(x, bool):
            raise TypeError(
                f"add_decayed_weights: mask leaves must be Python bools, got {type(x).__name__}; "
                "build the mask from names/shapes, e.g. lambda p: {k: v.ndim > 1 for k, v in p.items()}"
            )
    return leaves


def add_decayed_weights(
    weight_decay: ScalarOrSchedule = 0.0,
    mask: Any | Callable[[Params], Any] | None = None,
) -> GradientTransformation:
    r"""Add weight decay: :math:`u_t \leftarrow u_t + \lambda\, \theta_t`.

    Placed before an adaptive scaling (``chain(add_decayed_weights(wd), scale_by_adam(), ...)``)
    this is L2 regularisation as in torch.optim.Adam(weight_decay=wd); placed after it and before
    ``scale_by_learning_rate`` it is decoupled weight decay (AdamW, Loshchilov & Hutter 2019).

    Args:
      weight_decay: :math:`\lambda` >= 0, a number, 0-d tensor or schedule ``count -> lambda``
        (default 0).
      mask: which parameters decay: a tree of Python bools with the structure of the params, or
        a function ``params -> such a tree``; ``True`` decays the leaf (default None: all).

    Needs ``params`` in ``update``. Reference: optax ``add_decayed_weights``.
    """
    check_hyperparameter("weight_decay", weight_decay, low=0.0)

    def init(params):
        return AddDecayedWeightsState(step_counter(params))

    def update(updates, state, params=None, **extra):
        expect_state(state, AddDecayedWeightsState, "add_decayed_weights")
        u, treedef, p = param_leaves(updates, params, "add_decayed_weights")
        count = increment(state.count)
        if not u:
            return updates, AddDecayedWeightsState(count)
        wd = resolve(weight_decay, state.count)
        keep = _mask_leaves(mask, params) if mask is not None else [True] * len(u)
        idx = [i for i, k in enumerate(keep) if k]
        if idx:
            pu = [p[i] if p[i].dtype == u[i].dtype else p[i].to(u[i].dtype) for i in idx]
            if isinstance(wd, Tensor):
                new = ops.add([u[i] for i in idx], ops.mul(pu, wd.to(u[0].device)))
            else:
                new = ops.add([u[i] for i in idx], pu, alpha=wd)
            u = list(u)
            for i, x in zip(idx, new):
                u[i] = x if x.dtype == u[i].dtype else x.to(u[i].dtype)
        return tree_unflatten(treedef, u), AddDecayedWeightsState(count)

    return GradientTransformation(init, update)
