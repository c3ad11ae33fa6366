"""The optimizers HeavyBall 3.2.1 names, as funcopt chains with 3.2.1's defaults.

========================  =====================  =============================================
HeavyBall 3.2.1 class     funcopt function       agreement with 3.2.1 (float64 state)
========================  =====================  =============================================
``heavyball.LaProp``      :func:`laprop`         step for step (``eps``: see there)
``heavyball.ADOPT``       :func:`adopt`          step for step
``heavyball.SFAdamW``     :func:`sf_adamw`       step for step
``heavyball.Muon``        :func:`muon`           step for step (its own Newton-Schulz)
``heavyball.PSGDKron``    :func:`psgd_kron`      step for step (same probes: seed torch with
                                                 ``seed`` before 3.2.1's steps)
``heavyball.SOAP``        :func:`soap`           step for step only for leaves with no
                                                 factor; matrices differ (see :func:`soap`)
========================  =====================  =============================================

What every 3.2.1 class does, and so every function here: the learning rate at the 1-based
step :math:`t` is :math:`\\gamma_t = \\gamma\\, t / \\max(t, T_w + 1)` (``warmup_steps``
:math:`T_w`, default 0: no warmup); weight decay is decoupled,
:math:`\\theta \\leftarrow \\theta(1 - \\gamma_t\\lambda) - \\gamma_t u_t`; no gradient
clipping by default (PSGD clips its update). Not offered, all off by default in 3.2.1:
``caution``, ``mars``, ``palm``, ``cautious_weight_decay``, ``gradient_clipping``, ``ecc``.
3.2.1 stores its state in ``storage_dtype`` (float32 by default); funcopt keeps it in the
parameters' dtype, float32 at least (so the step-for-step tests give 3.2.1
``storage_dtype="float64"``).

Reference: https://github.com/HomebrewML/HeavyBall (v3.2.1).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from funcopt.base import GradientTransformation, Tensor, check_hyperparameter, tree_unflatten
from funcopt.compose import chain
from funcopt.engine import expect_state, leaves, ops
from funcopt.transforms.first_order import scale_by_learning_rate
from funcopt.transforms.per_coordinate import scale_by_laprop
from funcopt.transforms.psgd import PsgdKronOptions
from funcopt.transforms.psgd import psgd_kron as _psgd_kron
from funcopt.transforms.scaling import ema
from funcopt.transforms.schedule_free import scale_by_bias_corrected_rms, schedule_free
from funcopt.transforms.soap import SoapFactors, scale_by_soap
from funcopt.transforms.weight_decay import add_decayed_weights

__all__ = ["laprop", "adopt", "sf_adamw", "muon", "psgd_kron", "soap",
           "scale_by_nesterov_ema", "orthogonalize", "HEAVYBALL_NS_COEFFICIENTS"]

HEAVYBALL_NS_COEFFICIENTS = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)
"""The five ``(a, b, c)`` of HeavyBall 3.2.1's quintic Newton-Schulz, one per iteration."""


def _betas(betas) -> tuple[float, float]:
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise TypeError(f"betas={betas!r} must be a pair (beta1, beta2), e.g. (0.9, 0.99)")
    return betas[0], betas[1]


def _learning_rate(lr: float, warmup_steps: int, skip_first: bool = False):
    """3.2.1's :math:`\\gamma t / \\max(t, T_w + 1)` of the counter ``c = t - 1``, computed in
    float64; with ``skip_first`` it is 0 at ``t = 1`` (the classes whose first step only fills
    state and leaves the parameters, weight decay included, unchanged)."""
    check_hyperparameter("lr", lr, low=0.0)
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps!r} must be an int >= 0 (0: no warmup)")
    if not (warmup_steps or skip_first):
        return lr

    def schedule(c: Tensor) -> Tensor:
        t = torch.as_tensor(c).to(torch.float64) + 1
        rate = lr * t / torch.clamp(t, min=warmup_steps + 1)
        return torch.where(t > 1, rate, torch.zeros_like(rate)) if skip_first else rate

    return schedule


def _tail(lr, weight_decay, warmup_steps, skip_first=False) -> list[GradientTransformation]:
    decay = [add_decayed_weights(weight_decay)] if weight_decay else []
    return decay + [scale_by_learning_rate(_learning_rate(lr, warmup_steps, skip_first))]


