"""Wrappers: transforms that change when, or on what, another transform runs.

Gradient accumulation (``multi_steps``), skipping non-finite steps (``apply_if_finite``),
running on some steps only (``conditionally_transform``), hyperparameters in the state
(``inject_hyperparams``) and one flat buffer per dtype (``flatten``); ``lookahead`` is in
:mod:`funcopt.lookahead`. Each is
pure and keeps its bookkeeping in 0-d tensors; decisions that depend on tensor values (is this
the last micro-step? are the updates finite?) are taken with ``torch.where``, never with a host
synchronisation, so wrapped chains still compile.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import optree
import torch

from funcopt.base import (
    GradientTransformation,
    OptState,
    PyTree,
    increment,
    mark_schedule_value,
    register_hyperparameters,
    step_counter,
    tree_check_finite,
    tree_flatten,
    tree_leaves,
    tree_unflatten,
)
from funcopt.compose import _check_tx, _where_tree
from funcopt.engine import expect_state, ops
from funcopt.engine import leaves as engine_leaves
from funcopt.func.ravel import concat, group_by_dtype_device, split
from funcopt.schedules import Schedule

__all__ = [
    "multi_steps",
    "MultiStepsState",
    "apply_if_finite",
    "ApplyIfFiniteState",
    "inject_hyperparams",
    "InjectHyperparamsState",
    "flatten",
    "conditionally_transform",
    "ConditionallyTransformState",
]

# --------------------------------------------------------------------------- accumulation and guards


class MultiStepsState(NamedTuple):
    """State of :func:`multi_steps`: ``mini_step`` (micro-steps accumulated so far),
    ``gradient_step`` (inner steps taken), ``inner_state``, ``acc_grads`` (the running mean,
    or sum, of the accumulated gradients) and ``skip_state`` (what ``should_skip_update_fn``
    last reported; ``()`` without one)."""

    mini_step: torch.Tensor
    gradient_step: torch.Tensor
    inner_state: OptState
    acc_grads: PyTree
    skip_state: PyTree = ()


def _no_skip(updates, gradient_step, params):
    return torch.zeros((), dtype=torch.bool, device=gradient_step.device), ()


def _check_multi_steps_args(inner, every_k_schedule, use_grad_mean, should_skip_update_fn):
    _check_tx(inner, "multi_steps", "inner")
    if not callable(every_k_schedule) and (
        isinstance(every_k_schedule, bool) or int(every_k_schedule) != every_k_schedule
        or every_k_schedule < 1
    ):
        raise ValueError(f"multi_steps: every_k_schedule={every_k_schedule!r} must be an int >= 1")
    if not isinstance(use_grad_mean, bool):
        raise TypeError(f"multi_steps: use_grad_mean={use_grad_mean!r} must be True or False")
    if should_skip_update_fn is not None and not callable(should_skip_update_fn):
        raise TypeError("multi_steps: should_skip_update_fn must be None or a function "
                        "(updates, gradient_step, params) -> (bool 0-d tensor, info), e.g. "
                        f"fo.skip_not_finite; got {type(should_skip_update_fn).__name__}")


def multi_steps(
    inner: GradientTransformation,
    every_k_schedule: int | Callable[[torch.Tensor], Any],
    use_grad_mean: bool = True,
    should_skip_update_fn: Callable[..., tuple[torch.Tensor, Any]] | None = None,
) -> GradientTransformation:
    """Gradient accumulation: apply ``inner`` once every ``k`` micro-steps to the accumulated
    gradient.

    With ``use_grad_mean`` (default True) ``a_m = a_{m-1} + (g_m - a_{m-1}) / m`` (the running
    mean of micro-step ``m``), else ``a_m = a_{m-1} + g_m`` (the sum); on micro-step ``m = k``
    the output is ``inner(a_k)`` and ``a`` resets to 0, on the others the output is 0 and
    ``inner``'s state is unchanged.

    Args:
      inner: the transform.
      every_k_schedule: ``k`` as an int >= 1, or a schedule ``gradient_step -> k``.
      use_grad_mean: average (True, default) or sum (False) the micro-step gradients.
      should_skip_update_fn: None (default) or a predicate
        ``(updates, gradient_step, params) -> (skip, info)`` with ``skip`` a 0-d bool tensor
        (e.g. :func:`funcopt.skip_not_finite`, or :func:`funcopt.skip_large_updates` bound
        with ``functools.partial``). A skipped micro-step outputs zeros and leaves the whole
        state as it was except ``skip_state``, which holds ``info``.

    ``inner`` runs on every call and ``torch.where`` keeps or discards its result (no host
    sync); the extra work is one ``inner`` step per micro-step. The accumulator has the
    gradients' dtype (optax 0.2.8 keeps it in float32 unless given ``accumulator_dtype``).
    Reference: optax.MultiSteps.
    """
    _check_multi_steps_args(inner, every_k_schedule, use_grad_mean, should_skip_update_fn)
    skip_fn = should_skip_update_fn or _no_skip

    def init(params):
        zeros = optree.tree_map(torch.zeros_like, params)
        step = step_counter(params)
        _, skip_state = skip_fn(zeros, step, params)
        return MultiStepsState(step_counter(params), step, inner.init(params), zeros, skip_state)

    def update(updates, state, params=None, **extra):
        expect_state(state, MultiStepsState, "multi_steps")
        k = every_k_schedule(state.gradient_step) if callable(every_k_schedule) \
            else every_k_schedule
        skip, skip_state = skip_fn(updates, state.gradient_step, params)
        if not (isinstance(skip, torch.Tensor) and skip.dtype == torch.bool and skip.dim() == 0):
            raise TypeError("multi_steps: should_skip_update_fn must return a 0-d bool tensor "
                            f"first; got {skip!r}")
        acc = tree_leaves(state.acc_grads)
        leaves, treedef = engine_leaves(updates, params, "multi_steps", acc)
        if leaves and use_grad_mean:
            inv_m = 1.0 / (state.mini_step + 1).to(torch.float32)
            mean = ops.add(acc, ops.mul(ops.sub(leaves, acc), inv_m))
        else:
            mean = ops.add(acc, leaves) if leaves else []
        emit = (state.mini_step + 1 >= k) & ~skip
        out, inner_state = inner.update(tree_unflatten(treedef, mean), state.inner_state, params,
                                        **extra)
        out_leaves, out_def = tree_flatten(out)
        out = tree_unflatten(out_def, [torch.where(emit, o, torch.zeros_like(o))
                                       for o in out_leaves])
        new_acc = [torch.where(skip, a, torch.where(emit, torch.zeros_like(m), m))
                   for a, m in zip(acc, mean)]
        mini = torch.where(emit, torch.zeros_like(state.mini_step), state.mini_step + 1)
        return out, MultiStepsState(
            torch.where(skip, state.mini_step, mini),
            torch.where(emit, increment(state.gradient_step), state.gradient_step),
            _where_tree(emit, inner_state, state.inner_state),
            tree_unflatten(treedef, new_acc),
            skip_state,
        )

    return GradientTransformation(init, update)


class ApplyIfFiniteState(NamedTuple):
    """State of :func:`apply_if_finite`: ``notfinite_count`` (consecutive skipped steps),
    ``last_finite`` (0-d bool: the last step was finite), ``total_notfinite`` (all skipped
    steps) and ``inner_state``, the wrapped transform's state."""

    notfinite_count: torch.Tensor
    last_finite: torch.Tensor
    total_notfinite: torch.Tensor
    inner_state: OptState


