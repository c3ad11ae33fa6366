"""The core contract: GradientTransformation, apply_updates and pytree helpers.

A transform is a pair of pure functions::

    init(params) -> state
    update(updates, state, params=None, **extra) -> (updates, state)

Pytrees are handled with optree (dict, list, tuple, NamedTuple, None and registered custom
nodes). ``None`` is an empty node, not a leaf: a masked-out entry simply has no leaves.
Every helper flattens once and works on the list of leaves with ``torch._foreach_*`` ops.
"""

from __future__ import annotations

import operator
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol, Union

import optree
import torch
from torch.compiler import is_compiling as _is_compiling

from funcopt.engine import check_hyperparameter, current_learning_rate, ops, resolve

Tensor = torch.Tensor
PyTree = Any
"""A pytree: nested dict, list, tuple, NamedTuple and ``None`` nodes (optree), tensor leaves."""
Params = PyTree
"""The parameter pytree a transform is built for."""
Updates = PyTree
"""A pytree shaped like the params: gradients going in, updates coming out."""
OptState = PyTree
"""A transform's state: a tuple/NamedTuple tree of tensors."""
Schedule = Callable[[Tensor], Union[Tensor, float]]
"""A function of the 0-d int64 step count returning a value (``step -> value``); see
:mod:`funcopt.schedules`."""
ScalarOrSchedule = Union[float, int, Tensor, Schedule]
"""A hyperparameter: a Python number, a 0-d tensor (differentiable through ``update``) or a
:data:`Schedule`."""

__all__ = [
    "GradientTransformation",
    "EmptyState",
    "TransformInitFn",
    "TransformUpdateFn",
    "Params",
    "Updates",
    "OptState",
    "PyTree",
    "Schedule",
    "ScalarOrSchedule",
    "apply_updates",
    "tree_flatten",
    "tree_unflatten",
    "tree_leaves",
    "tree_structure",
    "tree_map",
    "tree_zeros_like",
    "tree_ones_like",
    "tree_full_like",
    "tree_cast",
    "tree_add",
    "tree_sub",
    "tree_scale",
    "tree_vdot",
    "tree_global_norm",
    "tree_check_structure",
    "tree_flatten_pair",
    "tree_check_finite",
    "step_counter",
    "increment",
    "resolve",
    "current_learning_rate",
    "check_hyperparameter",
    "require_params",
    "register_hyperparameters",
    "hyperparameter_fields",
]


class TransformInitFn(Protocol):
    """The type of ``GradientTransformation.init``: ``init(params) -> state``, a pure function
    that builds the state (a tuple/NamedTuple tree of tensors) for the parameter tree."""

    def __call__(self, params: Params) -> OptState: ...


class TransformUpdateFn(Protocol):
    """The type of ``GradientTransformation.update``:
    ``update(updates, state, params=None, **extra) -> (updates, state)``, pure (its inputs are
    never mutated); extra keyword arguments a transform does not use are ignored."""

    def __call__(
        self, updates: Updates, state: OptState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, OptState]: ...


class GradientTransformation(NamedTuple):
    """A pure optimizer transform: ``init(params) -> state`` and
    ``update(updates, state, params=None, **extra) -> (updates, state)``.

    ``update`` never mutates its inputs. Extra keyword arguments (``value``, ``loss_fn``,
    ``batch``, ``per_sample_grads`` ...) travel through :func:`funcopt.chain`; a transform
    ignores the ones it does not use.
    """

    init: TransformInitFn
    update: TransformUpdateFn


EmptyState = tuple
"""The state of a stateless transform: ``EmptyState()`` is the empty tuple ``()``.

A plain tuple rather than a field-less NamedTuple: some torch.compile versions (2.11) fail to
trace a NamedTuple with no fields.
"""


# --------------------------------------------------------------------------- pytrees


def tree_flatten(tree: PyTree) -> tuple[list[Any], optree.PyTreeSpec]:
    """Leaves (None is an empty node, not a leaf) and the tree definition."""
    return optree.tree_flatten(tree)


