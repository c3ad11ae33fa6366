"""The leaf engine: how every transform's per-leaf arithmetic runs.

One place decides three things that every transform shares:

1. **The op form.** :data:`ops` mirrors ``torch._foreach_*`` (``ops.mul(xs, s)``,
   ``ops.add(xs, ys, alpha=a)``, ``ops.addcmul_(xs, a, b, value=v)`` ...). In plain eager
   steps and under ``torch.compile`` it calls the fused ``_foreach`` kernel (one launch for
   the whole leaf list). While a ``torch.func`` transform runs (``vmap``, ``grad``, ``jvp``,
   ``jacrev`` ...) it applies the single-tensor op leaf by leaf instead: ``_foreach`` ops have
   no batching rule, so ``torch.func.vmap`` over a transform could not run otherwise. Eager
   steps on ``DTensor`` leaves (FSDP2) run leaf by leaf too: torch 2.11's DTensor has no
   sharding rule for some ``_foreach`` overloads (``_foreach_lerp.Scalar``). The
   in-place forms (``ops.mul_`` ...) return the list they wrote, so a caller writes
   ``out = ops.mul_(out, s)`` and the code is right in both forms.
2. **The leaf checks.** :func:`leaves` flattens the updates once and checks them against the
   parameters' tree and every per-leaf state list: count, shape and device (metadata only, no
   host sync), and that every leaf is a real floating-point tensor. A mismatch is one
   ``ValueError``/``TypeError`` naming the leaf's tree path and both shapes, raised before any
   arithmetic (a renamed or reshaped parameter never broadcasts silently into the state).
3. **The hyperparameter convention.** A hyperparameter is a Python number, a 0-d tensor or a
   schedule (``step -> value``). Numbers take the fast Scalar overloads; tensors stay tensors
   and keep their autograd / ``torch.func`` graph (:func:`host_number` reads a value on the
   host only for a plain CPU tensor in an eager step that nothing differentiates), so a
   learning rate given as a tensor can be learned by differentiating through ``update``.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Union

import optree
import torch
from torch.compiler import is_compiling as _is_compiling

Tensor = torch.Tensor
TensorList = Union[list[Tensor], tuple[Tensor, ...]]

__all__ = [
    "ops", "into", "leaves", "expect_state", "is_tracing", "differentiating", "host_number", "per_step", "resolve",
    "current_learning_rate", "check_hyperparameter", "check_number", "scalar_dtype",
    "elementwise", "is_elementwise",
]


# --------------------------------------------------------------------------- tracing predicates


def functorch_active() -> bool:
    """Whether a ``torch.func`` transform (vmap, grad, jvp ...) is running this code."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def is_tracing() -> bool:
    """Whether values must stay tensors: ``torch.compile`` is tracing, a ``torch.func``
    transform is running, or forward-mode AD (``torch.autograd.forward_ad``) is on."""
    return (
        _is_compiling() or functorch_active()
        or torch.autograd.forward_ad._current_level >= 0
    )


def differentiating(tensors: Iterable[Any]) -> bool:
    """Whether the result must be differentiable through ``tensors``: :func:`is_tracing`, or
    autograd records and one of them requires grad. An in-place or derivative-free kernel
    (torch's fused Adam, an in-place formula) is then not allowed."""
    return is_tracing() or (torch.is_grad_enabled()
                            and any(isinstance(t, Tensor) and t.requires_grad for t in tensors))


# --------------------------------------------------------------------------- the op form


def _per_leaf(single: Callable[..., Any]) -> Callable[..., list[Any]]:
    """``single`` applied leaf by leaf: list arguments are indexed, others passed whole."""

    def run(*args: Any, **kwargs: Any) -> list[Any]:
        n = len(args[0])
        return [single(*(a[i] if isinstance(a, (list, tuple)) else a for a in args), **kwargs)
                for i in range(n)]

    return run


def _dispatch(fused: Callable[..., Any], single: Callable[..., Any], inplace: bool):
    loop = _per_leaf(single)

    def op(*args: Any, **kwargs: Any) -> Any:
        first = args[0]
        eager_only = not _is_compiling() and (
            functorch_active() or (len(first) and hasattr(first[0], "_local_tensor")))
        run = loop if eager_only else fused
        out = run(*args, **kwargs)
        return args[0] if inplace else out

    op.__name__ = fused.__name__
    op.__doc__ = f"``{fused.__name__}``, leaf by leaf under torch.func transforms."
    return op


def _norm(x: Tensor, ord: float = 2.0) -> Tensor:
    return torch.linalg.vector_norm(x, ord)


def _maximum(x: Tensor, y: Any) -> Tensor:
    return torch.maximum(x, y) if isinstance(y, Tensor) else torch.clamp_min(x, y)


