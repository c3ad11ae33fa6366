"""The core contract: GradientTransformation, apply_updates and pytree helpers.

A transform is a pair of pure functions::

    init(params) -> state
    update(updates, state, params=None, **extra) -> (updates, state)

Pytrees are handled with optree (dict, list, tuple, NamedTuple, None and registered custom
nodes). ``None`` is an empty node, not a leaf: a masked-out entry simply has no leaves.
Every helper flattens once and works on the list of leaves with ``torch._foreach_*`` ops.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple, Protocol, Union

import optree
import torch
from torch.compiler import is_compiling as _is_compiling

Tensor = torch.Tensor
PyTree = Any
Params = PyTree
Updates = PyTree
OptState = PyTree
Schedule = Callable[[Tensor], Union[Tensor, float]]
ScalarOrSchedule = Union[float, int, Tensor, Schedule]

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
]


class TransformInitFn(Protocol):
    def __call__(self, params: Params) -> OptState: ...


class TransformUpdateFn(Protocol):
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


def tree_unflatten(treedef: optree.PyTreeSpec, leaves: Sequence[Any]) -> PyTree:
    return optree.tree_unflatten(treedef, leaves)


def tree_leaves(tree: PyTree) -> list[Any]:
    return optree.tree_leaves(tree)


def tree_structure(tree: PyTree) -> optree.PyTreeSpec:
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
    return optree.tree_map(lambda x: torch.zeros_like(x, dtype=dtype), tree)


def tree_ones_like(tree: PyTree, dtype: torch.dtype | None = None) -> PyTree:
    return optree.tree_map(lambda x: torch.ones_like(x, dtype=dtype), tree)


def tree_full_like(tree: PyTree, value: float, dtype: torch.dtype | None = None) -> PyTree:
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
    return tree_unflatten(treedef, torch._foreach_add(la, tree_leaves(b), alpha=alpha))


def tree_sub(a: PyTree, b: PyTree) -> PyTree:
    return tree_add(a, b, alpha=-1.0)


def tree_scale(tree: PyTree, scalar: float | Tensor) -> PyTree:
    leaves, treedef = tree_flatten(tree)
    return tree_unflatten(treedef, torch._foreach_mul(leaves, scalar))


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
    norms = torch._foreach_norm(leaves)
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
    Integer (non-float) parameter leaves are left unchanged when their update is ``None``.
    """
    u_leaves, treedef, p_leaves = tree_flatten_pair(updates, params)
    if not p_leaves:
        return params
    u_cast = [u if u.dtype == p.dtype else u.to(p.dtype) for p, u in zip(p_leaves, u_leaves)]
    if inplace:
        with torch.no_grad():
            torch._foreach_add_(p_leaves, u_cast)
        return params
    return tree_unflatten(treedef, torch._foreach_add(p_leaves, u_cast))


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


def per_step(x: Any) -> Any:
    """Mark ``x``, a 0-d tensor computed from the step count, as computed once per step.

    Under ``torch.compile`` Inductor inlines cheap scalar expressions into the element-wise
    kernels that read them, so a bias correction ``1 - beta**t`` or a cosine schedule would be
    re-evaluated for every element (``pow``/``cos`` per element made a compiled AdamW step 2x
    slower on a CPU). A no-op ``as_strided`` view makes Inductor store the scalar once. In
    eager mode and for numbers it returns ``x`` unchanged.
    """
    if isinstance(x, Tensor) and x.dim() == 0 and _is_compiling():
        return torch.as_strided(x, (), ())
    return x


def is_tracing() -> bool:
    """Whether values must stay tensors: ``torch.compile`` is tracing, a ``torch.func``
    transform is running, or forward-mode AD (``torch.autograd.forward_ad``) is on."""
    return (
        _is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None
        or torch.autograd.forward_ad._current_level >= 0
    )


def differentiating(tensors: Iterable[Any]) -> bool:
    """Whether the result must be differentiable through ``tensors``: :func:`is_tracing`, or
    autograd records and one of them requires grad. An in-place or derivative-free kernel
    (torch's fused Adam, an in-place formula) is then not allowed."""
    return is_tracing() or (torch.is_grad_enabled()
                            and any(isinstance(t, Tensor) and t.requires_grad for t in tensors))


def host_number(x: Any) -> Any:
    """``x`` as a Python number when it is a plain 0-d CPU tensor in an eager step, else ``x``.

    On a CPU, reading a value costs no device synchronisation, and a number coefficient takes
    the Scalar overloads of the ``_foreach`` ops: a 0-d tensor costs a 0-d op for each piece of
    step arithmetic (``1 - beta**t`` ...) and a dtype conversion per leaf in every
    ``_foreach_mul(leaves, tensor)``, which made up a quarter of an eager AdamW step on a CPU.
    Tensors stay tensors on other devices (no host sync), when they require grad
    (hyperparameters being learned), for tensor subclasses, and while :func:`is_tracing`.
    """
    if type(x) is Tensor and x.dim() == 0 and x.is_cpu and not differentiating([x]):
        return x.item()
    return x


def resolve(value: ScalarOrSchedule, count: Tensor) -> Tensor | float:
    """The value of a hyperparameter at step ``count``: schedules are called, others returned."""
    return per_step(value(count)) if callable(value) else value


def current_learning_rate(learning_rate: ScalarOrSchedule, stored: Tensor, step: Tensor) -> Tensor:
    """The learning rate of this step, in ``stored``'s dtype and device.

    A schedule is evaluated at ``step``; a tensor given when the transform was built (e.g. by
    :func:`funcopt.inject_hyperparams`) is used as it is now; a plain number is read from the
    state field ``stored``, so writing that field (as :class:`funcopt.Optimizer` does for
    ``lr``) changes the next update.
    """
    if callable(learning_rate):
        value = learning_rate(step)
    elif isinstance(learning_rate, Tensor):
        value = learning_rate.detach()
    else:
        return stored
    return per_step(torch.as_tensor(value, dtype=stored.dtype, device=stored.device).reshape(()))


def check_hyperparameter(
    name: str, value: Any, *, low: float | None = 0.0, high: float | None = None,
    low_inclusive: bool = True, high_inclusive: bool = True,
) -> None:
    """Raise a ValueError when a plain-number hyperparameter is outside its range.

    Schedules and tensors are not checked here (their values change with the step).
    """
    if callable(value) or isinstance(value, torch.Tensor):
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(
            f"{name} must be a number, a 0-d tensor or a schedule (step -> value); "
            f"got {type(value).__name__}"
        )
    v = float(value)
    if v != v:
        raise ValueError(f"{name} is NaN; pass a finite number")
    bad_low = low is not None and (v < low if low_inclusive else v <= low)
    bad_high = high is not None and (v > high if high_inclusive else v >= high)
    if bad_low or bad_high:
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        bracket = ("[" if low_inclusive else "(") + f"{lo}, {hi}" + ("]" if high_inclusive else ")")
        raise ValueError(f"{name}={value} is out of range: it must lie in {bracket}")


def require_params(params: Params | None, who: str) -> Params:
    """Raise a clear error when a transform that needs ``params`` did not get them."""
    if params is None:
        raise ValueError(
            f"{who} needs the current parameters: call update(updates, state, params)"
        )
    return params