def tree_flatten_tensors(tree: PyTree, leaf: str, fix: str) -> tuple[list[Tensor], optree.PyTreeSpec]:
    """:func:`tree_flatten`, after checking that every leaf is a tensor; otherwise a TypeError
    ``"<leaf % i> is a <type>, not a tensor; <fix>"`` (``leaf`` holds ``%d`` for the index)."""
    leaves, treedef = optree.tree_flatten(tree)
    for i, x in enumerate(leaves):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{leaf % i} is a {type(x).__name__}, not a tensor; {fix}")
    return leaves, treedef


def tree_unflatten(treedef: optree.PyTreeSpec, leaves: Sequence[Any]) -> PyTree:
    """The tree with definition ``treedef`` and these leaves (inverse of :func:`tree_flatten`)."""
    return optree.tree_unflatten(treedef, leaves)


def tree_leaves(tree: PyTree) -> list[Any]:
    """The leaves of ``tree`` in optree's order (``None`` is an empty node, not a leaf)."""
    return optree.tree_leaves(tree)


def tree_structure(tree: PyTree) -> optree.PyTreeSpec:
    """The tree definition (optree ``PyTreeSpec``) of ``tree``."""
    return optree.tree_structure(tree)


def tree_check_structure(
    tree: PyTree, other: PyTree, names: tuple[str, str] = ("updates", "params")
) -> None:
    """Raise a ValueError naming both trees when their structures differ.

    Skipped while ``torch.compile`` traces (some torch versions cannot trace a comparison of
    tree specs); the eager run of the same code has already checked the structures.
    """
    if _is_compiling():
        return
    a, b = optree.tree_structure(tree), optree.tree_structure(other)
    if a != b:
        raise ValueError(
            f"{names[0]} and {names[1]} have different tree structures:\n"
            f"  {names[0]}: {a}\n  {names[1]}: {b}\n"
            f"Pass {names[1]} with the same structure (keys, nesting, None entries) as {names[0]}."
        )


def tree_flatten_pair(
    tree: PyTree, other: PyTree, names: tuple[str, str] = ("updates", "params")
) -> tuple[list[Any], optree.PyTreeSpec, list[Any]]:
    """The leaves and tree definition of ``tree``, and the leaves of ``other``, which must have
    the same structure (a ValueError naming both otherwise). Each tree is flattened once."""
    leaves, treedef = optree.tree_flatten(tree)
    other_leaves, other_def = optree.tree_flatten(other)
    if not _is_compiling() and other_def != treedef:
        tree_check_structure(tree, other, names)
    return leaves, treedef, other_leaves


def tree_map(fn: Callable[..., Any], tree: PyTree, *rest: PyTree) -> PyTree:
    """Map ``fn`` over the leaves of ``tree`` and the matching leaves of ``rest``."""
    for i, other in enumerate(rest):
        tree_check_structure(tree, other, ("the first tree", f"tree #{i + 2}"))
    return optree.tree_map(fn, tree, *rest)


def tree_zeros_like(tree: PyTree, dtype: torch.dtype | None = None) -> PyTree:
    """A tree of zeros shaped and placed like ``tree`` (in ``dtype`` when given)."""
    return optree.tree_map(lambda x: torch.zeros_like(x, dtype=dtype), tree)


def tree_ones_like(tree: PyTree, dtype: torch.dtype | None = None) -> PyTree:
    """A tree of ones shaped and placed like ``tree`` (in ``dtype`` when given)."""
    return optree.tree_map(lambda x: torch.ones_like(x, dtype=dtype), tree)


def tree_full_like(tree: PyTree, value: float, dtype: torch.dtype | None = None) -> PyTree:
    """A tree of ``value``, shaped and placed like ``tree`` (in ``dtype`` when given)."""
    return optree.tree_map(lambda x: torch.full_like(x, value, dtype=dtype), tree)


def tree_cast(tree: PyTree, dtype: torch.dtype | None) -> PyTree:
    """Cast floating leaves to ``dtype`` (``None`` leaves the tree unchanged)."""
    if dtype is None:
        return tree
    return optree.tree_map(lambda x: x.to(dtype) if x.is_floating_point() else x, tree)


def tree_add(a: PyTree, b: PyTree, alpha: float = 1.0) -> PyTree:
    """``a + alpha * b`` leaf by leaf."""
    tree_check_structure(a, b, ("a", "b"))
    la, treedef = tree_flatten(a)
    return tree_unflatten(treedef, ops.add(la, tree_leaves(b), alpha=alpha))


