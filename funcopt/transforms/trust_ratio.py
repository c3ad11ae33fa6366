"""Layer-wise trust ratios and block norms: LAMB, LARS, Fromage and their building blocks.

Each leaf (a weight matrix, a bias vector) is a block; the transforms here rescale a block by
a ratio of norms (of the parameters, of the update), computed for all leaves at once as one
vector of per-leaf norms, with no host synchronisation.
"""

# ruff: noqa: F405 (the names of the toolkit's star import)
from __future__ import annotations

from typing import Any

import torch

from funcopt.compose import masked
from funcopt.transforms import first_order as fo
from funcopt.transforms._toolkit import *  # noqa: F403
from funcopt.transforms.first_order import ScaleByScheduleState
from funcopt.transforms.leaf_math import _is_number
from funcopt.transforms.weight_decay import add_decayed_weights

__all__ = [
    "scale_by_trust_ratio", "scale_by_param_block_norm", "scale_by_param_block_rms",
    "normalize_by_update_norm", "lamb", "lars", "fromage",
]


def leaf_norms(xs: list[Tensor], dtype: torch.dtype) -> Tensor:
    """The l2 norm of every leaf, as one vector in ``dtype`` (one ``_foreach_norm``)."""
    return torch.stack([n.to(dtype) for n in ops.norm(xs)])


def _scaled(u: list[Tensor], factors: Tensor) -> list[Tensor]:
    """``u_i * factors[i]`` for every leaf, in each leaf's dtype."""
    return _as(ops.mul(u, list(factors.unbind())), u)


def _device(x: Any, like: Tensor) -> Any:
    return x.to(like.device) if isinstance(x, Tensor) else x


def scale_by_trust_ratio(
    min_norm: float = 0.0, trust_coefficient: float = 1.0, eps: float = 0.0
) -> GradientTransformation:
    r"""Scale every leaf by its trust ratio.

    .. math::
        r_b = c\,\frac{\max(\|\theta_b\|, n_{min})}{\max(\|u_b\|, n_{min}) + \epsilon},\quad
        u_b \leftarrow r_b\, u_b,

    with :math:`r_b = 1` where either norm is 0 (a zero block is never frozen).

    Args:
      min_norm: :math:`n_{min}` >= 0, lower bound of both norms (default 0).
      trust_coefficient: :math:`c` (default 1).
      eps: :math:`\epsilon` >= 0 added to the denominator (default 0).

    Needs ``params`` in ``update``. Reference: You et al., "Large Batch Training of
    Convolutional Networks" (LARS), 2017; optax ``scale_by_trust_ratio``.
    """
    _check("min_norm", min_norm)
    _check("trust_coefficient", trust_coefficient, low=None)
    _check("eps", eps)

    def update(updates, state, params=None, **extra):
        params = require_params(params, "scale_by_trust_ratio")
        u, treedef = _leaves(updates, params, "scale_by_trust_ratio")
        if not u:
            return updates, state
        dt = scalar_dtype(u)
        pn = leaf_norms(tree_leaves(params), dt).clamp_min(_device(min_norm, u[0]))
        un = leaf_norms(u, dt).clamp_min(_device(min_norm, u[0]))
        ratio = _device(trust_coefficient, u[0]) * pn / (un + _device(eps, u[0]))
        ratio = torch.where((pn == 0) | (un == 0), torch.ones_like(ratio), ratio)
        return tree_unflatten(treedef, _scaled(u, ratio)), state

    return GradientTransformation(lambda params: EmptyState(), update)


def _block_scale(kind: str, min_scale: float) -> GradientTransformation:
    who = f"scale_by_param_block_{kind}"
    _check("min_scale", min_scale)

    def update(updates, state, params=None, **extra):
        params = require_params(params, who)
        u, treedef = _leaves(updates, params, who)
        if not u:
            return updates, state
        p = tree_leaves(params)
        n = leaf_norms(p, scalar_dtype(u))
        if kind == "rms":
            n = n / torch.tensor([max(x.numel(), 1) ** 0.5 for x in p], dtype=n.dtype,
                                 device=n.device)
        return tree_unflatten(treedef, _scaled(u, n.clamp_min(_device(min_scale, u[0])))), state

    return GradientTransformation(lambda params: EmptyState(), update)


