"""Learning-rate-free methods: Prodigy, D-Adaptation (AdamW) and Mechanic.

Both estimate the distance to the solution :math:`D` on the fly and scale an Adam step by it;
their output is the final parameter change (learning rate and sign included), as optax's
``contrib`` versions. Per-step scalars (:math:`d`, the weighted numerator) are 0-d tensors in
the state, so no step reads a value on the host.
"""

# ruff: noqa: F405 (the names of the toolkit's star import)
from __future__ import annotations

from typing import Any, NamedTuple

import torch

from funcopt.transforms._toolkit import *  # noqa: F403
from funcopt.transforms.line_search import _vdot

__all__ = ["ProdigyState", "DAdaptAdamWState", "MechanicState", "prodigy", "dadapt_adamw",
           "mechanize"]


def _lowest_dtype(leaves: list[Tensor]) -> torch.dtype:
    """The lowest-precision floating dtype among the leaves (optax's ``tree.dtype(.., 'lowest')``)."""
    return min((x.dtype for x in leaves), key=lambda d: torch.finfo(d).bits, default=torch.float32)


def _l1(xs: list[Tensor], dtype: torch.dtype) -> Tensor:
    return torch.stack([n.to(dtype) for n in ops.norm(xs, 1)]).sum()


def _check_betas(betas: Any) -> tuple[Any, Any]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2); got {betas!r}")
    _check_beta("betas[0]", betas[0])
    _check_beta("betas[1]", betas[1])
    return betas[0], betas[1]


class ProdigyState(NamedTuple):
    """State of :func:`prodigy`: Adam's moments, the weighted gradient sum, the current
    distance estimate ``estim_lr`` and its numerator (Mishchenko and Defazio 2023)."""

    exp_avg: Any
    exp_avg_sq: Any
    grad_sum: Any
    params0: Any
    estim_lr: Tensor
    numerator_weighted: Tensor
    count: Tensor  # type: ignore[assignment]  # shadows tuple.count by design (optax's name)