def tree_sub(a: PyTree, b: PyTree) -> PyTree:
    """``a - b`` leaf by leaf (the trees must have the same structure)."""
    return tree_add(a, b, alpha=-1.0)


def tree_scale(tree: PyTree, scalar: float | Tensor) -> PyTree:
    """``scalar * tree`` leaf by leaf (``scalar`` a number or a 0-d tensor)."""
    leaves, treedef = tree_flatten(tree)
    return tree_unflatten(treedef, ops.mul(leaves, scalar))


def tree_vdot(a: PyTree, b: PyTree) -> Tensor:
    """Sum over leaves of ``<a_i, b_i>`` as a 0-d tensor (float32 at least)."""
    tree_check_structure(a, b, ("a", "b"))
    la, lb = tree_leaves(a), tree_leaves(b)
    if not la:
        return torch.zeros(())
    dots = [torch.vdot(x.reshape(-1), y.reshape(-1).to(x.dtype)) for x, y in zip(la, lb)]
    return torch.stack([d.to(torch.promote_types(d.dtype, torch.float32)) for d in dots]).sum()


def tree_global_norm(tree: PyTree) -> Tensor:
    """The l2 norm of all leaves together, as a 0-d tensor (no host sync)."""
    leaves = tree_leaves(tree)
    if not leaves:
        return torch.zeros(())
    norms = ops.norm(leaves)
    dtype = torch.promote_types(norms[0].dtype, torch.float32)
    return torch.linalg.vector_norm(torch.stack([n.to(dtype) for n in norms]))


def tree_check_finite(tree: PyTree) -> Tensor:
    """A 0-d bool tensor: every element of every leaf is finite (no host sync)."""
    leaves = tree_leaves(tree)
    if not leaves:
        return torch.ones((), dtype=torch.bool)
    return torch.stack([torch.isfinite(x).all() for x in leaves]).all()


# --------------------------------------------------------------------------- applying


def apply_updates(params: Params, updates: Updates, *, inplace: bool = False) -> Params:
    """Return ``params + updates`` leaf by leaf, in each parameter's dtype.

    ``inplace=True`` adds into the parameter tensors and returns the same tree: the numbers
    are identical to the pure default; use it only when no one else holds the old values.

    The pure form keeps autograd graphs: differentiating through unrolled steps (with respect
    to the initial parameters or a tensor hyperparameter) works with autograd and
    ``torch.func``. Parameters that require grad with updates that do not (a graph that only
    grows) get a warning: detach them.
    Integer (non-float) parameter leaves are left unchanged when their update is ``None``.

    Where a kernel computed ``params + updates`` beside the updates (``register_sum``;
    :func:`funcopt.adamw`'s CUDA kernel does), the pure form returns that result for those
    very, unmodified updates and parameters (the leaf objects it returned and was given)
    instead of adding again: the same numbers. Its leaves lie in one storage (a leaf kept
    alive keeps the whole sum alive), each with its own version counter as torch's adds give
    them. A change between the update and this apply that no version counter sees (a write through
    ``.data``, ``.numpy()``, the storage or DLPack) is not seen either, as autograd does not
    see it.
    """
    u_leaves, treedef, p_leaves = tree_flatten_pair(updates, params)
    if not p_leaves:
        return params
    if inplace and not _is_compiling():
        _pop_sum(u_leaves)  # of no use after this apply: free it now
    elif not _is_compiling():
        done = _take_sum(p_leaves, u_leaves)
        if done is not None:
            return tree_unflatten(treedef, done)
    u_cast = [u if u.dtype == p.dtype else u.to(p.dtype) for p, u in zip(p_leaves, u_leaves)]
    if inplace:
        with torch.no_grad():
            ops.add_(p_leaves, u_cast)
        return params
    if (torch.is_grad_enabled() and not _is_compiling()
            and any(p.requires_grad for p in p_leaves)
            and not any(u.requires_grad for u in u_leaves)):
        warnings.warn(
            "apply_updates: the parameters require grad but the updates do not, so every step "
            "adds to one autograd graph that grows with the number of steps (memory grows). "
            "Pass detached parameters ({k: v.detach() for k, v in model.named_parameters()}), "
            "or step under torch.no_grad(); keep them attached only to differentiate through "
            "the steps.", stacklevel=2)
    return tree_unflatten(treedef, ops.add(p_leaves, u_cast))