def laprop(lr: float = 0.0025, betas=(0.9, 0.99), eps: float = 1e-8, weight_decay: float = 0.0,
           warmup_steps: int = 0) -> GradientTransformation:
    """``heavyball.LaProp``: momentum of the RMS-normalised gradient.

    .. math::
        v_t = \\hat\\beta_2 v_{t-1} + (1-\\hat\\beta_2) g_t^2,\\quad
        m_t = \\hat\\beta_1 m_{t-1} + (1-\\hat\\beta_1)\\, g_t / \\max(\\sqrt{v_t}, \\epsilon),
        \\quad \\theta \\leftarrow \\theta(1-\\gamma_t\\lambda) - \\gamma_t m_t

    with debiased decays :math:`\\hat\\beta = 1 - (1-\\beta)/(1-\\beta^t)`
    (:func:`funcopt.scale_by_laprop`). Defaults as 3.2.1: ``lr`` 0.0025, ``betas`` (0.9, 0.99),
    ``eps`` 1e-8, ``weight_decay`` 0, ``warmup_steps`` 0. 3.2.1 does not read ``eps`` (its
    fused step always floors at 1e-8); here ``eps`` is honoured.
    """
    b1, b2 = _betas(betas)
    return chain(scale_by_laprop(b1, b2, eps), *_tail(lr, weight_decay, warmup_steps))


def adopt(lr: float = 0.0025, betas=(0.9, 0.99), eps: float = 1e-8, weight_decay: float = 0.0,
          warmup_steps: int = 0) -> GradientTransformation:
    """``heavyball.ADOPT``: the momentum of ``g_t / max(sqrt(v_{t-1}), eps)``, then ``v``.

    Step 1 only sets :math:`v_1 = g_1^2` and leaves the parameters unchanged (weight decay
    included); from step 2, with :math:`\\hat\\beta` as in :func:`laprop`,
    :math:`m_t = \\hat\\beta_1(t-1) m_{t-1} + (1-\\hat\\beta_1(t-1))\\,g_t/\\max(\\sqrt{v_{t-1}},
    \\epsilon)`, :math:`\\theta \\leftarrow \\theta(1-\\gamma_t\\lambda) - \\gamma_t m_t`, then
    :math:`v_t = \\hat\\beta_2(t) v_{t-1} + (1-\\hat\\beta_2(t)) g_t^2`
    (:func:`funcopt.heavyball.scale_by_debiased_adopt`; no clipping, unlike the paper).
    Defaults as 3.2.1: ``lr`` 0.0025, ``betas`` (0.9, 0.99), ``eps`` 1e-8, ``weight_decay`` 0,
    ``warmup_steps`` 0 (:math:`\\gamma_t` counts the first step).
    """
    from funcopt.heavyball import scale_by_debiased_adopt

    b1, b2 = _betas(betas)
    return chain(scale_by_debiased_adopt(b1, b2, eps),
                 *_tail(lr, weight_decay, warmup_steps, skip_first=True))


def sf_adamw(lr: float = 0.0025, betas=(0.9, 0.99), eps: float = 1e-6,
             weight_decay: float = 0.0, warmup_steps: int = 0, r: float = 0.0,
             weight_lr_power: float = 2.0) -> GradientTransformation:
    """``heavyball.SFAdamW``: Schedule-Free over ``g / max(sqrt(v_hat), eps)``.

    :func:`funcopt.schedule_free` over :func:`funcopt.scale_by_bias_corrected_rms` with
    ``eps_floor=True``; 3.2.1's warmup :math:`t/\\max(t, T_w+1)` is funcopt's
    :math:`\\min(1, t/T)` at :math:`T = T_w + 1`. The parameters are the :math:`y` point (as
    3.2.1's in train mode); :func:`funcopt.schedule_free_eval_params` gives :math:`x`.
    Defaults as 3.2.1: ``lr`` 0.0025, ``betas`` (0.9, 0.99), ``eps`` 1e-6 (not 1e-8),
    ``weight_decay`` 0, ``warmup_steps`` 0, ``r`` 0, ``weight_lr_power`` 2.
    """
    b1, b2 = _betas(betas)
    _learning_rate(lr, warmup_steps)  # the same argument checks as the other recipes
    return schedule_free(scale_by_bias_corrected_rms(b2, eps, eps_floor=True), lr, b1,
                         weight_decay, warmup_steps + 1, r, weight_lr_power)


class ScaleByNesterovEmaState(NamedTuple):
    """State of :func:`scale_by_nesterov_ema`: ``ema``, one average per leaf."""

    ema: list


