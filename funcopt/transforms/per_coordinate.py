"""Adaptive per-coordinate scalings: Adamax, RMSprop, AdaGrad (and AdaGrad-Norm), Lion, LaProp
and ADOPT.

Each function builds one :class:`~funcopt.base.GradientTransformation` whose update runs over
the list of leaves with ``torch._foreach_*`` ops and never synchronises with the host. The
shared helpers live in :mod:`funcopt.transforms.first_order`.
"""

# ruff: noqa: F405 (the names of the toolkit's star import)
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from funcopt.base import TransformInitFn
from funcopt.engine import one_minus_pow
from funcopt.transforms._toolkit import *  # noqa: F403

__all__ = [
    "ScaleByAdamaxState", "ScaleByRmsState", "ScaleByRStdDevState", "ScaleByAdagradState",
    "ScaleByAdagradNormState", "ScaleByLionState", "ScaleByLapropState", "ScaleByAdoptState",
    "scale_by_adamax", "scale_by_rms", "scale_by_adagrad", "scale_by_adagrad_norm",
    "scale_by_lion", "scale_by_laprop", "scale_by_adopt",
]

# --------------------------------------------------------------------------- adamax

def _zero_moments_init(state_cls: type) -> TransformInitFn:
    """The ``init`` of a ``(count, mu, nu)`` state: the step counter and two zero moments,
    one tensor per leaf in the parameters' dtype (shared by the Adam-like scalings)."""

    def init(params):
        leaves = tree_leaves(params)
        return state_cls(step_counter(params), _zeros(leaves, None), _zeros(leaves, None))

    return init


