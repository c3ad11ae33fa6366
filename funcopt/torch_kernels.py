"""torch's own fused kernels for plain AdamW and SGD on flat storage.

:class:`funcopt.Optimizer` keeps an element-wise group's parameters, gradients and state in
flat buffers. On CUDA its step is compiled (:func:`funcopt.jit`); elsewhere it would run the
transform's eager ops, one pass over the buffers each (AdamW: about twenty). For the two
optimizers torch fuses on every device, :func:`funcopt.adamw` and :func:`funcopt.sgd` with
plain numbers for their hyperparameters (SGD: momentum None or above 0) and float32/float64
parameters, the group calls torch's kernel instead
(``torch._fused_adamw_``, ``torch._fused_sgd_``: the kernels of ``torch.optim.AdamW/SGD(
fused=True)``), one pass, on the same state the pure update keeps: the counters advance as
there (in place), so the state can be saved, loaded or given back to the pure update.

The numbers are the pure update's up to rounding: AdamW
:math:`\\theta \\leftarrow \\theta(1 - \\eta\\lambda) - \\eta\\,\\hat m/(\\sqrt{\\hat v} + \\epsilon)`
and SGD :math:`b \\leftarrow \\mu b + (1 - \\tau) d` (:math:`b_1 = d` on the first step, as
torch and :func:`funcopt.trace`), :math:`d = g + \\lambda\\theta`.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any

import torch

from funcopt.base import GradientTransformation, OptState
from funcopt.tree import tree_leaves

__all__ = ["kernel_for", "with_kernel"]

Kernel = Callable[[Any, Any, OptState], OptState]
_KERNELS: weakref.WeakKeyDictionary[Any, Kernel] = weakref.WeakKeyDictionary()


def with_kernel(tx: GradientTransformation, name: str, learning_rate: Any,
                **hyper: Any) -> GradientTransformation:
    """Register torch's fused ``name`` (``"adamw"`` or ``"sgd"``) kernel, with the keyword
    arguments ``hyper``, for ``tx`` and return ``tx``; a no-op unless ``learning_rate`` and
    every value in ``hyper`` are plain numbers, booleans or None (a schedule or a tensor keeps
    the transform's own update)."""
    if torch.compiler.is_compiling():  # rebuilt inside a traced step: nothing to register
        return tx
    if all(v is None or isinstance(v, (int, float)) for v in (learning_rate, *hyper.values())):
        kernels: dict[str, Callable[..., OptState]] = {"adamw": _adamw, "sgd": _sgd}
        _KERNELS[tx.update] = functools.partial(kernels[name], **hyper)
    return tx


def kernel_for(tx: GradientTransformation) -> Kernel | None:
    """The fused kernel registered for ``tx`` by :func:`with_kernel`, else None."""
    try:
        return _KERNELS.get(tx.update)
    except TypeError:  # an unhashable update
        return None


def _find(state: OptState, kind: str) -> Any:
    for s in state:
        if type(s).__name__ == kind:
            return s
    raise TypeError(f"fused kernel: no {kind} in the state; it was not built by this transform")


def _advance(state: OptState) -> None:
    """Advance every counter of the chain's states by one, in place (the buffers are updated
    in place too)."""
    torch._foreach_add_([s.count for s in state if hasattr(s, "count")], 1)


def _lr(state: OptState) -> float:
    return float(_find(state, "ScaleByLearningRateState").learning_rate)


def _adamw(flat: Any, grads: Any, state: OptState, *, b1: float, b2: float, eps: float,
           weight_decay: float) -> OptState:
    """AdamW in place with ``torch._fused_adamw_`` (one pass per dtype buffer)."""
    adam = _find(state, "ScaleByAdamState")
    params, gs = tree_leaves(flat), tree_leaves(grads)
    _advance(state)
    steps = [adam.count.to(torch.float32) for _ in params]
    torch._fused_adamw_(params, gs, tree_leaves(adam.mu), tree_leaves(adam.nu), [], steps,
                        lr=_lr(state), beta1=b1, beta2=b2, weight_decay=weight_decay, eps=eps,
                        amsgrad=False, maximize=False)
    return state


def _sgd(flat: Any, grads: Any, state: OptState, *, momentum: float | None, nesterov: bool,
         dampening: float, weight_decay: float) -> OptState:
    """SGD (momentum, Nesterov, dampening, L2 decay) in place with ``torch._fused_sgd_``."""
    params, gs = tree_leaves(flat), tree_leaves(grads)
    _advance(state)
    buffers, first = [], False
    if momentum is not None:
        trace = _find(state, "TraceState")
        buffers, first = tree_leaves(trace.trace), int(trace.count) == 1
    torch._fused_sgd_(params, gs, buffers, weight_decay=weight_decay, momentum=momentum or 0.0,
                      lr=_lr(state), dampening=dampening, nesterov=nesterov, maximize=False,
                      is_first_step=first)
    return state
