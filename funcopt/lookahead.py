"""Lookahead (Zhang et al. 2019): ``k`` fast steps forward, then one step of the slow weights
toward the fast ones; a wrapper around any transform, as optax's ``lookahead``."""

from __future__ import annotations

from typing import NamedTuple

import optree
import torch

from funcopt.base import (
    GradientTransformation,
    OptState,
    Params,
    require_params,
    step_counter,
    tree_leaves,
    tree_unflatten,
)
from funcopt.compose import _check_tx, _where_tree
from funcopt.engine import expect_state, ops
from funcopt.engine import leaves as engine_leaves

__all__ = ["lookahead", "LookaheadState", "LookaheadParams"]


class LookaheadParams(NamedTuple):
    """Fast and slow parameter copies for :func:`lookahead`."""

    fast: Params
    slow: Params

    @classmethod
    def init_synced(cls, params: Params) -> LookaheadParams:
        """Both copies start at ``params`` (the slow copy is a clone)."""
        return cls(params, optree.tree_map(torch.clone, params))


class LookaheadState(NamedTuple):
    """State of :func:`lookahead`: ``fast_state``, the fast optimizer's state, and
    ``steps_since_sync``, a 0-d int64 counter of fast steps since the last synchronisation."""

    fast_state: OptState
    steps_since_sync: torch.Tensor


def lookahead(
    fast_optimizer: GradientTransformation, sync_period: int, slow_step_size: float,
    reset_state: bool = False,
) -> GradientTransformation:
    """Lookahead: ``k`` fast steps forward, then pull the slow weights toward the fast ones.

    Fast steps: ``theta <- theta + fast(g)``. Every ``k``-th step (``k = sync_period``) after
    it: ``phi <- phi + alpha (theta - phi)`` and ``theta <- phi`` (``alpha = slow_step_size``).
    In this functional API the parameters are a :class:`LookaheadParams` ``(fast, slow)``
    (start with ``LookaheadParams.init_synced(params)``); the gradients passed to ``update``
    are taken at ``params.fast`` and have its structure; ``update`` needs ``params`` and
    returns ``LookaheadParams`` updates for ``apply_updates(params, updates)``. Evaluate
    with ``params.slow``. ``reset_state=True`` re-initialises the fast optimizer's state at
    each sync. Do not modify the updates before applying them.
    Reference: Zhang et al., "Lookahead Optimizer: k steps forward, 1 step back", 2019;
    optax.lookahead.
    """
    _check_tx(fast_optimizer, "lookahead", "fast_optimizer")
    if isinstance(sync_period, bool) or not isinstance(sync_period, int) or sync_period < 1:
        raise ValueError(f"lookahead: sync_period={sync_period!r} must be an int >= 1")

    def init(params):
        fast = params.fast if isinstance(params, LookaheadParams) else params
        return LookaheadState(fast_optimizer.init(fast), step_counter(fast))

    def update(updates, state, params=None, **extra):
        expect_state(state, LookaheadState, "lookahead")
        params = require_params(params, "lookahead")
        if not isinstance(params, LookaheadParams):
            raise TypeError("lookahead: params must be LookaheadParams(fast, slow); start with "
                            "LookaheadParams.init_synced(params)")
        upd, fast_state = fast_optimizer.update(updates, state.fast_state, params.fast, **extra)
        sync = state.steps_since_sync == sync_period - 1
        fast, slow = tree_leaves(params.fast), tree_leaves(params.slow)
        u, treedef = engine_leaves(upd, params.fast, "lookahead", slow)
        diff = ops.sub(ops.add(fast, u), slow)  # theta_k - phi
        slow_upd = ops.mul(diff, slow_step_size)
        to_slow = ops.sub(ops.add(slow, slow_upd), fast)  # phi' - theta
        fast_out = [torch.where(sync, t, x) for t, x in zip(to_slow, u)]
        slow_out = [torch.where(sync, s, torch.zeros_like(s)) for s in slow_upd]
        if reset_state:
            fast_state = _where_tree(sync, fast_optimizer.init(params.fast), fast_state)
        steps = torch.where(sync, torch.zeros_like(state.steps_since_sync),
                            state.steps_since_sync + 1)
        return (LookaheadParams(tree_unflatten(treedef, fast_out),
                                tree_unflatten(treedef, slow_out)),
                LookaheadState(fast_state, steps))

    return GradientTransformation(init, update)
