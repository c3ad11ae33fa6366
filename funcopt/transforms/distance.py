"""Step sizes from the distance travelled: DoG, DoWG and COCOB (coin betting).

Each keeps the initial parameters in its state and scales the gradient by a ratio of the
largest distance from them to the accumulated gradient norms, so no learning rate needs tuning.
"""

# ruff: noqa: F405 (the names of the toolkit's star import)
from __future__ import annotations

from typing import Any, NamedTuple

import torch

from funcopt.transforms import first_order as fo
from funcopt.transforms._toolkit import *  # noqa: F403
from funcopt.transforms.parameter_free import _lowest_dtype
from funcopt.transforms.weight_decay import add_decayed_weights

__all__ = [
    "DoGState", "DoWGState", "COCOBState", "scale_by_dog", "dog", "scale_by_dowg", "dowg",
    "scale_by_cocob", "cocob",
]


def _sq_norm(xs: list[Tensor], dtype: torch.dtype) -> Tensor:
    return torch.stack([(n * n).to(dtype) for n in ops.norm(xs)]).sum()


def _copy(params: Any) -> list[Tensor]:
    return [x.detach().clone() for x in tree_leaves(params)]


def _maybe_decay(weight_decay: Any, mask: Any) -> tuple[GradientTransformation, ...]:
    return () if weight_decay is None else (add_decayed_weights(weight_decay, mask),)


class DoGState(NamedTuple):
    """State of :func:`scale_by_dog`: the step count, the starting parameters, the largest
    distance from them so far and the sum of squared gradient norms (Ivgi et al. 2023)."""

    count: Tensor  # type: ignore[assignment]  # optax: a boolean ``is_init_step``
    init_params: Any
    max_dist: Tensor
    sum_sq_norm_grads: Tensor


def scale_by_dog(init_step: tuple[str, float], eps: float = 1e-8) -> GradientTransformation:
    r"""DoG's step size: :math:`u_t = \eta_t g_t`,

    .. math:: \bar r_t = \max(\bar r_{t-1}, \|x_t - x_0\|),\quad G_t = G_{t-1} + \|g_t\|^2,
        \quad \eta_t = \bar r_t / \sqrt{G_t + \epsilon},

    with :math:`\bar r_0` from ``init_step``: ``("distance", r)``: :math:`r`;
    ``("heuristic", c)``: :math:`c(1 + \|x_0\|)`; ``("learning_rate", \eta_0)``:
    :math:`\bar r_0 = 0` and :math:`\eta_1 = \eta_0`.

    Args:
      init_step: the pair above (``dog``'s default ``("heuristic", 1e-6)``).
      eps: :math:`\epsilon` (default 1e-8).

    Needs ``params``. Reference: Ivgi, Hinder, Carmon, "DoG is SGD's Best Friend", ICML 2023;
    optax ``contrib.scale_by_dog``.
    """
    kind, value = init_step
    if kind not in ("distance", "heuristic", "learning_rate"):
        raise ValueError(f"scale_by_dog: init_step=({kind!r}, ...); use 'distance', 'heuristic' "
                         "or 'learning_rate'")
    _check("init_step value", value)
    _check("eps", eps)

    def init(params):
        leaves = tree_leaves(params)
        dt = _lowest_dtype(leaves)
        count = step_counter(params)
        r = torch.zeros((), dtype=dt, device=count.device)
        if kind == "distance":
            r = r + value
        elif kind == "heuristic":
            r = r + value * (1 + torch.sqrt(_sq_norm(leaves, dt)))
        return DoGState(count, _copy(params), r, torch.zeros((), dtype=dt, device=count.device))

    def update(updates, state, params=None, **extra):
        params = require_params(params, "scale_by_dog")
        g, treedef = _leaves(updates, params, "scale_by_dog", state.init_params)
        dt = state.max_dist.dtype
        dist = torch.sqrt(_sq_norm(ops.sub(state.init_params, _as(tree_leaves(params), state.init_params)), dt))
        max_dist = torch.maximum(state.max_dist, dist)
        total = state.sum_sq_norm_grads + _sq_norm(g, dt)
        lr = max_dist / torch.sqrt(total + eps)
        if kind == "learning_rate":
            lr = torch.where(state.count == 0, torch.full_like(lr, value), lr)
        return tree_unflatten(treedef, _as(ops.mul(g, lr), g)), DoGState(
            increment(state.count), state.init_params, max_dist, total)

    return GradientTransformation(init, update)