def apply_if_finite(
    inner: GradientTransformation, max_consecutive_errors: int | None = None
) -> GradientTransformation:
    """Skip steps whose gradients, ``inner`` updates or ``inner``'s new state are not finite.

    ``ok = all(isfinite(g)) and all(isfinite(inner(g))) and all(isfinite(new inner state))``
    (floating leaves of the state); the output is ``inner(g)`` and
    ``inner``'s new state if ``ok``, else zero updates and ``inner``'s old state. The state
    counts consecutive (``notfinite_count``) and total (``total_notfinite``) skipped steps and
    records ``last_finite``. Args: ``inner``: the transform; ``max_consecutive_errors``:
    ``None`` (default) never lets a non-finite update through; an int ``n`` lets it through
    once more than ``n`` consecutive steps were skipped, so a diverged run shows NaNs instead
    of silently standing still (optax.apply_if_finite's rule). No host sync.
    Reference: optax.apply_if_finite (which checks only the incoming gradients: there a
    second moment overflowed to inf freezes the run without a skipped step being counted).
    """
    _check_tx(inner, "apply_if_finite", "inner")
    if max_consecutive_errors is not None and (
        isinstance(max_consecutive_errors, bool) or not isinstance(max_consecutive_errors, int)
        or max_consecutive_errors < 0
    ):
        raise ValueError(
            f"apply_if_finite: max_consecutive_errors={max_consecutive_errors!r} must be None "
            "or an int >= 0"
        )

    def init(params):
        c = step_counter(params)
        return ApplyIfFiniteState(c, torch.ones((), dtype=torch.bool, device=c.device), c,
                                  inner.init(params))

    def update(updates, state, params=None, **extra):
        expect_state(state, ApplyIfFiniteState, "apply_if_finite")
        out, inner_state = inner.update(updates, state.inner_state, params, **extra)
        # the new state too: a finite gradient of 1e30 can overflow a second moment to inf
        # while that step's update stays finite, and the run would stand still from then on
        finite = (tree_check_finite(updates) & tree_check_finite(out)
                  & tree_check_finite([x for x in tree_leaves(inner_state)
                                       if x.is_floating_point() or x.is_complex()]))
        notfinite = torch.where(finite, torch.zeros_like(state.notfinite_count),
                                increment(state.notfinite_count))
        ok = finite
        if max_consecutive_errors is not None:
            ok = finite | (notfinite > max_consecutive_errors)
        leaves, treedef = tree_flatten(out)
        out = tree_unflatten(treedef, [torch.where(ok, u, torch.zeros_like(u)) for u in leaves])
        return out, ApplyIfFiniteState(
            notfinite, finite,
            torch.where(finite, state.total_notfinite, increment(state.total_notfinite)),
            _where_tree(ok, inner_state, state.inner_state),
        )

    return GradientTransformation(init, update)


