"""Combinators: transforms built from transforms."""

from __future__ import annotations

from typing import Any

from funcopt.base import GradientTransformation, OptState, Params, Updates

__all__ = ["chain"]


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply ``transforms`` one after another; the state is the tuple of their states.

    Extra keyword arguments given to ``update`` reach every transform in the chain.
    ``chain()`` is the identity.
    """
    for i, t in enumerate(transforms):
        if not isinstance(t, GradientTransformation):
            raise TypeError(
                f"chain: argument {i} is a {type(t).__name__}, not a GradientTransformation; "
                "pass transforms such as fo.scale_by_adam(), not factories or tensors"
            )

    def init(params: Params) -> OptState:
        return tuple(t.init(params) for t in transforms)

    def update(updates: Updates, state: OptState, params: Params | None = None, **extra: Any):
        if not isinstance(state, tuple) or len(state) != len(transforms):
            raise ValueError(
                f"chain of {len(transforms)} transforms got a state that is not a tuple of "
                f"{len(transforms)} states; pass the state returned by this chain's init"
            )
        new_state = []
        for t, s in zip(transforms, state):
            updates, s = t.update(updates, s, params, **extra)
            new_state.append(s)
        return updates, tuple(new_state)

    return GradientTransformation(init, update)
