"""The :class:`Schedule` type and the checks every constructor of :mod:`funcopt.schedules`
shares (the conventions are in that package's docstring)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any, Union

import torch

Tensor = torch.Tensor
Value = Union[float, Tensor]
Step = Union[int, float, Tensor]
StepFn = Callable[[Step, Union[torch.dtype, None]], Any]

__all__ = ["Schedule", "as_schedule"]


class Schedule:
    """A hyperparameter as a function of the step: ``schedule(t, dtype=None) -> value``.

    ``t``: a Python number or a 0-d tensor (see the module docstring for negative steps);
    ``dtype``: None (float32 for tensor steps, float64 for Python steps) or a floating torch
    dtype to compute in. A Python step gives a Python float, a tensor step a 0-d tensor.

    Attributes: ``name`` (the constructor's name) and ``args`` (its ``(name, value)`` argument
    pairs), shown by ``repr``. Instances are immutable; copies are the instance itself. Build
    them with this module's constructors or :func:`as_schedule`; ``Schedule(fn, name, args)``
    takes ``fn(step, dtype)`` with ``dtype`` None or a floating dtype.
    """

    __slots__ = ("_fn", "name", "args")
    _fn: StepFn
    name: str
    args: tuple[tuple[str, Any], ...]

    def __init__(self, fn: StepFn, name: str, args: Mapping[str, Any] | None = None):
        object.__setattr__(self, "_fn", fn)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "args", tuple((args or {}).items()))

    def __call__(self, count: Step, dtype: torch.dtype | None = None) -> Any:
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"{self.name}: dtype={dtype!r} must be None or a floating torch dtype "
                            "(e.g. torch.float64)")
        return self._fn(count, dtype)

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError(f"Schedule is immutable: cannot set {key!r}; build a new one")

    def __delattr__(self, key: str) -> None:
        raise AttributeError(f"Schedule is immutable: cannot delete {key!r}")

    def __copy__(self) -> Schedule:
        return self

    def __deepcopy__(self, memo: dict) -> Schedule:
        return self

    def __repr__(self) -> str:
        def show(v: Any) -> str:
            if callable(v) and not isinstance(v, Schedule):
                return getattr(v, "__qualname__", None) or repr(v)
            return repr(v)

        return f"{self.name}({', '.join(f'{k}={show(v)}' for k, v in self.args)})"


def as_schedule(fn: Callable[[Any], Any]) -> Schedule:
    """Wrap a plain callable ``fn(step) -> value`` as a :class:`Schedule` (a Schedule is
    returned as it is). ``fn`` sees the step unchanged (negative steps included); with
    ``dtype`` given, a tensor it returns is cast to ``dtype``, a number is returned as it is."""
    if isinstance(fn, Schedule):
        return fn
    if not callable(fn):
        raise TypeError(f"as_schedule: fn must be a callable step -> value, got "
                        f"{type(fn).__name__}; use constant(x) for a fixed number")

    def call(step: Step, dtype: torch.dtype | None) -> Any:
        v = fn(step)
        return v.to(dtype) if dtype is not None and isinstance(v, Tensor) else v

    return Schedule(call, "as_schedule", {"fn": fn})


# --------------------------------------------------------------------------- checks


def _check_step(step: Any) -> Any:
    """The step, validated, with a negative Python step replaced by 0 (the type kept)."""
    if isinstance(step, Tensor):
        if step.ndim != 0:
            raise ValueError(f"a schedule takes a 0-d step, got shape {tuple(step.shape)}")
        return step
    if isinstance(step, bool) or not isinstance(step, numbers.Real):
        raise TypeError(f"a schedule takes an int or a 0-d tensor step, got {type(step)}")
    if not math.isfinite(step):
        raise ValueError(f"a schedule takes a finite step, got {step}")
    number: Any = step
    return number if number >= 0 else type(number)(0)


def _check_steps(who: str, name: str, value: Any, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{who}: {name}={value!r} must be an int >= {low}")


def _check_number(who: str, name: str, value: Any, low: float = -math.inf,
                  high: float = math.inf, *, open_low: bool = False,
                  open_high: bool = False) -> None:
    """Raise ValueError unless ``value`` is a finite real number in the given interval
    (closed unless ``open_low`` / ``open_high``). Tensors are not checked."""
    if isinstance(value, Tensor):
        return
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    if ok:
        ok = (value > low if open_low else value >= low) and (
            value < high if open_high else value <= high)
    if not ok:
        where = "" if (low, high) == (-math.inf, math.inf) else (
            " in " + ("(" if open_low else "[") + f"{low}, {high}" + (")" if open_high else "]"))
        raise ValueError(f"{who}: {name}={value!r} must be a finite number{where}")


def _evaluate(formula: Callable[[Tensor], Tensor]) -> StepFn:
    """Run ``formula`` on the step as a float tensor (negative steps as 0); a float back for a
    Python step, a 0-d tensor for a tensor step."""

    def fn(step: Step, dtype: torch.dtype | None) -> Value:
        step = _check_step(step)
        if isinstance(step, Tensor):
            return formula(torch.clamp(step.to(dtype or torch.float32), min=0))
        return float(formula(torch.tensor(float(step), dtype=dtype or torch.float64)))

    return fn


def _renamed(schedule: Schedule, name: str, args: Mapping[str, Any]) -> Schedule:
    return Schedule(schedule._fn, name, args)