def prodigy(
    learning_rate: ScalarOrSchedule = 1.0, betas: tuple[float, float] = (0.9, 0.999),
    beta3: float | None = None, eps: float = 1e-8, estim_lr0: float = 1e-6,
    estim_lr_coef: float = 1.0, weight_decay: float = 0.0, safeguard_warmup: bool = False,
) -> GradientTransformation:
    r"""Prodigy: Adam scaled by an estimate :math:`d_t` of the distance to the solution.

    With :math:`\eta_t` the learning rate (schedule), :math:`\lambda_t = d_t \eta_t
    \sqrt{1-\beta_2^t}/(1-\beta_1^t)` and :math:`\tilde g = d_t g_t`:

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1)\tilde g,\quad v_t = \beta_2 v_{t-1} + (1-\beta_2)
        \tilde g^2,\quad s_t = \beta_3 s_{t-1} + \frac{\lambda_t}{d_0}\tilde g,\\
        r_t = \beta_3 r_{t-1} + \frac{d_t}{d_0}\lambda_t\langle g_t, x_0 - x_t\rangle,\quad
        d_{t+1} = \max\big(d_t,\ c\, r_t / \|s_t\|_1\big),\\
        u_t = -\lambda_t\big(m_t/(\sqrt{v_t} + d_{t+1}\epsilon) + w\, x_t\big),

    (with ``safeguard_warmup``, :math:`s_t` adds :math:`(d_t/d_0)\tilde g` instead).

    Args:
      learning_rate: :math:`\eta` (default 1; a number, tensor or schedule).
      betas: :math:`(\beta_1, \beta_2)` (default (0.9, 0.999)).
      beta3: :math:`\beta_3` (default None: :math:`\sqrt{\beta_2}`).
      eps: :math:`\epsilon` (default 1e-8). estim_lr0: :math:`d_0` > 0 (default 1e-6).
      estim_lr_coef: :math:`c` (default 1). weight_decay: :math:`w` (default 0).
      safeguard_warmup: the safeguard above (default False).

    Needs ``params``. The output is the parameter change (sign and step size included).
    Reference: Mishchenko & Defazio, "Prodigy: An Expeditiously Adaptive Parameter-Free
    Learner", ICML 2024; optax ``contrib.prodigy`` (whose equations funcopt follows; the
    authors' PyTorch package also scales :math:`r_t` by :math:`\sqrt{\beta_2}`).
    """
    beta1, beta2 = _check_betas(betas)
    b3 = beta2**0.5 if beta3 is None else beta3
    _check_beta("beta3", b3)
    _check("eps", eps)
    _check("estim_lr0", estim_lr0, low=0.0, low_inclusive=False)
    _check("estim_lr_coef", estim_lr_coef, low=0.0, low_inclusive=False)
    _check("weight_decay", weight_decay)
    _check("learning_rate", learning_rate)

    def init(params):
        leaves, count = tree_leaves(params), step_counter(params)
        dt = _lowest_dtype(leaves)
        return ProdigyState(
            _zeros(leaves, None), _zeros(leaves, None), _zeros(leaves, None),
            [x.detach().clone() for x in leaves],
            torch.tensor(estim_lr0, dtype=dt, device=count.device),
            torch.zeros((), dtype=dt, device=count.device), count)

    def update(updates, state, params=None, **extra):
        params = require_params(params, "prodigy")
        g, treedef = _leaves(updates, params, "prodigy", state.exp_avg, state.params0)
        count = increment(state.count)
        d, dt = state.estim_lr, state.estim_lr.dtype
        t = count.to(dt)
        dlr = d * _hp(learning_rate, state.count) * torch.sqrt(1 - beta2**t) / (1 - beta1**t)
        p = tree_leaves(params)
        dg = ops.mul(g, d)
        acc = _vdot(g, ops.sub(_as(state.params0, g), _as(p, g)), dt)
        m = _as(ops.add(ops.mul(state.exp_avg, beta1), ops.mul(dg, 1 - beta1)), g)
        v = _as(ops.add(ops.mul(state.exp_avg_sq, beta2), ops.mul(ops.mul(dg, dg), 1 - beta2)), g)
        gain = (d if safeguard_warmup else dlr) / estim_lr0
        s = _as(ops.add(ops.mul(state.grad_sum, b3), ops.mul(dg, gain)), g)
        num = b3 * state.numerator_weighted + d / estim_lr0 * dlr * acc
        d_new = torch.maximum(d, estim_lr_coef * num / _l1(s, dt))
        out = ops.div(ops.mul(m, -dlr), ops.add(ops.sqrt(v), [d_new * eps] * len(v)))
        if not (isinstance(weight_decay, (int, float)) and weight_decay == 0):
            out = ops.sub(out, ops.mul(_as(p, g), weight_decay * dlr))
        return tree_unflatten(treedef, _as(out, g)), ProdigyState(
            m, v, s, state.params0, d_new, num, count)

    return GradientTransformation(init, update)


class DAdaptAdamWState(NamedTuple):
    """State of :func:`dadapt_adamw`: Adam's moments, the weighted gradient sum, the current
    distance estimate ``estim_lr`` (D-Adaptation's ``d``), its numerator and the step count."""

    exp_avg: Any
    exp_avg_sq: Any
    grad_sum: Any
    estim_lr: Tensor
    numerator_weighted: Tensor
    count: Tensor  # type: ignore[assignment]  # shadows tuple.count by design (optax's name)


