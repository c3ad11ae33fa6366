"""Methods from optax's ``contrib``: AdEMAMix (and its simplified form) and SAM.

AdEMAMix adds a slow momentum to Adam's fast one; SAM (sharpness-aware minimisation) takes the
outer step with the gradient at an adversarially perturbed point.
"""

# ruff: noqa: F405 (the names of the toolkit's star import)
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch

from funcopt.base import apply_updates
from funcopt.transforms import first_order as fo
from funcopt.transforms._toolkit import *  # noqa: F403
from funcopt.transforms.weight_decay import add_decayed_weights

__all__ = [
    "ScaleByAdemamixState", "ScaleBySimplifiedAdEMAMixState", "SAMState",
    "scale_by_ademamix", "ademamix", "scale_by_simplified_ademamix", "simplified_ademamix",
    "sam",
]


class ScaleByAdemamixState(NamedTuple):
    """State of :func:`scale_by_ademamix`: the step count and the second moment ``nu`` (the
    two first moments are held by its inner EMAs)."""

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count by design (optax's name)
    count_m2: Tensor
    m1: Any
    m2: Any
    nu: Any


def _decay(weight_decay: Any, mask: Any) -> tuple[GradientTransformation, ...]:
    zero = isinstance(weight_decay, (int, float)) and weight_decay == 0
    return () if zero else (add_decayed_weights(weight_decay, mask),)


def scale_by_ademamix(
    b1: float = 0.9, b2: float = 0.999, b3: ScalarOrSchedule = 0.9999,
    alpha: ScalarOrSchedule = 6.0, eps: float = 1e-8, eps_root: float = 0.0,
    mu_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    r"""AdEMAMix's scaling: Adam's fast EMA plus :math:`\alpha` times a slow EMA.

    .. math::
        m^{(1)}_t = \beta_1 m^{(1)}_{t-1} + (1-\beta_1) g_t,\quad
        m^{(2)}_t = \beta_3 m^{(2)}_{t-1} + (1-\beta_3) g_t,\quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,\\
        u_t = \big(m^{(1)}_t/(1-\beta_1^t) + \alpha\, m^{(2)}_t\big)
        / \big(\sqrt{v_t/(1-\beta_2^t) + \epsilon_{root}} + \epsilon\big).

    Args:
      b1: :math:`\beta_1` (default 0.9). b2: :math:`\beta_2` (default 0.999).
      b3: :math:`\beta_3`, the slow EMA's decay, a number or a schedule of the step
        (default 0.9999; the paper warms it up, e.g. ``funcopt.schedules``).
      alpha: :math:`\alpha`, a number or a schedule (default 6).
      eps: :math:`\epsilon` (default 1e-8). eps_root: :math:`\epsilon_{root}` (default 0).
      mu_dtype: dtype of the three moments (default: the parameters').

    Reference: Pagliardini, Ablin, Grangier, "The AdEMAMix Optimizer: Better, Faster, Older",
    2024; optax ``contrib.scale_by_ademamix``.
    """
    _check_beta("b1", b1)
    _check_beta("b2", b2)
    if not callable(b3):
        _check_beta("b3", b3)
    _check("alpha", alpha, low=None)
    _check("eps", eps)
    _check("eps_root", eps_root)

    def init(params):
        leaves, count = tree_leaves(params), step_counter(params)
        return ScaleByAdemamixState(count, count.clone(), _zeros(leaves, mu_dtype),
                                    _zeros(leaves, mu_dtype), _zeros(leaves, mu_dtype))

    def update(updates, state, params=None, **extra):
        g, treedef = _leaves(updates, params, "scale_by_ademamix", state.m1)
        count, count_m2 = increment(state.count), increment(state.count_m2)
        if not g:
            return updates, replace(state, count=count, count_m2=count_m2)
        c_b3, c_alpha = _hp(b3, state.count_m2), _hp(alpha, state.count_m2)
        m1 = _moment(_as(state.m1, g), g, b1)
        m2 = _moment(_as(state.m2, g), g, c_b3)
        nu = _moment_sq(_as(state.nu, g), g, b2)
        t = _steps(count, g)
        num = _axpy(c_alpha, m2, ops.div(m1, 1 - b1**t))
        den = ops.add(ops.sqrt(ops.add(ops.div(nu, 1 - b2**t), eps_root)), eps)
        return tree_unflatten(treedef, _as(ops.div(num, den), g)), ScaleByAdemamixState(
            count, count_m2, _as(m1, state.m1), _as(m2, state.m2), _as(nu, state.nu))

    return GradientTransformation(init, update)


def ademamix(
    learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
    b3: ScalarOrSchedule = 0.9999, alpha: ScalarOrSchedule = 5.0, eps: float = 1e-8,
    eps_root: float = 0.0, mu_dtype: torch.dtype | None = None,
    weight_decay: ScalarOrSchedule = 0.0, mask: Any = None,
) -> GradientTransformation:
    r"""AdEMAMix: ``chain(scale_by_ademamix(...), add_decayed_weights(weight_decay, mask),
    scale_by_learning_rate(learning_rate))``; :math:`\alpha` defaults to 5 here, 6 in
    :func:`scale_by_ademamix`, as optax.

    Reference: Pagliardini et al. 2024; optax ``contrib.ademamix``.
    """
    return chain(scale_by_ademamix(b1, b2, b3, alpha, eps, eps_root, mu_dtype),
                 *_decay(weight_decay, mask), fo.scale_by_learning_rate(learning_rate))


class ScaleBySimplifiedAdEMAMixState(NamedTuple):
    """State of :func:`scale_by_simplified_ademamix`: the step count and the two moments
    ``m`` and ``n``."""

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count by design (optax's ``t``)
    m: Any
    n: Any


def scale_by_simplified_ademamix(
    b1: float = 0.99, b2: float = 0.95, alpha: ScalarOrSchedule = 0.0, eps: float = 1e-8,
    eps_root: float = 0.0,
) -> GradientTransformation:
    r"""Simplified AdEMAMix: one undamped momentum plus :math:`\alpha` times the gradient.

    .. math:: m_t = \beta_1 m_{t-1} + g_t,\quad n_t = \beta_2 n_{t-1} + (1-\beta_2) g_t^2,\quad
        u_t = (m_t + \alpha g_t)/(\sqrt{n_t/(1-\beta_2^t) + \epsilon_{root}} + \epsilon).

    Args:
      b1: :math:`\beta_1` (default 0.99). b2: :math:`\beta_2` (default 0.95).
      alpha: :math:`\alpha`, a number or a schedule (default 0).
      eps: :math:`\epsilon` (default 1e-8). eps_root: :math:`\epsilon_{root}` (default 0).

    The step counter is named ``count`` (optax: ``t``). Reference: Morwani et al.,
    "Connections between Schedule-Free Optimizers, AdEMAMix, and Accelerated SGD Variants",
    2025; optax ``contrib.scale_by_simplified_ademamix``.
    """
    _check_beta("b1", b1)
    _check_beta("b2", b2)
    _check("alpha", alpha, low=None)
    _check("eps", eps)
    _check("eps_root", eps_root)

    def init(params):
        leaves = tree_leaves(params)
        return ScaleBySimplifiedAdEMAMixState(step_counter(params), _zeros(leaves, None),
                                              _zeros(leaves, None))

    def update(updates, state, params=None, **extra):
        g, treedef = _leaves(updates, params, "scale_by_simplified_ademamix", state.m)
        count = increment(state.count)
        if not g:
            return updates, replace(state, count=count)
        c_alpha = _hp(alpha, state.count)
        m = ops.add(g, ops.mul(_as(state.m, g), b1))
        n = _moment_sq(_as(state.n, g), g, b2)
        num = _axpy(c_alpha, g, m)
        den = ops.add(ops.sqrt(ops.add(ops.div(n, 1 - b2 ** _steps(count, g)), eps_root)), eps)
        return tree_unflatten(treedef, _as(ops.div(num, den), g)), ScaleBySimplifiedAdEMAMixState(
            count, _as(m, state.m), _as(n, state.n))

    return GradientTransformation(init, update)


def simplified_ademamix(
    learning_rate: ScalarOrSchedule, b1: float = 0.99, b2: float = 0.95,
    alpha: ScalarOrSchedule = 0.0, eps: float = 1e-8, eps_root: float = 0.0,
    weight_decay: ScalarOrSchedule = 0.0, mask: Any = None,
) -> GradientTransformation:
    r"""Simplified AdEMAMix: ``chain(scale_by_simplified_ademamix(...),
    add_decayed_weights(weight_decay, mask), scale_by_learning_rate(learning_rate))``.

    Reference: Morwani et al. 2025; optax ``contrib.simplified_ademamix``.
    """
    return chain(scale_by_simplified_ademamix(b1, b2, alpha, eps, eps_root),
                 *_decay(weight_decay, mask), fo.scale_by_learning_rate(learning_rate))


class SAMState(NamedTuple):
    """State of :func:`sam`: steps since the last outer step, the outer optimizer's state,
    the adversarial optimizer's state and the cached outer gradient."""

    steps_since_sync: Tensor
    opt_state: Any
    adv_state: Any
    cache: Any


def _pick(cond: Tensor, a: Any, b: Any) -> Any:
    """``a`` where ``cond`` else ``b``, leaf by leaf over two trees of one structure."""
    return optree.tree_map(lambda x, y: torch.where(cond, x, y), a, b)


def _neg(tree: Any) -> Any:
    leaves, treedef = optree.tree_flatten(tree)
    return tree_unflatten(treedef, ops.neg(leaves) if leaves else leaves)


def sam(
    optimizer: GradientTransformation, adv_optimizer: GradientTransformation,
    sync_period: int = 2, reset_state: bool = True, opaque_mode: bool = False,
    batch_axis_name: str | None = None,
) -> GradientTransformation:
    r"""Sharpness-aware minimisation: the outer step uses the gradient at an ascent point.

    Every ``sync_period`` steps form one SAM step: the first ``sync_period - 1`` steps move the
    parameters *up* by ``adv_optimizer`` (ascent, e.g. ``chain(normalize_by_update_norm(),
    scale(rho))``), the last returns the parameters to where the period started and applies
    ``optimizer`` to that step's gradient (taken at the perturbed point):

    .. math:: \tilde w = w + \rho\,\frac{\nabla f(w)}{\|\nabla f(w)\|},\quad
        w \leftarrow w + \text{optimizer}(\nabla f(\tilde w)).

    Default (transparent) mode: each ``update`` is one step of the outer loop. With
    ``opaque_mode=True`` one ``update`` does the whole period and needs ``grad_fn=(params, i)
    -> gradient`` by keyword.

    Args:
      optimizer: the outer transform (e.g. ``sgd(lr)``).
      adv_optimizer: the ascent transform; its output is negated and applied.
      sync_period: steps per SAM step, >= 1 (default 2).
      reset_state: re-initialise ``adv_optimizer``'s state after each period (default True).
      opaque_mode: see above (default False).
      batch_axis_name: not supported (a JAX ``pmean`` axis); must be None.

    Reference: Foret et al., "Sharpness-Aware Minimization for Efficiently Improving
    Generalization", ICLR 2021; optax ``contrib.sam``.
    """
    if not isinstance(sync_period, int) or sync_period < 1:
        raise ValueError(f"sam: sync_period={sync_period!r} must be an int >= 1")
    if batch_axis_name is not None:
        raise ValueError("sam: batch_axis_name is a JAX pmean axis; average the gradients "
                         "with funcopt.all_reduce_mean instead and leave it None")

    def init(params):
        count = step_counter(params)
        cache = None if opaque_mode else optree.tree_map(lambda x: x.detach().clone(), params)
        return SAMState(count, optimizer.init(params), adv_optimizer.init(params), cache)

    def transparent(updates, state, params=None, **extra):
        params = require_params(params, "sam")
        first = state.steps_since_sync == 0
        last = state.steps_since_sync == sync_period - 1
        adv_updates, adv_state = adv_optimizer.update(updates, state.adv_state, params)
        adv_updates = _neg(adv_updates)
        opt_updates, opt_state = optimizer.update(updates, state.opt_state, state.cache)
        opt_updates = optree.tree_map(lambda c, p, u: c - p + u, state.cache, params, opt_updates)
        cache = _pick(first, params, state.cache)
        out = _pick(last, opt_updates, adv_updates)
        keep = adv_optimizer.init(params) if reset_state else state.adv_state
        return out, SAMState((state.steps_since_sync + 1) % sync_period, _pick(last, opt_state, state.opt_state),
                             _pick(last, keep, adv_state), cache)

    def opaque(updates, state, params=None, *, grad_fn: Callable[..., Any] | None = None, **extra):
        params = require_params(params, "sam")
        if grad_fn is None:
            raise ValueError("sam(opaque_mode=True): update needs grad_fn=(params, i) -> gradient")
        adv_params, adv_updates, adv_state = params, updates, state.adv_state
        for i in range(sync_period - 1):
            adv_updates, adv_state = adv_optimizer.update(adv_updates, adv_state, adv_params)
            adv_params = apply_updates(adv_params, _neg(adv_updates))
            adv_updates = grad_fn(adv_params, i)
        if reset_state:
            adv_state = adv_optimizer.init(params)
        out, opt_state = optimizer.update(adv_updates, state.opt_state, params)
        return out, SAMState(torch.zeros_like(state.steps_since_sync), opt_state, adv_state, None)

    return GradientTransformation(init, opaque if opaque_mode else transparent)