_SUM = "_funcopt_sum"
_version_of, _requires_grad = operator.attrgetter("_version"), operator.attrgetter("requires_grad")
_deref = weakref.ReferenceType.__call__


class _Sum(NamedTuple):
    """``params + updates`` as a kernel wrote it beside the updates: weak references to the
    leaves (the parameters', then the updates'), the parameters' version counters, the
    updates' buffer's version counter, the leaves' addresses at that time, and the result's
    leaves."""

    leaves: list[Any]
    versions: list[int]
    version: int
    addresses: list[int]
    result: list[Tensor]


def register_sum(buffer: Tensor, params: list[Tensor], updates: list[Tensor],
                 result: list[Tensor]) -> None:
    """Record that ``result`` holds ``params + updates`` leaf by leaf, rounded as
    :func:`apply_updates` rounds it, where ``updates`` are views of the flat ``buffer`` (the
    record is kept on it, so it lives as long as the updates); nothing is recorded where one
    is an inference tensor (they have no version counter). The next :func:`apply_updates`
    of these updates (pure form) returns ``result`` if both trees hold the very leaf objects
    recorded, unmodified
    (the parameters' and the buffer's version counters, and each leaf's address, unchanged),
    none requiring grad; it adds otherwise. A change that no version counter sees is not
    seen here either, as autograd does not see it: a write through ``.data``, ``.numpy()``,
    the storage or DLPack, or ``.data = x`` where ``x`` is the same memory seen another way
    (``.data`` set to new memory is seen: the address changes). One use: the record is dropped
    by the first :func:`apply_updates` that sees it (an in-place one included)."""
    try:
        versions, version = list(map(_version_of, params)), buffer._version
    except RuntimeError:  # an inference tensor: no version counter, so no record
        return
    every = [*params, *updates]
    setattr(buffer, _SUM, _Sum(list(map(weakref.ref, every)), versions, version,
                               list(map(Tensor.data_ptr, every)), result))


def _pop_sum(u_leaves: list[Any]) -> tuple[Tensor, _Sum] | None:
    """The buffer of the first update leaf and the record on it (then dropped), or None."""
    buffer = getattr(u_leaves[0], "_base", None)
    if type(buffer) is not Tensor or not hasattr(buffer, _SUM):
        return None
    s = getattr(buffer, _SUM)
    delattr(buffer, _SUM)
    return buffer, s


def _take_sum(p_leaves: list[Any], u_leaves: list[Any]) -> list[Tensor] | None:
    """The result :func:`register_sum` recorded for exactly these leaves, or None; the record
    is dropped either way. None during a CUDA graph capture: the graph must hold the add."""
    popped = _pop_sum(u_leaves)
    if popped is None:
        return None
    buffer, s = popped
    every = [*p_leaves, *u_leaves]
    if ((buffer.is_cuda and torch.cuda.is_current_stream_capturing())
            or buffer._version != s.version or len(every) != len(s.leaves)
            or not all(map(operator.is_, map(_deref, s.leaves), every))
            or list(map(_version_of, p_leaves)) != s.versions
            or list(map(Tensor.data_ptr, every)) != s.addresses
            or any(map(_requires_grad, every))):
        return None
    return s.result


# --------------------------------------------------------------------------- settable hyperparameters

_HYPERPARAMETER_FIELDS: dict[type, tuple[str, ...]] = {}


def register_hyperparameters(state_cls: type, *fields: str) -> type:
    """Declare which fields of a NamedTuple state class hold settable hyperparameters.

    A field holds a 0-d tensor that ``update`` reads (``learning_rate`` of
    :func:`scale_by_learning_rate`), or a dict of them (``hyperparams`` of
    :func:`inject_hyperparams`). :func:`funcopt.find_hyperparams` and
    :class:`funcopt.Optimizer` (LR schedulers) find hyperparameters through this declaration,
    by the state's type, never by a field's name alone: a field called ``learning_rate`` that
    is not declared (KFAC's KL-clip step) is not exposed. Returns ``state_cls``.
    """
    unknown = [f for f in fields if f not in getattr(state_cls, "_fields", ())]
    if unknown:
        raise ValueError(f"{state_cls.__name__} has no field(s) {unknown}")
    _HYPERPARAMETER_FIELDS[state_cls] = tuple(fields)
    return state_cls


