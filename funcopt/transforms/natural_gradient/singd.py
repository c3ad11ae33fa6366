"""SINGD: structured inverse-free natural gradient (Lin et al. 2024), a pure transform fed by
:func:`funcopt.func.capture_curvature` (the workflow: :mod:`funcopt.transforms.natural_gradient`).

Host syncs: none with ``T=1`` or with the extra keyword ``refresh=True/False`` of ``update``
(the caller decides on the host whether this step refreshes; it overrides the every-``T``
schedule). Otherwise, in eager steps the step counter is read on the host once per step to
decide whether this is a refresh step (every ``T`` steps); while
:func:`funcopt.engine.is_tracing` (``torch.compile(fullgraph=True)``, ``torch.func.vmap``)
there is no host read: the refresh runs on every step and ``torch.where`` keeps it on refresh
steps, so ``curvature`` must be passed on every step.

A whole training step (``capture_curvature``, ``update``, ``apply_updates``) runs under
:func:`funcopt.jit` (compiled, donated, a CUDA graph on CUDA); pass ``refresh`` to get one
graph per kind of step instead of a refresh computed and discarded on most steps.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from funcopt.base import (
    GradientTransformation,
    ScalarOrSchedule,
    check_hyperparameter,
    increment,
    resolve,
    step_counter,
)
from funcopt.engine import expect_state
from funcopt.func.capture import LayerSpec
from funcopt.transforms.natural_gradient import kronecker as kr
from funcopt.transforms.natural_gradient.structures import Structure, get_structure

__all__ = ["SINGDState", "scale_by_singd", "singd"]

# --------------------------------------------------------------------------- SINGD

_WIDE = {torch.float32, torch.float64}


class SINGDState(NamedTuple):
    """``count``; per layer the structured factors ``K``, ``C`` and their momenta ``m_K``,
    ``m_C`` (tuples of tensors, see :mod:`funcopt.transforms.natural_gradient.structures`; the momenta are
    empty tuples when ``alpha1 = 0``)."""

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count by design (optax's name)
    K: dict[str, tuple[Tensor, ...]]
    C: dict[str, tuple[Tensor, ...]]
    m_K: dict[str, tuple[Tensor, ...]]
    m_C: dict[str, tuple[Tensor, ...]]


class _SINGDConfig(NamedTuple):
    sK: Structure
    sC: Structure
    damping: float
    alpha1: float
    lr_cov: ScalarOrSchedule
    kfac_like: bool
    normalize_lr_cov: bool
    process_group: Any


def _singd_momenta(cfg: _SINGDConfig, K, C, mK_old, mC_old, lay, dtypes):
    """The new momenta ``m_K, m_C`` of one layer (Lin et al. 2024, Fig. 2, lines 3-6),
    ``alpha1`` times the old ones included, each one :meth:`Structure.combine`.

    ``H_K = r_a Pi_K(K^T a^T a K)`` and ``H_C = r_g Pi_C(C^T g^T g C)`` with ``r_a = 1/n_a``,
    ``r_g = N``: in float32/float64 without a process group the numbers ``r_a``, ``r_g`` enter
    the coefficients of :meth:`Structure.combine` (no pass over ``a``, ``g``); otherwise (16-bit
    factors, or an average over processes with batches of different sizes) ``a``, ``g`` are
    scaled first."""
    sK, sC = cfg.sK, cfg.sC
    a, g = kr.cast(lay.a, dtypes[0]), kr.cast(lay.g, dtypes[1])
    ra, rg = 1.0 / a.shape[0], float(lay.num_loss_terms)
    if cfg.process_group is not None or not {a.dtype, g.dtype} <= _WIDE:
        a, g = a * math.sqrt(ra), g * math.sqrt(rg)
        ra = rg = 1.0
    H_K, KtK = sK.gram_pair(K, a)
    H_C, CtC = sC.gram_pair(C, g)
    if cfg.process_group is not None:
        flat = kr.all_reduce_mean([*H_K, *H_C], cfg.process_group)
        H_K, H_C = tuple(flat[:len(H_K)]), tuple(flat[len(H_K):])
    s = 0.5 * ((1.0 - cfg.alpha1) if cfg.normalize_lr_cov else 1.0)
    lam = cfg.damping
    if cfg.kfac_like:  # c^2 = kappa^2 = 1
        cK = dK = cC = dC = None
        hK, hC = s * ra, s * rg
    else:  # c^2 = r_g tr(H~_C)/d_C, c'^2 = r_a tr(H~_K)/d_K: r_a r_g in both coefficients
        cK, dK = sC.average_trace(H_C), sC.average_trace(CtC)
        cC, dC = sK.average_trace(H_K), sK.average_trace(KtK)
        hK = hC = s * ra * rg
    old_K = [(mK_old, cfg.alpha1, None)] if cfg.alpha1 != 0.0 else []
    old_C = [(mC_old, cfg.alpha1, None)] if cfg.alpha1 != 0.0 else []
    m_K = sK.combine(old_K + [(H_K, hK, cK), (KtK, s * lam, dK)], -s)
    m_C = sC.combine(old_C + [(H_C, hC, cC), (CtC, s * lam, dC)], -s)
    return m_K, m_C


def _singd_refresh(cfg: _SINGDConfig, K, C, mK_old, mC_old, lay, dtypes, count):
    """One Riemannian step on ``K``, ``C`` (Lin et al. 2024, Fig. 2, lines 3-8)."""
    m_K, m_C = _singd_momenta(cfg, K, C, mK_old, mC_old, lay, dtypes)
    beta = resolve(cfg.lr_cov, count)
    beta_K = beta_C = beta
    if cfg.normalize_lr_cov:
        beta_K = beta / cfg.sK.inf_norm(m_K).clamp(min=1.0)
        beta_C = beta / cfg.sC.inf_norm(m_C).clamp(min=1.0)
    K, C = cfg.sK.descend(K, m_K, beta_K), cfg.sC.descend(C, m_C, beta_C)
    keep = cfg.alpha1 != 0.0
    return K, C, (m_K if keep else ()), (m_C if keep else ())


def _singd_init_layer(cfg, s: LayerSpec, w: Tensor, dtypes):
    K = cfg.sK.eye(s.dim_in, dtypes[0], w.device)
    C = cfg.sC.eye(s.dim_out, dtypes[1], w.device)
    keep = cfg.alpha1 != 0.0
    mK = cfg.sK.zeros(s.dim_in, dtypes[0], w.device) if keep else ()
    mC = cfg.sC.zeros(s.dim_out, dtypes[1], w.device) if keep else ()
    return K, C, mK, mC


def scale_by_singd(
    model: nn.Module, *, lr_cov: ScalarOrSchedule = 1e-2, damping: float = 1e-3,
    alpha1: float | None = None, T: int = 10, structures: tuple = ("dense", "dense"),
    kfac_like: bool = False, preconditioner_dtype: tuple = (None, None),
    normalize_lr_cov: bool = False, process_group: Any = None,
) -> GradientTransformation:
    r"""Structured inverse-free natural-gradient preconditioning (SINGD).

    Per layer, with gradient matrix :math:`V` (``dim_out x dim_in``), captured ``a``
    (:math:`n_a` rows) and ``g``, every ``T`` steps (Lin et al. 2024, Fig. 2):

    .. math::
        H_K &= \Pi_K(K^\top a^\top a K)/n_a,\quad H_C = \Pi_C(C^\top g^\top g\, C) N \\
        m_K &\leftarrow \alpha_1 m_K + \tfrac12\big(c^2 H_K + \lambda\,\kappa^2\,
               \Pi_K(K^\top K) - I\big),\quad c^2 = \mathrm{tr}(H_C)/d_C,\
               \kappa^2 = \mathrm{tr}\,\Pi_C(C^\top C)/d_C \\
        m_C &\leftarrow \alpha_1 m_C + \tfrac12\big(\kappa'^2 H_C + \lambda\, c'^2\,
               \Pi_C(C^\top C) - I\big),\quad \kappa'^2 = \mathrm{tr}(H_K)/d_K,\
               c'^2 = \mathrm{tr}\,\Pi_K(K^\top K)/d_K \\
        K &\leftarrow K (I - \beta_1 m_K),\qquad C \leftarrow C (I - \beta_1 m_C)

    and on every step the output is :math:`C C^\top V K K^\top`. :math:`\Pi` projects onto
    the structure (:mod:`funcopt.transforms.natural_gradient.structures`); ``K``, ``C`` start at ``I``, the
    momenta at 0. With ``kfac_like`` the traces are replaced by 1 and :math:`\alpha_1 = 0`
    (IKFAC, the update close to KFAC). ``N`` is ``num_loss_terms`` of the capture.

    Argument names and defaults are those of the reference package ``singd`` 0.0.5.

    Args:
      model: the module whose supported layers are preconditioned (others pass through).
      lr_cov: :math:`\beta_1`, step size of ``K``, ``C`` (number or schedule; default 1e-2).
      damping: :math:`\lambda` (default 1e-3).
      alpha1: :math:`\alpha_1`, Riemannian momentum (default 0.5; 0 with ``kfac_like``).
      T: update ``K``, ``C`` every ``T`` steps (default 10).
      structures: structures of ``(K, C)``: names from
        :data:`funcopt.transforms.natural_gradient.structures.STRUCTURES` or Structure objects
        (default ``("dense", "dense")``).
      kfac_like: the IKFAC variant (default False).
      preconditioner_dtype: dtypes of ``(K, C)`` (``None``: the weight's; default both None).
      normalize_lr_cov: divide :math:`\beta_1` by :math:`\max(1, \|m\|_\infty)` and scale the
        momentum step by :math:`1-\alpha_1` (default False).
      process_group: ``torch.distributed`` group; ``H_K``, ``H_C`` are averaged over it.

    Extra keywords of ``update``: ``curvature``, required on refresh steps (``count % T ==
    0``); ``refresh`` (True/False, optional): refresh on this step or not, whatever the count.

    Reference: Lin et al., "Structured Inverse-Free Natural Gradient Descent:
    Memory-Efficient & Numerically-Stable KFAC", ICML 2024, arXiv:2312.05705; package
    ``singd`` (github.com/f-dangel/singd).
    """
    if kfac_like and alpha1 not in (None, 0, 0.0):
        raise ValueError(f"kfac_like=True uses no Riemannian momentum; alpha1={alpha1} would "
                         "be ignored: leave alpha1 unset (or 0)")
    alpha1 = (0.0 if kfac_like else 0.5) if alpha1 is None else float(alpha1)
    for name, v in (("lr_cov", lr_cov), ("damping", damping), ("alpha1", alpha1)):
        check_hyperparameter(name, v, low=0.0)
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"T={T!r} must be an int >= 1")
    if len(structures) != 2 or len(preconditioner_dtype) != 2:
        raise ValueError("structures and preconditioner_dtype are pairs: (for K, for C)")
    cfg = _SINGDConfig(get_structure(structures[0]), get_structure(structures[1]), damping,
                       alpha1, lr_cov, kfac_like, normalize_lr_cov, process_group)
    layers = kr.supported(model)

    def dtypes_of(w):
        return tuple(d or w.dtype for d in preconditioner_dtype)

    def init(params):
        kr.check_updates(params, layers, "scale_by_singd", "params")
        K, C, mK, mC = {}, {}, {}, {}
        for name, s in layers.items():
            w = params[s.weight]
            K[name], C[name], mK[name], mC[name] = _singd_init_layer(cfg, s, w, dtypes_of(w))
        return SINGDState(step_counter(params), K, C, mK, mC)

    def update(updates, state, params=None, **extra):
        expect_state(state, SINGDState, "scale_by_singd")
        kr.check_updates(updates, layers, "scale_by_singd", params=params)
        K, C, mK, mC = (dict(d) for d in state[1:])
        due = kr.refresh_due(extra, state.count, T, "scale_by_singd")
        if due is not False:  # a 0-d tensor while tracing: torch.where keeps it when due
            cur = kr.curvature_of(extra, layers, "scale_by_singd", traced=due is not True)
            for name, s in layers.items():
                dt = dtypes_of(updates[s.weight])
                old = (K[name], C[name], mK[name], mC[name])
                new = _singd_refresh(cfg, *old, cur[name], dt, state.count)
                if due is not True:
                    new = tuple(tuple(torch.where(due, a, b) for a, b in zip(n, o))
                                for n, o in zip(new, old))
                K[name], C[name], mK[name], mC[name] = new
        out = dict(updates)
        for name, s in layers.items():
            V = kr.grad_matrix(updates, s)
            Kp, Cp = K[name], C[name]
            nat = cfg.sK.precondition_rows(Kp, kr.cast(V, Kp[0].dtype))  # V K K^T
            nat = cfg.sC.precondition(Cp, kr.cast(nat, Cp[0].dtype))      # C C^T V K K^T
            kr.scatter(out, updates, s, kr.cast(nat, V.dtype))
        return out, SINGDState(increment(state.count), K, C, mK, mC)

    return GradientTransformation(init, update)


def singd(
    model: nn.Module, learning_rate: ScalarOrSchedule = 1e-3, *, momentum: float = 0.9,
    weight_decay: float = 0.0, fallback: GradientTransformation | None = None,
    **singd_options,
) -> GradientTransformation:
    r"""SINGD as in the reference package: structured preconditioning, then weight decay,
    heavy-ball momentum and the learning rate:
    ``chain(scale_by_singd(model, ...), add_decayed_weights(weight_decay), trace(momentum),
    scale_by_learning_rate(learning_rate))``:
    :math:`m \leftarrow \alpha_2 m + (C C^\top V K K^\top + \gamma\theta)`,
    :math:`\theta \leftarrow \theta - \beta_2 m`.

    Args:
      model: the module.
      learning_rate: :math:`\beta_2` (package ``lr``; number or schedule; default 1e-3).
      momentum: :math:`\alpha_2` (default 0.9).
      weight_decay: :math:`\gamma` (default 0).
      fallback: transform for parameters outside supported layers (required if any exist).
      singd_options: ``lr_cov``, ``damping``, ``alpha1``, ``T``, ``structures``,
        ``kfac_like``, ``preconditioner_dtype``, ``normalize_lr_cov``, ``process_group`` of
        :func:`scale_by_singd`.

    Differences from ``singd.optim.SINGD``: the curvature comes from
    :func:`funcopt.func.capture_curvature` (pass ``kfac_approx``/``loss_average`` there);
    for AMP, capture with ``capture_curvature(..., loss_scale=s)``, which returns unscaled
    gradients and ``g`` (there is no scaler inside the transform); the
    package's block-diagonal structure multiplies by ``K`` where its definition (and ours)
    multiplies by ``K^T``.

    Reference: Lin et al., ICML 2024, arXiv:2312.05705.
    """
    from funcopt.compose import chain
    from funcopt.transforms.first_order import scale_by_learning_rate, trace
    from funcopt.transforms.weight_decay import add_decayed_weights

    layers = kr.supported(model)
    natural = chain(scale_by_singd(model, **singd_options), add_decayed_weights(weight_decay),
                    trace(momentum), scale_by_learning_rate(learning_rate))
    return kr.with_fallback(model, layers, natural, fallback, "singd")