def dadapt_adamw(
    learning_rate: ScalarOrSchedule = 1.0, betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8, estim_lr0: float = 1e-6, weight_decay: float = 0.0,
) -> GradientTransformation:
    r"""D-Adaptation AdamW: AdamW whose step size :math:`d_t` estimates the distance to the solution.

    With :math:`\lambda_t = d_t\eta_t\sqrt{1-\beta_2^t}/(1-\beta_1^t)` and
    :math:`\gamma = \sqrt{\beta_2}`:

    .. math::
        a_t = \langle g_t, s_{t-1}/(\sqrt{v_{t-1}}+\epsilon)\rangle,\quad
        m_t = \beta_1 m_{t-1} + (1-\beta_1)\lambda_t g_t,\quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,\\
        s_t = \gamma s_{t-1} + (1-\gamma)\lambda_t g_t,\quad
        r_t = \gamma r_{t-1} + (1-\gamma)\lambda_t a_t,\quad
        d_{t+1} = \max\big(d_t,\ r_t/((1-\gamma)\|s_t\|_1)\big),\\
        u_t = -m_t/(\sqrt{v_t}+\epsilon) - w\lambda_t x_t.

    Args:
      learning_rate: :math:`\eta` (default 1; a number, tensor or schedule).
      betas: :math:`(\beta_1, \beta_2)` (default (0.9, 0.999)). eps: :math:`\epsilon` (1e-8).
      estim_lr0: :math:`d_0` > 0 (default 1e-6). weight_decay: :math:`w` (default 0).

    Needs ``params``. The output is the parameter change. Reference: Defazio & Mishchenko,
    "Learning-Rate-Free Learning by D-Adaptation", ICML 2023; optax ``contrib.dadapt_adamw``.
    """
    beta1, beta2 = _check_betas(betas)
    _check("eps", eps)
    _check("estim_lr0", estim_lr0, low=0.0, low_inclusive=False)
    _check("weight_decay", weight_decay)
    _check("learning_rate", learning_rate)
    sb2 = beta2**0.5

    def init(params):
        leaves, count = tree_leaves(params), step_counter(params)
        dt = _lowest_dtype(leaves)
        return DAdaptAdamWState(
            _zeros(leaves, None), _zeros(leaves, None), _zeros(leaves, None),
            torch.tensor(estim_lr0, dtype=dt, device=count.device),
            torch.zeros((), dtype=dt, device=count.device), count)

    def update(updates, state, params=None, **extra):
        params = require_params(params, "dadapt_adamw")
        g, treedef = _leaves(updates, params, "dadapt_adamw", state.exp_avg)
        count = increment(state.count)
        d, dt = state.estim_lr, state.estim_lr.dtype
        t = count.to(dt)
        dlr = d * _hp(learning_rate, state.count) * torch.sqrt(1 - beta2**t) / (1 - beta1**t)
        weighted = ops.div(state.grad_sum, ops.add(ops.sqrt(state.exp_avg_sq), eps))
        acc = _vdot(g, _as(weighted, g), dt)
        m = _as(ops.add(ops.mul(state.exp_avg, beta1), ops.mul(g, (1 - beta1) * dlr)), g)
        v = _as(ops.add(ops.mul(state.exp_avg_sq, beta2), ops.mul(ops.mul(g, g), 1 - beta2)), g)
        s = _as(ops.add(ops.mul(state.grad_sum, sb2), ops.mul(g, (1 - sb2) * dlr)), g)
        num = sb2 * state.numerator_weighted + (1 - sb2) * dlr * acc
        d_new = torch.maximum(d, num / ((1 - sb2) * _l1(s, dt)))
        out = ops.neg(ops.div(m, ops.add(ops.sqrt(v), eps)))
        if not (isinstance(weight_decay, (int, float)) and weight_decay == 0):
            out = ops.sub(out, ops.mul(_as(tree_leaves(params), g), weight_decay * dlr))
        return tree_unflatten(treedef, _as(out, g)), DAdaptAdamWState(m, v, s, d_new, num, count)

    return GradientTransformation(init, update)


class MechanicState(NamedTuple):
    """State of :func:`mechanize` (Mechanic, Cutkosky et al. 2023): the wrapped optimizer's
    state, the step count, the starting point's offset ``r`` and the moments ``m``, ``v``
    and scales ``s`` of its learned step sizes."""

    base_optimizer_state: Any
    count: Tensor  # type: ignore[assignment]  # shadows tuple.count by design (optax's name)
    r: Tensor
    m: Tensor
    v: Tensor
    s: Tensor
    x0: Any


