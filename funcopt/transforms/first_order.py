"""First-order transforms: scaling, momentum and the adaptive moment methods.

Each function builds one :class:`~funcopt.base.GradientTransformation`. The math runs over
the list of leaves with ``torch._foreach_*`` ops; bias corrections are 0-d tensors computed
from the step counter, so no update synchronises with the host. Per-parameter state (moments,
traces) is kept as a list of tensors in the order of ``tree_leaves(params)``.
"""

from __future__ import annotations

from collections.abc import Callable
from numbers import Number
from typing import Any, NamedTuple

import torch

from funcopt.base import (
    EmptyState,
    GradientTransformation,
    ScalarOrSchedule,
    Tensor,
    check_hyperparameter,
    increment,
    resolve,
    step_counter,
    tree_flatten,
    tree_leaves,
    tree_unflatten,
)

__all__ = [
    "ScaleByScheduleState", "ScaleByLearningRateState", "TraceState", "EmaState",
    "ScaleByAdamState", "ScaleByAmsgradState", "ScaleByNadamState", "ScaleByAdamaxState",
    "ScaleByRmsState", "ScaleByRStdDevState", "ScaleByAdagradState", "ScaleByAdagradNormState",
    "ScaleByLionState", "ScaleByLapropState", "ScaleByAdoptState",
    "scale", "scale_by_schedule", "scale_by_learning_rate", "trace", "ema", "scale_by_adam",
    "scale_by_nadam", "scale_by_adamax", "scale_by_rms", "scale_by_adagrad",
    "scale_by_adagrad_norm", "scale_by_lion", "scale_by_laprop", "scale_by_adopt",
    "scale_by_sign",
]

# --------------------------------------------------------------------------- helpers
# Scalars (hyperparameters, bias corrections) are Python numbers or 0-d tensors. Numbers use
# the fused Scalar overloads; tensors use the Tensor overloads, which never read the value on
# the host.


def scalar_dtype(leaves: list[Tensor]) -> torch.dtype:
    """float64 when any leaf is float64, else float32: the dtype of 0-d scalars in a step."""
    return torch.float64 if any(x.dtype == torch.float64 for x in leaves) else torch.float32


def _hp(value: ScalarOrSchedule, count: Tensor) -> Tensor | float:
    v = resolve(value, count)
    return v.to(count.device) if isinstance(v, Tensor) else v


def _steps(count: Tensor, leaves: list[Tensor]) -> Tensor:
    """The step number ``count`` as a 0-d float tensor (for ``beta ** t``)."""
    return count.to(scalar_dtype(leaves))


def _axpy(alpha: Any, xs: list[Tensor], ys: list[Tensor]) -> list[Tensor]:
    """``ys + alpha * xs``."""
    if isinstance(alpha, Number):
        return torch._foreach_add(ys, xs, alpha=alpha)
    return torch._foreach_add(ys, torch._foreach_mul(xs, alpha))


def _moment(state: list[Tensor], xs: list[Tensor], decay: Any) -> list[Tensor]:
    """``decay * state + (1 - decay) * xs`` (torch.optim's ``lerp`` form for numbers)."""
    if isinstance(decay, Number):
        return torch._foreach_lerp(state, xs, 1.0 - decay)
    return _axpy(1.0 - decay, xs, torch._foreach_mul(state, decay))


def _moment_sq(state: list[Tensor], xs: list[Tensor], decay: Any) -> list[Tensor]:
    """``decay * state + (1 - decay) * xs**2``."""
    if isinstance(decay, Number):
        return torch._foreach_addcmul(torch._foreach_mul(state, decay), xs, xs, value=1.0 - decay)
    return _axpy(1.0 - decay, torch._foreach_mul(xs, xs), torch._foreach_mul(state, decay))


def _as(xs: list[Tensor], refs: list[Tensor]) -> list[Tensor]:
    """Each ``x`` in the dtype of the matching ``ref`` (no copy when it already is)."""
    return [x if x.dtype == r.dtype else x.to(r.dtype) for x, r in zip(xs, refs)]