def scale_by_nesterov_ema(b1: float = 0.9) -> GradientTransformation:
    """Gradient plus its moving average (HeavyBall's ``nesterov_ema``, Grokfast's form).

    .. math:: m_t = \\beta_1 m_{t-1} + (1-\\beta_1) g_t, \\quad u_t = g_t + m_t

    with :math:`m_0 = 0` and no debiasing. ``b1``: :math:`\\beta_1` in [0, 1) (default 0.9).
    """
    check_hyperparameter("b1", b1, low=0.0, high=1.0, high_inclusive=False)

    def init(params):
        ps, _ = leaves(params, None, "scale_by_nesterov_ema")
        return ScaleByNesterovEmaState(
            [torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) for p in ps])

    def update(updates, state, params=None, **extra):
        expect_state(state, ScaleByNesterovEmaState, "scale_by_nesterov_ema")
        g, treedef = leaves(updates, params, "scale_by_nesterov_ema", state.ema)
        if not g:
            return updates, state
        m = ops.lerp(list(state.ema), [x.to(e.dtype) for x, e in zip(g, state.ema)], 1.0 - b1)
        out = [(x + e).to(x.dtype) for x, e in zip(g, m)]
        return tree_unflatten(treedef, out), ScaleByNesterovEmaState(list(m))

    return GradientTransformation(init, update)


def _newton_schulz(g: Tensor, coefficients, eps: float) -> Tensor:
    """:math:`X_0 = G/\\max(\\|G\\|_F, \\epsilon)`, :math:`X \\leftarrow a_k X + (b_k A + c_k
    A^2) X` (:math:`A = X X^T`) for each :math:`(a_k, b_k, c_k)`, on the wide orientation."""
    x = g.to(torch.promote_types(g.dtype, torch.float32))
    tall = x.size(-2) > x.size(-1)
    x = x.mT if tall else x
    x = x / torch.linalg.matrix_norm(x).clamp(min=eps)
    for a, b, c in coefficients:
        s = x @ x.mT
        x = a * x + (b * s + c * s @ s) @ x
    return (x.mT if tall else x).to(g.dtype)


def orthogonalize(coefficients=HEAVYBALL_NS_COEFFICIENTS, eps: float = 1e-7
                  ) -> GradientTransformation:
    """Replace each leaf of 2+ dims by its approximate orthogonal factor (HeavyBall's
    ``orthogonalize_update``); leaves of fewer dims pass through unchanged.

    A leaf of shape ``(r, ...)`` is flattened to ``(r, c)``, sent through the quintic
    Newton-Schulz iteration with one ``(a, b, c)`` per step (see :func:`_newton_schulz`) and
    scaled by :math:`\\sqrt{\\max(1, r/c)}`. ``coefficients``: the per-step triples (default
    :data:`HEAVYBALL_NS_COEFFICIENTS`, five steps); ``eps``: floor of the Frobenius norm (1e-7).
    3.2.1 iterates in bfloat16 with stochastic rounding unless the leaf is float64; here in the
    leaf's dtype, float32 at least (deterministic). Stateless.
    """
    coefficients = tuple(tuple(float(v) for v in abc) for abc in coefficients)
    if not coefficients or any(len(abc) != 3 for abc in coefficients):
        raise ValueError("orthogonalize: coefficients must be a non-empty sequence of (a, b, c)")
    check_hyperparameter("eps", eps, low=0.0)

    def update(updates, state, params=None, **extra):
        g, treedef = leaves(updates, params, "orthogonalize")
        out = []
        for x in g:
            if x.dim() < 2 or x.numel() == 0:
                out.append(x if x.dim() < 2 else torch.zeros_like(x))
                continue
            rows, cols = x.shape[0], math.prod(x.shape[1:])
            o = _newton_schulz(x.reshape(rows, cols), coefficients, eps)
            out.append((o * max(1.0, rows / cols) ** 0.5).reshape(x.shape))
        return tree_unflatten(treedef, out), state

    return GradientTransformation(lambda params: (), update)


def muon(lr: float = 0.0025, betas=(0.9, 0.99), weight_decay: float = 0.0,
         warmup_steps: int = 0, nesterov: bool = True) -> GradientTransformation:
    """``heavyball.Muon``: orthogonalised momentum, on every leaf.

    ``chain(scale_by_nesterov_ema(beta1) (or ema(beta1, debias=True) when nesterov=False),
    orthogonalize(), decay, learning rate)``:
    :math:`u_t = \\mathrm{NS}(g_t + m_t)\\sqrt{\\max(1, r/c)}` for leaves of 2+ dims and
    :math:`u_t = g_t + m_t` for the rest (3.2.1 sends every leaf through Muon; there is no
    AdamW branch). This is not Keller Jordan's Muon (:func:`funcopt.muon`): the momentum is
    :math:`g + m` with :math:`m` an EMA (not :math:`(1-\\beta) g + \\beta m`), Newton-Schulz
    uses five different coefficient triples (:data:`HEAVYBALL_NS_COEFFICIENTS`) after one
    normalisation by :math:`\\max(\\|G\\|_F, 10^{-7})`, and the defaults differ.

    Defaults as 3.2.1: ``lr`` 0.0025, ``betas`` (0.9, 0.99) (only ``betas[0]`` is used),
    ``weight_decay`` 0, ``warmup_steps`` 0, ``nesterov`` True. 3.2.1's ``eps`` does not change
    its numbers and is not taken; ``heavyball_momentum=True`` is not offered.
    """
    b1, _ = _betas(betas)
    momentum = scale_by_nesterov_ema(b1) if nesterov else ema(b1, debias=True)
    return chain(momentum, orthogonalize(), *_tail(lr, weight_decay, warmup_steps))


