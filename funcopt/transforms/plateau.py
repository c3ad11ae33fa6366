"""Reduce-on-plateau: scale the updates down when a monitored value stops improving."""

from __future__ import annotations

from typing import NamedTuple

import torch

from funcopt.base import GradientTransformation, Tensor, replace, tree_leaves, tree_unflatten
from funcopt.engine import check_hyperparameter, expect_state, ops
from funcopt.engine import leaves as engine_leaves

__all__ = ["ReduceLROnPlateauState", "reduce_on_plateau"]


class ReduceLROnPlateauState(NamedTuple):
    """State of :func:`reduce_on_plateau`: ``scale`` (the factor applied to the updates),
    ``best_value``, ``plateau_count``, ``cooldown_count``, ``count`` (values averaged so far)
    and ``avg_value`` (their mean). Counters are 0-d int64 tensors."""

    scale: Tensor
    best_value: Tensor
    plateau_count: Tensor
    cooldown_count: Tensor
    count: Tensor  # type: ignore[assignment]  # shadows tuple.count by design (optax's name)
    avg_value: Tensor


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"reduce_on_plateau: {name}={value!r} must be an int >= {low}")


def _check(factor, patience, rtol, atol, cooldown, accumulation_size, min_scale) -> None:
    if not isinstance(factor, (int, float)) or not 0.0 < factor < 1.0:
        raise ValueError(f"reduce_on_plateau: factor={factor!r} must lie in (0, 1)")
    for name, value in (("rtol", rtol), ("atol", atol), ("min_scale", min_scale)):
        check_hyperparameter(f"reduce_on_plateau: {name}", value, low=0.0)
    if rtol > 1.0:
        raise ValueError(f"reduce_on_plateau: rtol={rtol!r} must be <= 1")
    if rtol == 0.0 and atol == 0.0:
        raise ValueError("reduce_on_plateau: rtol and atol are both 0; make one positive "
                         "(an improvement must beat best * (1 - rtol) - atol)")
    _check_int("patience", patience, 1)
    _check_int("cooldown", cooldown, 0)
    _check_int("accumulation_size", accumulation_size, 1)


def reduce_on_plateau(
    factor: float = 0.1,
    patience: int = 10,
    rtol: float = 1e-4,
    atol: float = 0.0,
    cooldown: int = 0,
    accumulation_size: int = 1,
    min_scale: float = 0.0,
) -> GradientTransformation:
    r"""Multiply the updates by a ``scale`` that drops by ``factor`` when the monitored value
    has not improved for ``patience`` evaluations.

    ``update(updates, state, params, value=v)``. Every ``accumulation_size`` calls, the mean
    :math:`\bar v` of the values given since the last evaluation is compared with the best:
    it improved if :math:`\bar v < (1 - \text{rtol})\,\text{best} - \text{atol}` (then
    ``best = v̄`` and the plateau count resets), else the plateau count grows. Outside a
    cooldown, when the count reaches ``patience``,
    :math:`\text{scale} \leftarrow \max(\text{scale}\cdot\text{factor}, \text{min\_scale})`,
    the count resets and a cooldown of ``cooldown`` evaluations starts (during which the
    count stays 0). The output is ``scale * updates``; chain it after the optimizer.

    Args:
      factor: in (0, 1), default 0.1. patience: int >= 1, default 10.
      rtol: relative tolerance in [0, 1], default 1e-4. atol: absolute tolerance >= 0,
        default 0 (one of rtol, atol must be positive).
      cooldown: evaluations to wait after a reduction, default 0.
      accumulation_size: values averaged per evaluation, default 1 (use more when ``value``
        is a noisy minibatch loss).
      min_scale: the scale never goes below it, default 0.

    ``scale`` has the lowest floating dtype of the parameters, ``best_value`` and
    ``avg_value`` the highest. No host sync. Reference: optax.contrib.reduce_on_plateau;
    torch.optim.lr_scheduler.ReduceLROnPlateau (mode="min", threshold_mode="rel").
    """
    _check(factor, patience, rtol, atol, cooldown, accumulation_size, min_scale)

    def init(params):
        leaves = [x for x in tree_leaves(params) if x.is_floating_point()]
        dtypes = sorted({x.dtype for x in leaves}, key=lambda d: torch.finfo(d).bits) or [
            torch.get_default_dtype()]
        device = leaves[0].device if leaves else torch.device("cpu")
        zero = torch.zeros((), dtype=torch.int64, device=device)
        return ReduceLROnPlateauState(
            torch.ones((), dtype=dtypes[0], device=device),
            torch.full((), float("inf"), dtype=dtypes[-1], device=device),
            zero, zero, zero, torch.zeros((), dtype=dtypes[-1], device=device))

    def _evaluate(s: ReduceLROnPlateauState) -> ReduceLROnPlateauState:
        improved = s.avg_value < (1 - rtol) * s.best_value - atol
        plateau = torch.where(improved, torch.zeros_like(s.plateau_count), s.plateau_count + 1)
        cooling = s.cooldown_count > 0
        hit = (plateau == patience) & ~cooling
        scale = torch.where(cooling, s.scale, torch.clamp_min(
            torch.where(hit, s.scale * factor, s.scale), min_scale))
        return ReduceLROnPlateauState(
            scale,
            torch.where(improved, s.avg_value, s.best_value),
            torch.where(cooling | hit, torch.zeros_like(plateau), plateau),
            torch.where(cooling, s.cooldown_count - 1,
                        torch.where(hit, torch.full_like(plateau, cooldown),
                                    torch.zeros_like(plateau))),
            torch.zeros_like(s.count),
            torch.zeros_like(s.avg_value),
        )

    def update(updates, state, params=None, *, value=None, **extra):
        expect_state(state, ReduceLROnPlateauState, "reduce_on_plateau")
        if value is None:
            raise TypeError("reduce_on_plateau: update needs value= (the monitored loss or "
                            "metric), e.g. tx.update(grads, state, params, value=loss)")
        count = state.count + 1
        value = torch.as_tensor(value, device=state.avg_value.device).to(state.avg_value.dtype)
        avg = (state.count * state.avg_value + value) / count
        s = replace(state, count=count, avg_value=avg)
        new = _evaluate(s)
        due = count == accumulation_size
        s = ReduceLROnPlateauState(*[torch.where(due, a, b) for a, b in zip(new, s)])
        u, treedef = engine_leaves(updates, params, "reduce_on_plateau")
        return tree_unflatten(treedef, ops.mul(u, s.scale) if u else []), s

    return GradientTransformation(init, update)
