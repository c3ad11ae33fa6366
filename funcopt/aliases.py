"""Ready-made optimizers: each a short ``chain`` of building blocks ending in
``scale_by_learning_rate``. Names, arguments and defaults follow optax; each docstring says how to
reproduce the torch.optim optimizer of the same name where one exists.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch

from funcopt.base import GradientTransformation, ScalarOrSchedule, Tensor
from funcopt.compose import chain
from funcopt.engine import elementwise
from funcopt.torch_kernels import with_kernel
from funcopt.transforms import first_order as fo
from funcopt.transforms import per_coordinate as ad
from funcopt.transforms.weight_decay import add_decayed_weights
from funcopt.triton_kernels import with_triton_adamw

__all__ = [
    "sgd", "adam", "adamw", "nadam", "amsgrad", "adamax", "rmsprop", "adagrad", "adagrad_norm",
    "lion", "laprop", "adopt", "nadamw", "adamaxw",
]


def _elementwise_alias(alias: Callable[..., GradientTransformation]) -> Callable[..., GradientTransformation]:
    """Mark what ``alias`` builds as element-wise (:func:`funcopt.elementwise`) unless a
    weight-decay ``mask`` picks leaves by the tree's shape."""

    signature = inspect.signature(alias)

    @functools.wraps(alias)
    def build(*args: Any, **kwargs: Any) -> GradientTransformation:
        tx = alias(*args, **kwargs)
        if torch.compiler.is_compiling():  # rebuilt inside a traced step (inject_hyperparams):
            return tx  # the mark is for fo.Optimizer, which builds its groups outside
        mask = signature.bind(*args, **kwargs).arguments.get("mask")
        return tx if mask is not None else elementwise(tx)

    return build