def scale_by_param_block_norm(min_scale: float = 1e-3) -> GradientTransformation:
    r"""``u_b <- u_b * max(||theta_b||, min_scale)`` for every leaf ``b``.

    Args:
      min_scale: lower bound of the factor (default 1e-3).

    Needs ``params``. Reference: optax ``scale_by_param_block_norm``.
    """
    return _block_scale("norm", min_scale)


def scale_by_param_block_rms(min_scale: float = 1e-3) -> GradientTransformation:
    r"""``u_b <- u_b * max(rms(theta_b), min_scale)``, :math:`\operatorname{rms}(x) =
    \sqrt{\operatorname{mean}(x^2)}`, for every leaf ``b`` (Adafactor's relative step).

    Args:
      min_scale: lower bound of the factor (default 1e-3).

    Needs ``params``. Reference: Shazeer & Stern 2018; optax ``scale_by_param_block_rms``.
    """
    return _block_scale("rms", min_scale)


def normalize_by_update_norm(scale_factor: float = 1.0, eps: float = 1e-6) -> GradientTransformation:
    r"""Normalise by the global norm: :math:`u \leftarrow s\, u / (\|u\| + \epsilon)`.

    Args:
      scale_factor: :math:`s` (default 1; -1 makes a normalised descent step).
      eps: :math:`\epsilon` >= 0 (default 1e-6).

    Reference: optax ``normalize_by_update_norm``.
    """
    _check("scale_factor", scale_factor, low=None)
    _check("eps", eps)

    def update(updates, state, params=None, **extra):
        u, treedef = _leaves(updates, params, "normalize_by_update_norm")
        if not u:
            return updates, state
        norm = torch.linalg.vector_norm(leaf_norms(u, scalar_dtype(u)))
        factor = _device(scale_factor, u[0]) / (norm + _device(eps, u[0]))
        return tree_unflatten(treedef, _as(ops.mul(u, factor), u)), state

    return GradientTransformation(lambda params: EmptyState(), update)


def _add_scaled_params(factor: Any) -> GradientTransformation:
    """``u <- u + factor * theta`` for any sign of ``factor`` (Fromage's shrinkage)."""

    def update(updates, state, params=None, **extra):
        params = require_params(params, "fromage")
        u, treedef = _leaves(updates, params, "fromage")
        if not u:
            return updates, state
        p = _as(tree_leaves(params), u)
        f = _device(factor, u[0])
        out = ops.add(u, p, alpha=f) if isinstance(f, (int, float)) else ops.add(u, ops.mul(p, f))
        return tree_unflatten(treedef, _as(out, u)), state

    return GradientTransformation(lambda params: EmptyState(), update)


def lamb(
    learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6,
    eps_root: float = 0.0, weight_decay: ScalarOrSchedule = 0.0, mask: Any = None,
) -> GradientTransformation:
    r"""LAMB: Adam's direction plus decoupled weight decay, rescaled per leaf by its trust ratio.

    .. math:: d_t = \hat m_t/(\sqrt{\hat v_t + \epsilon_{root}} + \epsilon) + \lambda\theta_t,
        \quad \theta_{t+1} = \theta_t - \eta\,\frac{\|\theta_t\|}{\|d_t\|}\, d_t\ \text{(per leaf)}.

    ``chain(scale_by_adam(b1, b2, eps, eps_root), add_decayed_weights(weight_decay, mask),
    scale_by_trust_ratio(), scale_by_learning_rate(learning_rate))``.

    Args:
      learning_rate: :math:`\eta`. b1, b2: Adam's decays (defaults 0.9, 0.999).
      eps: :math:`\epsilon` (default 1e-6). eps_root: :math:`\epsilon_{root}` (default 0).
      weight_decay: :math:`\lambda` (default 0). mask: which leaves decay (default all).

    Reference: You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76
    minutes", ICLR 2020; optax ``lamb``. torch.optim has no LAMB.
    """
    decay = () if _is_number(weight_decay) and weight_decay == 0 else (
        add_decayed_weights(weight_decay, mask),)
    return chain(fo.scale_by_adam(b1, b2, eps, eps_root), *decay, scale_by_trust_ratio(),
                 fo.scale_by_learning_rate(learning_rate))