def psgd_kron(lr: float = 0.001, beta: float | None = None, betas=(0.9, 0.999),
              weight_decay: float = 0.0, warmup_steps: int = 0,
              preconditioner_update_probability: float | Callable | None = None,
              momentum_into_precond_update: bool = True, precond_lr: float = 0.1,
              options: PsgdKronOptions | None = None, seed: int = 0) -> GradientTransformation:
    """``heavyball.PSGDKron``: :func:`funcopt.psgd_kron` under 3.2.1's argument names.

    The momentum is ``beta``, or ``betas[0]`` when ``beta`` is None (3.2.1's rule; ``betas[1]``
    is unused). The update is soft-clipped (3.2.1's default ``update_clipping``,
    :func:`funcopt.scale_by_trust_region_clip`). 3.2.1's ``max_size_triangular``,
    ``min_ndim_triangular``, ``memory_save_mode``, ``precond_init_scale*``,
    ``lower_bound_beta``, ``dampening``, ``precond_update_power_iterations`` and ``q_dtype``
    are the fields of ``options`` (a :class:`funcopt.PsgdKronOptions`, its defaults 3.2.1's).
    ``preconditioner_update_probability`` None: 3.2.1's schedule (1 for 1000 steps, then
    decaying by 0.999 a step to 0.03). Defaults as 3.2.1: ``lr`` 0.001, ``betas`` (0.9,
    0.999), ``weight_decay`` 0, ``warmup_steps`` 0, ``momentum_into_precond_update`` True,
    ``precond_lr`` 0.1. ``seed`` seeds the probe generator (3.2.1 draws from torch's global
    one).
    """
    b1 = _betas(betas)[0] if beta is None else beta
    return _psgd_kron(_learning_rate(lr, warmup_steps), b1, weight_decay, 0, True,
                      preconditioner_update_probability, momentum_into_precond_update,
                      precond_lr, options, seed)


def _every(frequency: int):
    """3.2.1's refresh rule for ``precondition_frequency = f``: it accumulates ``1/f`` a step and
    refreshes when the integer part grows, i.e. at the 1-based steps ``t`` with ``f | t``."""
    if isinstance(frequency, bool) or not isinstance(frequency, int) or frequency < 1:
        raise ValueError(f"precondition_frequency={frequency!r} must be an int >= 1")
    return lambda count, seed: (count + 1) % frequency == 0


def soap(lr: float = 3e-3, betas=(0.9, 0.95), shampoo_beta: float = 0.95, eps: float = 1e-8,
         weight_decay: float = 0.01, precondition_frequency: int = 2, warmup_steps: int = 0,
         factors: SoapFactors | None = None) -> GradientTransformation:
    """``heavyball.SOAP``'s interface and defaults over :func:`funcopt.scale_by_soap`.

    Step 1 only builds the factors and leaves the parameters unchanged (weight decay
    included); then Adam in the factors' eigenbasis (debiased at :math:`t-1`), decoupled decay,
    3.2.1's warmup. ``factors``: a :class:`funcopt.SoapFactors` with 3.2.1's
    ``max_precond_dim`` (2048), ``merge_dims`` (True) and ``precondition_1d`` (False).
    Refreshes happen at the 1-based steps divisible by ``precondition_frequency``, as in 3.2.1.

    Leaves that get no factor (1-d leaves, dimensions over ``max_precond_dim``) follow 3.2.1
    step for step. Leaves with factors do not: 3.2.1 debiases ``shampoo_beta``, seeds its basis
    from the first gradient differently, lifts the Gram matrix before its QR refresh, sorts by
    column-wise eigenvalue estimates and rotates the momentum into each new basis; funcopt's
    SOAP keeps HeavyBall 0.7.2's refresh. On random float64 gradients the matrices'
    displacement from the start differs from 3.2.1's by 20-80% over 20 steps: a SOAP of the
    same family, not 3.2.1's numbers. Defaults as 3.2.1: ``lr`` 3e-3, ``betas``
    (0.9, 0.95), ``shampoo_beta`` 0.95, ``eps`` 1e-8, ``weight_decay`` 0.01,
    ``precondition_frequency`` 2, ``warmup_steps`` 0.
    """
    b1, b2 = _betas(betas)
    base = scale_by_soap(b1, b2, shampoo_beta, eps, _every(precondition_frequency), factors)
    return chain(base, *_tail(lr, weight_decay, warmup_steps, skip_first=True))
