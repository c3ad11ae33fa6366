"""Adam variants that change the second moment or its use: RAdam, Yogi, AdaBelief, ACProp.

Each keeps Adam's state (``count``, ``mu``, ``nu``) and differs in one line of the update; the
math runs over the leaf list with the engine's ``_foreach`` ops and never reads a tensor on the
host (eager CPU steps use Python numbers for the step-dependent scalars).
"""

# ruff: noqa: F405 (the names of the toolkit's star import)
from __future__ import annotations

from typing import Any

import torch

from funcopt.transforms._toolkit import *  # noqa: F403
from funcopt.transforms.first_order import ScaleByAdamState, scale_by_learning_rate
from funcopt.transforms.per_coordinate import _zero_moments_init
from funcopt.transforms.weight_decay import add_decayed_weights

__all__ = [
    "scale_by_radam", "scale_by_yogi", "scale_by_belief", "radam", "yogi", "adabelief",
    "scale_by_acprop", "acprop",
]


def _mu_hat(mu: TensorList, g: TensorList, b1: Any, t: Any, nesterov: bool) -> TensorList:
    """``mu / (1 - b1^t)``, or Nesterov's ``b1 mu / (1 - b1^(t+1)) + (1 - b1) g / (1 - b1^t)``."""
    if not nesterov:
        return ops.div(mu, 1 - b1**t)
    return _axpy((1 - b1) / (1 - b1**t), g, ops.mul(mu, b1 / (1 - b1 ** (t + 1))))


def _root(nu: TensorList, bc2: Any, eps: Any, eps_root: Any) -> TensorList:
    """``sqrt(nu / bc2 + eps_root) + eps``."""
    return ops.add(ops.sqrt(ops.add(ops.div(nu, bc2), eps_root)), eps)


def _check_adam(b1: Any, b2: Any, eps: Any, eps_root: Any) -> None:
    _check_beta("b1", b1)
    _check_beta("b2", b2)
    _check("eps", eps)
    _check("eps_root", eps_root)


def scale_by_radam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, eps_root: float = 0.0,
    threshold: float = 5.0, *, nesterov: bool = False,
) -> GradientTransformation:
    r"""Rectified Adam's scaling.

    .. math::
        \rho_\infty = \frac{2}{1-\beta_2} - 1,\quad
        \rho_t = \rho_\infty - \frac{2t\beta_2^t}{1-\beta_2^t},\quad
        r_t = \sqrt{\frac{(\rho_t-4)(\rho_t-2)\rho_\infty}{(\rho_\infty-4)(\rho_\infty-2)\rho_t}},\\
        u_t = r_t\,\hat m_t / (\sqrt{\hat v_t + \epsilon_{root}} + \epsilon)
        \text{ if } \rho_t \ge \rho_{thr}\text{, else } u_t = \hat m_t,

    with Adam's moments and bias corrections (:func:`scale_by_adam`; ``nesterov`` as there).
    Where :math:`\rho_t < 4` (possible only with a threshold below 4) :math:`r_t = 0`; optax gives NaN.

    funcopt follows optax: torch.optim.RAdam adds :math:`\epsilon` to :math:`\sqrt{v_t}` before
    the bias correction (:math:`\sqrt{1-\beta_2^t}/(\sqrt{v_t}+\epsilon)`) and rectifies only
    when :math:`\rho_t > 5`; with the same :math:`\epsilon` the two differ by
    :math:`O(\epsilon)` per step.

    Args:
      b1: :math:`\beta_1` (default 0.9). b2: :math:`\beta_2` (default 0.999).
      eps: :math:`\epsilon` (default 1e-8). eps_root: :math:`\epsilon_{root}` (default 0).
      threshold: :math:`\rho_{thr}`, the variance-tractability threshold (default 5).
      nesterov: Nesterov momentum (default False).

    Reference: Liu et al., "On the Variance of the Adaptive Learning Rate and Beyond", ICLR
    2020; optax ``scale_by_radam``.
    """
    _check_adam(b1, b2, eps, eps_root)
    _check("threshold", threshold, low=None)
    ro_inf = 2.0 / (1.0 - b2) - 1.0

    init = _zero_moments_init(ScaleByAdamState)

    def step(g, mu, nu, count):
        mu = _moment(mu, g, b1)
        nu = _moment_sq(nu, g, b2)
        t = _steps(count, g)
        b2t = b2**t
        ro = ro_inf - 2 * t * b2t / (1 - b2t)
        m_hat = _mu_hat(mu, g, b1, t, nesterov)
        ratio = (ro - 4) * (ro - 2) * ro_inf / ((ro_inf - 4) * (ro_inf - 2) * ro)
        if isinstance(ro, Tensor):
            r = torch.where(ro >= threshold, torch.sqrt(ratio.clamp_min(0.0)), 0.0)
            plain = torch.where(ro >= threshold, 0.0, 1.0)
            out = ops.add(ops.mul(m_hat, plain),
                          ops.mul(ops.div(m_hat, _root(nu, 1 - b2t, eps, eps_root)), r))
        elif ro >= threshold:
            out = ops.mul(ops.div(m_hat, _root(nu, 1 - b2t, eps, eps_root)), _sqrt(max(ratio, 0.0)))
        else:
            out = m_hat
        return out, mu, nu

    return GradientTransformation(init, moments_update("scale_by_radam", ScaleByAdamState, step))


