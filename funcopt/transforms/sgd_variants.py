"""Variants of gradient descent: sign descent (signSGD, Signum), noisy SGD, optimistic
gradient descent (and optimistic Adam), the Polyak step size and Momo."""

# ruff: noqa: F405 (the names of the toolkit's star import)
from __future__ import annotations

from typing import Any, NamedTuple

import torch

from funcopt.engine import check_number
from funcopt.transforms import first_order as fo
from funcopt.transforms._toolkit import *  # noqa: F403
from funcopt.transforms.clipping import add_noise
from funcopt.transforms.line_search import _vdot

__all__ = [
    "ScaleByOptimisticGradientState", "sign_sgd", "signum", "noisy_sgd",
    "scale_by_optimistic_gradient", "optimistic_gradient_descent", "optimistic_adam",
    "scale_by_polyak", "polyak_sgd", "MomoState", "momo", "momo_adam",
]


def sign_sgd(learning_rate: ScalarOrSchedule) -> GradientTransformation:
    r"""signSGD: :math:`\theta_{t+1} = \theta_t - \eta\operatorname{sign}(g_t)`;
    ``chain(scale_by_sign(), scale_by_learning_rate(learning_rate))``.

    Reference: Bernstein et al., "signSGD: Compressed Optimisation for Non-Convex Problems",
    ICML 2018; optax ``sign_sgd``.
    """
    return chain(fo.scale_by_sign(), fo.scale_by_learning_rate(learning_rate))


def signum(
    learning_rate: ScalarOrSchedule, beta: float = 0.9, accumulator_dtype: torch.dtype | None = None
) -> GradientTransformation:
    r"""Signum: sign of the momentum,
    :math:`m_t = \beta m_{t-1} + (1-\beta) g_t,\ \theta_{t+1} = \theta_t - \eta\operatorname{sign}(m_t)`;
    ``chain(ema(beta, debias=False), scale_by_sign(), scale_by_learning_rate(learning_rate))``.

    Args: learning_rate :math:`\eta`; beta :math:`\beta` (default 0.9); accumulator_dtype of
    :math:`m` (default: the parameters'). Reference: Bernstein et al. 2018; optax ``signum``.
    """
    return chain(fo.ema(beta, debias=False, accumulator_dtype=accumulator_dtype),
                 fo.scale_by_sign(), fo.scale_by_learning_rate(learning_rate))


def noisy_sgd(
    learning_rate: ScalarOrSchedule, eta: float = 0.01, gamma: float = 0.55, seed: int = 0
) -> GradientTransformation:
    r"""Noisy SGD: :math:`\theta_{t+1} = \theta_t - \alpha(g_t + \epsilon_t)`,
    :math:`\epsilon_t \sim N(0, \eta/(1+t)^\gamma)`; ``chain(add_noise(eta, gamma, seed),
    scale_by_learning_rate(learning_rate))``.

    Args: learning_rate :math:`\alpha`; eta :math:`\eta` (default 0.01); gamma :math:`\gamma`
    (default 0.55); seed of funcopt's counter-based noise (optax takes a JAX ``key``; the draws
    differ, the distribution is the same). Reference: Neelakantan et al., "Adding Gradient
    Noise Improves Learning for Very Deep Networks", 2015; optax ``noisy_sgd``.
    """
    return chain(add_noise(eta, gamma, seed), fo.scale_by_learning_rate(learning_rate))


