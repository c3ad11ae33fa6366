"""Schedule-Free optimisation (Defazio et al., 2024) as a wrapper over any base transform.

Schedule-Free keeps two sequences besides the gradient point ``y`` (the parameters the
gradient is taken at): ``z``, a plain SGD-style iterate, and ``x``, an online average of ``z``.
Only ``y`` and ``z`` are stored; ``x`` is recovered from them by
:func:`schedule_free_eval_params`, which replaces the reference optimizer's ``eval()`` switch.

Reference: Defazio, Yang, Mehta, Mishchenko, Khaled, Cutkosky, "The Road Less Scheduled",
https://arxiv.org/abs/2405.15682; code https://github.com/facebookresearch/schedule_free
(schedulefree 1.4.1, ``AdamWScheduleFree`` / ``SGDScheduleFree``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from funcopt.base import (
    GradientTransformation,
    PyTree,
    ScalarOrSchedule,
    Tensor,
    check_hyperparameter,
    current_learning_rate,
    find_state,
    increment,
    mark_if_schedule_value,
    register_hyperparameters,
    require_params,
    resolve,
    step_counter,
    tree_flatten,
    tree_leaves,
    tree_unflatten,
)
from funcopt.engine import expect_state, leaves, ops, scalar_dtype
from funcopt.schedules.base import Schedule
from funcopt.schedules.one_based import warmup_factor

__all__ = [
    "ScheduleFreeState",
    "ScaleByBiasCorrectedRmsState",
    "scale_by_bias_corrected_rms",
    "schedule_free",
    "schedule_free_adamw",
    "schedule_free_sgd",
    "schedule_free_eval_params",
]


class ScaleByBiasCorrectedRmsState(NamedTuple):
    """State of :func:`scale_by_bias_corrected_rms`: ``count``, the step t, and ``nu``, the EMA
    of squared gradients."""

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count by design (optax's name)
    nu: PyTree


def scale_by_bias_corrected_rms(
    b2: ScalarOrSchedule = 0.999, eps: float = 1e-8, eps_floor: bool = False
) -> GradientTransformation:
    """Divide by the root of a bias-corrected EMA of squared gradients (Adam without momentum).

    .. math::
        v_t = \\hat\\beta_2 v_{t-1} + (1 - \\hat\\beta_2) g_t^2, \\qquad
        u_t = g_t / (\\sqrt{v_t / c_t} + \\epsilon)

    With a constant ``b2`` (:math:`\\beta_2`), :math:`\\hat\\beta_2 = \\beta_2` and
    :math:`c_t = 1 - \\beta_2^t` (schedulefree's AdamW). With a schedule ``b2(t)``, the EMA is
    debiased in place as HeavyBall does: :math:`\\hat\\beta_2 = 1 - (1-\\beta_2)/(1-\\beta_2^t)`
    and :math:`c_t = 1` (which is the same for a constant :math:`\\beta_2`).
    ``eps_floor=True`` uses :math:`\\max(\\sqrt{v_t/c_t}, \\epsilon)` instead of adding
    :math:`\\epsilon` (HeavyBall 0.7.2).

    Args:
      b2: :math:`\\beta_2`, a float in [0, 1), 0-d tensor or schedule (e.g. PaLM's
        ``1 - t^{-0.8}``). Default 0.999.
      eps: :math:`\\epsilon`. Default 1e-8.
      eps_floor: take the maximum with eps instead of adding it. Default False.
    """
    check_hyperparameter("b2", b2, low=0.0, high=1.0, high_inclusive=False)
    check_hyperparameter("eps", eps, low=0.0)

    def init(params):
        return ScaleByBiasCorrectedRmsState(
            step_counter(params), [torch.zeros_like(p) for p in tree_leaves(params)])

    def update(updates, state, params=None, **extra):
        expect_state(state, ScaleByBiasCorrectedRmsState, "scale_by_bias_corrected_rms")
        g, treedef = leaves(updates, params, "scale_by_bias_corrected_rms", state.nu)
        count = increment(state.count)
        t = count.to(scalar_dtype(g))
        beta = _scalar(b2(count) if callable(b2) else b2, t)
        if callable(b2):
            beta, corr = 1.0 - (1.0 - beta) / (1.0 - beta ** t), None
        else:
            corr = 1.0 - beta ** t
        if not g:
            return updates, ScaleByBiasCorrectedRmsState(count, state.nu)
        nu = ops.mul(state.nu, _per_leaf(beta, g))
        nu = ops.add(nu, ops.mul(ops.mul(g, g),
                                                       _per_leaf(1.0 - beta, g)))
        nu = _cast_like(nu, g)
        denom = nu if corr is None else ops.div(nu, _per_leaf(corr, g))
        denom = ops.sqrt(denom)
        e = _per_leaf(_scalar(eps, t), g)
        denom = ops.maximum(denom, e) if eps_floor else ops.add(denom, e)
        return tree_unflatten(treedef, _cast_like(ops.div(g, denom), g)), \
            ScaleByBiasCorrectedRmsState(count, nu)

    return GradientTransformation(init, update)


def _scalar(value, like: Tensor) -> Tensor:
    """A hyperparameter (number or 0-d tensor of any dtype) as a 0-d tensor of ``like``'s
    dtype and device: float64 where the parameters are float64, else float32 (so float64 runs
    match schedulefree's float64 arithmetic to rounding)."""
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


def _per_leaf(scalar: Tensor, leaves: list[Tensor]) -> list[Tensor]:
    """``scalar`` as one 0-d tensor per leaf, at least float32 (one cast per leaf dtype).

    Low-precision leaves are scaled in float32 (0.999 is 1.0 in bfloat16); the caller casts
    the results back to each leaf's dtype with :func:`_cast_like`.
    """
    casts = {x.dtype: scalar.to(torch.promote_types(x.dtype, torch.float32)) for x in leaves}
    return [casts[x.dtype] for x in leaves]


def _cast_like(xs, refs: list[Tensor]) -> list[Tensor]:
    """Each ``xs[i]`` in the dtype of ``refs[i]`` (no copy where it already is)."""
    return [x if x.dtype == r.dtype else x.to(r.dtype) for x, r in zip(xs, refs)]


class ScheduleFreeState(NamedTuple):
    """State of :func:`schedule_free`: ``z`` iterate, averaging weights and the base's state."""

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count by design (optax's name)
    learning_rate: Tensor
    lr_max: Tensor
    weight_sum: Tensor
    b1: Tensor
    z: PyTree
    base_state: Any


register_hyperparameters(ScheduleFreeState, "learning_rate")


def _includes_learning_rate(base_state: Any) -> bool:
    """Whether a base's state holds a :func:`funcopt.scale_by_learning_rate` state (every
    funcopt alias ends with one): its updates then already carry ``-learning_rate``."""
    from funcopt.transforms.first_order import ScaleByLearningRateState

    stack = [base_state]
    while stack:
        node = stack.pop()
        if isinstance(node, ScaleByLearningRateState):
            return True
        if isinstance(node, (tuple, list)):
            stack.extend(node)
        elif isinstance(node, dict):
            stack.extend(node.values())
    return False


def _check_schedule_free(learning_rate, b1, weight_decay, warmup_steps, r, weight_lr_power,
                         base_includes_learning_rate) -> None:
    check_hyperparameter("learning_rate", learning_rate, low=0.0)
    check_hyperparameter("b1", b1, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
    check_hyperparameter("weight_decay", weight_decay, low=0.0)
    check_hyperparameter("warmup_steps", warmup_steps, low=0.0)
    check_hyperparameter("r", r, low=0.0)
    check_hyperparameter("weight_lr_power", weight_lr_power, low=0.0)
    if not isinstance(b1, (int, float, torch.Tensor)):  # a schedule (other types failed above)
        raise TypeError("schedule_free: b1 must be a number (it defines the evaluation point)")
    if base_includes_learning_rate not in (None, True, False):
        raise TypeError("schedule_free: base_includes_learning_rate must be None (detect), "
                        f"True or False; got {base_includes_learning_rate!r}")


def _step_size(learning_rate, stored: Tensor, count: Tensor, like: Tensor) -> Tensor:
    """The learning rate at ``count`` as a 0-d tensor of ``like``'s dtype (a schedule is
    evaluated in that dtype: float64 where the parameters are float64)."""
    if isinstance(learning_rate, Schedule):
        return _scalar(learning_rate(count, dtype=like.dtype), like)
    return _scalar(current_learning_rate(learning_rate, stored, count), like)


def schedule_free(
    base: GradientTransformation | None,
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    r: float = 0.0,
    weight_lr_power: float = 2.0,
    *,
    base_includes_learning_rate: bool | None = None,
) -> GradientTransformation:
    r"""Schedule-Free wrapper: turn a base direction into the y/z/x Schedule-Free iteration.

    With :math:`s_t` the base step at :math:`y_t` (the params given to update), either
    :math:`s_t = -\gamma_t (d_t + \lambda y_t)` for a base that gives a direction :math:`d_t`
    (funcopt's convention: ``scale_by_adam()``, ``None`` for SGD) with :math:`\gamma_t` the
    learning rate times the linear warmup :math:`\min(1, t/T_w)`, or :math:`s_t = u_t`, the
    base's update, for a base that already includes the learning rate (optax's convention:
    ``fo.adamw(lr)``, ``fo.sgd(lr)``):

    .. math::
        w_t &= t^r (\max_{s\le t}\gamma_s)^{p}, \quad c_t = w_t / \textstyle\sum_{s\le t} w_s \\
        y_{t+1} &= (1-c_t) y_t + c_t z_t + (1 - \beta_1(1-c_t)) s_t \\
        z_{t+1} &= z_t + s_t

    The returned update is :math:`y_{t+1} - y_t`. The evaluation point
    :math:`x = y + (1 - 1/\beta_1)(z - y)` comes from :func:`schedule_free_eval_params`.

    Args:
      base: the direction (``scale_by_bias_corrected_rms`` gives AdamW, ``None`` gives SGD),
        or an optax-style base whose updates include ``-learning_rate`` (see below).
      learning_rate: :math:`\gamma`, float or schedule; its current value is the state field
        ``learning_rate`` (read from there when a float was given). With an optax-style base
        it only weights the average (the base applies it), evaluated at the 1-based step as
        optax.contrib.schedule_free does.
      b1: :math:`\beta_1`, interpolation momentum in (0, 1). Default 0.9.
      weight_decay: :math:`\lambda`, applied to the direction at :math:`y`. Default 0.
      warmup_steps: :math:`T_w`, linear warmup length. Default 0.
      r: :math:`r`, polynomial weighting power. Default 0.
      weight_lr_power: :math:`p`, learning-rate weighting power. Default 2.
      base_includes_learning_rate: None (default) detects it: a base whose state holds a
        :func:`funcopt.scale_by_learning_rate` state (every funcopt alias: ``sgd``, ``adamw``
        ...) includes it; True declares it (e.g. a base ending in ``scale(-lr)``); False
        declares a direction. With an optax-style base, ``weight_decay`` and ``warmup_steps``
        must be 0 (put them in the base and in ``learning_rate``, as optax does); otherwise
        ``init`` raises ValueError.

    Scalars (weights, learning rate, :math:`\beta_1`) are float64 where the parameters are.
    Reference: Defazio et al., "The Road Less Scheduled", https://arxiv.org/abs/2405.15682
    (schedulefree 1.4.1; optax.contrib.schedule_free). ``params`` must be passed to
    ``update`` (they are :math:`y_t`).
    """
    _check_schedule_free(learning_rate, b1, weight_decay, warmup_steps, r, weight_lr_power,
                         base_includes_learning_rate)
    if base is None:
        from funcopt.compose import identity  # layer 4, lazily: transforms sit beneath it

        base = identity()

    def optax_style(base_state: Any) -> bool:
        if base_includes_learning_rate is not None:
            return base_includes_learning_rate
        return _includes_learning_rate(base_state)

    def init(params):
        count = step_counter(params)
        lr0 = resolve(learning_rate, count)
        like = torch.zeros((), dtype=scalar_dtype(tree_leaves(params)), device=count.device)
        base_state = base.init(params)
        if optax_style(base_state) and (_nonzero(weight_decay) or _nonzero(warmup_steps)):
            raise ValueError(
                "schedule_free: the base already includes the learning rate (optax's "
                "convention), so weight_decay and warmup_steps must be 0: chain "
                "add_decayed_weights into the base and give a warmup schedule as learning_rate "
                "(and to the base), or pass a direction such as scale_by_adam()")
        lr = _scalar(lr0, like).clone()
        return ScheduleFreeState(
            count, mark_if_schedule_value(lr, learning_rate),
            torch.full_like(like, -1.0),
            like, _scalar(b1, like).clone(),
            [p.detach().clone() for p in tree_leaves(params)], base_state)

    def update(updates, state, params=None, **extra):
        expect_state(state, ScheduleFreeState, "schedule_free")
        params = require_params(params, "schedule_free")
        leaves(updates, params, "schedule_free", tree_leaves(state.z))
        includes_lr = optax_style(state.base_state)
        d, base_state = base.update(updates, state.base_state, params, **extra)
        d, treedef = tree_flatten(d)
        y = tree_leaves(params)
        like = state.weight_sum
        if isinstance(weight_decay, Tensor):
            d = ops.add(d, ops.mul(y, _per_leaf(_scalar(weight_decay, like), y)))
        elif weight_decay != 0:
            d = ops.add(d, y, alpha=weight_decay)
        count = increment(state.count)
        lr = _step_size(learning_rate, state.learning_rate,
                        count if includes_lr else state.count, like)
        t = count.to(like.dtype)
        lr_t = lr * warmup_factor(t, _scalar(warmup_steps, like))
        lr_max = torch.maximum(lr_t, state.lr_max)
        weight = t ** _scalar(r, like) * lr_max ** _scalar(weight_lr_power, like)
        weight_sum = state.weight_sum + weight
        ckp1 = torch.where(weight_sum > 0, weight / weight_sum, torch.zeros_like(weight))
        if not y:
            return tree_unflatten(treedef, []), state
        s = d if includes_lr else ops.mul(d, _per_leaf(-lr_t, y))
        step = ops.mul(ops.sub(state.z, y), _per_leaf(ckp1, y))
        step = ops.add(step, ops.mul(s, _per_leaf(1 - state.b1 * (1 - ckp1), y)))
        z = _cast_like(ops.add(state.z, s), y)
        new_state = ScheduleFreeState(count, lr, lr_max, weight_sum, state.b1, z, base_state)
        return tree_unflatten(treedef, _cast_like(step, y)), new_state

    return GradientTransformation(init, update)


def _nonzero(value: Any) -> bool:
    return isinstance(value, Tensor) or callable(value) or value != 0


def schedule_free_adamw(
    learning_rate: ScalarOrSchedule = 0.0025, b1: float = 0.9, b2: ScalarOrSchedule = 0.999,
    eps: float = 1e-8, weight_decay: float = 0.0, warmup_steps: int = 0, r: float = 0.0,
    weight_lr_power: float = 2.0,
) -> GradientTransformation:
    """Schedule-Free AdamW: :func:`schedule_free` over :func:`scale_by_bias_corrected_rms`.

    :math:`d_t = g_t / (\\sqrt{v_t/(1-\\beta_2^t)} + \\epsilon)`, then the Schedule-Free step
    (see :func:`schedule_free`). Arguments as schedulefree's ``AdamWScheduleFree``
    (``lr`` -> ``learning_rate``, ``betas`` -> ``b1, b2``); ``b2`` may be a schedule such as
    PaLM's. Defaults: learning_rate 0.0025, b1 0.9, b2 0.999, eps 1e-8, weight_decay 0,
    warmup_steps 0, r 0, weight_lr_power 2. Reference: https://arxiv.org/abs/2405.15682.

    Example::

        tx = fo.schedule_free_adamw(1e-3, warmup_steps=100)
        state = tx.init(params)
        updates, state = tx.update(grads, state, params)
        params = fo.apply_updates(params, updates)
        eval_params = fo.schedule_free_eval_params(state, params)
    """
    return schedule_free(scale_by_bias_corrected_rms(b2, eps), learning_rate, b1, weight_decay,
                         warmup_steps, r, weight_lr_power)


def schedule_free_sgd(
    learning_rate: ScalarOrSchedule = 1.0, b1: float = 0.9, weight_decay: float = 0.0,
    warmup_steps: int = 0, r: float = 0.0, weight_lr_power: float = 2.0,
) -> GradientTransformation:
    """Schedule-Free SGD: :func:`schedule_free` with the raw gradient as direction.

    Arguments as schedulefree's ``SGDScheduleFree`` (``lr`` -> ``learning_rate``,
    ``momentum`` -> ``b1``). Defaults: learning_rate 1.0, b1 0.9, weight_decay 0,
    warmup_steps 0, r 0, weight_lr_power 2. Reference: https://arxiv.org/abs/2405.15682.
    """
    return schedule_free(None, learning_rate, b1, weight_decay, warmup_steps, r, weight_lr_power)


def schedule_free_eval_params(state: Any, params: PyTree) -> PyTree:
    """The parameters to evaluate with: :math:`x = y + (1 - 1/\\beta_1)(z - y)`.

    ``state`` is a :func:`schedule_free` state or any state tree containing one (e.g. a
    ``chain``'s); ``params`` are the training parameters :math:`y` (those given to ``update``).
    The order is optax's ``(state, params)``; the reversed order ``(params, state)`` is
    recognised (by which argument holds the ScheduleFreeState) and gives the same result.
    This is schedulefree's ``optimizer.eval()`` without mutating anything.
    """
    sf = find_state(state, ScheduleFreeState)
    if sf is None:
        sf, params = find_state(params, ScheduleFreeState), state
    if sf is None:
        raise ValueError("schedule_free_eval_params: no ScheduleFreeState found in state; pass "
                         "(state, params) with the state of a transform built with "
                         "fo.schedule_free(...)")
    y, treedef = tree_flatten(params)
    if len(y) != len(sf.z):
        raise ValueError(f"schedule_free_eval_params: params have {len(y)} leaves but the state "
                         f"holds {len(sf.z)}; pass the params this state was built for")
    if not y:
        return params
    weight = _per_leaf(1.0 - 1.0 / sf.b1, y)
    return tree_unflatten(treedef, ops.add(
        y, ops.mul(ops.sub(sf.z, y), weight)))