def _minimum(x: Tensor, y: Any) -> Tensor:
    return torch.minimum(x, y) if isinstance(y, Tensor) else torch.clamp_max(x, y)


class _Ops:
    """``torch._foreach_*`` in the form the current step can run (see the module docstring)."""

    def __init__(self) -> None:
        singles: dict[str, Callable[..., Any]] = {
            "norm": _norm, "maximum": _maximum, "minimum": _minimum,
            "copy_": Tensor.copy_, "zero_": Tensor.zero_,
        }
        names = ("mul add sub div sqrt rsqrt clamp_min clamp_max maximum minimum sign lerp "
                 "abs neg log log1p exp tanh reciprocal addcmul addcdiv pow norm").split()
        for name in names:
            single = singles.get(name) or getattr(torch, name)
            setattr(self, name, _dispatch(getattr(torch, f"_foreach_{name}"), single, False))
        for name in "mul_ add_ sub_ div_ clamp_min_ clamp_max_ addcmul_ abs_ log1p_ zero_ copy_".split():
            single = singles.get(name) or getattr(Tensor, name)
            setattr(self, name, _dispatch(getattr(torch, f"_foreach_{name}"), single, True))

    def __getattr__(self, name: str) -> Any:  # for type checkers; every op is set above
        raise AttributeError(f"funcopt.engine.ops has no op {name!r}")


ops: Any = _Ops()
"""``torch._foreach_*`` ops in the form the current step can run: ``ops.mul(xs, s)``,
``ops.add(xs, ys, alpha=a)``, in-place ``ops.mul_`` ...; fused kernels in eager and compiled
steps, leaf by leaf under ``torch.func`` transforms (see the module docstring)."""


def into(op: str, out: TensorList, *args: Any, **kwargs: Any) -> TensorList:
    """``op(out, *args)`` written into ``out``, a list of new tensors only this step holds
    (``into("addcmul", out, a, b, value=v)``): in place in eager and compiled steps (no
    allocation, still pure), out of place under ``torch.func`` transforms, whose batching rules
    do not write into tensors. Use the returned list."""
    if not _is_compiling() and functorch_active():
        return getattr(ops, op)(out, *args, **kwargs)
    return getattr(ops, op + "_")(out, *args, **kwargs)


# --------------------------------------------------------------------------- leaf checks


def _path(tree: Any, i: int) -> str:
    paths = optree.tree_paths(tree)
    return "root" if not paths[i] else "".join(f"[{p!r}]" for p in paths[i])


def _check_leaf_types(g: Sequence[Any], updates: Any, who: str) -> None:
    for i, x in enumerate(g):
        if not isinstance(x, Tensor):
            raise TypeError(f"{who}: leaf {_path(updates, i)} of the updates is a "
                            f"{type(x).__name__}, not a tensor")
        if not x.is_floating_point():
            raise TypeError(
                f"{who}: leaf {_path(updates, i)} of the updates is {x.dtype}; funcopt "
                "transforms take floating-point tensors. "
                + ("For complex parameters optimise torch.view_as_real(p) instead."
                   if x.is_complex() else
                   "Leave integer/bool tensors (counters, masks, buffers) out of the "
                   "parameter tree, or mask them with fo.masked."))


def leaves(updates: Any, params: Any | None, who: str, *state: Sequence[Tensor]
           ) -> tuple[list[Tensor], optree.PyTreeSpec]:
    """Flatten ``updates`` once and check them before any arithmetic.

    Checks: every leaf is a floating-point tensor; ``params`` (when given) has the updates'
    tree structure, shapes and dtypes; each per-leaf ``state`` list has one entry per leaf, of
    the leaf's shape (devices are left to torch's own error). The
    checks read metadata only (no host sync) and are skipped while ``torch.compile`` traces
    (the eager run of the same step has checked them). Raises ValueError/TypeError naming
    ``who``, the leaf's tree path and both shapes. States keep no names: a renamed leaf of
    the same shape in the same place of the flattened tree cannot be told apart.
    """
    g, treedef = optree.tree_flatten(updates)
    if _is_compiling():
        return g, treedef
    # fast comparisons of whole lists first (this runs in every transform of every step);
    # the loops that name the offending leaf run only when one fails
    if not all(isinstance(x, Tensor) and x.is_floating_point() for x in g):
        _check_leaf_types(g, updates, who)
    if params is not None:
        p_leaves, p_def = optree.tree_flatten(params)
        if p_def != treedef:
            raise ValueError(
                f"{who}: updates and params have different tree structures:\n"
                f"  updates: {treedef}\n  params:  {p_def}\n"
                "Pass params with the same structure (keys, nesting, None entries) as the updates.")
        if [(x.shape, x.dtype) for x in g] != [(q.shape, q.dtype) for q in p_leaves]:
            _check_against_params(g, p_leaves, updates, who)
    shapes = None
    for st in state:
        if shapes is None:
            shapes = [x.shape for x in g]
        if len(st) != len(g) or [y.shape for y in st] != shapes:
            _check_against_state(g, st, updates, who)
    return g, treedef


