"""The optimizers HeavyBall 0.7.2 ships, as short funcopt chains, and (from
:mod:`funcopt.heavyball3`) those HeavyBall 3.2.1 names: ``laprop`` (``LaProp``), ``adopt``
(``ADOPT``), ``sf_adamw`` (``SFAdamW``), ``muon`` (``Muon``), ``psgd_kron`` (``PSGDKron``) and
``soap`` (``SOAP``), with 3.2.1's defaults; see that module for how each one matches 3.2.1.

Each 0.7.2 class is one line over funcopt's building blocks (``ForeachSOAP`` ->
``foreach_soap``). Defaults are 0.7.2's. Where 0.7.2 differs from these recipes:

* weight decay: 0.7.2 multiplies parameters by ``1 + lr * wd`` (a sign slip); funcopt decays.
* ``warmup_steps=0`` raises ZeroDivisionError in 0.7.2; here it means no warmup.
* ``ForeachAdamW`` 0.7.2 calls ``tuple.lerp_`` and cannot run; :func:`foreach_adamw` is
  ``chain(scale_by_adam(b1, b2, eps), add_decayed_weights(wd), scale_by_learning_rate(lr))``,
  which adds eps to the root where 0.7.2 takes ``max(root, eps)`` (equal up to eps).
* ``ForeachLaProp`` is ``chain(scale_by_laprop(b1, b2, eps), ...)`` (bit-for-bit the same math).
* ``ForeachADOPT`` 0.7.2 keeps both moments as debiased averages (not the paper's ``v_0 = g_0^2``),
  does not clip, and applies each step's momentum one call late; :func:`foreach_adopt` applies
  it at once, so its parameters after ``t`` calls are 0.7.2's after ``t + 1`` calls.
* ``SFPaLMForeachSOAP`` / ``PrecondScheduleSFPaLMSOAP`` (0.7.2) add adaptive gradient clipping
  and feed the unprojected gradient to the second moment; their recipes here are
  Schedule-Free over SOAP without momentum (:func:`sf_palm_foreach_soap`), not bit-matched.
* ``PrecondSchedulePaLMForeachSOAP`` 0.7.2 raises KeyError('beta2_scale') on its first step.

Reference: https://github.com/HomebrewML/HeavyBall (v0.7.2).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from funcopt.base import (
    GradientTransformation,
    PyTree,
    Tensor,
    check_hyperparameter,
    increment,
    replace,
    step_counter,
    tree_leaves,
    tree_unflatten,
)
from funcopt.compose import chain
from funcopt.engine import expect_state, leaves, ops
from funcopt.schedules.one_based import host_linear_warmup, linear_warmup, palm_beta2
from funcopt.transforms.first_order import scale_by_adam, scale_by_learning_rate
from funcopt.transforms.per_coordinate import scale_by_laprop
from funcopt.transforms.schedule_free import scale_by_bias_corrected_rms, schedule_free
from funcopt.transforms.soap import precond_schedule, scale_by_soap
from funcopt.transforms.soap import soap as _soap
from funcopt.transforms.weight_decay import add_decayed_weights

__all__ = [
    "foreach_adamw", "foreach_laprop", "foreach_adopt", "scale_by_debiased_adopt",
    "palm_beta2", "foreach_sfadamw", "palm_foreach_sfadamw", "foreach_soap",
    "palm_foreach_soap", "precond_schedule_foreach_soap", "precond_schedule_palm_foreach_soap",
    "sf_palm_foreach_soap", "precond_schedule_sf_palm_foreach_soap",
    # HeavyBall 3.2.1's names (funcopt.heavyball3)
    "laprop", "adopt", "sf_adamw", "muon", "psgd_kron", "soap",
]


def _tail(lr, weight_decay, warmup_steps, offset=1):
    parts = [add_decayed_weights(weight_decay)] if weight_decay else []
    return parts + [scale_by_learning_rate(linear_warmup(lr, warmup_steps, offset))]


def foreach_adamw(lr=0.0025, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0, warmup_steps=0):
    """``ForeachAdamW``: :math:`u_t = -\\gamma_t(\\hat m_t / (\\sqrt{\\hat v_t} + \\epsilon)
    + \\lambda\\theta_t)`, :math:`\\gamma_t = \\gamma\\min(t/T_w, 1)`.

    ``lr`` :math:`\\gamma`, ``betas`` :math:`(\\beta_1, \\beta_2)`, ``eps`` :math:`\\epsilon`,
    ``weight_decay`` :math:`\\lambda` (decoupled), ``warmup_steps`` :math:`T_w` (0: none).
    Defaults as 0.7.2 (lr 0.0025, betas (0.9, 0.99), eps 1e-8, no decay, no warmup).
    """
    return chain(scale_by_adam(betas[0], betas[1], eps), *_tail(lr, weight_decay, warmup_steps))


def foreach_laprop(lr=0.0025, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0, warmup_steps=0):
    """``ForeachLaProp``: momentum of ``g / max(sqrt(v_hat), eps)`` (:func:`scale_by_laprop`),
    then decoupled decay and the warmed-up learning rate as :func:`foreach_adamw`."""
    return chain(scale_by_laprop(betas[0], betas[1], eps), *_tail(lr, weight_decay, warmup_steps))


class ScaleByDebiasedAdoptState(NamedTuple):
    count: Tensor  # type: ignore[assignment]  # shadows tuple.count by design (optax's name)
    mu: PyTree
    nu: PyTree


def scale_by_debiased_adopt(b1: float = 0.9, b2: float = 0.99, eps: float = 1e-8
                            ) -> GradientTransformation:
    """ADOPT as HeavyBall 0.7.2 defines it: debiased averages, previous second moment.

    .. math::
        \\hat\\beta(t) = 1 - \\frac{1-\\beta}{1-\\beta^t},\\quad
        m_t = \\hat\\beta_1(t-1)\\, m_{t-1} + (1-\\hat\\beta_1(t-1))\\,
        \\frac{g_t}{\\max(\\sqrt{v_{t-1}}, \\epsilon)},\\quad
        v_t = \\hat\\beta_2(t)\\, v_{t-1} + (1-\\hat\\beta_2(t))\\, g_t^2

    with :math:`u_1 = 0` (only :math:`v_1 = g_1^2`) and :math:`u_t = m_t` after.
    ``b1`` :math:`\\beta_1` (0.9), ``b2`` :math:`\\beta_2` (0.99), ``eps`` :math:`\\epsilon` (1e-8).
    Reference: HeavyBall 0.7.2 ``ForeachADOPT``; Taniguchi et al. 2024 (ADOPT).
    """
    check_hyperparameter("b1", b1, low=0.0, high=1.0, high_inclusive=False)
    check_hyperparameter("b2", b2, low=0.0, high=1.0, high_inclusive=False)
    check_hyperparameter("eps", eps, low=0.0, low_inclusive=False)

    def init(params):
        leaves = tree_leaves(params)
        f32 = [torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32))
               for p in leaves]
        return ScaleByDebiasedAdoptState(step_counter(params), f32, [x.clone() for x in f32])

    def update(updates, state, params=None, **extra):
        expect_state(state, ScaleByDebiasedAdoptState, "scale_by_debiased_adopt")
        g, treedef = leaves(updates, params, "scale_by_debiased_adopt", state.mu)
        count = increment(state.count)
        t = count.to(torch.float64)
        if not g:
            return updates, replace(state, count=count)
        g32 = [x.to(m.dtype) for x, m in zip(g, state.mu)]
        w1 = torch.where(t > 1, (1 - b1) / (1 - b1 ** (t - 1).clamp(min=1)), 0.0)
        w2 = (1 - b2) / (1 - b2 ** t)
        x = ops.div(g32, ops.clamp_min(ops.sqrt(state.nu), eps))
        mu = ops.add(state.mu, ops.mul(
            ops.sub(x, state.mu), w1.to(g32[0].dtype)))
        nu = ops.add(state.nu, ops.mul(
            ops.sub(ops.mul(g32, g32), state.nu), w2.to(g32[0].dtype)))
        out = [m.to(x.dtype) for m, x in zip(mu, g)]
        return tree_unflatten(treedef, out), ScaleByDebiasedAdoptState(count, list(mu), list(nu))

    return GradientTransformation(init, update)


def foreach_adopt(lr=0.0025, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0, warmup_steps=0):
    """``ForeachADOPT``: :func:`scale_by_debiased_adopt`, decoupled decay, learning rate
    :math:`\\gamma\\min((t-1)/T_w, 1)` (0.7.2 warms up on the momentum's own step count)."""
    return chain(scale_by_debiased_adopt(betas[0], betas[1], eps),
                 *_tail(lr, weight_decay, warmup_steps, offset=0))


def foreach_sfadamw(lr=0.0025, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0, warmup_steps=0,
                    r=0.0, weight_lr_power=2.0):
    """``ForeachSFAdamW``: Schedule-Free over ``g / max(sqrt(v_hat), eps)``."""
    return schedule_free(scale_by_bias_corrected_rms(betas[1], eps, eps_floor=True), lr,
                         betas[0], weight_decay, warmup_steps, r, weight_lr_power)


def palm_foreach_sfadamw(lr=0.0025, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0,
                         warmup_steps=0, r=0.0, weight_lr_power=2.0):
    """``PaLMForeachSFAdamW``: :func:`foreach_sfadamw` with ``beta2 = 1 - t^-0.8``."""
    return schedule_free(scale_by_bias_corrected_rms(palm_beta2(0.8), eps, eps_floor=True), lr,
                         betas[0], weight_decay, warmup_steps, r, weight_lr_power)


def foreach_soap(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                 precondition_frequency=2, factors=None, warmup_steps=1):
    """``ForeachSOAP`` (0.7.2 default weight_decay 0.01 is replaced by 0: see module notes).

    ``factors``: a :class:`funcopt.SoapFactors` holding 0.7.2's ``max_precond_dim``,
    ``merge_dims`` and ``precondition_1d`` (default None: 2048, True, False, as 0.7.2)."""
    return _soap(host_linear_warmup(lr, warmup_steps), betas[0], betas[1], None, eps, weight_decay,
                precondition_frequency, factors)


def palm_foreach_soap(lr=3e-3, betas=(0.9, 0.95), beta2_scale=0.8, **kw):
    """``PaLMForeachSOAP``: :func:`foreach_soap` with ``beta2 = 1 - t^-beta2_scale``."""
    return foreach_soap(lr, (betas[0], palm_beta2(beta2_scale)), **kw)


def precond_schedule_foreach_soap(lr=3e-3, precond_scheduler=(1 / 3, 9), **kw):
    """``PrecondScheduleForeachSOAP``: refresh with probability ``1/(log10(t^a)^b + 1)``."""
    return foreach_soap(lr, precondition_frequency=precond_schedule(*precond_scheduler), **kw)


def precond_schedule_palm_foreach_soap(lr=3e-3, precond_scheduler=(1 / 3, 9), **kw):
    """``PrecondSchedulePaLMForeachSOAP``."""
    return palm_foreach_soap(lr, precondition_frequency=precond_schedule(*precond_scheduler), **kw)


def sf_palm_foreach_soap(lr=3e-3, beta=0.9, beta2_scale=0.8, eps=1e-8, weight_decay=0.0,
                         warmup_steps=1, r=0.0, weight_lr_power=2.0, precondition_frequency=2,
                         factors=None):
    """``SFPaLMForeachSOAP``: Schedule-Free over SOAP without momentum, PaLM beta2.

    ``factors``: as :func:`foreach_soap`."""
    base = scale_by_soap(0.0, palm_beta2(beta2_scale), None, eps, precondition_frequency,
                         factors)
    return schedule_free(base, lr, beta, weight_decay, warmup_steps, r, weight_lr_power)


def precond_schedule_sf_palm_foreach_soap(lr=3e-3, precond_scheduler=(1 / 3, 9), **kw):
    """``PrecondScheduleSFPaLMSOAP``."""
    return sf_palm_foreach_soap(lr, precondition_frequency=precond_schedule(*precond_scheduler),
                                **kw)


from funcopt.heavyball3 import adopt, laprop, muon, psgd_kron, sf_adamw, soap  # noqa: E402