def _zeros(leaves: list[Tensor], dtype: torch.dtype | None) -> list[Tensor]:
    return [torch.zeros_like(x, dtype=dtype) for x in leaves]


def _full(leaves: list[Tensor], value: float, dtype: torch.dtype | None = None) -> list[Tensor]:
    return [torch.full_like(x, value, dtype=dtype) for x in leaves]


def _check(name: str, value: Any, **kw: Any) -> None:
    check_hyperparameter(name, value, **kw)


def _check_beta(name: str, value: Any) -> None:
    check_hyperparameter(name, value, low=0.0, high=1.0, high_inclusive=False)


# --------------------------------------------------------------------------- scaling


class ScaleByScheduleState(NamedTuple):
    count: Tensor


class ScaleByLearningRateState(NamedTuple):
    count: Tensor
    learning_rate: Tensor


def scale(step_size: float | Tensor) -> GradientTransformation:
    """Multiply the updates by a constant: ``u <- step_size * u``.

    Args:
      step_size: the factor (a number or 0-d tensor). For a value that changes with the step
        use :func:`scale_by_schedule`.

    Reference: optax ``scale``.
    """
    if callable(step_size):
        raise TypeError("scale takes a number; for a schedule use scale_by_schedule(fn)")
    _check("step_size", step_size, low=None)

    def init(params):
        return EmptyState()

    def update(updates, state, params=None, **extra):
        leaves, treedef = tree_flatten(updates)
        if not leaves:
            return updates, state
        s = step_size.to(leaves[0].device) if isinstance(step_size, Tensor) else step_size
        return tree_unflatten(treedef, _as(torch._foreach_mul(leaves, s), leaves)), state

    return GradientTransformation(init, update)


def scale_by_schedule(step_size_fn: Callable[[Tensor], Any]) -> GradientTransformation:
    """Multiply the updates by ``step_size_fn(count)``, ``count`` = 0, 1, 2, ... (0-d int64).

    Args:
      step_size_fn: a schedule ``count -> factor`` (number or 0-d tensor).

    Reference: optax ``scale_by_schedule``.
    """
    if not callable(step_size_fn):
        raise TypeError("scale_by_schedule takes a function count -> factor; for a number use scale")

    def init(params):
        return ScaleByScheduleState(step_counter(params))

    def update(updates, state, params=None, **extra):
        leaves, treedef = tree_flatten(updates)
        if leaves:
            leaves = _as(torch._foreach_mul(leaves, _hp(step_size_fn, state.count)), leaves)
        return tree_unflatten(treedef, leaves), ScaleByScheduleState(increment(state.count))

    return GradientTransformation(init, update)


def scale_by_learning_rate(
    learning_rate: ScalarOrSchedule, *, flip_sign: bool = True
) -> GradientTransformation:
    """Multiply the updates by ``-learning_rate`` (or ``+learning_rate``): ``u <- -eta_t u``.

    The state holds the current learning rate ``eta_t`` as a 0-d float tensor. When
    ``learning_rate`` is a number (or 0-d tensor) update() reads it from the state, so writing
    ``state.learning_rate`` changes it; when it is a schedule, update() uses
    ``learning_rate(count)`` and stores that value in the state for inspection.

    Args:
      learning_rate: ``eta``, a non-negative number, 0-d tensor or schedule ``count -> eta``.
      flip_sign: multiply by ``-eta`` (default True: descent) or by ``+eta``.

    Reference: optax ``scale_by_learning_rate``.
    """
    _check("learning_rate", learning_rate, low=0.0)
    sign = -1.0 if flip_sign else 1.0

    def init(params):
        leaves = tree_leaves(params)
        count = step_counter(params)
        lr0 = resolve(learning_rate, count)
        return ScaleByLearningRateState(
            count, torch.as_tensor(lr0, dtype=scalar_dtype(leaves), device=count.device).clone()
        )

    def update(updates, state, params=None, **extra):
        leaves, treedef = tree_flatten(updates)
        lr = state.learning_rate
        if callable(learning_rate):
            lr = torch.as_tensor(learning_rate(state.count), dtype=lr.dtype, device=lr.device)
        if leaves:
            leaves = _as(torch._foreach_mul(leaves, lr * sign), leaves)
        return tree_unflatten(treedef, leaves), ScaleByLearningRateState(
            increment(state.count), lr
        )

    return GradientTransformation(init, update)