def dog(
    learning_rate: ScalarOrSchedule = 1.0, init_step: tuple[str, float] = ("heuristic", 1e-6),
    eps: float = 1e-8, weight_decay: ScalarOrSchedule | None = None, mask: Any = None,
) -> GradientTransformation:
    r"""DoG: ``chain([add_decayed_weights(weight_decay, mask)], scale_by_dog(init_step, eps),
    scale_by_learning_rate(learning_rate))``; ``learning_rate`` is a multiplier of DoG's own
    step (default 1). Reference: Ivgi et al. 2023; optax ``contrib.dog``.
    """
    return chain(*_maybe_decay(weight_decay, mask), scale_by_dog(init_step, eps),
                 fo.scale_by_learning_rate(learning_rate))


class DoWGState(NamedTuple):
    """State of :func:`scale_by_dowg`: the starting parameters, the distance-weighted sum of
    squared gradient norms and the squared distance estimate (Khaled et al. 2023)."""

    init_params: Any
    weighted_sq_norm_grads: Tensor
    estim_sq_dist: Tensor


def scale_by_dowg(init_estim_sq_dist: float | None = None, eps: float = 1e-4) -> GradientTransformation:
    r"""DoWG's step size: :math:`u_t = \eta_t g_t`,

    .. math:: \bar r_t^2 = \max(\bar r_{t-1}^2, \|x_t - x_0\|^2),\quad
        v_t = v_{t-1} + \bar r_t^2\|g_t\|^2,\quad \eta_t = \bar r_t^2/(\sqrt{v_t} + \epsilon).

    Args:
      init_estim_sq_dist: :math:`\bar r_0^2` (default None: ``eps``).
      eps: :math:`\epsilon` (default 1e-4).

    Needs ``params``. Reference: Khaled, Mishchenko, Jin, "DoWG Unleashed", NeurIPS 2023;
    optax ``contrib.scale_by_dowg``.
    """
    _check("eps", eps)
    r0 = eps if init_estim_sq_dist is None else init_estim_sq_dist
    _check("init_estim_sq_dist", r0)

    def init(params):
        leaves = tree_leaves(params)
        dt, dev = _lowest_dtype(leaves), step_counter(params).device
        return DoWGState(_copy(params), torch.zeros((), dtype=dt, device=dev),
                         torch.tensor(float(r0), dtype=dt, device=dev))

    def update(updates, state, params=None, **extra):
        params = require_params(params, "scale_by_dowg")
        g, treedef = _leaves(updates, params, "scale_by_dowg", state.init_params)
        dt = state.estim_sq_dist.dtype
        sq = _sq_norm(ops.sub(state.init_params, _as(tree_leaves(params), state.init_params)), dt)
        r2 = torch.maximum(state.estim_sq_dist, sq)
        v = r2 * _sq_norm(g, dt) + state.weighted_sq_norm_grads
        lr = r2 / (torch.sqrt(v) + eps)
        return tree_unflatten(treedef, _as(ops.mul(g, lr), g)), DoWGState(state.init_params, v, r2)

    return GradientTransformation(init, update)


def dowg(
    learning_rate: ScalarOrSchedule = 1.0, init_estim_sq_dist: float | None = None,
    eps: float = 1e-4, weight_decay: ScalarOrSchedule | None = None, mask: Any = None,
) -> GradientTransformation:
    r"""DoWG: ``chain([add_decayed_weights(weight_decay, mask)], scale_by_dowg(...),
    scale_by_learning_rate(learning_rate))``. Reference: Khaled et al. 2023; optax
    ``contrib.dowg``.
    """
    return chain(*_maybe_decay(weight_decay, mask), scale_by_dowg(init_estim_sq_dist, eps),
                 fo.scale_by_learning_rate(learning_rate))


