"""The optimizers HeavyBall 0.7.2 ships, as short funcopt chains.

Each 0.7.2 class is one line over funcopt's building blocks (``ForeachSOAP`` ->
``foreach_soap``). Defaults are 0.7.2's. Where 0.7.2 differs from these recipes:

* weight decay: 0.7.2 multiplies parameters by ``1 + lr * wd`` (a sign slip); funcopt decays.
* ``warmup_steps=0`` raises ZeroDivisionError in 0.7.2; here it means no warmup.
* ``ForeachAdamW`` 0.7.2 calls ``tuple.lerp_`` and cannot run; its recipe is
  ``fo.chain(fo.scale_by_adam(b1, b2, eps), fo.add_decayed_weights(wd),
  fo.scale_by_learning_rate(lr))``. ``ForeachLaProp`` / ``ForeachADOPT`` are
  ``fo.chain(fo.scale_by_laprop(...) | fo.scale_by_adopt(...), fo.scale_by_learning_rate(lr))``.
* ``SFPaLMForeachSOAP`` / ``PrecondScheduleSFPaLMSOAP`` (0.7.2) add adaptive gradient clipping
  and feed the unprojected gradient to the second moment; their recipes here are
  Schedule-Free over SOAP without momentum (:func:`sf_palm_foreach_soap`), not bit-matched.
* ``PrecondSchedulePaLMForeachSOAP`` 0.7.2 raises KeyError('beta2_scale') on its first step.

Reference: https://github.com/HomebrewML/HeavyBall (v0.7.2).
"""

from __future__ import annotations

from funcopt.transforms.schedule_free import scale_by_bias_corrected_rms, schedule_free
from funcopt.transforms.soap import precond_schedule, scale_by_soap, soap

__all__ = [
    "palm_beta2", "foreach_sfadamw", "palm_foreach_sfadamw", "foreach_soap",
    "palm_foreach_soap", "precond_schedule_foreach_soap", "precond_schedule_palm_foreach_soap",
    "sf_palm_foreach_soap", "precond_schedule_sf_palm_foreach_soap",
]


def palm_beta2(scale: float = 0.8):
    """PaLM's ``beta2(t) = 1 - t^{-scale}`` (t counted from 1; clamped at 1)."""
    return lambda t: 1.0 - max(float(t), 1.0) ** -scale


def _warmup(lr: float, warmup_steps: int):
    return lr if warmup_steps <= 0 else (lambda t: lr * min(float(t) / warmup_steps, 1.0))


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
                 precondition_frequency=2, max_precond_dim=2048, merge_dims=True,
                 precondition_1d=False, warmup_steps=1):
    """``ForeachSOAP`` (0.7.2 default weight_decay 0.01 is replaced by 0: see module notes)."""
    return soap(_warmup(lr, warmup_steps), betas[0], betas[1], None, eps, weight_decay,
                precondition_frequency, max_precond_dim, merge_dims, precondition_1d)


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
                         max_precond_dim=2048, merge_dims=True, precondition_1d=False):
    """``SFPaLMForeachSOAP``: Schedule-Free over SOAP without momentum, PaLM beta2."""
    base = scale_by_soap(0.0, palm_beta2(beta2_scale), None, eps, precondition_frequency,
                         max_precond_dim, merge_dims, precondition_1d)
    return schedule_free(base, lr, beta, weight_decay, warmup_steps, r, weight_lr_power)


def precond_schedule_sf_palm_foreach_soap(lr=3e-3, precond_scheduler=(1 / 3, 9), **kw):
    """``PrecondScheduleSFPaLMSOAP``."""
    return sf_palm_foreach_soap(lr, precondition_frequency=precond_schedule(*precond_scheduler),
                                **kw)