def scale_by_sign() -> GradientTransformation:
    """``u <- sign(u)`` element-wise (signSGD; Bernstein et al. 2018). Reference: optax."""

    def init(params):
        return EmptyState()

    def update(updates, state, params=None, **extra):
        leaves, treedef = tree_flatten(updates)
        return tree_unflatten(treedef, torch._foreach_sign(leaves) if leaves else leaves), state

    return GradientTransformation(init, update)


# --------------------------------------------------------------------------- momentum


class TraceState(NamedTuple):
    count: Tensor
    trace: Any


class EmaState(NamedTuple):
    count: Tensor
    ema: Any


def trace(
    decay: ScalarOrSchedule, nesterov: bool = False, accumulator_dtype: torch.dtype | None = None,
    *, dampening: float = 0.0,
) -> GradientTransformation:
    """Heavy-ball momentum.

    ``t_k = decay * t_{k-1} + c_k g_k`` with ``t_0 = 0``, ``c_1 = 1`` and ``c_k = 1 - dampening``
    afterwards; the output is ``t_k``, or ``g_k + decay * t_k`` when ``nesterov``. With
    ``dampening=0`` this is optax ``trace`` and torch.optim.SGD's momentum buffer (whose first
    step ``buf = g`` equals ``0 * decay + g``); with ``dampening > 0`` it is torch's dampened
    buffer, first step undampened as torch does.

    Args:
      decay: the momentum ``mu`` (0 <= mu < 1 not required: any number >= 0), or a schedule.
      nesterov: use Nesterov's look-ahead ``g + mu t`` (default False).
      accumulator_dtype: dtype of the stored trace (default: the parameters' dtype).
      dampening: torch.optim.SGD's ``dampening`` (default 0).

    Reference: Polyak 1964; Sutskever et al. 2013; optax ``trace``; torch.optim.SGD.
    """
    _check("decay", decay)
    _check("dampening", dampening, high=1.0)

    def init(params):
        return TraceState(step_counter(params), _zeros(tree_leaves(params), accumulator_dtype))

    def update(updates, state, params=None, **extra):
        g, treedef = tree_flatten(updates)
        if not g:
            return updates, TraceState(increment(state.count), state.trace)
        mu = _hp(decay, state.count)
        prev = _as(state.trace, g)
        scaled = g
        if callable(dampening) or isinstance(dampening, Tensor) or dampening != 0:
            one = torch.ones((), dtype=scalar_dtype(g), device=state.count.device)
            c = torch.where(state.count == 0, one, one - _hp(dampening, state.count))
            scaled = torch._foreach_mul(g, c)
        new = _axpy(mu, prev, scaled)
        out = _axpy(mu, new, g) if nesterov else new
        return tree_unflatten(treedef, _as(out, g)), TraceState(
            increment(state.count), _as(new, state.trace)
        )

    return GradientTransformation(init, update)


