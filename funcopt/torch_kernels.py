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

import weakref
from collections.abc import Callable
from typing import Any

import torch

from funcopt.base import GradientTransformation, OptState
from funcopt.tree import tree_leaves

__all__ = ["kernel_for", "with_kernel"]

Run = Callable[[], None]


class _Fused:
    """A registered kernel: ``kernel(flat, grads, state)`` runs one step in place and returns
    ``state``; ``kernel.prepare(flat, grads, state)`` does the look-ups into ``state`` once
    and returns a ``run()`` that steps these same tensors (for a caller that steps one state
    object many times: the step then spends its time in the kernel, not in finding it)."""

    def __init__(self, prepare: Callable[..., Run], hyper: dict[str, Any]) -> None:
        self._prepare, self.hyper = prepare, hyper

    def prepare(self, flat: Any, grads: Any, state: OptState) -> Run:
        return self._prepare(flat, grads, state, **self.hyper)

    def __call__(self, flat: Any, grads: Any, state: OptState) -> OptState:
        self.prepare(flat, grads, state)()
        return state


_KERNELS: weakref.WeakKeyDictionary[Any, _Fused] = weakref.WeakKeyDictionary()


def with_kernel(tx: GradientTransformation, name: str, learning_rate: Any,
                **hyper: Any) -> GradientTransformation:
    """Register torch's fused ``name`` (``"adamw"`` or ``"sgd"``) kernel, with the keyword
    arguments ``hyper``, for ``tx`` and return ``tx``; a no-op unless ``learning_rate`` and
    every value in ``hyper`` are plain numbers, booleans or None (a schedule or a tensor keeps
    the transform's own update)."""
    if torch.compiler.is_compiling():  # rebuilt inside a traced step: nothing to register
        return tx
    if all(v is None or isinstance(v, (int, float)) for v in (learning_rate, *hyper.values())):
        kernels: dict[str, Callable[..., Run]] = {"adamw": _adamw, "sgd": _sgd}
        _KERNELS[tx.update] = _Fused(kernels[name], hyper)
    return tx


def kernel_for(tx: GradientTransformation) -> _Fused | None:
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


def _counts(state: OptState) -> list[torch.Tensor]:
    """The counters of the chain's states, which every step advances by one in place (the
    buffers are updated in place too)."""
    return [s.count for s in state if hasattr(s, "count")]


def _lr(state: OptState) -> torch.Tensor:
    """The 0-d learning-rate tensor (read at every run: the adapter writes a param group's
    ``lr`` into it in place)."""
    return _find(state, "ScaleByLearningRateState").learning_rate


def _adamw(flat: Any, grads: Any, state: OptState, *, b1: float, b2: float, eps: float,
           weight_decay: float) -> Run:
    """AdamW in place with ``torch._fused_adamw_`` (one pass per dtype buffer)."""
    adam = _find(state, "ScaleByAdamState")
    params, gs, mu, nu = tree_leaves(flat), tree_leaves(grads), tree_leaves(adam.mu), tree_leaves(adam.nu)
    counts, lr, count = _counts(state), _lr(state), adam.count

    def run() -> None:
        torch._foreach_add_(counts, 1)
        steps = [count.to(torch.float32) for _ in params]
        torch._fused_adamw_(params, gs, mu, nu, [], steps, lr=float(lr), beta1=b1, beta2=b2,
                            weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False)

    return run


def _sgd(flat: Any, grads: Any, state: OptState, *, momentum: float | None, nesterov: bool,
         dampening: float, weight_decay: float) -> Run:
    """SGD (momentum, Nesterov, dampening, L2 decay) in place with ``torch._fused_sgd_``; the
    first step (momentum buffer = gradient) is the one where the trace's counter reaches 1."""
    params, gs = tree_leaves(flat), tree_leaves(grads)
    counts, lr, buffers, count = _counts(state), _lr(state), [], None
    if momentum is not None:
        trace = _find(state, "TraceState")
        buffers, count = tree_leaves(trace.trace), trace.count

    def run() -> None:
        torch._foreach_add_(counts, 1)
        torch._fused_sgd_(params, gs, buffers, weight_decay=weight_decay,
                          momentum=momentum or 0.0, lr=float(lr), dampening=dampening,
                          nesterov=nesterov, maximize=False,
                          is_first_step=count is not None and int(count) == 1)

    return run