def _check_against_params(g: Sequence[Tensor], p_leaves: Sequence[Any], updates: Any,
                          who: str) -> None:
    for i, (x, q) in enumerate(zip(g, p_leaves)):
        if isinstance(q, Tensor) and q.shape != x.shape:
            raise ValueError(
                f"{who}: leaf {_path(updates, i)} of the updates has shape "
                f"{tuple(x.shape)} but the parameter has {tuple(q.shape)}; pass gradients "
                "shaped like the parameters.")
        if isinstance(q, Tensor) and q.dtype != x.dtype:
            raise TypeError(
                f"{who}: leaf {_path(updates, i)} of the updates is {x.dtype} but the "
                f"parameter is {q.dtype}; pass gradients in the parameters' dtype (as "
                "autograd and torch.func give them), e.g. g.to(p.dtype).")


def _check_against_state(g: Sequence[Tensor], st: Sequence[Tensor], updates: Any,
                         who: str) -> None:
    if len(st) != len(g):
        raise ValueError(
            f"{who}: the updates have {len(g)} leaves but the state holds {len(st)}; pass "
            "updates with the structure of the params given to init (or re-run init on them)")
    for i, (x, y) in enumerate(zip(g, st)):
        if y.shape != x.shape:
            raise ValueError(
                f"{who}: leaf {_path(updates, i)} of the updates has shape "
                f"{tuple(x.shape)}, but the state holds {tuple(y.shape)} for it (leaf #{i}). "
                "The state was made by init for other params: re-run init on these params, "
                "or pass the params init saw.")


def options_or_default(value: Any, cls: type, who: str, name: str) -> Any:
    """``cls()`` when ``value`` is None, else ``value``, which must be a ``cls``: a TypeError
    naming ``who`` and the argument ``name`` otherwise (an options object such as
    ``fo.SoapFactors``)."""
    opt = cls() if value is None else value
    if not isinstance(opt, cls):
        raise TypeError(f"{who}: {name} must be a fo.{cls.__name__}; got {type(opt).__name__}")
    return opt


def expect_state(state: Any, cls: type | tuple[type, ...], who: str) -> None:
    """Raise a TypeError naming ``who`` when ``state`` is not what its init returns (the
    state of another transform, or of a chain whose parts are in another order)."""
    if not isinstance(state, cls):
        want = " or ".join(c.__name__ for c in (cls if isinstance(cls, tuple) else (cls,)))
        raise TypeError(f"{who}: got a {type(state).__name__} state where its init returns a "
                        f"{want}; pass the state this transform's init returned")


# --------------------------------------------------------------------------- hyperparameters


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


def resolve(value: Any, count: Tensor) -> Any:
    """The value of a hyperparameter at step ``count``: schedules are called, others returned."""
    return per_step(value(count)) if callable(value) else value


def current_learning_rate(learning_rate: Any, stored: Tensor, step: Tensor) -> Tensor:
    """The learning rate of this step, in ``stored``'s dtype and device.

    A schedule is evaluated at ``step``; a tensor given when the transform was built (e.g. by
    :func:`funcopt.inject_hyperparams`, or a learning rate being learned) is used as it is now,
    with its autograd / ``torch.func`` graph; a plain number is read from the state field
    ``stored``, so writing that field (as :class:`funcopt.Optimizer` does for ``lr``) changes
    the next update.
    """
    if callable(learning_rate):
        # a Schedule takes the dtype to compute in (float64 values for float64 parameters)
        takes_dtype = type(learning_rate).__name__ == "Schedule"
        value = learning_rate(step, stored.dtype) if takes_dtype else learning_rate(step)
        check_schedule_value(learning_rate, value)
    elif isinstance(learning_rate, Tensor):
        value = learning_rate
    else:
        return stored
    return per_step(torch.as_tensor(value, dtype=stored.dtype, device=stored.device).reshape(()))