def scale_by_yogi(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-3, eps_root: float = 0.0,
    initial_accumulator_value: float = 1e-6,
) -> GradientTransformation:
    r"""Yogi's scaling: an additive, sign-controlled second moment.

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad
        v_t = v_{t-1} - (1-\beta_2)\operatorname{sign}(v_{t-1} - g_t^2)\, g_t^2,\\
        u_t = \hat m_t / (\sqrt{\hat v_t + \epsilon_{root}} + \epsilon),\quad
        \hat m_t = m_t/(1-\beta_1^t),\ \hat v_t = v_t/(1-\beta_2^t),

    with :math:`m_0 = v_0` = ``initial_accumulator_value`` (as optax).

    Args:
      b1: :math:`\beta_1` (default 0.9). b2: :math:`\beta_2` (default 0.999).
      eps: :math:`\epsilon` (default 1e-3). eps_root: :math:`\epsilon_{root}` (default 0).
      initial_accumulator_value: :math:`m_0 = v_0` >= 0 (default 1e-6).

    Reference: Zaheer et al., "Adaptive Methods for Nonconvex Optimization", NeurIPS 2018;
    optax ``scale_by_yogi``.
    """
    _check_adam(b1, b2, eps, eps_root)
    _check("initial_accumulator_value", initial_accumulator_value)

    def init(params):
        leaves = tree_leaves(params)
        v0 = initial_accumulator_value
        return ScaleByAdamState(step_counter(params), _full(leaves, v0), _full(leaves, v0))

    def step(g, mu, nu0, count):
        mu = _moment(mu, g, b1)
        g2 = ops.mul(g, g)
        nu = ops.sub(nu0, ops.mul(ops.mul(ops.sign(ops.sub(nu0, g2)), g2), 1 - b2))
        t = _steps(count, g)
        out = ops.div(ops.div(mu, 1 - b1**t), _root(nu, 1 - b2**t, eps, eps_root))
        return out, mu, nu

    return GradientTransformation(init, moments_update("scale_by_yogi", ScaleByAdamState, step))


def scale_by_belief(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-16, eps_root: float = 1e-16, *,
    nesterov: bool = False,
) -> GradientTransformation:
    r"""AdaBelief's scaling: the second moment of the prediction error :math:`g_t - m_t`.

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad
        s_t = \beta_2 s_{t-1} + (1-\beta_2)(g_t - m_t)^2 + \epsilon_{root},\\
        u_t = \hat m_t / (\sqrt{s_t/(1-\beta_2^t)} + \epsilon).

    Args:
      b1: :math:`\beta_1` (default 0.9). b2: :math:`\beta_2` (default 0.999).
      eps: :math:`\epsilon` (default 1e-16). eps_root: :math:`\epsilon_{root}`, added to
        :math:`s_t` (default 1e-16). nesterov: Nesterov momentum (default False).

    Reference: Zhuang et al., "AdaBelief Optimizer: Adapting Stepsizes by the Belief in
    Observed Gradients", NeurIPS 2020; optax ``scale_by_belief``.
    """
    _check_adam(b1, b2, eps, eps_root)

    init = _zero_moments_init(ScaleByAdamState)

    def step(g, mu, nu, count):
        mu = _moment(mu, g, b1)
        nu = ops.add(_moment_sq(nu, ops.sub(g, mu), b2), eps_root)
        t = _steps(count, g)
        m_hat = _mu_hat(mu, g, b1, t, nesterov)
        out = ops.div(m_hat, ops.add(ops.sqrt(ops.div(nu, 1 - b2**t)), eps))
        return out, mu, nu

    return GradientTransformation(init, moments_update("scale_by_belief", ScaleByAdamState, step))