def ema(
    decay: ScalarOrSchedule, debias: bool = True, accumulator_dtype: torch.dtype | None = None
) -> GradientTransformation:
    """Exponential moving average: ``e_t = decay e_{t-1} + (1 - decay) g_t``, ``e_0 = 0``.

    Outputs ``e_t / (1 - decay^t)`` when ``debias`` (default True), else ``e_t``.

    Args:
      decay: the averaging factor in [0, 1) (number, tensor or schedule).
      debias: divide by ``1 - decay^t`` to remove the bias towards ``e_0 = 0``.
      accumulator_dtype: dtype of the stored average (default: the parameters' dtype).

    Reference: optax ``ema``.
    """
    if not callable(decay):
        _check_beta("decay", decay)

    def init(params):
        return EmaState(step_counter(params), _zeros(tree_leaves(params), accumulator_dtype))

    def update(updates, state, params=None, **extra):
        g, treedef = tree_flatten(updates)
        count = increment(state.count)
        if not g:
            return updates, EmaState(count, state.ema)
        d = _hp(decay, state.count)
        new = _moment(_as(state.ema, g), g, d)
        out = torch._foreach_div(new, 1 - d ** _steps(count, g)) if debias else new
        return tree_unflatten(treedef, _as(out, g)), EmaState(count, _as(new, state.ema))

    return GradientTransformation(init, update)


# --------------------------------------------------------------------------- adam family


class ScaleByAdamState(NamedTuple):
    count: Tensor
    mu: Any
    nu: Any


class ScaleByAmsgradState(NamedTuple):
    count: Tensor
    mu: Any
    nu: Any
    nu_max: Any


class ScaleByNadamState(NamedTuple):
    count: Tensor
    mu_product: Tensor
    mu: Any
    nu: Any


def _adam_denominator(nu, bc2, eps, eps_root):
    """``sqrt(nu / bc2 + eps_root) + eps`` (torch.optim's ``sqrt(nu)/sqrt(bc2) + eps`` form)."""
    if isinstance(eps_root, Number) and eps_root == 0:
        root = torch._foreach_div(torch._foreach_sqrt(nu), torch.sqrt(bc2))
    else:
        root = torch._foreach_sqrt(torch._foreach_add(torch._foreach_div(nu, bc2), eps_root))
    return torch._foreach_add(root, eps)


def scale_by_adam(
    b1: ScalarOrSchedule = 0.9, b2: ScalarOrSchedule = 0.999, eps: float = 1e-8,
    eps_root: float = 0.0, *, mu_dtype: torch.dtype | None = None, nesterov: bool = False,
    amsgrad: bool = False,
) -> GradientTransformation:
    r"""Adam's scaling (Kingma & Ba 2015), optionally with Nesterov (NAdam) or AMSGrad.

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,\\
        \hat m_t = m_t / (1-\beta_1^t),\quad \hat v_t = v_t / (1-\beta_2^t),\quad
        u_t = \hat m_t / (\sqrt{\hat v_t + \epsilon_{root}} + \epsilon).

    ``nesterov``: :math:`\hat m_t = \beta_1 m_t/(1-\beta_1^{t+1}) + (1-\beta_1) g_t/(1-\beta_1^t)`
    (Dozat 2016 as in optax ``scale_by_adam(nesterov=True)``; torch.optim.NAdam's momentum
    schedule is :func:`scale_by_nadam`). ``amsgrad``: :math:`v^{max}_t = \max(v^{max}_{t-1}, v_t)`
    replaces :math:`v_t` before bias correction, as torch.optim.Adam(amsgrad=True) does (optax's
    ``scale_by_amsgrad`` takes the max of the bias-corrected :math:`\hat v_t` instead).

    Args:
      b1: :math:`\beta_1`, decay of the first moment (default 0.9).
      b2: :math:`\beta_2`, decay of the second moment (default 0.999).
      eps: :math:`\epsilon`, added outside the square root (default 1e-8).
      eps_root: :math:`\epsilon_{root}`, added inside the square root (default 0).
      mu_dtype: dtype of the stored first moment (default: the parameters' dtype).
      nesterov: Nesterov momentum (NAdam), default False.
      amsgrad: AMSGrad's running maximum of the second moment (Reddi et al. 2018), default False.

    Reference: Kingma & Ba, "Adam", ICLR 2015; optax ``scale_by_adam``; torch.optim.Adam.
    """
    for name, b in (("b1", b1), ("b2", b2)):
        if not callable(b):
            _check_beta(name, b)
    _check("eps", eps)
    _check("eps_root", eps_root)

    def init(params):
        leaves = tree_leaves(params)
        mu, nu = _zeros(leaves, mu_dtype), _zeros(leaves, None)
        if amsgrad:
            return ScaleByAmsgradState(step_counter(params), mu, nu, _zeros(leaves, None))
        return ScaleByAdamState(step_counter(params), mu, nu)

    def update(updates, state, params=None, **extra):
        g, treedef = tree_flatten(updates)
        count = increment(state.count)
        if not g:
            return updates, state._replace(count=count)
        beta1, beta2 = _hp(b1, state.count), _hp(b2, state.count)
        mu = _moment(_as(state.mu, g), g, beta1)
        nu = _moment_sq(_as(state.nu, g), g, beta2)
        t = _steps(count, g)
        bc1, bc2 = 1 - beta1**t, 1 - beta2**t
        nu_used = nu
        if amsgrad:
            nu_used = torch._foreach_maximum(_as(state.nu_max, g), nu)
        if nesterov:
            m_hat = torch._foreach_mul(mu, beta1 / (1 - beta1 ** (t + 1)))
            m_hat = _axpy((1 - beta1) / bc1, g, m_hat)
        else:
            m_hat = torch._foreach_div(mu, bc1)
        out = torch._foreach_div(m_hat, _adam_denominator(nu_used, bc2, eps, eps_root))
        new = state._replace(count=count, mu=_as(mu, state.mu), nu=_as(nu, state.nu))
        if amsgrad:
            new = new._replace(nu_max=_as(nu_used, state.nu_max))
        return tree_unflatten(treedef, _as(out, g)), new

    return GradientTransformation(init, update)