class COCOBState(NamedTuple):
    """State of :func:`scale_by_cocob`: the starting parameters, summed gradients, per-
    coordinate scales, summed absolute gradients and the accumulated reward (Orabona and
    Tommasi 2017)."""

    init_particles: Any
    cumulative_gradients: Any
    scale: Any
    subgradients: Any
    reward: Any


def scale_by_cocob(alpha: float = 100.0, eps: float = 1e-8) -> GradientTransformation:
    r"""COCOB-Backprop (coin betting), per coordinate, with :math:`c_t` the incoming update
    (a gradient):

    .. math:: L_t = \max(L_{t-1}, |c_t|),\ G_t = G_{t-1} + |c_t|,\
        R_t = \max(R_{t-1} - c_t(x_t - x_0), 0),\ C_t = C_{t-1} - c_t,\\
        x_{t+1} = x_0 + \frac{C_t}{L_t\max(G_t + L_t, \alpha L_t)}(L_t + R_t),

    output :math:`u_t = x_{t+1} - x_t` (the whole step, sign included), :math:`L_0 = \epsilon`.

    Args: alpha :math:`\alpha` (default 100); eps :math:`\epsilon` > 0 (default 1e-8).
    Needs ``params``. Reference: Orabona & Tommasi, "Training Deep Networks without Learning
    Rates Through Coin Betting", NeurIPS 2017; optax ``contrib.scale_by_cocob``.
    """
    _check("alpha", alpha, low=0.0, low_inclusive=False)
    _check("eps", eps, low=0.0, low_inclusive=False)

    def init(params):
        leaves = tree_leaves(params)
        z = _zeros(leaves, None)
        return COCOBState(_copy(params), z, _full(leaves, float(eps)), [x.clone() for x in z],
                          [x.clone() for x in z])

    def update(updates, state, params=None, **extra):
        params = require_params(params, "scale_by_cocob")
        c, treedef = _leaves(updates, params, "scale_by_cocob", state.scale)
        p, p0 = _as(tree_leaves(params), c), _as(state.init_particles, c)
        big_l = ops.maximum(_as(state.scale, c), ops.abs(c))
        big_g = ops.add(_as(state.subgradients, c), ops.abs(c))
        r = ops.clamp_min(ops.sub(_as(state.reward, c), ops.mul(c, ops.sub(p, p0))), 0.0)
        big_c = ops.sub(_as(state.cumulative_gradients, c), c)
        bet = ops.div(big_c, ops.mul(big_l, ops.maximum(ops.add(big_g, big_l), ops.mul(big_l, alpha))))
        out = ops.sub(ops.add(p0, ops.mul(bet, ops.add(big_l, r))), p)
        return tree_unflatten(treedef, _as(out, c)), COCOBState(
            state.init_particles, _as(big_c, c), _as(big_l, c), _as(big_g, c), _as(r, c))

    return GradientTransformation(init, update)


def cocob(
    learning_rate: ScalarOrSchedule = 1.0, alpha: float = 100.0, eps: float = 1e-8,
    weight_decay: ScalarOrSchedule = 0.0, mask: Any = None,
) -> GradientTransformation:
    r"""COCOB: ``chain(add_decayed_weights(weight_decay, mask), scale_by_learning_rate(
    learning_rate, flip_sign=False), scale_by_cocob(alpha, eps))`` (the learning rate scales the
    gradients the bettor sees; 1 by default). Reference: Orabona & Tommasi 2017; optax
    ``contrib.cocob``.
    """
    zero = isinstance(weight_decay, (int, float)) and weight_decay == 0
    decay = () if zero else (add_decayed_weights(weight_decay, mask),)
    return chain(*decay, fo.scale_by_learning_rate(learning_rate, flip_sign=False),
                 scale_by_cocob(alpha, eps))