class ScaleByOptimisticGradientState(NamedTuple):
    """State of :func:`scale_by_optimistic_gradient`: the step count and the previous
    gradient (Daskalakis et al. 2018)."""

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count by design (optax's name)
    previous_gradient: Any


def scale_by_optimistic_gradient(alpha: float = 1.0, beta: float = 1.0) -> GradientTransformation:
    r"""Generalised optimistic gradient: :math:`u_t = (\alpha + \beta) g_t - \beta g_{t-1}`,
    :math:`g_0` taken as :math:`g_1` at the first step.

    Args: alpha :math:`\alpha` (default 1); beta :math:`\beta`, the negative momentum (default 1).
    The state holds a step ``count`` (optax: a boolean ``is_initial_step``). Reference:
    Mokhtari, Ozdaglar, Pattathil, AISTATS 2020; optax ``scale_by_optimistic_gradient``.
    """
    _check("alpha", alpha, low=None)
    _check("beta", beta, low=None)

    def init(params):
        return ScaleByOptimisticGradientState(step_counter(params),
                                              _zeros(tree_leaves(params), None))

    def update(updates, state, params=None, **extra):
        g, treedef = _leaves(updates, params, "scale_by_optimistic_gradient",
                             state.previous_gradient)
        first = state.count == 0
        prev = [torch.where(first, x, y) for x, y in zip(g, _as(state.previous_gradient, g))]
        out = ops.sub(ops.mul(g, alpha + beta), ops.mul(prev, beta))
        return tree_unflatten(treedef, _as(out, g)), ScaleByOptimisticGradientState(
            increment(state.count), _as(g, state.previous_gradient))

    return GradientTransformation(init, update)


def optimistic_gradient_descent(
    learning_rate: ScalarOrSchedule, alpha: float = 1.0, beta: float = 1.0
) -> GradientTransformation:
    r"""Optimistic gradient descent (for min-max games):
    :math:`\theta_{t+1} = \theta_t - \eta((\alpha+\beta) g_t - \beta g_{t-1})`;
    ``chain(scale_by_optimistic_gradient(alpha, beta), scale_by_learning_rate(learning_rate))``.

    Reference: Mokhtari et al. 2020; optax ``optimistic_gradient_descent``.
    """
    return chain(scale_by_optimistic_gradient(alpha, beta), fo.scale_by_learning_rate(learning_rate))


def optimistic_adam(
    learning_rate: float, optimism: float | None = None, b1: float = 0.9, b2: float = 0.999,
    eps: float = 1e-8, eps_root: float = 0.0, mu_dtype: torch.dtype | None = None, *,
    nesterov: bool = True,
) -> GradientTransformation:
    r"""Optimistic Adam: optimistic gradient on Adam's direction :math:`d_t`,
    :math:`\theta_{t+1} = \theta_t - ((\eta + \mu) d_t - \mu d_{t-1})`, :math:`\mu` =
    ``optimism`` (default :math:`\eta`).

    ``chain(scale_by_adam(b1, b2, eps, eps_root, mu_dtype=mu_dtype, nesterov=nesterov),
    scale_by_optimistic_gradient(learning_rate, optimism), scale_by_learning_rate(1))``; the
    learning rate is a number or 0-d tensor (no schedule), as optax's (deprecated there in
    favour of ``optimistic_adam_v2``, which funcopt does not have).

    Reference: Daskalakis et al., "Training GANs with Optimism", ICLR 2018; optax
    ``optimistic_adam``.
    """
    check_number("learning_rate", learning_rate)
    mu = learning_rate if optimism is None else optimism
    return chain(fo.scale_by_adam(b1, b2, eps, eps_root, mu_dtype=mu_dtype, nesterov=nesterov),
                 scale_by_optimistic_gradient(learning_rate, mu), fo.scale_by_learning_rate(1.0))


def scale_by_polyak(
    f_min: float = 0.0, max_learning_rate: float = 1.0, eps: float = 0.0, variant: str = "sps"
) -> GradientTransformation:
    r"""Polyak's step size: :math:`u_t = \gamma_t g_t`,

    .. math:: \gamma_t = \min\Big(\frac{f(x_t) - f^\star}{\|g_t\|^2 + \epsilon},\ \gamma_{max}\Big)
        \quad(0 \text{ where } \|g_t\|^2 + \epsilon \le \text{float64 eps}),

    with :math:`f(x_t) - f^\star` clipped at 0 for ``variant="sps+"``. ``update`` needs
    ``value`` = :math:`f(x_t)` by keyword.

    Args:
      f_min: :math:`f^\star`, a lower bound of f (default 0).
      max_learning_rate: :math:`\gamma_{max}` (default 1). eps: :math:`\epsilon` (default 0).
      variant: ``"sps"`` or ``"sps+"`` (default ``"sps"``).

    Reference: Polyak 1987; Loizou et al., "Stochastic Polyak Step-size for SGD", AISTATS
    2021; optax ``scale_by_polyak``.
    """
    if variant not in ("sps", "sps+"):
        raise ValueError(f"scale_by_polyak: variant={variant!r}; use 'sps' or 'sps+'")
    _check("f_min", f_min, low=None)
    _check("max_learning_rate", max_learning_rate)
    _check("eps", eps)

    def update(updates, state, params=None, *, value=None, **extra):
        if value is None:
            raise ValueError("scale_by_polyak: update needs value=f(params) by keyword")
        g, treedef = _leaves(updates, params, "scale_by_polyak")
        if not g:
            return updates, state
        dt = scalar_dtype(g)
        sq = torch.stack([(n * n).to(dt) for n in ops.norm(g)]).sum()
        gap = torch.as_tensor(value).to(dtype=dt, device=sq.device) - f_min
        if variant == "sps+":
            gap = torch.relu(gap)
        step = torch.where(sq + eps <= torch.finfo(torch.float64).eps, 0.0,
                           torch.clamp_max(gap / (sq + eps), max_learning_rate))
        return tree_unflatten(treedef, _as(ops.mul(g, step), g)), state

    return GradientTransformation(lambda params: EmptyState(), update)


def polyak_sgd(
    max_learning_rate: float = 1.0, scaling: ScalarOrSchedule = 1.0, f_min: float = 0.0,
    eps: float = 0.0, variant: str = "sps",
) -> GradientTransformation:
    r"""SGD with Polyak's step size: ``chain(sgd(scaling), scale_by_polyak(f_min,
    max_learning_rate, eps, variant))``, :math:`\theta_{t+1} = \theta_t - \gamma_t\, s\, g_t`
    (see :func:`scale_by_polyak`); ``update`` needs ``value`` by keyword.

    Reference: Loizou et al. 2021; optax ``polyak_sgd``.
    """
    sgd = chain(fo.scale_by_learning_rate(scaling))  # fo.sgd(scaling): the same state layout
    return chain(sgd, scale_by_polyak(f_min, max_learning_rate, eps, variant))


class MomoState(NamedTuple):
    """State of :func:`momo` and :func:`momo_adam`: the momentum (and second moment), the
    averaged loss ``barf``, the averaged gradient-parameter product ``gamma``, the loss
    lower bound ``lb`` and the step count."""

    exp_avg: Any
    exp_avg_sq: Any
    barf: Tensor
    gamma: Tensor
    lb: Tensor
    count: Tensor  # type: ignore[assignment]  # shadows tuple.count by design (optax's name)


def _momo(learning_rate: Any, b1: float, b2: float | None, eps: float, lower_bound: float,
          weight_decay: float, adapt_lower_bound: bool, who: str) -> GradientTransformation:
    """Momo (``b2`` None) and Momo-Adam: the shared model-based step (see :func:`momo`)."""
    _check("learning_rate", learning_rate)
    _check("weight_decay", weight_decay)
    _check("eps", eps)
    _check("lower_bound", lower_bound, low=None)

    def init(params):
        leaves = tree_leaves(params)
        dt = min((x.dtype for x in leaves), key=lambda d: torch.finfo(d).bits, default=torch.float32)
        z = torch.zeros((), dtype=dt, device=step_counter(params).device)
        return MomoState(_zeros(leaves, None), _zeros(leaves, None) if b2 is not None else [],
                         z, z.clone(), z + lower_bound, step_counter(params))

    def update(updates, state, params=None, *, value=None, **extra):
        params = require_params(params, who)
        if value is None:
            raise ValueError(f"{who}: update needs value=f(params) (the loss) by keyword")
        g, treedef = _leaves(updates, params, who, state.exp_avg)
        dt, count = state.barf.dtype, increment(state.count)
        p = _as(tree_leaves(params), g)
        bt = torch.where(state.count == 0, 0.0, b1).to(dt) if b2 is None else torch.tensor(b1, dtype=dt)
        barf = bt * state.barf + (1 - bt) * torch.as_tensor(value).to(dt)
        m = _as(ops.add(ops.mul(state.exp_avg, bt), ops.mul(g, 1 - bt)), g)
        gamma = bt * state.gamma + (1 - bt) * _vdot(g, p, dt)
        alpha = _hp(learning_rate, state.count)
        bc1, v, precond = torch.ones((), dtype=dt), state.exp_avg_sq, None
        if b2 is not None:
            v = _as(ops.add(ops.mul(state.exp_avg_sq, b2), ops.mul(ops.mul(g, g), 1 - b2)), g)
            bc2 = 1 - b2 ** count.to(dt)
            precond = ops.add(ops.sqrt(ops.div(v, bc2)), eps)
            bc1 = 1 - b1 ** count.to(dt)
        direction = m if precond is None else ops.div(m, precond)
        norm, iprod = _vdot(m, direction, dt), _vdot(m, p, dt)
        shrink = 1 + alpha * weight_decay
        lb = state.lb
        if adapt_lower_bound:
            cap = shrink * (barf - gamma) + iprod
            lb = torch.where(cap < shrink * bc1 * state.lb,
                             torch.clamp_min(cap / (2 * bc1 * shrink), lower_bound), state.lb)
        t1 = torch.clamp_min(shrink * (barf - bc1 * lb - gamma) + iprod, 0.0) / norm
        t1 = torch.where(norm <= torch.finfo(torch.float64).eps, 0.0, t1)
        tau = torch.clamp_max(t1, alpha / bc1)
        out = ops.sub(ops.mul(p, -(alpha * weight_decay) / shrink), ops.mul(direction, tau))
        if adapt_lower_bound:
            lb = torch.clamp_min((barf + iprod - gamma - 0.5 * tau * norm) / bc1, lower_bound)
        return tree_unflatten(treedef, _as(out, g)), MomoState(m, v, barf, gamma, lb, count)

    return GradientTransformation(init, update)


def momo(
    learning_rate: ScalarOrSchedule = 1.0, beta: float = 0.9, lower_bound: float = 0.0,
    weight_decay: float = 0.0, adapt_lower_bound: bool = False,
) -> GradientTransformation:
    r"""Momo: SGD with momentum whose step is capped by a Polyak-type model of the loss.

    With :math:`\beta_1 = 0` at the first step, :math:`\beta` after, :math:`\lambda` the
    weight decay and :math:`h = f^\star` the lower bound:

    .. math::
        \bar f_t = \beta\bar f_{t-1} + (1-\beta) f(x_t),\quad d_t = \beta d_{t-1} + (1-\beta) g_t,
        \quad \gamma_t = \beta\gamma_{t-1} + (1-\beta)\langle g_t, x_t\rangle,\\
        \tau_t = \min\Big(\alpha_t, \frac{[(1+\alpha_t\lambda)(\bar f_t - h - \gamma_t)
        + \langle d_t, x_t\rangle]_+}{\|d_t\|^2}\Big),\quad
        u_t = -\frac{\alpha_t\lambda}{1+\alpha_t\lambda} x_t - \tau_t d_t

    (``adapt_lower_bound`` re-estimates :math:`h` each step, Momo*). ``update`` needs
    ``value`` = :math:`f(x_t)` by keyword; the output is the whole step.

    Args: learning_rate :math:`\alpha` (default 1); beta (default 0.9); lower_bound
    :math:`h` (default 0); weight_decay :math:`\lambda` (default 0); adapt_lower_bound
    (default False). Reference: Schaipp, Ohana, Eickenberg, Defazio, Gower, "MoMo:
    Momentum Models for Adaptive Learning Rates", ICML 2024; optax ``contrib.momo``.
    """
    _check_beta("beta", beta)
    return _momo(learning_rate, beta, None, 0.0, lower_bound, weight_decay, adapt_lower_bound,
                 "momo")


def momo_adam(
    learning_rate: ScalarOrSchedule = 1e-2, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
    lower_bound: float = 0.0, weight_decay: float = 0.0, adapt_lower_bound: bool = False,
) -> GradientTransformation:
    r"""Momo-Adam: :func:`momo`'s model step in Adam's geometry: :math:`d_t` is preconditioned by
    :math:`D_t = \sqrt{v_t/(1-\beta_2^t)} + \epsilon`, the norm is :math:`\langle d_t,
    D_t^{-1} d_t\rangle`, and the bound and cap carry :math:`1-\beta_1^t`:
    :math:`\tau_t = \min(\alpha_t/(1-\beta_1^t), \ldots)`, :math:`u_t = -\frac{\alpha_t\lambda}
    {1+\alpha_t\lambda} x_t - \tau_t D_t^{-1} d_t`. ``update`` needs ``value`` by keyword.

    Args: learning_rate (default 1e-2); b1, b2 (0.9, 0.999); eps (1e-8); lower_bound (0);
    weight_decay (0); adapt_lower_bound (False). Reference: Schaipp et al., ICML 2024; optax
    ``contrib.momo_adam``.
    """
    _check_beta("b1", b1)
    _check_beta("b2", b2)
    return _momo(learning_rate, b1, b2, eps, lower_bound, weight_decay, adapt_lower_bound,
                 "momo_adam")