def hyperparameter_fields(state: Any) -> tuple[str, ...]:
    """The hyperparameter fields declared for ``type(state)`` (empty when none)."""
    return _HYPERPARAMETER_FIELDS.get(type(state), ())


# hyperparameter tensors that record a schedule's value, by id (weak: an entry goes with its
# tensor, so a reused id never matches another tensor)
_SCHEDULE_VALUES: weakref.WeakValueDictionary[int, Tensor] = weakref.WeakValueDictionary()


def mark_schedule_value(t: Tensor) -> Tensor:
    """Mark the hyperparameter tensor ``t`` that an ``init`` made for a schedule: a record of
    the schedule's value, which ``update`` does not read (it evaluates the schedule at the
    step count); :func:`funcopt.load_checkpoint` keeps the saved record of such a field. The
    mark belongs to this tensor object (a copy, or a compiled ``init``'s output, is unmarked;
    nothing is marked while compiling). Returns ``t``."""
    if not _is_compiling():
        _SCHEDULE_VALUES[id(t)] = t
    return t


def holds_schedule_value(leaf: Any) -> bool:
    """Whether ``leaf`` is a tensor marked by :func:`mark_schedule_value`."""
    return isinstance(leaf, Tensor) and _SCHEDULE_VALUES.get(id(leaf)) is leaf


def mark_if_schedule_value(t: Tensor, given: Any) -> Tensor:
    """``t``, the state's copy of the hyperparameter argument ``given``, marked
    (:func:`mark_schedule_value`) when ``given`` is a schedule or a marked tensor: in both
    cases ``update`` uses ``given`` (evaluated at the step count, or the tensor itself) and
    ``t`` only records it. The second case is :func:`funcopt.inject_hyperparams` over e.g.
    ``adam``: it passes its marked record of a schedule to the factory, whose own copy must
    then keep the saved value on load like the outer record. Returns ``t``."""
    if not _is_compiling() and (callable(given) or holds_schedule_value(given)):
        mark_schedule_value(t)
    return t


# --------------------------------------------------------------------------- counters and hyperparameters


def step_counter(tree: PyTree) -> Tensor:
    """A 0-d int64 zero on the device of the tree's first leaf (CPU for an empty tree)."""
    leaves = tree_leaves(tree)
    device = leaves[0].device if leaves else torch.device("cpu")
    return torch.zeros((), dtype=torch.int64, device=device)


def increment(count: Tensor) -> Tensor:
    """``count + 1`` (one kernel). Counters are int64: at a billion steps a second they would
    wrap after 292 years, so no saturation guard is paid for on every step."""
    return count + 1


def replace(state: Any, **changes: Any) -> Any:
    """``state._replace(**changes)`` for a NamedTuple, in a form torch.compile traces correctly
    (Dynamo in torch 2.11 returns an empty tuple from a compiled ``_replace``)."""
    unknown = set(changes) - set(state._fields)
    if unknown:
        raise TypeError(f"{type(state).__name__} has no field(s) {sorted(unknown)}")
    return type(state)(*[changes.get(f, v) for f, v in zip(state._fields, state)])


def find_state(state: Any, cls: type | tuple[type, ...]) -> Any:
    """The first ``cls`` state inside ``state``: ``state`` itself, or the first found depth
    first in its tuples (a chain's or wrapper's state), lists and dict values; None if none."""
    if isinstance(state, cls):
        return state
    children = state.values() if isinstance(state, dict) else (
        state if isinstance(state, (tuple, list)) else ())
    for child in children:
        found = find_state(child, cls)
        if found is not None:
            return found
    return None


def require_params(params: Params | None, who: str) -> Params:
    """Raise a clear error when a transform that needs ``params`` did not get them."""
    if params is None:
        raise ValueError(
            f"{who} needs the current parameters: call update(updates, state, params)"
        )
    return params