class ConditionallyTransformState(NamedTuple):
    """State of :func:`conditionally_transform`: ``inner_state``, the wrapped transform's state,
    and ``step``, the 0-d int64 step passed to the predicate."""

    inner_state: OptState
    step: torch.Tensor


def conditionally_transform(
    inner: GradientTransformation, should_transform_fn: Callable[[torch.Tensor], Any]
) -> GradientTransformation:
    """Apply ``inner`` only on steps where ``should_transform_fn(step)`` is true.

    On other steps the updates pass through unchanged and ``inner``'s state is kept. Args:
    ``inner``: the transform; ``should_transform_fn``: ``step -> bool`` (a Python bool or a
    0-d bool tensor; with a tensor, ``inner`` runs every step and ``torch.where`` selects, no
    host sync). ``step`` counts calls from 0. Reference: optax.conditionally_transform.
    """
    _check_tx(inner, "conditionally_transform", "inner")

    def init(params):
        return ConditionallyTransformState(inner.init(params), step_counter(params))

    def update(updates, state, params=None, **extra):
        expect_state(state, ConditionallyTransformState, "conditionally_transform")
        cond = should_transform_fn(state.step)
        if isinstance(cond, bool):
            if cond:
                updates, inner_state = inner.update(updates, state.inner_state, params, **extra)
            else:
                inner_state = state.inner_state
        else:
            cond = torch.as_tensor(cond, dtype=torch.bool, device=state.step.device)
            new, new_state = inner.update(updates, state.inner_state, params, **extra)
            updates = _where_tree(cond, new, updates)
            inner_state = _where_tree(cond, new_state, state.inner_state)
        return updates, ConditionallyTransformState(inner_state, increment(state.step))

    return GradientTransformation(init, update)