def scale_by_nadam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, momentum_decay: float = 4e-3
) -> GradientTransformation:
    r"""NAdam with Dozat's momentum schedule, as torch.optim.NAdam computes it.

    .. math::
        \mu_t = \beta_1 (1 - \tfrac12 0.96^{t\psi}),\quad \Pi_t = \prod_{i\le t}\mu_i,\quad
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,\\
        d_t = \sqrt{v_t/(1-\beta_2^t)} + \epsilon,\quad
        u_t = \frac{1-\mu_t}{1-\Pi_t}\frac{g_t}{d_t} + \frac{\mu_{t+1}}{1-\Pi_t\mu_{t+1}}\frac{m_t}{d_t}.

    Args:
      b1: :math:`\beta_1` (default 0.9). b2: :math:`\beta_2` (default 0.999).
      eps: :math:`\epsilon` (default 1e-8). momentum_decay: :math:`\psi` (default 4e-3).

    Reference: Dozat, "Incorporating Nesterov Momentum into Adam", ICLR workshop 2016;
    torch.optim.NAdam. For optax's NAdam (constant :math:`\beta_1`) use
    ``scale_by_adam(nesterov=True)``.
    """
    _check_beta("b1", b1)
    _check_beta("b2", b2)
    _check("eps", eps)
    _check("momentum_decay", momentum_decay)

    def init(params):
        leaves = tree_leaves(params)
        count = step_counter(params)
        one = torch.ones((), dtype=scalar_dtype(leaves), device=count.device)
        return ScaleByNadamState(count, one, _zeros(leaves, None), _zeros(leaves, None))

    def update(updates, state, params=None, **extra):
        g, treedef = tree_flatten(updates)
        count = increment(state.count)
        if not g:
            return updates, state._replace(count=count)
        t = count.to(state.mu_product.dtype)
        mu_t = b1 * (1 - 0.5 * 0.96 ** (t * momentum_decay))
        mu_next = b1 * (1 - 0.5 * 0.96 ** ((t + 1) * momentum_decay))
        prod = state.mu_product * mu_t
        m = _moment(_as(state.mu, g), g, b1)
        v = _moment_sq(_as(state.nu, g), g, b2)
        denom = torch._foreach_add(torch._foreach_sqrt(torch._foreach_div(v, 1 - b2**t)), eps)
        out = torch._foreach_mul(m, mu_next / (1 - prod * mu_next))
        out = _axpy((1 - mu_t) / (1 - prod), g, out)
        out = torch._foreach_div(out, denom)
        return tree_unflatten(treedef, _as(out, g)), ScaleByNadamState(
            count, prod, _as(m, state.mu), _as(v, state.nu)
        )

    return GradientTransformation(init, update)


