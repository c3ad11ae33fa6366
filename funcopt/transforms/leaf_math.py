"""The leaf-list arithmetic shared by the first-order transforms.

Scalars (hyperparameters, bias corrections) are Python numbers or 0-d tensors. Numbers use
the fused Scalar overloads; tensors use the Tensor overloads, which never read the value on
the host. Every helper works on a list of leaves (``torch._foreach_*`` through
:data:`funcopt.engine.ops`). :mod:`funcopt.transforms.first_order` re-exports them under the
same names for the modules that import them from there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Union

import torch
from torch.compiler import is_compiling as _is_compiling

from funcopt.base import ScalarOrSchedule, Tensor, check_hyperparameter, resolve
from funcopt.engine import check_number, host_number, into, ops, scalar_dtype

TensorList = Union[list[Tensor], tuple[Tensor, ...]]


def _is_schedule(x: Any) -> bool:
    """``callable(x)`` without narrowing a float-annotated argument (for type checkers)."""
    return callable(x)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _hp(value: ScalarOrSchedule, count: Tensor) -> Any:
    v = resolve(value, count)
    return host_number(v.to(count.device)) if isinstance(v, Tensor) else v


def _steps(count: Tensor, leaves: Sequence[Tensor]) -> Any:
    """The step number ``count`` for ``beta ** t``: a 0-d float tensor, or a Python int where
    :func:`~funcopt.base.host_number` reads it (eager CPU steps)."""
    t = host_number(count)
    return t if isinstance(t, int) else count.to(scalar_dtype(leaves))


def _sqrt(x: Any) -> Any:
    """The square root of a number or a 0-d tensor."""
    return torch.sqrt(x) if isinstance(x, Tensor) else math.sqrt(x)


def _axpy(alpha: Any, xs: TensorList, ys: TensorList) -> TensorList:
    """``ys + alpha * xs``."""
    if _is_number(alpha):
        return ops.add(ys, xs, alpha=alpha)
    return ops.add(ys, ops.mul(xs, alpha))


def _add_scalar(xs: TensorList, c: Any) -> TensorList:
    """``xs + c`` for a number or a 0-d tensor ``c``, without a host sync: torch.compile traces
    ``_foreach_add(xs, tensor)`` into a ``.item()``, and on a GPU the eager op reads the tensor
    on the host too (a CUDA graph cannot capture it), so those pass a list instead (eager CPU
    steps keep the single op)."""
    if isinstance(c, Tensor) and (_is_compiling() or not c.is_cpu):
        return ops.add(xs, [c] * len(xs))
    return ops.add(xs, c)


def _moment(state: TensorList, xs: TensorList, decay: Any) -> TensorList:
    """``decay * state + (1 - decay) * xs`` (torch.optim's ``lerp`` form for numbers)."""
    if _is_number(decay):
        return ops.lerp(state, xs, 1.0 - decay)
    return _axpy(1.0 - decay, xs, ops.mul(state, decay))


def _moment_sq(state: TensorList, xs: TensorList, decay: Any) -> TensorList:
    """``decay * state + (1 - decay) * xs**2``."""
    out = ops.mul(state, decay)  # a new list: the in-place ops below touch only it
    if _is_number(decay):
        out = into("addcmul", out, xs, xs, value=1.0 - decay)
    else:
        out = into("add", out, ops.mul(ops.mul(xs, xs), 1.0 - decay))
    return out


def _as(xs: TensorList, refs: Sequence[Tensor]) -> list[Tensor]:
    """Each ``x`` in the dtype of the matching ``ref`` (no copy when it already is)."""
    return [x if x.dtype == r.dtype else x.to(r.dtype) for x, r in zip(xs, refs)]


def _wide(dtype: torch.dtype) -> torch.dtype:
    """float32 for float16 (whose range loses Adam's second moments), else ``dtype``."""
    return torch.float32 if dtype == torch.float16 else dtype


def _zeros(leaves: Sequence[Tensor], dtype: torch.dtype | None) -> list[Tensor]:
    return [torch.zeros_like(x, dtype=dtype) for x in leaves]


def _full(leaves: Sequence[Tensor], value: float, dtype: torch.dtype | None = None) -> list[Tensor]:
    return [torch.full_like(x, value, dtype=dtype) for x in leaves]


def _check(name: str, value: Any, **kw: Any) -> None:
    check_hyperparameter(name, value, **kw)


def _check_beta(name: str, value: Any) -> None:
    """A decay in [0, 1): a number or a 0-d tensor. A callable is a TypeError here; the
    transforms whose betas may follow a schedule check callables themselves."""
    check_number(name, value)
    check_hyperparameter(name, value, low=0.0, high=1.0, high_inclusive=False)