# --------------------------------------------------------------------------- hyperparameters in the state


class InjectHyperparamsState(NamedTuple):
    """State of :func:`inject_hyperparams`: ``count``, the 0-d int64 step; ``hyperparams``, a
    dict of 0-d tensors (write one to change it for the next step); ``inner_state``, the built
    transform's state."""

    count: torch.Tensor  # type: ignore[assignment]  # shadows tuple.count by design (optax's name)
    hyperparams: dict
    inner_state: OptState


register_hyperparameters(InjectHyperparamsState, "hyperparams")


def _hp_tensor(value: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(device, dtype) if value.is_floating_point() else value.to(device)
    if isinstance(value, int):
        return torch.tensor(value, dtype=torch.int64, device=device)
    return torch.tensor(value, dtype=dtype, device=device)


def _arguments(bound: inspect.BoundArguments, signature: inspect.Signature):
    """(name, value, parameter) for every argument, with ``**kwargs`` expanded."""
    for name, value in bound.arguments.items():
        param = signature.parameters[name]
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            for k, v in value.items():
                yield k, v, inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY)
        elif param.kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError("inject_hyperparams: pass the factory's arguments by name, "
                                "not through *args")
        else:
            yield name, value, param


def _is_schedule(param: inspect.Parameter, value: Any) -> bool:
    """A schedule (step -> value) by type: a :class:`funcopt.schedules.Schedule`, or a plain
    callable given for an argument annotated as taking a schedule (``ScalarOrSchedule``).
    Other callables (refresh rules, masks, functions, modules, transforms) pass through."""
    if isinstance(value, Schedule):
        return True
    return (callable(value) and not isinstance(value, (torch.nn.Module, torch.Tensor))
            and "Schedule" in str(param.annotation))


def inject_hyperparams(
    factory: Callable[..., GradientTransformation], static_args: str | Iterable[str] = (),
    hyperparam_dtype: torch.dtype | None = None,
) -> Callable[..., GradientTransformation]:
    """Wrap ``factory`` so its numeric hyperparameters live in the state as 0-d tensors.

    ``inject_hyperparams(fo.scale_by_adam)(b1=0.9, b2=schedule)`` builds a transform whose
    state is ``InjectHyperparamsState(count, hyperparams, inner_state)``. Each update rebuilds
    ``factory(**static, **hyperparams)`` with: numeric arguments read from
    ``state.hyperparams`` (write a new 0-d tensor there to change the next update; a
    compiled update does not recompile), and schedules evaluated at ``count`` (and stored in
    ``hyperparams`` for inspection; writing them has no effect). Args: ``factory``: a function
    returning a transform; ``static_args``: names passed through unchanged (bools and
    non-numeric values always are); ``hyperparam_dtype``: dtype of float hyperparameters
    (default: the first parameter's dtype, at least float32). Ints become int64 tensors: list
    integer arguments that the factory needs as Python ints in ``static_args``.
    Reference: optax.inject_hyperparams.
    """
    static = {static_args} if isinstance(static_args, str) else set(static_args)
    signature = inspect.signature(factory)

    def wrapped(*args: Any, **kwargs: Any) -> GradientTransformation:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        scheds, numeric, other = {}, {}, {}
        for name, value, param in _arguments(bound, signature):
            if name in static or isinstance(value, bool):
                other[name] = value
            elif _is_schedule(param, value):
                scheds[name] = value
            elif isinstance(value, (int, float, torch.Tensor)):
                numeric[name] = value
            else:
                other[name] = value

        factory(*args, **kwargs)  # refuse out-of-range values now, not at the first update

        def place(params):
            leaves = [x for x in tree_leaves(params) if x.is_floating_point()]
            dtype = hyperparam_dtype or (
                torch.promote_types(leaves[0].dtype, torch.float32) if leaves else torch.float32)
            return dtype, (leaves[0].device if leaves else torch.device("cpu"))

        def current(hps, count, dtype, device):
            hps = {k: _hp_tensor(v, dtype, device) for k, v in hps.items()}
            hps.update({k: _hp_tensor(f(count), dtype, device) for k, f in scheds.items()})
            return hps

        def build(hps):
            try:
                return factory(**other, **hps)
            except (TypeError, ValueError) as e:
                raise type(e)(
                    f"{e}\ninject_hyperparams: {getattr(factory, '__name__', factory)} got its "
                    f"numeric arguments {sorted(hps)} as 0-d tensors; list the ones it needs as "
                    "plain Python values in static_args=(...)") from e

        def init(params):
            dtype, device = place(params)
            count = step_counter(params)
            hps = current(numeric, count, dtype, device)
            for k in scheds:  # records: update evaluates the schedules
                mark_schedule_value(hps[k])
            return InjectHyperparamsState(count, hps, build(hps).init(params))

        def update(updates, state, params=None, **extra):
            expect_state(state, InjectHyperparamsState, "inject_hyperparams")
            # the dtype and device init chose (LM passes updates=None; a state must keep the
            # dtypes init made, or a checkpoint of it would not load into a fresh init)
            floats = [v for v in state.hyperparams.values() if v.is_floating_point()]
            dtype, device = ((floats[0].dtype, floats[0].device) if floats
                             else place(params if params is not None else updates))
            hps = current(state.hyperparams, state.count, dtype, device)
            out, inner_state = build(hps).update(updates, state.inner_state, params, **extra)
            return out, InjectHyperparamsState(increment(state.count), hps, inner_state)

        return GradientTransformation(init, update)

    return wrapped