class ScaleByAdamaxState(NamedTuple):
    count: Tensor
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

    def init(params):
        leaves = tree_leaves(params)
        return ScaleByAdamaxState(step_counter(params), _zeros(leaves, None), _zeros(leaves, None))

    def update(updates, state, params=None, **extra):
        g, treedef = tree_flatten(updates)
        count = increment(state.count)
        if not g:
            return updates, state._replace(count=count)
        m = _moment(_as(state.mu, g), g, b1)
        u = torch._foreach_maximum(
            torch._foreach_mul(_as(state.nu, g), b2), torch._foreach_add(torch._foreach_abs(g), eps)
        )
        out = torch._foreach_div(torch._foreach_div(m, 1 - b1 ** _steps(count, g)), u)
        return tree_unflatten(treedef, _as(out, g)), ScaleByAdamaxState(
            count, _as(m, state.mu), _as(u, state.nu)
        )

    return GradientTransformation(init, update)


# --------------------------------------------------------------------------- rms / adagrad


class ScaleByRmsState(NamedTuple):
    count: Tensor
    nu: Any


class ScaleByRStdDevState(NamedTuple):
    count: Tensor
    mu: Any
    nu: Any


def _inv_root(xs: list[Tensor], eps: float, eps_in_sqrt: bool) -> list[Tensor]:
    """``1/sqrt(x + eps)`` when ``eps_in_sqrt`` else ``1/(sqrt(x) + eps)``."""
    if eps_in_sqrt:
        return torch._foreach_rsqrt(torch._foreach_add(xs, eps))
    return torch._foreach_reciprocal(torch._foreach_add(torch._foreach_sqrt(xs), eps))