def check_schedule_value(schedule: Any, value: Any) -> None:
    """Raise a TypeError (not a number or tensor) or ValueError (a tensor of more than one
    element; a Python number that is NaN, inf or negative) naming the schedule, for a
    learning-rate schedule's return ``value``: one number or 0-d tensor per step (a tensor's
    shape only is checked: no host read)."""
    name = getattr(schedule, "__name__", type(schedule).__name__)
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"the learning-rate schedule {name} returned a tensor of shape "
                f"{tuple(value.shape)} at a step; a schedule returns one number or a 0-d "
                "tensor per step (e.g. return lr * factor, not a tensor of several values)")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise TypeError(
            f"the learning-rate schedule {name} returned a {type(value).__name__} "
            f"({value!r:.40}); a schedule maps the step count to a number or a 0-d tensor")
    if isinstance(value, (int, float)) and not _is_compiling() and not (
            math.isfinite(value) and value >= 0):  # traced, a number may be symbolic
        raise ValueError(f"the learning-rate schedule {name} returned {value!r} at a step; a "
                         "learning rate must be a finite number >= 0")


def one_minus_pow(beta: Any, t: Any) -> Any:
    """``1 - beta**t`` (a bias correction) without cancellation: ``-expm1(t log beta)``.

    With ``beta`` near 1 and small ``t`` the plain form loses most digits in float32
    (``1 - 0.999**3`` keeps 4 of 7), which made a float32 Adam step's tensor path differ from
    its number path by 3e-5 relative. Numbers in, a number out (double precision)."""
    if not isinstance(beta, Tensor) and not isinstance(t, Tensor):
        return 1 - beta**t
    log_beta = torch.log(beta) if isinstance(beta, Tensor) else (
        math.log(beta) if beta > 0 else -math.inf)
    return -torch.expm1(t * log_beta)


def scalar_dtype(leaves: Sequence[Tensor]) -> torch.dtype:
    """float64 when any leaf is float64, else float32: the dtype of 0-d scalars in a step."""
    return torch.float64 if any(x.dtype == torch.float64 for x in leaves) else torch.float32


def check_number(name: str, value: Any) -> None:
    """Raise a TypeError at construction when ``value`` (an argument that must be a number or
    a tensor, never a schedule) is a callable or another non-number."""
    if isinstance(value, Tensor):
        return
    if callable(value):
        raise TypeError(f"{name} must be a number or a 0-d tensor here, not a schedule "
                        f"({value!r}); a schedule is accepted only where documented")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number or a 0-d tensor; got {type(value).__name__}")


def check_hyperparameter(
    name: str, value: Any, *, low: float | None = 0.0, high: float | None = None,
    low_inclusive: bool = True, high_inclusive: bool = True,
) -> None:
    """Raise at construction when a hyperparameter is out of its range.

    Numbers must be finite and lie in the range; a 0-d tensor is checked the same way when
    it lives on the CPU and nothing differentiates through it (reading it is then free);
    schedules are checked by their constructors (their values change with the step).
    """
    if callable(value) and not isinstance(value, Tensor):
        return
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a 0-d tensor; got shape {tuple(value.shape)}")
        if not (value.is_cpu and type(value) is Tensor) or differentiating([value]):
            return
        value = value.item()
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(
            f"{name} must be a number, a 0-d tensor or a schedule (step -> value); "
            f"got {type(value).__name__}"
        )
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name}={value} is not finite; pass a finite number")
    bad_low = low is not None and (v < low if low_inclusive else v <= low)
    bad_high = high is not None and (v > high if high_inclusive else v >= high)
    if bad_low or bad_high:
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        bracket = ("[" if low_inclusive else "(") + f"{lo}, {hi}" + ("]" if high_inclusive else ")")
        raise ValueError(f"{name}={value} is out of range: it must lie in {bracket}")


# --------------------------------------------------------------------------- element-wise marks

_ELEMENTWISE: weakref.WeakSet[Callable[..., Any]] = weakref.WeakSet()


def elementwise(tx: Any) -> Any:
    """Mark the transform ``tx`` as element-wise and return it.

    A transform is element-wise when its update of a concatenation of leaves is the
    concatenation of its updates of the leaves, state included: every number depends only on
    the same position of the gradients, parameters and state (AdamW, SGD, Lion ... with no
    per-leaf mask). :class:`funcopt.Optimizer` runs such a transform on flat storage (one
    buffer for the parameters, one for the gradients, one per state entry). The mark is a
    promise the caller makes; the aliases that keep it mark themselves.
    """
    update = getattr(tx, "update", None)
    if not callable(update) or not callable(getattr(tx, "init", None)):
        raise TypeError(f"elementwise: {type(tx).__name__} is not a transform (init, update)")
    _ELEMENTWISE.add(update)
    return tx


def is_elementwise(tx: Any) -> bool:
    """Whether ``tx`` was marked with :func:`elementwise`."""
    update = getattr(tx, "update", None)
    try:
        return update in _ELEMENTWISE
    except TypeError:  # an unhashable update
        return False
