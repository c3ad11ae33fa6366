"""KFAC: Kronecker-factored approximate curvature (Martens & Grosse 2015; Grosse & Martens 2016
for convolutions), as a pure transform fed by :func:`funcopt.func.capture_curvature`.

The workflow (curvature passed to ``update`` as the extra keyword ``curvature``) is that of
:mod:`funcopt.transforms.natural_gradient`.

Host syncs (eager steps): the step counter is read once per step (refresh decision) unless
``T=1`` or the extra keyword ``refresh=True/False`` of ``update`` decides (it overrides the
every-``T`` schedule); on refresh steps the factors are checked for finiteness and the
Cholesky factorisation for success. While :func:`funcopt.engine.is_tracing`
(``torch.compile``, ``torch.func.vmap``) there is no host read: without ``refresh`` the
refresh is computed on every step and ``torch.where`` keeps it on refresh steps only (so
``curvature`` must then be passed on every step), a failed Cholesky factorisation picks the
eigh pseudo-inverse the same way (:class:`funcopt.solvers.Fallback`), and non-finite factors
are not refused (they make the update non-finite, which :func:`funcopt.apply_if_finite` can
skip).

Under :func:`funcopt.jit` on CUDA, steps without a refresh (``refresh=False``) are captured
as CUDA graphs; a refresh step is not capturable, since the eigh fallback it computes
(``torch.linalg.eigh``) reads its error code on the host: run refresh steps eagerly or with
``fo.jit(step, graph=False)``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from funcopt.base import (
    GradientTransformation,
    ScalarOrSchedule,
    check_hyperparameter,
    current_learning_rate,
    increment,
    resolve,
    step_counter,
)
from funcopt.engine import expect_state, is_tracing
from funcopt.func.capture import kronecker_factors
from funcopt.transforms.natural_gradient import kronecker as kr

__all__ = ["KFACState", "scale_by_kfac", "kfac"]


class KFACState(NamedTuple):
    """``count``; per layer the running factors ``(A, G)`` and the preconditioner:
    ``(A_inv, G_inv)`` for ``method="inverse"``, ``(Q_A, s_A, Q_G, s_G)`` for ``"eigh"``."""

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count by design (optax's name)
    factors: dict[str, tuple[Tensor, Tensor]]
    precond: dict[str, tuple[Tensor, ...]]
    learning_rate: Tensor   # eta of the KL clip (0-d float); 1 when there is no clip


def _damped_inverse(m: Tensor, gamma: Tensor) -> Tensor:
    """``(m + gamma I)^{-1}`` through the solver layer, in float32 or wider: Cholesky, and where
    it reports failure the eigh pseudo-inverse (``solvers.Fallback(Cholesky(),
    SVD(hermitian=True))``), so a singular, undamped factor still gives finite numbers. While
    tracing, both are computed and ``torch.where`` picks (no host read; the eager path checks
    its input and decides on the host)."""
    from funcopt import solvers
    from funcopt.solvers.operators import dense

    work = m if m.dtype in (torch.float32, torch.float64) else m.float()
    # work + gamma I with no identity matrix built (out of place: vmap may batch gamma only)
    damped = work.diagonal_scatter(work.diagonal() + kr.cast(gamma, work.dtype))
    op = dense(damped, symmetric=True, positive_definite=True)
    eye = kr.eye(work.shape[0], work.dtype, work.device)
    solver = solvers.Fallback(solvers.Cholesky(), solvers.SVD(hermitian=True), eager=not is_tracing())
    if is_tracing():
        return solver.compute(solver.init(op), eye).value.to(m.dtype)
    return solver.solve(op, eye).value.to(m.dtype)


def _eigh(m: Tensor) -> tuple[Tensor, Tensor]:
    work = m if m.dtype in (torch.float32, torch.float64) else m.float()
    s, q = torch.linalg.eigh(work)
    return q.to(m.dtype), s.clamp(min=0).to(m.dtype)


def _kfac_refresh(A: Tensor, G: Tensor, damping: Any, method: str, pi: bool) -> tuple:
    if method == "eigh":
        return (*_eigh(A), *_eigh(G))
    lam = torch.as_tensor(damping, dtype=torch.float64, device=A.device)
    if pi:
        ta = A.diagonal().mean().double().clamp(min=1e-30)
        tg = G.diagonal().mean().double().clamp(min=1e-30)
        ratio = torch.sqrt(ta / tg)
    else:
        ratio = torch.ones((), dtype=torch.float64, device=A.device)
    return (_damped_inverse(A, ratio * lam.sqrt()), _damped_inverse(G, lam.sqrt() / ratio))


def _kfac_apply(mat: Tensor, pre: tuple, damping: Any) -> Tensor:
    if len(pre) == 2:
        a_inv, g_inv = pre
        return g_inv @ kr.cast(mat, a_inv.dtype) @ a_inv
    qa, sa, qg, sg = pre
    v = qg.T @ kr.cast(mat, qa.dtype) @ qa
    return qg @ (v / (sg[:, None] * sa[None, :] + damping)) @ qa.T


def _check_finite(A: Tensor, G: Tensor, name: str, t: int, damping: Any) -> None:
    """Refuse non-finite factors with the cause and the remedies (one host sync)."""
    if not bool(torch.isfinite(A).all() & torch.isfinite(G).all()):
        raise FloatingPointError(
            f"scale_by_kfac: the Kronecker factors of layer {name!r} are not finite at step "
            f"{t}: the curvature came from a diverged model (NaN/inf loss or parameters). "
            f"Lower the learning rate, raise damping (now {damping}), or pass kl_clip "
            "(e.g. kfac(..., kl_clip=1e-3)); check the inputs for NaN.")


def _clip(nat: dict, grads: dict, kl_clip: float, lr: Tensor) -> dict:
    """KL clipping (Ba et al. 2017): scale every ``u_l`` by ``min(1, sqrt(kappa / (eta^2
    sum_l |<V_l, u_l>|)))``; no host sync."""
    names = list(nat)
    vg = torch.stack([_inner64(nat[k], grads[k]) for k in names]).sum().abs()
    nu = torch.sqrt(kl_clip / (lr.double() ** 2 * vg).clamp(min=1e-300)).clamp(max=1.0)
    return {k: nat[k] * kr.cast(nu, nat[k].dtype) for k in names}


def _inner64(u: Tensor, v: Tensor) -> Tensor:
    """``<u, v>`` summed in float64: a float32 (or float64) product summed with a float64
    accumulator, else (16-bit) the product of float64 copies."""
    if u.dtype == v.dtype and u.dtype in (torch.float32, torch.float64):
        return torch.sum(u * v, dtype=torch.float64)
    return (u.double() * v.double()).sum()


def scale_by_kfac(
    model: nn.Module, *, damping: float = 1e-3, decay: float = 0.95, T: int = 10,
    method: str = "inverse", pi_damping: bool = True, factor_dtype: torch.dtype | None = None,
    process_group: Any = None, kl_clip: float | None = None,
    learning_rate: ScalarOrSchedule = 1.0,
) -> GradientTransformation:
    r"""Kronecker-factored preconditioning (KFAC) of every supported layer's gradient.

    For a layer with gradient matrix :math:`V = [\nabla W, \nabla b]`, captured ``a`` and
    ``g`` (:func:`funcopt.func.capture_curvature`):

    .. math::
        \bar A_t = \rho \bar A_{t-1} + (1-\rho) A_t,\quad A_t = a^\top a / n_a;\qquad
        \bar G_t = \rho \bar G_{t-1} + (1-\rho) G_t,\quad G_t = N g^\top g

    (the first step takes :math:`\bar A = A_1`), and every :math:`T` steps the preconditioner
    is refreshed. ``method="inverse"`` (Martens & Grosse 2015, factored Tikhonov damping):
    :math:`u = (\bar G + \tfrac{\sqrt\lambda}{\pi} I)^{-1} V (\bar A + \pi\sqrt\lambda I)^{-1}`
    with :math:`\pi = \sqrt{(\mathrm{tr}\bar A / d_A)/(\mathrm{tr}\bar G / d_G)}` (or 1).
    ``method="eigh"``: exact damping of the Kronecker product,
    :math:`\mathrm{vec}(u) = (\bar G \otimes \bar A + \lambda I)^{-1}\mathrm{vec}(V)` through the
    eigen-decompositions :math:`\bar A = Q_A S_A Q_A^\top`, :math:`\bar G = Q_G S_G Q_G^\top`.

    Args:
      model: the module whose supported layers are preconditioned; other entries of the
        updates pass through unchanged.
      damping: :math:`\lambda > 0` (default 1e-3). A number.
      decay: :math:`\rho \in [0, 1)`, the running-average decay of the factors (default 0.95).
      T: refresh the inverses (or eigenbases) every ``T`` steps (default 10); the factors are
        averaged only on those steps, so ``curvature`` is needed only then.
      method: ``"inverse"`` (default) or ``"eigh"``.
      pi_damping: use the :math:`\pi` split of the damping (default True; "inverse" only).
      factor_dtype: dtype of the factors (default: the weight's dtype); e.g. float32 for
        bf16 weights.
      process_group: a ``torch.distributed`` group; the new factors are averaged over it.
      kl_clip: :math:`\kappa`, the KL-clipping trust region of Ba et al. (2017): all layers'
        outputs are scaled by :math:`\nu = \min(1, \sqrt{\kappa / (\eta^2 \sum_l
        |\langle V_l, u_l\rangle|)})`. ``None`` (default): no clipping.
      learning_rate: :math:`\eta` used by ``kl_clip`` only (number or schedule; default 1).
        As a number it is kept in ``state.learning_rate`` and read from there, so writing
        that field changes it; as a schedule, ``learning_rate(count)`` is stored there.

    Extra keywords of ``update``: ``curvature`` (a :class:`funcopt.func.Captured` or its
    ``layers`` dict), required on refresh steps (``count % T == 0``); ``refresh``
    (True/False, optional): refresh on this step or not, whatever the count.

    A refresh whose factors are not finite (the loss or the parameters diverged) raises a
    ``FloatingPointError`` naming the layer and the remedies.

    Reference: Martens & Grosse, "Optimizing Neural Networks with Kronecker-factored
    Approximate Curvature", ICML 2015; Grosse & Martens, ICML 2016 (convolutions); Ba, Grosse
    & Martens, "Distributed Second-Order Optimization using Kronecker-Factored
    Approximations", ICLR 2017 (KL clipping).
    """
    check_hyperparameter("damping", damping, low=0.0)
    check_hyperparameter("decay", decay, low=0.0, high=1.0, high_inclusive=False)
    if method not in ("inverse", "eigh"):
        raise ValueError(f"method={method!r}: pass 'inverse' or 'eigh'")
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"T={T!r} must be an int >= 1")
    if method == "eigh" and not damping > 0:
        raise ValueError("method='eigh' needs damping > 0 (the eigenvalues may be 0)")
    if kl_clip is not None:
        check_hyperparameter("kl_clip", kl_clip, low=0.0, low_inclusive=False)
    check_hyperparameter("learning_rate", learning_rate, low=0.0)
    layers = kr.supported(model)

    def init(params):
        kr.check_updates(params, layers, "scale_by_kfac", "params")
        factors, precond = {}, {}
        for name, s in layers.items():
            w = params[s.weight]
            dt = factor_dtype or w.dtype
            A = torch.zeros(s.dim_in, s.dim_in, dtype=dt, device=w.device)
            G = torch.zeros(s.dim_out, s.dim_out, dtype=dt, device=w.device)
            factors[name] = (A, G)
            eye_a, eye_g = kr.eye(s.dim_in, dt, w.device), kr.eye(s.dim_out, dt, w.device)
            if method == "inverse":
                precond[name] = (eye_a, eye_g)
            else:
                precond[name] = (eye_a, torch.ones(s.dim_in, dtype=dt, device=w.device),
                                 eye_g, torch.ones(s.dim_out, dtype=dt, device=w.device))
        count = step_counter(params)
        lr = resolve(learning_rate, count)
        w0 = params[next(iter(layers.values())).weight]
        lr = torch.as_tensor(lr, dtype=torch.float32, device=w0.device).clone()
        return KFACState(count, factors, precond, lr)

    def refreshed(old, cur, name, t):
        """The averaged factors of layer ``name`` (``old``: the state's) and their
        preconditioner (``t``: the step, a number in eager steps, a 0-d tensor while
        tracing)."""
        A0, G0 = old
        A, G = kr.all_reduce_mean(list(kronecker_factors(cur[name], A0.dtype)), process_group)
        if isinstance(t, Tensor):
            A = torch.where(t > 0, decay * A0 + (1 - decay) * A, A)
            G = torch.where(t > 0, decay * G0 + (1 - decay) * G, G)
        else:
            if t > 0:
                A, G = decay * A0 + (1 - decay) * A, decay * G0 + (1 - decay) * G
            _check_finite(A, G, name, t, damping)
        return (A, G), _kfac_refresh(A, G, damping, method, pi_damping)

    def update(updates, state, params=None, **extra):
        expect_state(state, KFACState, "scale_by_kfac")
        kr.check_updates(updates, layers, "scale_by_kfac", params=params)
        factors, precond = dict(state.factors), dict(state.precond)
        due = kr.refresh_due(extra, state.count, T, "scale_by_kfac")
        if due is not False:  # a 0-d tensor while tracing: torch.where keeps it when due
            cur = kr.curvature_of(extra, layers, "scale_by_kfac", traced=due is not True)
            t = state.count if is_tracing() else kr.host_count(state.count)
            for name in layers:
                new_f, new_p = refreshed(factors[name], cur, name, t)
                if due is not True:
                    new_f = tuple(torch.where(due, a, b) for a, b in zip(new_f, factors[name]))
                    new_p = tuple(torch.where(due, a, b) for a, b in zip(new_p, precond[name]))
                factors[name], precond[name] = new_f, new_p
        lr = current_learning_rate(learning_rate, state.learning_rate, state.count)
        grads = {name: kr.grad_matrix(updates, s) for name, s in layers.items()}
        nat = {name: _kfac_apply(V, precond[name], damping) for name, V in grads.items()}
        if kl_clip is not None:
            nat = _clip(nat, grads, kl_clip, lr)
        out = dict(updates)
        for name, s in layers.items():
            kr.scatter(out, updates, s, nat[name])
        return out, KFACState(increment(state.count), factors, precond, lr)

    return GradientTransformation(init, update)


def kfac(
    model: nn.Module, learning_rate: ScalarOrSchedule = 1e-3, *, momentum: float = 0.0,
    weight_decay: float = 0.0, kl_clip: float | None = 1e-3,
    fallback: GradientTransformation | None = None, **kfac_options,
) -> GradientTransformation:
    r"""KFAC with KL clipping, momentum and weight decay:
    ``chain(scale_by_kfac(model, ...), add_decayed_weights(weight_decay), trace(momentum),
    scale_by_learning_rate(learning_rate))``, i.e. :math:`\theta \leftarrow \theta - \eta\,
    m`, :math:`m \leftarrow \mu m + (F^{-1}\nabla + \gamma\theta)`.

    Args:
      model: the module; learning_rate: :math:`\eta` (number or schedule, default 1e-3);
      momentum: :math:`\mu` (default 0); weight_decay: :math:`\gamma` (default 0);
      kl_clip: :math:`\kappa` of :func:`scale_by_kfac` (default 1e-3, as Ba et al. 2017 and
        the kfac-pytorch package; ``None`` turns it off). With a small damping (the default
        1e-3) and no clipping, KFAC's steps are unbounded in directions of tiny curvature
        and training with a fixed learning rate can diverge;
      fallback: transform for parameters outside supported layers (required if any exist);
      kfac_options: ``damping``, ``decay``, ``T``, ``method``, ``pi_damping``,
        ``factor_dtype``, ``process_group`` of :func:`scale_by_kfac`.

    Reference: Martens & Grosse, ICML 2015; Ba et al., ICLR 2017.
    """
    from funcopt.compose import chain
    from funcopt.transforms.first_order import scale_by_learning_rate, trace
    from funcopt.transforms.weight_decay import add_decayed_weights

    layers = kr.supported(model)
    pre = scale_by_kfac(model, kl_clip=kl_clip, learning_rate=learning_rate, **kfac_options)
    natural = chain(pre, add_decayed_weights(weight_decay),
                    trace(momentum), scale_by_learning_rate(learning_rate))
    return kr.with_fallback(model, layers, natural, fallback, "kfac")