def radam(
    learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
    eps_root: float = 0.0, threshold: float = 5.0, *, nesterov: bool = False,
) -> GradientTransformation:
    r"""RAdam: ``chain(scale_by_radam(...), scale_by_learning_rate(eta))``,
    :math:`\theta_{t+1} = \theta_t - \eta u_t` with :math:`u_t` from :func:`scale_by_radam`
    (see there for how it differs from torch.optim.RAdam).

    Reference: Liu et al., ICLR 2020; optax ``radam``.
    """
    return chain(scale_by_radam(b1, b2, eps, eps_root, threshold, nesterov=nesterov),
                 scale_by_learning_rate(learning_rate))


def yogi(
    learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-3
) -> GradientTransformation:
    r"""Yogi: ``chain(scale_by_yogi(b1, b2, eps), scale_by_learning_rate(eta))``.

    Reference: Zaheer et al., NeurIPS 2018; optax ``yogi``. torch.optim has no Yogi.
    """
    return chain(scale_by_yogi(b1, b2, eps), scale_by_learning_rate(learning_rate))


def adabelief(
    learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-16,
    eps_root: float = 1e-16, *, nesterov: bool = False,
) -> GradientTransformation:
    r"""AdaBelief: ``chain(scale_by_belief(...), scale_by_learning_rate(eta))``.

    Reference: Zhuang et al., NeurIPS 2020; optax ``adabelief``. torch.optim has none.
    """
    return chain(scale_by_belief(b1, b2, eps, eps_root, nesterov=nesterov),
                 scale_by_learning_rate(learning_rate))


def scale_by_acprop(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-16, eps_root: float = 1e-16
) -> GradientTransformation:
    r"""ACProp's scaling: the gradient over the *previous* belief second moment.

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad
        s_t = \beta_2 s_{t-1} + (1-\beta_2)(g_t - m_{t-1})^2 + \epsilon_{root},\\
        u_t = g_t / (\sqrt{s_{t-1}/(1-\beta_2^{t-1})} + \epsilon)\ (t \ge 2),\quad
        u_1 = g_1/(1 + \epsilon).

    Args:
      b1: :math:`\beta_1` (default 0.9). b2: :math:`\beta_2` (default 0.999).
      eps: :math:`\epsilon` (default 1e-16). eps_root: :math:`\epsilon_{root}` (default 1e-16).

    Reference: Zhuang et al., "Momentum Centering and Asynchronous Update for Adaptive Gradient
    Methods", NeurIPS 2021; optax ``contrib.scale_by_acprop``.
    """
    _check_adam(b1, b2, eps, eps_root)

    init = _zero_moments_init(ScaleByAdamState)

    def step(g, mu_prev, nu_prev, count):
        mu = _moment(mu_prev, g, b1)
        nu = ops.add(_moment_sq(nu_prev, ops.sub(g, mu_prev), b2), eps_root)
        prev = count - 1  # the state's count
        first = prev == 0
        t = torch.where(first, count, prev).to(g[0].dtype)
        keep = torch.where(first, 0.0, 1.0).to(g[0].dtype)
        nu_hat = ops.add(ops.mul(ops.div(nu_prev, 1 - b2**t), keep), 1 - keep)
        out = ops.div(g, ops.add(ops.sqrt(nu_hat), eps))
        return out, mu, nu

    return GradientTransformation(init, moments_update("scale_by_acprop", ScaleByAdamState, step))


def acprop(
    learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-16,
    eps_root: float = 1e-16, weight_decay: ScalarOrSchedule = 0.0, mask: Any = None,
) -> GradientTransformation:
    r"""ACProp: ``chain(scale_by_acprop(b1, b2, eps, eps_root), add_decayed_weights(
    weight_decay, mask), scale_by_learning_rate(learning_rate))``.

    Reference: Zhuang et al., NeurIPS 2021; optax ``contrib.acprop``.
    """
    zero = isinstance(weight_decay, (int, float)) and weight_decay == 0
    decay = () if zero else (add_decayed_weights(weight_decay, mask),)
    return chain(scale_by_acprop(b1, b2, eps, eps_root), *decay,
                 scale_by_learning_rate(learning_rate))
