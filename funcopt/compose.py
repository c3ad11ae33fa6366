"""Combinators: chains of transforms and transforms restricted to parts of the tree.

``chain``/``named_chain`` run transforms one after another; ``masked`` and ``partition`` give
different leaves different transforms. The wrappers that change *when* or *on what* a
transform runs (``multi_steps``, ``apply_if_finite``, ``inject_hyperparams``, ``flatten``,
``lookahead`` ...) are in :mod:`funcopt.wrappers`. Every combinator is pure.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch

from funcopt.base import (
    EmptyState,
    GradientTransformation,
    OptState,
    Params,
    PyTree,
    Updates,
    tree_flatten,
    tree_leaves,
    tree_unflatten,
)
from funcopt.engine import expect_state, leaves

__all__ = [
    "chain",
    "named_chain",
    "identity",
    "set_to_zero",
    "partition",
    "PartitionState",
    "masked",
    "MaskedState",
]


def _check_tx(t: Any, who: str, i: Any) -> None:
    if not isinstance(t, GradientTransformation):
        raise TypeError(
            f"{who}: argument {i} is a {type(t).__name__}, not a GradientTransformation; "
            "pass transforms such as fo.scale_by_adam(), not factories or tensors"
        )


def _where_tree(cond: torch.Tensor, a: PyTree, b: PyTree) -> PyTree:
    """``a`` where ``cond`` else ``b``, leaf by leaf (same structure, tensor leaves)."""
    return optree.tree_map(lambda x, y: torch.where(cond, x, y), a, b)


# --------------------------------------------------------------------------- chains


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply ``transforms`` one after another; the state is the tuple of their states.

    Extra keyword arguments given to ``update`` reach every transform in the chain.
    ``chain()`` is the identity. Reference: optax.chain.
    """
    for i, t in enumerate(transforms):
        _check_tx(t, "chain", i)

    def init(params: Params) -> OptState:
        return tuple(t.init(params) for t in transforms)

    def update(updates: Updates, state: OptState, params: Params | None = None, **extra: Any):
        if not isinstance(state, tuple) or len(state) != len(transforms):
            raise ValueError(
                f"chain of {len(transforms)} transforms got a state that is not a tuple of "
                f"{len(transforms)} states; pass the state returned by this chain's init"
            )
        if not transforms:
            leaves(updates, params, "chain()")
        new_state = []
        for t, s in zip(transforms, state):
            updates, s = t.update(updates, s, params, **extra)
            new_state.append(s)
        return updates, tuple(new_state)

    return GradientTransformation(init, update)


def named_chain(*transforms: tuple[str, GradientTransformation]) -> GradientTransformation:
    """Like :func:`chain`, but the state is a dict ``name -> state`` of the named transforms.

    Args:
      *transforms: ``(name, transform)`` pairs with distinct names.
    Reference: optax.named_chain.
    """
    names = [n for n, _ in transforms]
    if len(set(names)) != len(names):
        raise ValueError(f"named_chain: names must be distinct, got {names}")
    for n, t in transforms:
        _check_tx(t, "named_chain", repr(n))

    def init(params):
        return {n: t.init(params) for n, t in transforms}

    def update(updates, state, params=None, **extra):
        if not isinstance(state, dict) or list(state) != names:
            raise ValueError(
                f"named_chain expects a dict state with keys {names}; pass this chain's init state"
            )
        new = {}
        for n, t in transforms:
            updates, new[n] = t.update(updates, state[n], params, **extra)
        return updates, new

    return GradientTransformation(init, update)


def identity() -> GradientTransformation:
    """``u <- u``: the updates pass through unchanged (state ``EmptyState()``); with
    ``params``, their leaves are checked against the updates' (types, structure, shapes)."""

    def update(updates, state, params=None, **extra):
        leaves(updates, params, "identity")
        return updates, state

    return GradientTransformation(lambda params: EmptyState(), update)


def set_to_zero() -> GradientTransformation:
    """``u <- 0``: zero updates (freezes parameters; use with :func:`partition`)."""

    def update(updates, state, params=None, **extra):
        u, treedef = leaves(updates, params, "set_to_zero")
        return tree_unflatten(treedef, [torch.zeros_like(x) for x in u]), state

    return GradientTransformation(lambda params: EmptyState(), update)


# --------------------------------------------------------------------------- masks and partitions