def lars(
    learning_rate: ScalarOrSchedule, weight_decay: ScalarOrSchedule = 0.0,
    weight_decay_mask: Any = True, trust_coefficient: float = 0.001, eps: float = 0.0,
    trust_ratio_mask: Any = True, momentum: float = 0.9, nesterov: bool = False,
) -> GradientTransformation:
    r"""LARS: SGD with momentum on the per-leaf trust-ratio-scaled, L2-decayed gradient.

    .. math:: d_t = c\,\frac{\|\theta_t\|}{\|g_t + \lambda\theta_t\| + \epsilon}
        (g_t + \lambda\theta_t),\quad b_t = \mu b_{t-1} - \eta d_t,\quad
        \theta_{t+1} = \theta_t + b_t\ (\text{or } -\eta d_t + \mu b_t \text{ if nesterov}).

    As optax, the learning rate is applied before the momentum trace.

    Args:
      learning_rate: :math:`\eta`. weight_decay: :math:`\lambda` (default 0).
      weight_decay_mask: which leaves decay: True (all, default) or a mask tree / callable.
      trust_coefficient: :math:`c` (default 1e-3). eps: :math:`\epsilon` (default 0).
      trust_ratio_mask: which leaves get the trust ratio: True (all, default) or a mask.
      momentum: :math:`\mu` (default 0.9). nesterov: Nesterov momentum (default False).

    Reference: You, Gitman, Ginsburg, "Large Batch Training of Convolutional Networks", 2017;
    optax ``lars``. torch.optim has no LARS.
    """
    decay = add_decayed_weights(weight_decay, None if weight_decay_mask is True else weight_decay_mask)
    ratio = scale_by_trust_ratio(trust_coefficient=trust_coefficient, eps=eps)
    if trust_ratio_mask is not True:
        ratio = masked(ratio, trust_ratio_mask)
    return chain(decay, ratio, fo.scale_by_learning_rate(learning_rate), fo.trace(momentum, nesterov))


def fromage(learning_rate: float, min_norm: float = 1e-6) -> GradientTransformation:
    r"""Fromage: a trust-ratio step, then a shrinkage that keeps the parameter norm in check.

    .. math:: \theta_{t+1} = \frac{1}{\sqrt{1+\eta^2}}\Big(\theta_t - \eta\,
        \frac{\max(\|\theta_t\|, n_{min})}{\max(\|g_t\|, n_{min})}\, g_t\Big)\ \text{(per leaf)}.

    Args:
      learning_rate: :math:`\eta`, a number or a 0-d tensor (the shrinkage depends on it).
      min_norm: :math:`n_{min}` (default 1e-6).

    Reference: Bernstein et al., "On the distance between two neural networks and the
    stability of learning", NeurIPS 2020; optax ``fromage``.
    """
    _check("learning_rate", learning_rate, low=0.0)
    if callable(learning_rate) and not isinstance(learning_rate, Tensor):
        mult: Any = lambda c: 1 / (1 + learning_rate(c) ** 2) ** 0.5  # noqa: E731
        step: Any = lambda c: mult(c) * learning_rate(c)  # noqa: E731
        return chain(scale_by_trust_ratio(min_norm), fo.scale_by_learning_rate(step),
                     _fromage_shrink(lambda c: mult(c) - 1))
    mult = 1 / (1 + learning_rate**2) ** 0.5
    return chain(scale_by_trust_ratio(min_norm), fo.scale_by_learning_rate(learning_rate * mult),
                 _add_scaled_params(mult - 1))


def _fromage_shrink(factor_fn: Any) -> GradientTransformation:
    """``u <- u + factor_fn(count) * theta`` with a step counter (Fromage with a schedule)."""

    def update(updates, state, params=None, **extra):
        out, _ = _add_scaled_params(factor_fn(state.count)).update(updates, EmptyState(), params)
        return out, ScaleByScheduleState(increment(state.count))

    return GradientTransformation(lambda params: ScaleByScheduleState(step_counter(params)), update)
