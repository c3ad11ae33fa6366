"""Sophia: Adam-like momentum preconditioned by a clipped estimate of the Hessian diagonal,
with Hutchinson's estimator of that diagonal."""

# ruff: noqa: F405 (the names of the toolkit's star import)
from __future__ import annotations

from typing import Any, NamedTuple

import optree
import torch

from funcopt.engine import is_tracing
from funcopt.transforms import first_order as fo
from funcopt.transforms._toolkit import *  # noqa: F403
from funcopt.transforms.clipping import _M1, _mix, _normal
from funcopt.transforms.weight_decay import add_decayed_weights

__all__ = ["HutchinsonState", "SophiaState", "hutchinson_estimator_diag_hessian",
           "scale_by_sophia", "sophia"]


class HutchinsonState(NamedTuple):
    """State of :func:`hutchinson_estimator_diag_hessian`: the step count and the seed its
    Rademacher probes are drawn from."""

    count: Tensor  # type: ignore[assignment]  # optax keeps a JAX key instead
    key: Tensor


def hutchinson_estimator_diag_hessian(random_seed: int = 0) -> GradientTransformation:
    r"""Hutchinson's estimate of the Hessian diagonal: :math:`\hat d = z \odot (H z)` with
    Rademacher :math:`z` (:math:`E[\hat d] = \operatorname{diag} H`).

    ``update(updates, state, params, obj_fn=f)`` ignores ``updates`` and returns
    :math:`\hat d` at ``params`` (one Hessian-vector product, ``jvp`` of ``grad``). The signs
    come from a counter-based generator keyed by ``random_seed`` and the step (kept in the
    state), so a run is reproducible; its draws differ from JAX's (optax takes a key).

    Reference: Hutchinson 1989; optax ``contrib.hutchinson_estimator_diag_hessian``.
    """
    if not isinstance(random_seed, int) or isinstance(random_seed, bool):
        raise TypeError(f"random_seed must be an int; got {type(random_seed).__name__}")

    def init(params):
        count = step_counter(params)
        return HutchinsonState(count, torch.tensor(random_seed, dtype=torch.int64, device=count.device))

    def update(updates, state, params=None, *, obj_fn=None, **extra):
        params = require_params(params, "hutchinson_estimator_diag_hessian")
        if obj_fn is None:
            raise ValueError("hutchinson_estimator_diag_hessian: update needs obj_fn=f (params -> "
                             "loss) by keyword")
        p, treedef = tree_leaves(params), optree.tree_structure(params)
        count = increment(state.count)
        sizes = [x.numel() for x in p]
        z = torch.sign(_normal(sum(sizes), _mix(_mix(state.key) ^ (count * _M1)), torch.float32))
        signs = [s.view(x.shape).to(x.dtype) for s, x in zip(torch.split(z, sizes), p)]
        tangent = tree_unflatten(treedef, signs)
        hvp = torch.func.jvp(torch.func.grad(obj_fn), (params,), (tangent,))[1]
        out = ops.mul(_as(tree_leaves(hvp), p), signs)
        return tree_unflatten(treedef, out), HutchinsonState(count, state.key)

    return GradientTransformation(init, update)


