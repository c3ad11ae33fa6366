"""What the transform modules are written with, in one import.

``from funcopt.transforms._toolkit import *`` brings the contract's types and tree helpers
(:mod:`funcopt.base`), ``chain``, the leaf engine's ``ops``/``leaves``/``expect_state``, the
leaf-list arithmetic of :mod:`funcopt.transforms.leaf_math`, and three builders of the
``update``/transform shapes that most transforms share:

- :func:`counted_update`: a state with a step ``count``; check the state, flatten and check
  the updates, step the counter (an empty tree only counts), then the method's own step;
- :func:`moments_update`: the same for a ``(count, mu, nu)`` state (Adam's shape);
- :func:`leafwise`: an empty state and a function of the update leaves (clipping, scaling);

and :func:`param_leaves`, the opening of an ``update`` that needs the parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from funcopt.base import (
    EmptyState,
    GradientTransformation,
    ScalarOrSchedule,
    Tensor,
    increment,
    replace,
    require_params,
    step_counter,
    tree_leaves,
    tree_map,
    tree_unflatten,
)
from funcopt.compose import chain
from funcopt.engine import expect_state, ops, scalar_dtype
from funcopt.engine import leaves as _leaves
from funcopt.transforms.leaf_math import (
    TensorList,
    _as,
    _axpy,
    _check,
    _check_beta,
    _full,
    _hp,
    _moment,
    _moment_sq,
    _sqrt,
    _steps,
    _zeros,
)

__all__ = [
    "EmptyState", "GradientTransformation", "ScalarOrSchedule", "Tensor", "increment",
    "replace", "require_params", "step_counter", "tree_leaves", "tree_map", "tree_unflatten",
    "chain", "expect_state", "ops", "scalar_dtype", "_leaves",
    "TensorList", "_as", "_axpy", "_check", "_check_beta", "_full", "_hp", "_moment",
    "_moment_sq", "_sqrt", "_steps", "_zeros",
    "counted_update", "moments_update", "leafwise", "param_leaves",
]

def param_leaves(updates: Any, params: Any, who: str, *state: Any
                 ) -> tuple[list[Tensor], Any, list[Tensor]]:
    """``(g, treedef, p)``: the update leaves, checked against ``params`` (required: a
    ValueError naming ``who`` without them) and ``state`` as :func:`funcopt.engine.leaves`
    does, their tree definition, and the parameter leaves."""
    params = require_params(params, who)
    g, treedef = _leaves(updates, params, who, *state)
    return g, treedef, tree_leaves(params)


Step = Callable[[list[Tensor], Any, Tensor], tuple[TensorList, Any]]


def counted_update(who: str, state_cls: type | tuple[type, ...], step: Step,
                   leaves_of: str = "mu") -> Callable[..., tuple[Any, Any]]:
    """The ``update`` of a transform whose state has a step ``count``.

    It checks that the state is a ``state_cls`` (TypeError naming ``who``), flattens the
    updates and checks them against ``params`` and the per-leaf list ``state.<leaves_of>``,
    and computes ``count = state.count + 1``. An empty tree returns the updates and the state
    with the new count; otherwise ``step(g, state, count)`` returns the output leaves and the
    new state, and the leaves go back to the updates' dtypes and tree.
    """

    def update(updates, state, params=None, **extra):
        expect_state(state, state_cls, who)
        g, treedef = _leaves(updates, params, who, getattr(state, leaves_of))
        count = increment(state.count)
        if not g:
            return updates, replace(state, count=count)
        out, new = step(g, state, count)
        return tree_unflatten(treedef, _as(out, g)), new

    return update


MomentStep = Callable[[list[Tensor], list[Tensor], list[Tensor], Tensor],
                      tuple[TensorList, TensorList, TensorList]]


def moments_update(who: str, state_cls: type, step: MomentStep) -> Callable[..., tuple[Any, Any]]:
    """:func:`counted_update` for a ``state_cls(count, mu, nu)`` state: ``step(g, mu, nu,
    count)`` gets the moments in the updates' dtypes and returns ``(out, mu, nu)``; the new
    moments are stored back in the state's dtypes."""

    def moment_step(g: list[Tensor], state: Any, count: Tensor) -> tuple[TensorList, Any]:
        out, mu, nu = step(g, _as(state.mu, g), _as(state.nu, g), count)
        return out, state_cls(count, _as(mu, state.mu), _as(nu, state.nu))

    return counted_update(who, state_cls, moment_step)


def leafwise(who: str, fn: Callable[[list[Tensor]], TensorList]) -> GradientTransformation:
    """A transform with an empty state whose update is ``fn`` on the list of update leaves
    (checked against ``params`` when given, results cast back to the leaves' dtypes); an empty
    tree passes through unchanged."""

    def init(params):
        return EmptyState()

    def update(updates, state, params=None, **extra):
        u, treedef = _leaves(updates, params, who)
        if not u:
            return updates, state
        return tree_unflatten(treedef, _as(fn(u), u)), state

    return GradientTransformation(init, update)
