"""More per-coordinate adaptive methods: Adan, NovoGrad, Adadelta and Rprop.

Where optax 0.2.8 and torch.optim disagree the docstring says which one funcopt follows.
"""

# ruff: noqa: F405 (the names of the toolkit's star import)
from __future__ import annotations

from typing import Any, NamedTuple

import torch

from funcopt.transforms import first_order as fo
from funcopt.transforms._toolkit import *  # noqa: F403
from funcopt.transforms.weight_decay import add_decayed_weights

__all__ = [
    "ScaleByAdanState", "ScaleByNovogradState", "ScaleByAdaDeltaState", "ScaleByRpropState",
    "scale_by_adan", "adan", "scale_by_novograd", "novograd", "scale_by_adadelta", "adadelta",
    "scale_by_rprop", "rprop",
]


def _decay(weight_decay: Any, mask: Any = None) -> tuple[GradientTransformation, ...]:
    zero = isinstance(weight_decay, (int, float)) and weight_decay == 0
    return () if zero else (add_decayed_weights(weight_decay, mask),)


class ScaleByAdanState(NamedTuple):
    """State of :func:`scale_by_adan`: the step count, the moments ``m``, ``v`` (of gradient
    differences) and ``n``, and the previous gradient ``g`` (Xie et al. 2022)."""

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count by design (optax's ``t``)
    m: Any
    v: Any
    n: Any
    g: Any


def scale_by_adan(
    b1: float = 0.98, b2: float = 0.92, b3: float = 0.99, eps: float = 1e-8, eps_root: float = 0.0
) -> GradientTransformation:
    r"""Adan's scaling: Nesterov momentum estimated from gradient differences.

    With :math:`\Delta_t = g_t - g_{t-1}` (0 at the first step):

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad v_t = \beta_2 v_{t-1} + (1-\beta_2)\Delta_t,
        \quad n_t = \beta_3 n_{t-1} + (1-\beta_3)(g_t + (1-\beta_2)\Delta_t)^2,\\
        u_t = (\hat m_t + (1-\beta_2)\hat v_t)/(\sqrt{\hat n_t + \epsilon_{root}} + \epsilon),

    hats the bias corrections :math:`1/(1-\beta_i^t)`.

    Args:
      b1, b2, b3: :math:`\beta_{1,2,3}` (defaults 0.98, 0.92, 0.99).
      eps: :math:`\epsilon` (default 1e-8). eps_root: :math:`\epsilon_{root}` (default 0).

    The step counter is named ``count`` (optax: ``t``). Reference: Xie et al., "Adan: Adaptive
    Nesterov Momentum Algorithm for Faster Optimizing Deep Models", 2022 (Algorithm 1);
    optax ``scale_by_adan``.
    """
    for name, b in (("b1", b1), ("b2", b2), ("b3", b3)):
        _check_beta(name, b)
    _check("eps", eps)
    _check("eps_root", eps_root)

    def init(params):
        leaves = tree_leaves(params)
        z = [_zeros(leaves, None) for _ in range(4)]
        return ScaleByAdanState(step_counter(params), *z)

    def update(updates, state, params=None, **extra):
        g, treedef = _leaves(updates, params, "scale_by_adan", state.m)
        count = increment(state.count)
        if not g:
            return updates, replace(state, count=count)
        started = (state.count > 0).to(scalar_dtype(g))
        diff = ops.mul(ops.sub(g, _as(state.g, g)), started)
        m = _moment(_as(state.m, g), g, b1)
        v = _moment(_as(state.v, g), diff, b2)
        n = _moment_sq(_as(state.n, g), ops.add(g, ops.mul(diff, 1 - b2)), b3)
        t = _steps(count, g)
        num = ops.add(ops.div(m, 1 - b1**t), ops.mul(v, (1 - b2) / (1 - b2**t)))
        den = ops.add(ops.sqrt(ops.add(ops.div(n, 1 - b3**t), eps_root)), eps)
        return tree_unflatten(treedef, _as(ops.div(num, den), g)), ScaleByAdanState(
            count, _as(m, state.m), _as(v, state.v), _as(n, state.n), _as(g, state.g))

    return GradientTransformation(init, update)


def adan(
    learning_rate: ScalarOrSchedule, b1: float = 0.98, b2: float = 0.92, b3: float = 0.99,
    eps: float = 1e-8, eps_root: float = 1e-8, weight_decay: ScalarOrSchedule = 0.0,
    mask: Any = None,
) -> GradientTransformation:
    r"""Adan: ``chain(scale_by_adan(b1, b2, b3, eps, eps_root), add_decayed_weights(weight_decay,
    mask), scale_by_learning_rate(learning_rate))`` (``eps_root`` defaults to 1e-8 here, as
    optax). Reference: Xie et al. 2022; optax ``adan``. torch.optim has no Adan.
    """
    return chain(scale_by_adan(b1, b2, b3, eps, eps_root), *_decay(weight_decay, mask),
                 fo.scale_by_learning_rate(learning_rate))


class ScaleByNovogradState(NamedTuple):
    """State of :func:`scale_by_novograd`: the step count, the first moment ``mu`` and the
    per-layer second moment ``nu`` (Ginsburg et al. 2019)."""

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count by design (optax's name)
    mu: Any
    nu: Any


def scale_by_novograd(
    b1: float = 0.9, b2: float = 0.25, eps: float = 1e-8, eps_root: float = 0.0,
    weight_decay: float = 0.0, mu_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    r"""NovoGrad's scaling: a layer-wise (per-leaf) second moment of the gradient norm.

    .. math::
        \nu_t = \beta_2\nu_{t-1} + (1-\beta_2)\|g_t\|^2\ (\nu_1 = \|g_1\|^2),\quad
        d_t = g_t/(\sqrt{\nu_t + \epsilon_{root}} + \epsilon) + w\,\theta_t,\\
        m_t = \beta_1 m_{t-1} + d_t\ (m_1 = d_1),\quad u_t = m_t.

    Args:
      b1: :math:`\beta_1` (default 0.9). b2: :math:`\beta_2` (default 0.25).
      eps: :math:`\epsilon` (default 1e-8). eps_root: :math:`\epsilon_{root}` (default 0).
      weight_decay: :math:`w` (default 0). mu_dtype: dtype of :math:`m` (default: params').

    Needs ``params``. Reference: Ginsburg et al., "Stochastic Gradient Methods with
    Layer-wise Adaptive Moments for Training of Deep Networks", 2019; optax
    ``scale_by_novograd``.
    """
    _check_beta("b1", b1)
    _check_beta("b2", b2)
    _check("eps", eps)
    _check("eps_root", eps_root)
    _check("weight_decay", weight_decay)

    def init(params):
        leaves = tree_leaves(params)
        return ScaleByNovogradState(step_counter(params), _zeros(leaves, mu_dtype),
                                    [torch.zeros((), dtype=x.dtype, device=x.device) for x in leaves])

    def update(updates, state, params=None, **extra):
        params = require_params(params, "scale_by_novograd")
        g, treedef = _leaves(updates, params, "scale_by_novograd", state.mu)
        count = increment(state.count)
        if not g:
            return updates, replace(state, count=count)
        first = state.count == 0
        norms2 = [(n * n).to(v.dtype) for n, v in zip(ops.norm(g), state.nu)]
        nu = [torch.where(first, n2, b2 * v + (1 - b2) * n2) for n2, v in zip(norms2, state.nu)]
        d = ops.div(g, [torch.sqrt(v + eps_root) + eps for v in nu])
        d = _axpy(weight_decay, _as(tree_leaves(params), g), d)
        keep = torch.where(first, 0.0, b1).to(scalar_dtype(g))
        mu = ops.add(ops.mul(_as(state.mu, g), keep), d)
        return tree_unflatten(treedef, _as(mu, g)), ScaleByNovogradState(
            count, _as(mu, state.mu), nu)

    return GradientTransformation(init, update)


def novograd(
    learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.25, eps: float = 1e-6,
    eps_root: float = 0.0, weight_decay: float = 0.0,
) -> GradientTransformation:
    r"""NovoGrad: ``chain(scale_by_novograd(b1, b2, eps, eps_root, weight_decay),
    scale_by_learning_rate(learning_rate))`` (``eps`` defaults to 1e-6 here, as optax).

    Reference: Ginsburg et al. 2019; optax ``novograd``. torch.optim has no NovoGrad.
    """
    return chain(scale_by_novograd(b1, b2, eps, eps_root, weight_decay),
                 fo.scale_by_learning_rate(learning_rate))


class ScaleByAdaDeltaState(NamedTuple):
    """State of :func:`scale_by_adadelta`: the running averages of squared gradients ``e_g``
    and squared updates ``e_x`` (Zeiler 2012)."""

    e_g: Any
    e_x: Any


def scale_by_adadelta(rho: float = 0.9, eps: float = 1e-6) -> GradientTransformation:
    r"""Adadelta's scaling.

    .. math:: E[g^2]_t = \rho E[g^2]_{t-1} + (1-\rho) g_t^2,\quad
        u_t = \frac{\sqrt{E[\Delta x^2]_{t-1} + \epsilon}}{\sqrt{E[g^2]_t + \epsilon}}\, g_t,\quad
        E[\Delta x^2]_t = \rho E[\Delta x^2]_{t-1} + (1-\rho) u_t^2.

    Args:
      rho: :math:`\rho` (default 0.9). eps: :math:`\epsilon` (default 1e-6).

    Reference: Zeiler, "ADADELTA: An Adaptive Learning Rate Method", 2012; optax
    ``scale_by_adadelta``; torch.optim.Adadelta (the same numbers).
    """
    _check_beta("rho", rho)
    _check("eps", eps)

    def init(params):
        leaves = tree_leaves(params)
        return ScaleByAdaDeltaState(_zeros(leaves, None), _zeros(leaves, None))

    def update(updates, state, params=None, **extra):
        g, treedef = _leaves(updates, params, "scale_by_adadelta", state.e_g, state.e_x)
        if not g:
            return updates, state
        e_g = _moment_sq(_as(state.e_g, g), g, rho)
        e_x = _as(state.e_x, g)
        out = ops.mul(ops.div(ops.sqrt(ops.add(e_x, eps)), ops.sqrt(ops.add(e_g, eps))), g)
        e_x = _moment_sq(e_x, out, rho)
        return tree_unflatten(treedef, _as(out, g)), ScaleByAdaDeltaState(
            _as(e_g, state.e_g), _as(e_x, state.e_x))

    return GradientTransformation(init, update)


def adadelta(
    learning_rate: ScalarOrSchedule | None = None, rho: float = 0.9, eps: float = 1e-6,
    weight_decay: ScalarOrSchedule = 0.0, weight_decay_mask: Any = None,
) -> GradientTransformation:
    r"""Adadelta: ``chain(add_decayed_weights(weight_decay, mask), scale_by_adadelta(rho, eps),
    scale_by_learning_rate(learning_rate))``; :math:`\theta_{t+1} = \theta_t - \eta u_t`.

    ``learning_rate=None`` (default) means :math:`\eta = 1`, torch.optim.Adadelta's default, and
    the step descends; optax 0.2.8's ``adadelta(None)`` leaves the sign unflipped and so
    *ascends*: funcopt follows torch here. ``adadelta(lr, rho, eps, weight_decay)`` gives
    torch.optim.Adadelta(lr, rho, eps, weight_decay)'s numbers (L2 decay on the gradient).

    Reference: Zeiler 2012; optax ``adadelta``; torch.optim.Adadelta.
    """
    lr = 1.0 if learning_rate is None else learning_rate
    return chain(*_decay(weight_decay, weight_decay_mask), scale_by_adadelta(rho, eps),
                 fo.scale_by_learning_rate(lr))


class ScaleByRpropState(NamedTuple):
    """State of :func:`scale_by_rprop`: the per-coordinate step sizes, the previous updates
    and the learning rate (Riedmiller and Braun 1993)."""

    step_sizes: Any
    prev_updates: Any


def scale_by_rprop(
    learning_rate: float, eta_minus: float = 0.5, eta_plus: float = 1.2,
    min_step_size: float = 1e-6, max_step_size: float = 50.0,
) -> GradientTransformation:
    r"""Rprop's scaling (iRprop-, as torch.optim.Rprop): sign steps of per-coordinate sizes.

    .. math::
        s_t = g_t\, g'_{t-1},\quad \Delta_t = \operatorname{clip}(\Delta_{t-1}\cdot
        \{\eta^+ \text{ if } s_t>0;\ \eta^- \text{ if } s_t<0;\ 1\}, \Delta_{min}, \Delta_{max}),\\
        g'_t = 0 \text{ where } s_t < 0 \text{ else } g_t,\quad u_t = \Delta_t \operatorname{sign}(g'_t),

    :math:`\Delta_0` = ``learning_rate``, :math:`g'_0 = 0`. The output is the ascent step:
    chain ``scale(-1)`` (as :func:`rprop` does).

    funcopt follows torch.optim.Rprop: optax 0.2.8's ``scale_by_rprop`` returns the step
    computed one update earlier (its first update is 0) and stores the step, not the gradient,
    as the previous sign.

    Args:
      learning_rate: :math:`\Delta_0` > 0. eta_minus: :math:`\eta^-` (default 0.5).
      eta_plus: :math:`\eta^+` (default 1.2). min_step_size: :math:`\Delta_{min}` (1e-6).
      max_step_size: :math:`\Delta_{max}` (default 50).

    Reference: Riedmiller & Braun 1993; Igel & Hüsken 2000 (iRprop-); torch.optim.Rprop.
    """
    _check("learning_rate", learning_rate, low=0.0, low_inclusive=False)
    _check("eta_minus", eta_minus, low=0.0, high=1.0, low_inclusive=False)
    _check("eta_plus", eta_plus, low=1.0)
    _check("min_step_size", min_step_size)
    _check("max_step_size", max_step_size, low=0.0, low_inclusive=False)

    def init(params):
        leaves = tree_leaves(params)
        return ScaleByRpropState(_full(leaves, float(learning_rate)), _zeros(leaves, None))

    def update(updates, state, params=None, **extra):
        g, treedef = _leaves(updates, params, "scale_by_rprop", state.step_sizes)
        if not g:
            return updates, state
        s = ops.mul(g, _as(state.prev_updates, g))
        factor = [torch.where(x > 0, eta_plus, torch.where(x < 0, eta_minus, 1.0)).to(x.dtype)
                  for x in s]
        steps = ops.clamp_max(ops.clamp_min(ops.mul(_as(state.step_sizes, g), factor),
                                            min_step_size), max_step_size)
        prev = [torch.where(x < 0, 0.0, y) for x, y in zip(s, g)]
        out = ops.mul(ops.sign(prev), steps)
        return tree_unflatten(treedef, _as(out, g)), ScaleByRpropState(
            _as(steps, state.step_sizes), _as(prev, state.prev_updates))

    return GradientTransformation(init, update)


def rprop(
    learning_rate: float, eta_minus: float = 0.5, eta_plus: float = 1.2,
    min_step_size: float = 1e-6, max_step_size: float = 50.0,
) -> GradientTransformation:
    r"""Rprop: ``chain(scale_by_rprop(...), scale(-1))``; the same numbers as
    torch.optim.Rprop(lr, etas=(eta_minus, eta_plus), step_sizes=(min, max)) (see
    :func:`scale_by_rprop` for how optax differs).

    Reference: Riedmiller & Braun 1993; torch.optim.Rprop; optax ``rprop``.
    """
    return chain(scale_by_rprop(learning_rate, eta_minus, eta_plus, min_step_size, max_step_size),
                 fo.scale(-1.0))