class SophiaState(NamedTuple):
    """State of :func:`scale_by_sophia`: the step count, the momentum ``mu``, the diagonal
    Hessian estimate ``nu`` and the estimator's state (Liu et al. 2023)."""

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count by design (optax's name)
    mu: Any
    nu: Any
    hessian_fn_state: Any


def scale_by_sophia(
    b1: float = 0.965, b2: float = 0.99, eps: float = 1e-8, gamma: float = 0.01,
    clip_threshold: float | None = 1.0, update_interval: int = 10,
    hessian_diagonal_fn: GradientTransformation | None = None,
    mu_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    r"""Sophia's scaling.

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad
        u_t = \operatorname{clip}\Big(\frac{m_t/(1-\beta_1^t)}{\max(\gamma h_{t-1}, \epsilon)},
        \rho\Big),\\
        h_t = \beta_2 h_{t-1} + (1-\beta_2)\hat d_t \text{ every ``update_interval`` steps
        (from step 0), else } h_t = h_{t-1},

    :math:`\hat d_t` from ``hessian_diagonal_fn`` (default
    :func:`hutchinson_estimator_diag_hessian`), which receives ``update``'s extra keyword
    arguments (the estimator needs ``obj_fn``).

    Args:
      b1: :math:`\beta_1` (default 0.965). b2: :math:`\beta_2` (default 0.99).
      eps: :math:`\epsilon` (default 1e-8). gamma: :math:`\gamma` (default 0.01).
      clip_threshold: :math:`\rho` (default 1; None: no clipping).
      update_interval: steps between Hessian estimates (default 10).
      hessian_diagonal_fn: the estimator transform (default Hutchinson, seed 0).
      mu_dtype: dtype of :math:`m` (default: the parameters').

    optax's ``verbose`` and ``print_win_rate_every_n_steps`` (which only print) are not taken:
    funcopt prints nothing; the clipping is visible in the updates and the state.

    Eager steps estimate the Hessian only on the steps that use it (a host read of the
    counter); under ``torch.compile``/``torch.func`` it is estimated every step and kept on
    those steps. Reference: Liu et al., "Sophia: A Scalable Stochastic Second-order
    Optimizer for Language Model Pre-training", ICLR 2024; optax ``contrib.scale_by_sophia``.
    """
    _check_beta("b1", b1)
    _check_beta("b2", b2)
    _check("eps", eps)
    _check("gamma", gamma)
    if clip_threshold is not None:
        _check("clip_threshold", clip_threshold, low=0.0, low_inclusive=False)
    if not isinstance(update_interval, int) or update_interval < 1:
        raise ValueError(f"scale_by_sophia: update_interval={update_interval!r} must be an int >= 1")
    hess = hessian_diagonal_fn or hutchinson_estimator_diag_hessian()

    def init(params):
        leaves = tree_leaves(params)
        return SophiaState(step_counter(params), _zeros(leaves, mu_dtype), _zeros(leaves, None),
                           hess.init(params))

    def update(updates, state, params=None, **extra):
        params = require_params(params, "scale_by_sophia")
        g, treedef = _leaves(updates, params, "scale_by_sophia", state.mu)
        count = increment(state.count)
        mu = _moment(_as(state.mu, g), g, b1)
        m_hat = ops.div(mu, 1 - b1 ** _steps(count, g))
        out = ops.div(m_hat, ops.clamp_min(ops.mul(_as(state.nu, g), gamma), eps))
        if clip_threshold is not None:
            out = ops.clamp_max(ops.clamp_min(out, -clip_threshold), clip_threshold)
        due = state.count % update_interval == 0
        nu, hess_state = state.nu, state.hessian_fn_state
        if is_tracing() or bool(due):
            d, new_hess = hess.update(updates, state.hessian_fn_state, params, **extra)
            new_nu = _as(_moment(_as(state.nu, g), _as(tree_leaves(d), g), b2), state.nu)
            if is_tracing():
                new_nu = [torch.where(due, a, b) for a, b in zip(new_nu, state.nu)]
                new_hess = optree.tree_map(lambda a, b: torch.where(due, a, b), new_hess,
                                           state.hessian_fn_state)
            nu, hess_state = new_nu, new_hess
        return tree_unflatten(treedef, _as(out, g)), SophiaState(
            count, _as(mu, state.mu), nu, hess_state)

    return GradientTransformation(init, update)


def sophia(
    learning_rate: ScalarOrSchedule, b1: float = 0.965, b2: float = 0.99, eps: float = 1e-8,
    weight_decay: ScalarOrSchedule = 1e-4, weight_decay_mask: Any = None, gamma: float = 0.01,
    clip_threshold: float | None = 1.0, update_interval: int = 10,
    hessian_diagonal_fn: GradientTransformation | None = None,
    mu_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    r"""Sophia: ``chain(scale_by_sophia(...), add_decayed_weights(weight_decay,
    weight_decay_mask), scale_by_learning_rate(learning_rate))``; ``update`` needs
    ``obj_fn`` = the loss as a function of the params (for the default Hessian estimator).
    Arguments as :func:`scale_by_sophia` (positions as optax's, without its printing flags),
    plus ``learning_rate`` :math:`\eta`, ``weight_decay`` (default 1e-4, decoupled) and
    ``weight_decay_mask``.

    Reference: Liu et al., ICLR 2024; optax ``contrib.sophia``.
    """
    zero = isinstance(weight_decay, (int, float)) and weight_decay == 0
    decay = () if zero else (add_decayed_weights(weight_decay, weight_decay_mask),)
    return chain(scale_by_sophia(b1, b2, eps, gamma, clip_threshold, update_interval,
                                 hessian_diagonal_fn, mu_dtype),
                 *decay, fo.scale_by_learning_rate(learning_rate))