def _is_zero(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == 0


def _decay(weight_decay: ScalarOrSchedule, mask: Any = None) -> tuple[GradientTransformation, ...]:
    return () if _is_zero(weight_decay) else (add_decayed_weights(weight_decay, mask),)


@_elementwise_alias
def sgd(
    learning_rate: ScalarOrSchedule, momentum: float | None = None, nesterov: bool = False,
    accumulator_dtype: torch.dtype | None = None, *, weight_decay: ScalarOrSchedule = 0.0,
    dampening: float = 0.0,
) -> GradientTransformation:
    r"""Stochastic gradient descent with optional (Nesterov) momentum and L2 weight decay.

    .. math:: d_t = g_t + \lambda\theta_t,\quad b_t = \mu b_{t-1} + d_t,\quad
        \theta_{t+1} = \theta_t - \eta\,(b_t \text{ or } d_t + \mu b_t \text{ if nesterov}).

    ``chain(add_decayed_weights(lambda), trace(mu, nesterov), scale_by_learning_rate(eta))``:
    the same numbers as ``torch.optim.SGD(lr, momentum, dampening, weight_decay, nesterov)``.

    Args:
      learning_rate: :math:`\eta` (number, tensor or schedule).
      momentum: :math:`\mu`, None for plain SGD (default None).
      nesterov: Nesterov momentum (default False; needs ``momentum``).
      weight_decay: :math:`\lambda`, added to the gradient before momentum (default 0).
      dampening: torch's dampening of the momentum buffer (default 0).
      accumulator_dtype: dtype of the momentum buffer (default: the parameters').

    The positional order is optax's (``learning_rate, momentum, nesterov, accumulator_dtype``);
    ``weight_decay`` and ``dampening``, which optax's ``sgd`` does not have, are keyword-only.

    Reference: Robbins & Monro 1951; Sutskever et al. 2013; optax ``sgd``; torch.optim.SGD.
    """
    if nesterov and momentum is None:
        raise ValueError("sgd: nesterov=True needs momentum; pass momentum=0.9 (say)")
    # torch applies dampening to a momentum buffer only: at momentum 0 it has none
    damp = 0.0 if _is_zero(momentum) else dampening
    momentum_tx = () if momentum is None else (
        fo.trace(momentum, nesterov, accumulator_dtype, dampening=damp),)
    tx = chain(*_decay(weight_decay), *momentum_tx, fo.scale_by_learning_rate(learning_rate))
    # torch's kernel takes no momentum buffer at momentum 0, where fo.trace keeps one
    if accumulator_dtype is None and not _is_zero(momentum):
        tx = with_kernel(tx, "sgd", learning_rate, momentum=momentum, nesterov=nesterov,
                         dampening=dampening, weight_decay=weight_decay)
    return tx


@_elementwise_alias
def adam(
    learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
    eps_root: float = 0.0, mu_dtype: torch.dtype | None = None, *, nesterov: bool = False,
    amsgrad: bool = False,
) -> GradientTransformation:
    r"""Adam: ``chain(scale_by_adam(...), scale_by_learning_rate(eta))``.

    .. math:: \theta_{t+1} = \theta_t - \eta\, \hat m_t / (\sqrt{\hat v_t + \epsilon_{root}}
        + \epsilon) \quad\text{(see scale_by_adam)}.

    Differs from torch.optim.Adam only in how weight decay is given: torch's
    ``weight_decay=w`` (L2 added to the gradient) is ``chain(add_decayed_weights(w), adam(...))``.

    Args:
      learning_rate: :math:`\eta`. b1, b2, eps, eps_root, mu_dtype, nesterov, amsgrad: as
        :func:`scale_by_adam` (defaults 0.9, 0.999, 1e-8, 0, None, False, False).

    Reference: Kingma & Ba 2015; optax ``adam``; torch.optim.Adam.
    """
    return chain(
        fo.scale_by_adam(b1, b2, eps, eps_root, mu_dtype=mu_dtype, nesterov=nesterov,
                         amsgrad=amsgrad),
        fo.scale_by_learning_rate(learning_rate),
    )


@_elementwise_alias
def adamw(
    learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
    eps_root: float = 0.0, mu_dtype: torch.dtype | None = None,
    weight_decay: ScalarOrSchedule = 1e-4, mask: Any = None, *, nesterov: bool = False,
    amsgrad: bool = False,
) -> GradientTransformation:
    r"""AdamW: Adam with decoupled weight decay.

    .. math:: \theta_{t+1} = \theta_t - \eta\,\big(\hat m_t/(\sqrt{\hat v_t}+\epsilon)
        + \lambda\theta_t\big).

    ``chain(scale_by_adam, add_decayed_weights(lambda, mask), scale_by_learning_rate(eta))``.
    Same numbers as torch.optim.AdamW (whose decay :math:`\theta(1-\eta\lambda)` is also
    multiplied by the learning rate); the default :math:`\lambda` is optax's 1e-4, torch's is 1e-2.

    Args:
      learning_rate: :math:`\eta`. b1, b2, eps, eps_root, mu_dtype, nesterov, amsgrad: as
        :func:`scale_by_adam`. weight_decay: :math:`\lambda` (default 1e-4).
      mask: which parameters decay (see :func:`add_decayed_weights`), default all.

    Reference: Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019;
    optax ``adamw``; torch.optim.AdamW.
    """
    tx = chain(
        fo.scale_by_adam(b1, b2, eps, eps_root, mu_dtype=mu_dtype, nesterov=nesterov,
                         amsgrad=amsgrad),
        *_decay(weight_decay, mask),
        fo.scale_by_learning_rate(learning_rate),
    )
    if mask is None and not (nesterov or amsgrad) and mu_dtype is None and _is_zero(eps_root):
        # eager CUDA steps: one Triton kernel where it gives the chain's numbers
        tx = with_triton_adamw(tx, learning_rate, b1=b1, b2=b2, eps=eps,
                               weight_decay=weight_decay)
        tx = with_kernel(tx, "adamw", learning_rate, b1=b1, b2=b2, eps=eps,
                         weight_decay=weight_decay)
    return tx


@_elementwise_alias
def nadam(
    learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
    eps_root: float = 0.0, mu_dtype: torch.dtype | None = None, *,
    momentum_decay: float | None = None,
) -> GradientTransformation:
    r"""NAdam: Adam with Nesterov momentum.

    With ``momentum_decay=None`` (default) this is optax's ``nadam``
    (``scale_by_adam(nesterov=True)``, constant :math:`\beta_1`). With a number
    :math:`\psi` it is :func:`scale_by_nadam`, Dozat's momentum schedule
    :math:`\mu_t = \beta_1(1 - \frac12 0.96^{t\psi})` that torch.optim.NAdam uses
    (``momentum_decay=4e-3`` reproduces torch's default; ``eps_root`` and ``mu_dtype`` must
    then keep their defaults).

    Reference: Dozat 2016; optax ``nadam``; torch.optim.NAdam.
    """
    if momentum_decay is None:
        scaling = fo.scale_by_adam(b1, b2, eps, eps_root, mu_dtype=mu_dtype, nesterov=True)
    else:
        if not _is_zero(eps_root) or mu_dtype is not None:
            raise ValueError("nadam: eps_root and mu_dtype are not available with momentum_decay; "
                             "leave them at their defaults or set momentum_decay=None")
        scaling = fo.scale_by_nadam(b1, b2, eps, momentum_decay)
    return chain(scaling, fo.scale_by_learning_rate(learning_rate))


@_elementwise_alias
def amsgrad(
    learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
    eps_root: float = 0.0, mu_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    r"""AMSGrad: Adam with the running maximum of the second moment (Reddi et al. 2018).

    Takes the maximum of the raw :math:`v_t` and bias-corrects it afterwards, as
    torch.optim.Adam(amsgrad=True) does; optax's ``amsgrad`` maximises the bias-corrected
    :math:`\hat v_t` instead (the two differ in the first steps). Args as :func:`adam`.

    Reference: Reddi, Kale, Kumar, "On the Convergence of Adam and Beyond", ICLR 2018.
    """
    return adam(learning_rate, b1, b2, eps, eps_root, mu_dtype, amsgrad=True)


@_elementwise_alias
def adamax(
    learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> GradientTransformation:
    r"""Adamax: ``chain(scale_by_adamax(b1, b2, eps), scale_by_learning_rate(eta))``; the same
    numbers as torch.optim.Adamax (torch's default :math:`\eta` is 2e-3).

    Reference: Kingma & Ba 2015, Sec. 7.1; optax ``adamax``; torch.optim.Adamax.
    """
    return chain(ad.scale_by_adamax(b1, b2, eps), fo.scale_by_learning_rate(learning_rate))


@_elementwise_alias
def rmsprop(
    learning_rate: ScalarOrSchedule, decay: float = 0.9, eps: float = 1e-8,
    initial_scale: float = 0.0, eps_in_sqrt: bool = True, centered: bool = False,
    momentum: float | None = None, nesterov: bool = False, bias_correction: bool = False,
) -> GradientTransformation:
    r"""RMSprop: ``chain(scale_by_rms(...), [trace(momentum, nesterov)], scale_by_learning_rate)``.

    .. math:: \theta_{t+1} = \theta_t - \eta\, g_t / \sqrt{v_t + \epsilon}
        \quad(\text{see } scale\_by\_rms).

    torch.optim.RMSprop(lr, alpha, eps, momentum, centered) is
    ``rmsprop(lr, decay=alpha, eps=eps, eps_in_sqrt=False, centered=centered, momentum=momentum)``
    (optax's default puts ``eps`` inside the root and decay 0.9; torch's alpha is 0.99).

    Reference: Tieleman & Hinton 2012; Graves 2013 (centred); optax ``rmsprop``;
    torch.optim.RMSprop.
    """
    momentum_tx = () if momentum is None or _is_zero(momentum) else (
        fo.trace(momentum, nesterov),)
    return chain(
        ad.scale_by_rms(decay, eps, initial_scale, eps_in_sqrt, bias_correction, centered=centered),
        *momentum_tx,
        fo.scale_by_learning_rate(learning_rate),
    )


@_elementwise_alias
def adagrad(
    learning_rate: ScalarOrSchedule, initial_accumulator_value: float = 0.1, eps: float = 1e-7,
    *, eps_in_sqrt: bool = True,
) -> GradientTransformation:
    r"""AdaGrad: :math:`\theta_{t+1} = \theta_t - \eta\, g_t/\sqrt{\sum_{i\le t} g_i^2 + \epsilon}`.

    torch.optim.Adagrad(lr) is ``adagrad(lr, 0.0, 1e-10, eps_in_sqrt=False)``; its
    ``lr_decay=d`` is the schedule ``lambda t: lr / (1 + t * d)``.

    Reference: Duchi, Hazan, Singer 2011; optax ``adagrad``; torch.optim.Adagrad.
    """
    return chain(
        ad.scale_by_adagrad(initial_accumulator_value, eps, eps_in_sqrt=eps_in_sqrt),
        fo.scale_by_learning_rate(learning_rate),
    )


def adagrad_norm(
    learning_rate: ScalarOrSchedule, initial_accumulator_value: float = 0.0, eps: float = 1e-10
) -> GradientTransformation:
    r"""AdaGrad-Norm: :math:`\theta_{t+1} = \theta_t - \eta\, g_t / b_t`,
    :math:`b_t^2 = b_{t-1}^2 + \|g_t\|^2` (see :func:`scale_by_adagrad_norm`).

    Reference: Ward, Wu, Bottou, ICML 2019. torch.optim has no counterpart.
    """
    return chain(
        ad.scale_by_adagrad_norm(initial_accumulator_value, eps),
        fo.scale_by_learning_rate(learning_rate),
    )


@_elementwise_alias
def lion(
    learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.99,
    mu_dtype: torch.dtype | None = None, weight_decay: ScalarOrSchedule = 1e-3, mask: Any = None,
) -> GradientTransformation:
    r"""Lion: :math:`\theta_{t+1} = \theta_t - \eta(\operatorname{sign}(\beta_1 m_{t-1}
    + (1-\beta_1)g_t) + \lambda\theta_t)` with decoupled weight decay :math:`\lambda`
    (default 1e-3 as optax). Reference: Chen et al. 2023; optax ``lion``.
    """
    return chain(
        ad.scale_by_lion(b1, b2, mu_dtype), *_decay(weight_decay, mask),
        fo.scale_by_learning_rate(learning_rate),
    )


@_elementwise_alias
def laprop(
    learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.99, eps: float = 1e-8,
    weight_decay: ScalarOrSchedule = 0.0, mask: Any = None,
) -> GradientTransformation:
    r"""LaProp: :math:`\theta_{t+1} = \theta_t - \eta(\hat m_t + \lambda\theta_t)` with
    :math:`\hat m_t` from :func:`scale_by_laprop` and decoupled weight decay :math:`\lambda`
    (default 0). Reference: Ziyin, Wang, Ueda 2020; heavyball ``LaProp``.
    """
    return chain(
        ad.scale_by_laprop(b1, b2, eps), *_decay(weight_decay, mask),
        fo.scale_by_learning_rate(learning_rate),
    )


@_elementwise_alias
def adopt(
    learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.9999, eps: float = 1e-6,
    mu_dtype: torch.dtype | None = None, *, nesterov: bool = False, use_clipping: bool = True,
    clip_value_fn: Callable[[Tensor], Tensor] = lambda t: t**0.25,
) -> GradientTransformation:
    r"""ADOPT: ``chain(scale_by_adopt(...), scale_by_learning_rate(eta))``; the first step
    leaves the parameters unchanged (it only initialises :math:`v_0 = g_0^2`).

    Reference: Taniguchi et al., NeurIPS 2024; optax ``contrib.adopt``.
    """
    return chain(
        ad.scale_by_adopt(b1, b2, eps, mu_dtype, nesterov=nesterov, use_clipping=use_clipping,
                          clip_value_fn=clip_value_fn),
        fo.scale_by_learning_rate(learning_rate),
    )


@_elementwise_alias
def nadamw(
    learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
    eps_root: float = 0.0, mu_dtype: torch.dtype | None = None,
    weight_decay: ScalarOrSchedule = 1e-4, mask: Any = None, *, nesterov: bool = True,
) -> GradientTransformation:
    r"""NAdamW: AdamW with Nesterov momentum, ``adamw(..., nesterov=True)``.

    .. math:: \hat m_t = \beta_1 m_t/(1-\beta_1^{t+1}) + (1-\beta_1) g_t/(1-\beta_1^t),\quad
        \theta_{t+1} = \theta_t - \eta\,\big(\hat m_t/(\sqrt{\hat v_t + \epsilon_{root}}
        + \epsilon) + \lambda\theta_t\big).

    Args: as :func:`adamw` (weight_decay :math:`\lambda` default 1e-4, mask default all);
    ``nesterov`` (default True) is kept for optax's signature.

    funcopt follows optax (constant :math:`\beta_1`); torch.optim.NAdam(decoupled_weight_decay=True)
    uses Dozat's momentum schedule (:func:`scale_by_nadam`) and multiplies the decay by the
    learning rate the same way.

    Reference: Loshchilov & Hutter 2019; Dozat 2016; optax ``nadamw``.
    """
    return adamw(learning_rate, b1, b2, eps, eps_root, mu_dtype, weight_decay, mask,
                 nesterov=nesterov)


@_elementwise_alias
def adamaxw(
    learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
    weight_decay: ScalarOrSchedule = 1e-4, mask: Any = None,
) -> GradientTransformation:
    r"""AdamaxW: Adamax with decoupled weight decay.

    .. math:: \theta_{t+1} = \theta_t - \eta\,\big(m_t/((1-\beta_1^t) u^\infty_t)
        + \lambda\theta_t\big)\quad(\text{see } scale\_by\_adamax).

    ``chain(scale_by_adamax(b1, b2, eps), add_decayed_weights(weight_decay, mask),
    scale_by_learning_rate(learning_rate))``.

    Args:
      learning_rate: :math:`\eta`. b1, b2, eps: as :func:`adamax` (0.9, 0.999, 1e-8).
      weight_decay: :math:`\lambda` (default 1e-4). mask: which leaves decay (default all).

    Reference: Kingma & Ba 2015; Loshchilov & Hutter 2019; optax ``adamaxw``.
    """
    return chain(ad.scale_by_adamax(b1, b2, eps), *_decay(weight_decay, mask),
                 fo.scale_by_learning_rate(learning_rate))