def mechanize(
    base_optimizer: GradientTransformation, weight_decay: float = 1e-2, eps: float = 1e-8,
    s_init: float = 1e-6, num_betas: int = 6,
) -> GradientTransformation:
    r"""Mechanic: learn the scale :math:`s` of ``base_optimizer``'s steps online.

    With :math:`\Delta_t` the sum of the base steps so far (:math:`x_t = x_0 + s\Delta_t`),
    :math:`\tilde g_t = g_t + \lambda\,\Sigma s\,\|g_t\|/(\|x_t\|+\epsilon)\,x_t` and
    :math:`h_t = \langle\tilde g_t, \Delta_{t-1}\rangle`, for each :math:`\beta_i = 1 - 0.1^i`
    (:math:`i = 1..n`):

    .. math:: m_i \leftarrow \max(\beta_i m_i, |h_t| + \epsilon),\quad
        v_i \leftarrow \beta_i^2 v_i + h_t^2,\quad
        r_i \leftarrow \beta_i r_i - \operatorname{clip}(h_t, -m_i, m_i)\, s_i,\\
        s_i = \frac{s_{init} m_i / n + \max(r_i, 0)}{\sqrt{v_i} + \epsilon},\quad
        x_{t+1} = x_0 + \Big(\sum_i s_i\Big)\Delta_t

    (signs as optax computes them: the clipped term uses the previous :math:`m`). The output
    is :math:`x_{t+1} - x_t`.

    Args:
      base_optimizer: the transform whose steps are scaled (e.g. ``adam(1.0)``; its
        learning rate should be about 1).
      weight_decay: :math:`\lambda` (default 1e-2). eps: :math:`\epsilon` (default 1e-8).
      s_init: :math:`s_{init}` > 0 (default 1e-6). num_betas: :math:`n` >= 1 (default 6).

    Needs ``params``. Reference: Cutkosky, Defazio, Mehta, "Mechanic: A Learning Rate Tuner",
    NeurIPS 2023; optax ``contrib.mechanize``.
    """
    _check("weight_decay", weight_decay)
    _check("eps", eps)
    _check("s_init", s_init, low=0.0, low_inclusive=False)
    if not isinstance(num_betas, int) or num_betas < 1:
        raise ValueError(f"mechanize: num_betas={num_betas!r} must be an int >= 1")

    def init(params):
        leaves, count = tree_leaves(params), step_counter(params)
        z = torch.zeros(num_betas, dtype=_lowest_dtype(leaves), device=count.device)
        return MechanicState(base_optimizer.init(params), count, z, z.clone(), z.clone(),
                             z + s_init, [x.detach().clone() for x in leaves])

    def update(updates, state, params=None, **extra):
        params = require_params(params, "mechanize")
        g, treedef = _leaves(updates, params, "mechanize", state.x0)
        steps, base_state = base_optimizer.update(updates, state.base_optimizer_state, params, **extra)
        p, dt = _as(tree_leaves(params), g), state.s.dtype
        first = state.count == 0
        x0 = [torch.where(first, x, y) for x, y in zip(p, _as(state.x0, g))]
        s_sum = state.s.sum()
        g_norm, p_norm = torch.sqrt(_vdot(g, g, dt)), torch.sqrt(_vdot(p, p, dt))
        g = ops.add(g, ops.mul(p, weight_decay * s_sum * g_norm / (p_norm + eps)))
        delta_prev = ops.div(ops.sub(x0, p), s_sum + eps)
        delta = ops.sub(delta_prev, _as(tree_leaves(steps), g))
        h = _vdot(g, delta_prev, dt)
        betas = torch.tensor([1.0 - 0.1**i for i in range(1, num_betas + 1)], dtype=dt,
                             device=h.device)
        clipped = torch.minimum(torch.maximum(h, -state.m), state.m)
        m = torch.maximum(betas * state.m, h.abs() + eps)
        v = betas**2 * state.v + h**2
        r = betas * state.r + clipped * state.s
        root = torch.where(v > 0, torch.sqrt(torch.where(v > 0, v, 1.0)), 0.0)  # d/dv finite at 0
        s = (s_init / num_betas * m + r.clamp_min(0.0)) / (root + eps)
        out = ops.sub(ops.sub(x0, ops.mul(delta, s.sum())), p)
        return tree_unflatten(treedef, _as(out, g)), MechanicState(
            base_state, increment(state.count), r, m, v, s, _as(x0, state.x0))

    return GradientTransformation(init, update)