def scale_by_rms(
    decay: float = 0.9, eps: float = 1e-8, initial_scale: float = 0.0, centered: bool = False,
    eps_in_sqrt: bool = True, bias_correction: bool = False,
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

    Args:
      decay: :math:`\rho` (torch's ``alpha``), default 0.9.
      eps: :math:`\epsilon`, default 1e-8.
      initial_scale: :math:`v_0`, default 0.
      centered: subtract the squared mean (Graves 2013), default False.
      eps_in_sqrt: where :math:`\epsilon` goes (default True, optax).
      bias_correction: divide :math:`m_t, v_t` by :math:`1-\rho^t` (default False).

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

    def update(updates, state, params=None, **extra):
        g, treedef = tree_flatten(updates)
        count = increment(state.count)
        if not g:
            return updates, state._replace(count=count)
        nu = _moment_sq(_as(state.nu, g), g, decay)
        bc = 1 - decay ** _steps(count, g) if bias_correction else None
        s = torch._foreach_div(nu, bc) if bias_correction else nu
        if centered:
            mu = _moment(_as(state.mu, g), g, decay)
            m = torch._foreach_div(mu, bc) if bias_correction else mu
            s = torch._foreach_clamp_min(torch._foreach_addcmul(s, m, m, value=-1.0), 0.0)
        out = torch._foreach_mul(g, _inv_root(s, eps, eps_in_sqrt))
        new = state._replace(count=count, nu=_as(nu, state.nu))
        if centered:
            new = new._replace(mu=_as(mu, state.mu))
        return tree_unflatten(treedef, _as(out, g)), new

    return GradientTransformation(init, update)


class ScaleByAdagradState(NamedTuple):
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
        g, treedef = tree_flatten(updates)
        if not g:
            return updates, state
        s = torch._foreach_addcmul(_as(state.sum_of_squares, g), g, g)
        scaling = _inv_root(s, eps, eps_in_sqrt)
        if eps_in_sqrt:
            scaling = [torch.where(x > 0, r, 0.0) for x, r in zip(s, scaling)]
        out = torch._foreach_mul(g, scaling)
        return tree_unflatten(treedef, _as(out, g)), ScaleByAdagradState(_as(s, state.sum_of_squares))

    return GradientTransformation(init, update)


class ScaleByAdagradNormState(NamedTuple):
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
        g, treedef = tree_flatten(updates)
        if not g:
            return updates, state
        b2 = state.sum_of_norms
        norms = torch.stack([n.to(b2.dtype) for n in torch._foreach_norm(g)])
        b2 = b2 + (norms * norms).sum()
        out = torch._foreach_div(g, torch.sqrt(b2) + eps)
        return tree_unflatten(treedef, _as(out, g)), ScaleByAdagradNormState(b2)

    return GradientTransformation(init, update)


# --------------------------------------------------------------------------- lion / laprop / adopt


class ScaleByLionState(NamedTuple):
    count: Tensor
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

    def update(updates, state, params=None, **extra):
        g, treedef = tree_flatten(updates)
        count = increment(state.count)
        if not g:
            return updates, ScaleByLionState(count, state.mu)
        m = _as(state.mu, g)
        out = torch._foreach_sign(_moment(m, g, b1))
        return tree_unflatten(treedef, _as(out, g)), ScaleByLionState(
            count, _as(_moment(m, g, b2), state.mu))

    return GradientTransformation(init, update)


class ScaleByLapropState(NamedTuple):
    count: Tensor
    mu: Any
    nu: Any


def _debiased(beta: float, t: Tensor) -> Tensor:
    """The decay that makes an EMA started at 0 equal its bias-corrected value."""
    return 1 - (1 - beta) / (1 - beta**t)


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

    def init(params):
        leaves = tree_leaves(params)
        return ScaleByLapropState(step_counter(params), _zeros(leaves, None), _zeros(leaves, None))

    def update(updates, state, params=None, **extra):
        g, treedef = tree_flatten(updates)
        count = increment(state.count)
        if not g:
            return updates, state._replace(count=count)
        t = _steps(count, g)
        v = _moment_sq(_as(state.nu, g), g, _debiased(b2, t))
        root = torch._foreach_clamp_min(torch._foreach_sqrt(torch._foreach_clamp_min(v, 0.0)), eps)
        m = _moment(_as(state.mu, g), torch._foreach_div(g, root), _debiased(b1, t))
        return tree_unflatten(treedef, _as(m, g)), ScaleByLapropState(
            count, _as(m, state.mu), _as(v, state.nu))

    return GradientTransformation(init, update)


class ScaleByAdoptState(NamedTuple):
    count: Tensor
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

    def update(updates, state, params=None, **extra):
        g, treedef = tree_flatten(updates)
        count = increment(state.count)
        if not g:
            return updates, state._replace(count=count)
        started = state.count > 0
        sd = scalar_dtype(g)
        zero = torch.zeros((), dtype=sd, device=started.device)
        beta1 = torch.where(started, zero + b1, 1.0)
        beta2 = torch.where(started, zero + b2, 0.0)
        nu_prev = _as(state.nu, g)
        x = torch._foreach_div(g, torch._foreach_clamp_min(torch._foreach_sqrt(nu_prev), eps))
        if use_clipping:
            c = torch.as_tensor(clip_value_fn(state.count.to(sd)))
            x = [xi.clamp(-c, c) for xi in x]
        mu = _moment(_as(state.mu, g), x, beta1)
        out = _moment(mu, x, beta1) if nesterov else mu
        nu = _moment_sq(nu_prev, g, beta2)
        return tree_unflatten(treedef, _as(out, g)), ScaleByAdoptState(
            count, _as(mu, state.mu), _as(nu, state.nu))

    return GradientTransformation(init, update)