def _mask_leaves(tree: PyTree, mask: PyTree | Callable, who: str) -> list[Any]:
    """One mask entry (a bool, or a label for partition) per leaf of ``tree``; ``mask`` may be
    a prefix tree or a callable."""
    if callable(mask):
        mask = mask(tree)
    if isinstance(mask, (bool, str, int)):  # one entry for the whole tree (also traces in Dynamo,
        return [mask] * len(tree_leaves(tree))  # whose optree broadcast fails on it)
    try:
        full = optree.tree_broadcast_prefix(mask, tree)
    except ValueError as e:
        raise ValueError(
            f"{who}: the mask/labels tree does not match the parameter tree ({e}); give one "
            "entry per leaf, or a prefix of the tree, or a callable params -> such a tree"
        ) from None
    # one entry per leaf of ``tree``: empty (None) nodes of ``tree``, such as the leaves an
    # outer masked/partition took away, get none
    return list(optree.tree_structure(tree).flatten_up_to(full))


def _select(tree: PyTree | None, keep: list[bool]) -> PyTree | None:
    """``tree`` with the leaves where ``keep`` is False replaced by None (an empty node)."""
    if tree is None:
        return None
    leaves, treedef = tree_flatten(tree)
    return tree_unflatten(treedef, [x if k else None for x, k in zip(leaves, keep)])


class MaskedState(NamedTuple):
    """State of :func:`masked`: ``inner_state``, the state of the transform applied to the
    masked-in leaves."""

    inner_state: OptState


def masked(inner: GradientTransformation, mask: PyTree | Callable) -> GradientTransformation:
    """Apply ``inner`` to the leaves where ``mask`` is True; the others pass through unchanged.

    ``u_i <- inner(u)_i`` if ``mask_i`` else ``u_i``. ``inner`` sees the tree with the
    unmasked leaves replaced by ``None`` (an empty node), so its state holds only the masked
    leaves. Args: ``inner``: the transform; ``mask``: a tree of Python bools with the params'
    structure (or a prefix of it), or a callable ``tree -> such a tree`` (called on params in
    ``init`` and on the updates in ``update``). Reference: optax.masked.
    """
    _check_tx(inner, "masked", "inner")

    def init(params):
        return MaskedState(inner.init(_select(params, _mask_leaves(params, mask, "masked"))))

    def update(updates, state, params=None, **extra):
        expect_state(state, MaskedState, "masked")
        u, treedef = leaves(updates, params, "masked")
        keep = _mask_leaves(updates, mask, "masked")
        out, inner_state = inner.update(
            _select(updates, keep), state.inner_state, _select(params, keep), **extra
        )
        it = iter(tree_leaves(out))
        return tree_unflatten(treedef, [next(it) if k else x for x, k in zip(u, keep)]), \
            MaskedState(inner_state)

    return GradientTransformation(init, update)


class PartitionState(NamedTuple):
    """State of :func:`partition`: ``inner_states``, a dict from each label to its transform's
    state."""

    inner_states: dict


def partition(
    transforms: dict[Any, GradientTransformation], param_labels: PyTree | Callable
) -> GradientTransformation:
    """Apply a different transform to each group of parameters.

    ``u_i <- transforms[label_i](u restricted to that label)_i``. Args: ``transforms``: a dict
    ``label -> transform``; ``param_labels``: a tree of labels with the params' structure (or a
    prefix of it), or a callable ``params -> such a tree``. Every leaf must carry a label
    that is a key of ``transforms``. State: ``PartitionState(inner_states={label: state})``.
    Reference: optax.multi_transform / optax.partition.
    """
    if not isinstance(transforms, dict) or not transforms:
        raise TypeError("partition: transforms must be a non-empty dict label -> transform")
    for k, t in transforms.items():
        _check_tx(t, "partition", repr(k))

    def labels_of(tree):
        labels = _mask_leaves(tree, param_labels, "partition")
        missing = sorted({repr(lab) for lab in labels if lab not in transforms})
        if missing:
            raise ValueError(
                f"partition: labels {missing} have no transform; the transforms dict has "
                f"{sorted(map(repr, transforms))}"
            )
        return labels

    def init(params):
        labels = labels_of(params)
        return PartitionState({
            k: t.init(_select(params, [lab == k for lab in labels])) for k, t in transforms.items()
        })

    def update(updates, state, params=None, **extra):
        expect_state(state, PartitionState, "partition")
        labels = labels_of(updates)
        leaves, treedef = tree_flatten(updates)
        out, new_states = list(leaves), {}
        for k, t in transforms.items():
            keep = [lab == k for lab in labels]
            u, new_states[k] = t.update(
                _select(updates, keep), state.inner_states[k], _select(params, keep), **extra
            )
            it = iter(tree_leaves(u))
            out = [next(it) if kk else o for o, kk in zip(out, keep)]
        return tree_unflatten(treedef, out), PartitionState(new_states)

    return GradientTransformation(init, update)