class ScaleByAdamaxState(NamedTuple):
    """State of :func:`scale_by_adamax`: ``count``, the step t; ``mu``, the first-moment EMA;
    ``nu``, the exponentially weighted infinity norm :math:`u_t`."""

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count by design (optax's name)
    mu: Any
    nu: Any


def scale_by_adamax(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> GradientTransformation:
    r"""Adamax, Adam's infinity-norm variant.

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad u_t^\infty = \max(\beta_2 u_{t-1}^\infty,
        |g_t| + \epsilon),\quad u_t = \frac{m_t}{(1-\beta_1^t)\, u_t^\infty}.

    Args:
      b1: :math:`\beta_1` (default 0.9). b2: :math:`\beta_2` (default 0.999).
      eps: :math:`\epsilon` (default 1e-8), as torch.optim.Adamax and optax place it.

    Reference: Kingma & Ba 2015, Sec. 7.1; optax ``scale_by_adamax``; torch.optim.Adamax.
    """
    _check_beta("b1", b1)
    _check_beta("b2", b2)
    _check("eps", eps)

    init = _zero_moments_init(ScaleByAdamaxState)

    def step(g, mu, nu, count):
        m = _moment(mu, g, b1)
        u = ops.maximum(ops.mul(nu, b2), ops.add(ops.abs(g), eps))
        return ops.div(ops.div(m, one_minus_pow(b1, _steps(count, g))), u), m, u

    return GradientTransformation(init, moments_update("scale_by_adamax", ScaleByAdamaxState, step))


# --------------------------------------------------------------------------- rms / adagrad


class ScaleByRmsState(NamedTuple):
    """State of :func:`scale_by_rms`: ``count``, the step t, and ``nu``, the EMA of squared
    gradients."""

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count by design (optax's name)
    nu: Any


class ScaleByRStdDevState(NamedTuple):
    """State of :func:`scale_by_rms` with ``centered=True``: ``count``, the step t; ``mu`` and
    ``nu``, the EMAs of the gradients and of their squares."""

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count by design (optax's name)
    mu: Any
    nu: Any


def _inv_root(xs: TensorList, eps: float, eps_in_sqrt: bool) -> TensorList:
    """``1/sqrt(x + eps)`` when ``eps_in_sqrt`` else ``1/(sqrt(x) + eps)``."""
    if eps_in_sqrt:
        return ops.rsqrt(ops.add(xs, eps))
    return ops.reciprocal(ops.add(ops.sqrt(xs), eps))


def scale_by_rms(
    decay: float = 0.9, eps: float = 1e-8, initial_scale: float = 0.0, eps_in_sqrt: bool = True,
    bias_correction: bool = False, *, centered: bool = False,
) -> GradientTransformation:
    r"""RMSprop's scaling, optionally centred.

    .. math::
        v_t = \rho v_{t-1} + (1-\rho) g_t^2,\quad s_t = v_t \;(\text{or } v_t - m_t^2
        \text{ if centered, } m_t = \rho m_{t-1} + (1-\rho) g_t),\\
        u_t = g_t / \sqrt{s_t + \epsilon}\;\text{(eps\_in\_sqrt)}\quad\text{or}\quad
        u_t = g_t / (\sqrt{s_t} + \epsilon).

    ``eps_in_sqrt=True`` is optax's default; torch.optim.RMSprop adds ``eps`` outside the
    square root: ``scale_by_rms(decay=alpha, eps=eps, eps_in_sqrt=False)`` reproduces it
    (including ``centered``). Negative round-off in ``v_t - m_t^2`` is clamped to 0.

    The positional order is optax's (``decay, eps, initial_scale, eps_in_sqrt,
    bias_correction``); ``centered=True`` is optax's ``scale_by_stddev``.

    Args:
      decay: :math:`\rho` (torch's ``alpha``), default 0.9.
      eps: :math:`\epsilon`, default 1e-8.
      initial_scale: :math:`v_0`, default 0.
      eps_in_sqrt: where :math:`\epsilon` goes (default True, optax).
      bias_correction: divide :math:`m_t, v_t` by :math:`1-\rho^t` (default False).
      centered: keyword-only; subtract the squared mean (Graves 2013), default False.

    Reference: Tieleman & Hinton, Lecture 6.5, 2012; optax ``scale_by_rms`` /
    ``scale_by_stddev``; torch.optim.RMSprop.
    """
    _check_beta("decay", decay)
    _check("eps", eps)
    _check("initial_scale", initial_scale)

    def init(params):
        leaves, count = tree_leaves(params), step_counter(params)
        nu = _full(leaves, initial_scale)
        return ScaleByRStdDevState(count, _zeros(leaves, None), nu) if centered else (
            ScaleByRmsState(count, nu))

    def step(g, state, count):
        nu = _moment_sq(_as(state.nu, g), g, decay)
        bc = one_minus_pow(decay, _steps(count, g)) if bias_correction else None
        s = ops.div(nu, bc) if bias_correction else nu
        if centered:
            mu = _moment(_as(state.mu, g), g, decay)
            m = ops.div(mu, bc) if bias_correction else mu
            s = ops.clamp_min(ops.addcmul(s, m, m, value=-1.0), 0.0)
        out = ops.mul(g, _inv_root(s, eps, eps_in_sqrt))
        new = replace(state, count=count, nu=_as(nu, state.nu))
        if centered:
            new = replace(new, mu=_as(mu, state.mu))
        return out, new

    states = (ScaleByRmsState, ScaleByRStdDevState)
    return GradientTransformation(init, counted_update("scale_by_rms", states, step, "nu"))


class ScaleByAdagradState(NamedTuple):
    r"""State of :func:`scale_by_adagrad`: ``sum_of_squares``, :math:`\sum_s g_s^2` per element
    (a tree like the params)."""

    sum_of_squares: Any


def scale_by_adagrad(
    initial_accumulator_value: float = 0.1, eps: float = 1e-7, *, eps_in_sqrt: bool = True
) -> GradientTransformation:
    r"""AdaGrad's scaling by the root of the sum of squared gradients.

    .. math::
        s_t = s_{t-1} + g_t^2,\; s_0 = \text{initial\_accumulator\_value},\quad
        u_t = g_t/\sqrt{s_t + \epsilon}\;\text{(eps\_in\_sqrt)}\;\text{or}\;g_t/(\sqrt{s_t}+\epsilon).

    The defaults are optax's ``scale_by_rss``; torch.optim.Adagrad is
    ``scale_by_adagrad(0.0, 1e-10, eps_in_sqrt=False)``. With ``eps_in_sqrt`` an entry whose sum
    is still 0 gets update 0 (as optax).

    Args:
      initial_accumulator_value: :math:`s_0` >= 0 (default 0.1).
      eps: :math:`\epsilon` >= 0 (default 1e-7).
      eps_in_sqrt: add :math:`\epsilon` inside (default, optax) or outside (torch) the root.

    Reference: Duchi, Hazan, Singer, JMLR 2011; optax ``scale_by_rss``; torch.optim.Adagrad.
    """
    _check("initial_accumulator_value", initial_accumulator_value)
    _check("eps", eps)

    def init(params):
        return ScaleByAdagradState(_full(tree_leaves(params), initial_accumulator_value))

    def update(updates, state, params=None, **extra):
        expect_state(state, ScaleByAdagradState, "scale_by_adagrad")
        g, treedef = _leaves(updates, params, "scale_by_adagrad", state.sum_of_squares)
        if not g:
            return updates, state
        s = ops.addcmul(_as(state.sum_of_squares, g), g, g)
        if eps_in_sqrt:
            # An entry whose sum is still 0 gets 0, not 0 * rsqrt(0): take the root of
            # max(s + eps, 1 - sign(s)) (= s + eps wherever s > 0) and multiply by sign(s).
            nonzero = ops.sign(s)
            zero_at = ops.add(ops.neg(nonzero), 1.0)
            root = ops.rsqrt(ops.maximum(ops.add(s, eps), zero_at))
            scaling = ops.mul(root, nonzero)
        else:
            scaling = _inv_root(s, eps, eps_in_sqrt)
        out = ops.mul(g, scaling)
        return tree_unflatten(treedef, _as(out, g)), ScaleByAdagradState(_as(s, state.sum_of_squares))

    return GradientTransformation(init, update)


class ScaleByAdagradNormState(NamedTuple):
    r"""State of :func:`scale_by_adagrad_norm`: ``sum_of_norms``, the 0-d running sum
    :math:`b_t^2 = b_{t-1}^2 + \|g_t\|^2`."""

    sum_of_norms: Tensor


def scale_by_adagrad_norm(
    initial_accumulator_value: float = 0.0, eps: float = 1e-10
) -> GradientTransformation:
    r"""AdaGrad-Norm: one scalar step size for the whole tree.

    .. math::
        b_t^2 = b_{t-1}^2 + \|g_t\|^2,\quad u_t = g_t / (b_t + \epsilon),

    :math:`\|g_t\|` the l2 norm over every leaf together. Chained with
    ``scale_by_learning_rate(eta)`` this is :math:`x_{t+1} = x_t - \eta g_t / b_t`.

    Args:
      initial_accumulator_value: :math:`b_0^2` >= 0 (default 0).
      eps: :math:`\epsilon` >= 0 guarding :math:`b_t = 0` (default 1e-10).

    Reference: Ward, Wu, Bottou, "AdaGrad stepsizes: sharp convergence over nonconvex
    landscapes", ICML 2019 (Algorithm 1).
    """
    _check("initial_accumulator_value", initial_accumulator_value)
    _check("eps", eps)

    def init(params):
        leaves, count = tree_leaves(params), step_counter(params)
        return ScaleByAdagradNormState(torch.tensor(
            float(initial_accumulator_value), dtype=scalar_dtype(leaves), device=count.device))

    def update(updates, state, params=None, **extra):
        expect_state(state, ScaleByAdagradNormState, "scale_by_adagrad_norm")
        g, treedef = _leaves(updates, params, "scale_by_adagrad_norm")
        if not g:
            return updates, state
        b2 = state.sum_of_norms
        norms = torch.stack([n.to(b2.dtype) for n in ops.norm(g)])
        b2 = b2 + (norms * norms).sum()
        out = ops.div(g, torch.sqrt(b2) + eps)
        return tree_unflatten(treedef, _as(out, g)), ScaleByAdagradNormState(b2)

    return GradientTransformation(init, update)


# --------------------------------------------------------------------------- lion / laprop / adopt


class ScaleByLionState(NamedTuple):
    """State of :func:`scale_by_lion`: ``count``, the step t, and ``mu``, Lion's momentum."""

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count by design (optax's name)
    mu: Any


def scale_by_lion(
    b1: float = 0.9, b2: float = 0.99, mu_dtype: torch.dtype | None = None
) -> GradientTransformation:
    r"""Lion's sign update.

    .. math::
        u_t = \operatorname{sign}(\beta_1 m_{t-1} + (1-\beta_1) g_t),\quad
        m_t = \beta_2 m_{t-1} + (1-\beta_2) g_t.

    Args:
      b1: :math:`\beta_1`, interpolation for the update (default 0.9).
      b2: :math:`\beta_2`, decay of the momentum (default 0.99).
      mu_dtype: dtype of the stored momentum (default: the parameters' dtype).

    Reference: Chen et al., "Symbolic Discovery of Optimization Algorithms", 2023 (Program 1);
    optax ``scale_by_lion``.
    """
    _check_beta("b1", b1)
    _check_beta("b2", b2)

    def init(params):
        return ScaleByLionState(step_counter(params), _zeros(tree_leaves(params), mu_dtype))

    def step(g, state, count):
        m = _as(state.mu, g)
        c = _moment(m, g, b1)
        # sign(nan) is 0: keep a non-finite momentum visible in the update (0 * c is NaN where
        # c is NaN or inf, 0 elsewhere) so it is seen and apply_if_finite can skip the step,
        # instead of the coordinate silently never moving again
        out = ops.add(ops.sign(c), ops.mul(c, 0.0))
        return out, ScaleByLionState(count, _as(_moment(m, g, b2), state.mu))

    return GradientTransformation(init, counted_update("scale_by_lion", ScaleByLionState, step))


class ScaleByLapropState(NamedTuple):
    """State of :func:`scale_by_laprop`: ``count``, the step t; ``mu``, the momentum of the
    normalised gradients; ``nu``, the EMA of squared gradients."""

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count by design (optax's name)
    mu: Any
    nu: Any


def _debiased(beta: float, t: Tensor) -> Tensor:
    """The decay that makes an EMA started at 0 equal its bias-corrected value."""
    return 1 - (1 - beta) / one_minus_pow(beta, t)


def scale_by_laprop(b1: float = 0.9, b2: float = 0.99, eps: float = 1e-8) -> GradientTransformation:
    r"""LaProp: normalise the gradient by its running RMS first, then take momentum.

    .. math::
        \hat v_t = \frac{\sum_{i\le t}\beta_2^{t-i}(1-\beta_2) g_i^2}{1-\beta_2^t},\quad
        \hat m_t = \frac{\sum_{i\le t}\beta_1^{t-i}(1-\beta_1)\, g_i/\max(\sqrt{\hat v_i},
        \epsilon)}{1-\beta_1^t},\quad u_t = \hat m_t.

    The averages are kept bias-corrected (decay :math:`1-(1-\beta)/(1-\beta^t)` at step t) and
    :math:`\epsilon` bounds the root from below, as heavyball 3.2.1's ``LaProp``; the paper's
    Algorithm 1 adds :math:`\epsilon` to the root instead (same up to :math:`\epsilon`).

    Args:
      b1: :math:`\beta_1`, momentum of the normalised gradient (default 0.9).
      b2: :math:`\beta_2`, decay of the squared gradient (default 0.99).
      eps: :math:`\epsilon`, lower bound of the root (default 1e-8).

    Reference: Ziyin, Wang, Ueda, "LaProp: Separating Momentum and Adaptivity in Adam", 2020;
    heavyball ``LaProp``.
    """
    _check_beta("b1", b1)
    _check_beta("b2", b2)
    _check("eps", eps)

    init = _zero_moments_init(ScaleByLapropState)

    def step(g, mu, nu, count):
        t = _steps(count, g)
        v = _moment_sq(nu, g, _debiased(b2, t))
        root = ops.clamp_min(ops.sqrt(ops.clamp_min(v, 0.0)), eps)
        m = _moment(mu, ops.div(g, root), _debiased(b1, t))
        return m, m, v

    return GradientTransformation(init, moments_update("scale_by_laprop", ScaleByLapropState, step))


class ScaleByAdoptState(NamedTuple):
    """State of :func:`scale_by_adopt`: ``count``, the step t; ``mu`` and ``nu``, ADOPT's
    momentum and second-moment estimate."""

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count by design (optax's name)
    mu: Any
    nu: Any


def scale_by_adopt(
    b1: float = 0.9, b2: float = 0.9999, eps: float = 1e-6, mu_dtype: torch.dtype | None = None,
    *, nesterov: bool = False, use_clipping: bool = True,
    clip_value_fn: Callable[[Tensor], Tensor] = lambda t: t**0.25,
) -> GradientTransformation:
    r"""ADOPT: momentum of the gradient normalised by the *previous* second moment.

    .. math::
        v_0 = g_0^2,\; m_0 = 0,\; u_0 = 0;\quad\text{for } t\ge1:\;
        m_t = \beta_1 m_{t-1} + (1-\beta_1)\operatorname{clip}\!\big(g_t/\max(\sqrt{v_{t-1}},
        \epsilon),\, c_t\big),\; u_t = m_t,\; v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,

    with :math:`c_t` = ``clip_value_fn(t)`` (default :math:`t^{1/4}`) when ``use_clipping``.
    ``nesterov`` outputs :math:`\beta_1 m_t + (1-\beta_1)\operatorname{clip}(\cdot)`.

    Args:
      b1: :math:`\beta_1` (default 0.9). b2: :math:`\beta_2` (default 0.9999).
      eps: :math:`\epsilon` (default 1e-6). mu_dtype: dtype of the stored momentum.
      nesterov: Nesterov momentum (default False).
      use_clipping: clip the normalised gradient to :math:`[-c_t, c_t]` (default True).
      clip_value_fn: :math:`t \mapsto c_t` on a 0-d float tensor (default :math:`t^{1/4}`).

    Reference: Taniguchi et al., "ADOPT: Modified Adam Can Converge with Any beta2 with the
    Optimal Rate", NeurIPS 2024 (Algorithm 2); optax ``contrib.scale_by_adopt``.
    """
    _check_beta("b1", b1)
    _check_beta("b2", b2)
    _check("eps", eps, low_inclusive=False)

    def init(params):
        leaves = tree_leaves(params)
        return ScaleByAdoptState(step_counter(params), _zeros(leaves, mu_dtype), _zeros(leaves, None))

    def step(g_in, state, count):
        # 16-bit leaves are computed in float32: g / eps overflows float16 while nu is still 0
        g = [x.float() if x.dtype in (torch.float16, torch.bfloat16) else x for x in g_in]
        started = state.count > 0
        sd = scalar_dtype(g)
        zero = torch.zeros((), dtype=sd, device=started.device)
        beta1 = torch.where(started, zero + b1, 1.0)
        beta2 = torch.where(started, zero + b2, 0.0)
        nu_prev = _as(state.nu, g)
        x = ops.div(g, ops.clamp_min(ops.sqrt(nu_prev), eps))
        if use_clipping:
            # clamp(x, -c, c) as x / max(1, |x| / c) (equal up to rounding), since foreach ops
            # take a 0-d tensor only in mul/div/add; c >= tiny keeps step 0 (c = 0) finite.
            c = torch.as_tensor(clip_value_fn(state.count.to(sd)), dtype=sd, device=zero.device)
            c = c.clamp_min(torch.finfo(sd).tiny)
            excess = ops.clamp_min(ops.div(ops.abs(x), c), 1.0)
            x = ops.div(x, excess)
        mu = _moment(_as(state.mu, g), x, beta1)
        out = _moment(mu, x, beta1) if nesterov else mu
        nu = _moment_sq(nu_prev, g, beta2)
        return out, ScaleByAdoptState(count, _as(mu, state.mu), _as(nu, state.nu))

    return GradientTransformation(init, counted_update("scale_by_adopt", ScaleByAdoptState, step))