# --------------------------------------------------------------------------- one flat buffer


def flatten(inner: GradientTransformation) -> GradientTransformation:
    """Run ``inner`` on one contiguous 1-D buffer per (dtype, device) group of leaves.

    ``inner`` sees a tuple of 1-D tensors (params and updates concatenated the same way), its
    state lives on those buffers, and its output is split back into the original shapes (the
    returned leaves are views of one buffer). A chain of element-wise transforms then runs a
    handful of large kernels instead of a few per leaf. Only for element-wise transforms:
    ones that use a leaf's shape (Muon, SOAP, Shampoo, ...) or per-leaf norms (per-leaf
    clipping, LARS/LAMB trust ratios) see one vector instead. Extra keyword arguments reach
    ``inner`` unchanged (not flattened). Updates must have the params' dtypes.

    Each step copies the updates and params into the buffers (the state already lives there);
    parameters and gradients that are already flat (``fo.ravel``: one 1-D tensor per group)
    are passed through without a copy. It pays off in eager steps over many small leaves (an
    H200, AdamW on 1e7 parameters in 1,000 tensors: 12.8 ms against 18.0 ms for the tree).
    Under ``torch.compile`` it does not: Inductor already fuses the per-leaf work, and the
    copies cost a write and a read of each buffer (1e9 parameters in 200 tensors: 2.5x the
    memory floor, against 1.0x for ``fo.ravel`` storage; benchmarks/RESULTS.md). For compiled
    steps keep the parameters flat with :func:`funcopt.ravel` instead.
    Reference: optax.flatten.
    """
    _check_tx(inner, "flatten", "inner")

    def init(params):
        leaves = tree_leaves(params)
        return inner.init(concat(leaves, group_by_dtype_device(leaves)))

    def update(updates, state, params=None, **extra):
        leaves, treedef = engine_leaves(updates, params, "flatten")  # the user's leaf names
        groups = group_by_dtype_device(leaves)
        flat_params = None
        if params is not None:
            p_leaves = tree_leaves(params)
            if len(p_leaves) != len(leaves):
                raise ValueError("flatten: params and updates have different numbers of leaves")
            flat_params = concat(p_leaves, groups, copy=False)
        out, state = inner.update(concat(leaves, groups, copy=False), state, flat_params, **extra)
        new = split(out, groups, [x.shape for x in leaves], [None] * len(leaves))
        return tree_unflatten(treedef, new), state

    return GradientTransformation(init, update)
