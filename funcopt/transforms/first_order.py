"""First-order transforms: scaling, momentum and the Adam family.

Each function builds one :class:`~funcopt.base.GradientTransformation`. The math runs over
the list of leaves with ``torch._foreach_*`` ops (``scale_by_adam``'s eager steps with torch's
fused Adam kernel where it applies). Bias corrections are computed from the step counter as 0-d
tensors, so no update synchronises with the host; on a CPU, where reading a value is no sync,
eager steps use Python numbers (:func:`~funcopt.base.host_number`). Per-parameter state
(moments, traces) is kept as a list of tensors in the order of ``tree_leaves(params)``.

The private helpers here (``_leaves``, ``_moment`` ...) are shared with
:mod:`funcopt.transforms.per_coordinate`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Union

import torch
from torch.compiler import is_compiling as _is_compiling

from funcopt.base import (
    EmptyState,
    GradientTransformation,
    ScalarOrSchedule,
    Tensor,
    check_hyperparameter,
    current_learning_rate,
    increment,
    register_hyperparameters,
    replace,
    resolve,
    step_counter,
    tree_leaves,
    tree_unflatten,
)
from funcopt.engine import (
    check_number,
    differentiating,
    expect_state,
    host_number,
    into,
    one_minus_pow,
    ops,
    per_step,
    scalar_dtype,
)
from funcopt.engine import leaves as _leaves

__all__ = [
    "ScaleByScheduleState", "ScaleByLearningRateState", "TraceState", "EmaState",
    "ScaleByAdamState", "ScaleByAmsgradState", "ScaleByNadamState",
    "scale", "scale_by_schedule", "scale_by_learning_rate", "trace", "ema", "scale_by_adam",
    "scale_by_nadam", "scale_by_sign",
]

# --------------------------------------------------------------------------- helpers
# Scalars (hyperparameters, bias corrections) are Python numbers or 0-d tensors. Numbers use
# the fused Scalar overloads; tensors use the Tensor overloads, which never read the value on
# the host.

TensorList = Union[list[Tensor], tuple[Tensor, ...]]


def _is_schedule(x: Any) -> bool:
    """``callable(x)`` without narrowing a float-annotated argument (for type checkers)."""
    return callable(x)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _hp(value: ScalarOrSchedule, count: Tensor) -> Any:
    v = resolve(value, count)
    return host_number(v.to(count.device)) if isinstance(v, Tensor) else v


def _steps(count: Tensor, leaves: Sequence[Tensor]) -> Any:
    """The step number ``count`` for ``beta ** t``: a 0-d float tensor, or a Python int where
    :func:`~funcopt.base.host_number` reads it (eager CPU steps)."""
    t = host_number(count)
    return t if isinstance(t, int) else count.to(scalar_dtype(leaves))


def _sqrt(x: Any) -> Any:
    """The square root of a number or a 0-d tensor."""
    return torch.sqrt(x) if isinstance(x, Tensor) else math.sqrt(x)


def _axpy(alpha: Any, xs: TensorList, ys: TensorList) -> TensorList:
    """``ys + alpha * xs``."""
    if _is_number(alpha):
        return ops.add(ys, xs, alpha=alpha)
    return ops.add(ys, ops.mul(xs, alpha))


def _add_scalar(xs: TensorList, c: Any) -> TensorList:
    """``xs + c`` for a number or a 0-d tensor ``c``, without a host sync: torch.compile traces
    ``_foreach_add(xs, tensor)`` into a ``.item()``, and on a GPU the eager op reads the tensor
    on the host too (a CUDA graph cannot capture it), so those pass a list instead (eager CPU
    steps keep the single op)."""
    if isinstance(c, Tensor) and (_is_compiling() or not c.is_cpu):
        return ops.add(xs, [c] * len(xs))
    return ops.add(xs, c)


def _moment(state: TensorList, xs: TensorList, decay: Any) -> TensorList:
    """``decay * state + (1 - decay) * xs`` (torch.optim's ``lerp`` form for numbers)."""
    if _is_number(decay):
        return ops.lerp(state, xs, 1.0 - decay)
    return _axpy(1.0 - decay, xs, ops.mul(state, decay))


def _moment_sq(state: TensorList, xs: TensorList, decay: Any) -> TensorList:
    """``decay * state + (1 - decay) * xs**2``."""
    out = ops.mul(state, decay)  # a new list: the in-place ops below touch only it
    if _is_number(decay):
        out = into("addcmul", out, xs, xs, value=1.0 - decay)
    else:
        out = into("add", out, ops.mul(ops.mul(xs, xs), 1.0 - decay))
    return out


def _as(xs: TensorList, refs: Sequence[Tensor]) -> list[Tensor]:
    """Each ``x`` in the dtype of the matching ``ref`` (no copy when it already is)."""
    return [x if x.dtype == r.dtype else x.to(r.dtype) for x, r in zip(xs, refs)]


def _wide(dtype: torch.dtype) -> torch.dtype:
    """float32 for float16 (whose range loses Adam's second moments), else ``dtype``."""
    return torch.float32 if dtype == torch.float16 else dtype


def _zeros(leaves: Sequence[Tensor], dtype: torch.dtype | None) -> list[Tensor]:
    return [torch.zeros_like(x, dtype=dtype) for x in leaves]


def _full(leaves: Sequence[Tensor], value: float, dtype: torch.dtype | None = None) -> list[Tensor]:
    return [torch.full_like(x, value, dtype=dtype) for x in leaves]


def _check(name: str, value: Any, **kw: Any) -> None:
    check_hyperparameter(name, value, **kw)


def _check_beta(name: str, value: Any) -> None:
    """A decay in [0, 1): a number or a 0-d tensor. A callable is a TypeError here; the
    transforms whose betas may follow a schedule check callables themselves."""
    check_number(name, value)
    check_hyperparameter(name, value, low=0.0, high=1.0, high_inclusive=False)


# --------------------------------------------------------------------------- scaling


class ScaleByScheduleState(NamedTuple):
    """State of :func:`scale_by_schedule`: ``count``, the 0-d int64 step at which the schedule
    is evaluated."""

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count by design (optax's name)


class ScaleByLearningRateState(NamedTuple):
    """State of :func:`scale_by_learning_rate`: ``count``, the step t, and ``learning_rate``, a
    0-d tensor: for a number learning rate it is the value used (writing it changes the next
    update)."""

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count by design (optax's name)
    learning_rate: Tensor


register_hyperparameters(ScaleByLearningRateState, "learning_rate")


def scale(step_size: float | Tensor) -> GradientTransformation:
    """Multiply the updates by a constant: ``u <- step_size * u``.

    Args:
      step_size: the factor (a number or 0-d tensor). For a value that changes with the step
        use :func:`scale_by_schedule`.

    Reference: optax ``scale``.
    """
    if _is_schedule(step_size):
        raise TypeError("scale takes a number; for a schedule use scale_by_schedule(fn)")
    _check("step_size", step_size, low=None)

    def init(params):
        return EmptyState()

    def update(updates, state, params=None, **extra):
        leaves, treedef = _leaves(updates, params, "scale")
        if not leaves:
            return updates, state
        s = step_size.to(leaves[0].device) if isinstance(step_size, Tensor) else step_size
        return tree_unflatten(treedef, _as(ops.mul(leaves, s), leaves)), state

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
        expect_state(state, ScaleByScheduleState, "scale_by_schedule")
        leaves, treedef = _leaves(updates, params, "scale_by_schedule")
        if leaves:
            leaves = _as(ops.mul(leaves, _hp(step_size_fn, state.count)), leaves)
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
        expect_state(state, ScaleByLearningRateState, "scale_by_learning_rate")
        leaves, treedef = _leaves(updates, params, "scale_by_learning_rate")
        lr = current_learning_rate(learning_rate, state.learning_rate, state.count)
        if leaves:
            leaves = _as(ops.mul(leaves, host_number(lr) * sign), leaves)
        return tree_unflatten(treedef, leaves), ScaleByLearningRateState(
            increment(state.count), lr
        )

    return GradientTransformation(init, update)


def scale_by_sign() -> GradientTransformation:
    """``u <- sign(u)`` element-wise (signSGD; Bernstein et al. 2018). Reference: optax."""

    def init(params):
        return EmptyState()

    def update(updates, state, params=None, **extra):
        leaves, treedef = _leaves(updates, params, "scale_by_sign")
        return tree_unflatten(treedef, ops.sign(leaves) if leaves else leaves), state

    return GradientTransformation(init, update)


# --------------------------------------------------------------------------- momentum


class TraceState(NamedTuple):
    """State of :func:`trace`: ``count``, the step t, and ``trace``, the momentum buffer (a tree
    like the params)."""

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count by design (optax's name)
    trace: Any


class EmaState(NamedTuple):
    r"""State of :func:`ema`: ``count``, the 0-d int64 step, and ``ema``, the moving average
    :math:`\bar g_t` (a tree like the params)."""

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count by design (optax's name)
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
        expect_state(state, TraceState, "trace")
        g, treedef = _leaves(updates, params, "trace", state.trace)
        if not g:
            return updates, TraceState(increment(state.count), state.trace)
        mu = _hp(decay, state.count)
        prev = _as(state.trace, g)
        scaled = g
        if _is_schedule(dampening) or isinstance(dampening, Tensor) or dampening != 0:
            one = torch.ones((), dtype=scalar_dtype(g), device=state.count.device)
            c = torch.where(state.count == 0, one, one - _hp(dampening, state.count))
            scaled = ops.mul(g, c)
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
        expect_state(state, EmaState, "ema")
        g, treedef = _leaves(updates, params, "ema", state.ema)
        count = increment(state.count)
        if not g:
            return updates, EmaState(count, state.ema)
        d = _hp(decay, state.count)
        new = _moment(_as(state.ema, g), g, d)
        out = ops.div(new, one_minus_pow(d, _steps(count, g))) if debias else new
        return tree_unflatten(treedef, _as(out, g)), EmaState(count, _as(new, state.ema))

    return GradientTransformation(init, update)


# --------------------------------------------------------------------------- adam family


class ScaleByAdamState(NamedTuple):
    """State of :func:`scale_by_adam`: ``count``, the 0-d int64 step t; ``mu`` and ``nu``, the
    first and second moment EMAs :math:`m_t, v_t` (trees like the params)."""

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count by design (optax's name)
    mu: Any
    nu: Any


class ScaleByAmsgradState(NamedTuple):
    r"""State of :func:`scale_by_adam` with ``amsgrad=True``: ``count``, the step t; ``mu``,
    ``nu``, Adam's moments; ``nu_max``, the running maximum :math:`\hat v_t` of the second
    moment."""

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count by design (optax's name)
    mu: Any
    nu: Any
    nu_max: Any


class ScaleByNadamState(NamedTuple):
    r"""State of :func:`scale_by_nadam`: ``count``, the step t; ``mu_product``,
    :math:`\prod_{s \le t} \mu_s` (NAdam's momentum-schedule product); ``mu``, ``nu``, the
    moments."""

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count by design (optax's name)
    mu_product: Tensor
    mu: Any
    nu: Any


def _adam_denominator(nu: TensorList, bc2: Tensor, eps: float, eps_root: float) -> TensorList:
    """``sqrt(nu / bc2 + eps_root) + eps`` (torch.optim's ``sqrt(nu)/sqrt(bc2) + eps`` form)."""
    if _is_number(eps_root) and eps_root == 0:
        root = ops.div(ops.sqrt(nu), _sqrt(bc2))
    else:
        root = ops.sqrt(ops.add(ops.div(nu, bc2), eps_root))
    return ops.add(root, eps)


# float16 is left out: the kernel computes in float32, where the ``_foreach`` path (and so a
# compiled step) computes in float16, in which eps = 1e-8 underflows: the two would disagree
# far beyond rounding (finite against NaN for a zero gradient).
_FUSED_DTYPES = (torch.bfloat16, torch.float32, torch.float64)


def _fusable(g: list[Tensor], state: Any, beta1: Any, beta2: Any, eps: Any, eps_root: Any) -> bool:
    """Whether torch's fused Adam kernel can compute this eager step: number coefficients, and
    updates and moments all plain tensors (no subclasses such as DTensor), contiguous (the
    kernel reads strided tensors wrongly), of one shape per leaf (it does not check), of one
    dtype, on one CPU or CUDA device, and not tracked by autograd, ``torch.func`` or
    forward-mode AD (it has no derivative)."""
    if differentiating(itertools.chain(g, *state[1:])) or not (
            _is_number(beta1) and _is_number(beta2) and _is_number(eps)
            and _is_number(eps_root) and eps_root == 0):
        return False
    dtype, device = g[0].dtype, g[0].get_device()  # -1 on the CPU
    if dtype not in _FUSED_DTYPES or not (g[0].is_cpu or g[0].is_cuda):
        return False
    for i, x in enumerate(g):
        for y in (x, *(s[i] for s in state[1:])):  # the update, mu, nu (and nu_max)
            if (type(y) is not Tensor or y.dtype != dtype or not y.is_contiguous()
                    or y.shape != x.shape or y.is_neg() or y.get_device() != device):
                return False
    return True


def _copy(xs: list[Tensor], times: float = 1.0) -> list[Tensor]:
    """New tensors ``times * x`` for ``times`` 1 (a copy) or 0 (zeros). On a GPU one
    ``_foreach_mul`` (one launch, allocations in C++; ``x * 1`` is exactly ``x``, NaN, inf and
    -0.0 included; ``0 * x`` is NaN where ``x`` is not finite, where Adam's direction is NaN
    anyway); on a CPU a memory copy or fill, which is faster there."""
    if xs[0].is_cuda:
        return list(ops.mul(xs, times))
    out = [torch.empty_like(x) for x in xs]
    if times == 0:
        ops.zero_(out)
    else:
        ops.copy_(out, xs)
    return out


def _fused_adam(g: list[Tensor], state: Any, count: Tensor, beta1: float, beta2: float,
                eps: float, amsgrad: bool) -> tuple[list[Tensor], ...]:
    """Adam's direction ``m_hat / (sqrt(v_hat) + eps)`` and the new moments in one fused pass.

    torch's fused Adam kernel updates a parameter in place; here it runs on new tensors only:
    copies of the moments, and an all-zero "parameter" stepped with learning rate -1, which
    receives the direction. The inputs stay untouched, so the transform stays pure. The kernel
    reads the step count in float32 (exact up to 2**24 steps; beyond, the bias corrections are
    1 to within float32 rounding). A whole eager AdamW step was 1.2-1.3x faster with it than with
    the ``_foreach`` path on a small CPU MLP, and took 12-19% less time on three H100 shapes
    (2026-11-23; docs/performance.md, "What we learned").
    """
    out = _copy(g, 0.0)
    mu, nu = _copy(state.mu), _copy(state.nu)
    nu_max = _copy(state.nu_max) if amsgrad else []
    step = count.to(g[0].device, torch.float32)  # the kernels read a float32 step count
    torch._fused_adam_(out, g, mu, nu, nu_max, [step] * len(g), lr=-1.0, beta1=beta1,
                       beta2=beta2, weight_decay=0.0, eps=eps, amsgrad=amsgrad, maximize=False)
    return out, mu, nu, nu_max


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
        # float16 moments underflow (g^2 < 6e-8 is 0, and eps = 1e-8 is 0 too: 0/0): kept in
        # float32 unless mu_dtype says otherwise, and float16 steps computed in float32
        mu = [torch.zeros_like(x, dtype=mu_dtype or _wide(x.dtype)) for x in leaves]
        nu = [torch.zeros_like(x, dtype=_wide(x.dtype)) for x in leaves]
        if amsgrad:
            nu_max = [torch.zeros_like(x, dtype=_wide(x.dtype)) for x in leaves]
            return ScaleByAmsgradState(step_counter(params), mu, nu, nu_max)
        return ScaleByAdamState(step_counter(params), mu, nu)

    def update(updates, state, params=None, **extra):
        expect_state(state, ScaleByAmsgradState if amsgrad else ScaleByAdamState, "scale_by_adam")
        g_in, treedef = _leaves(updates, params, "scale_by_adam", state.mu)
        g = [x.float() if x.dtype == torch.float16 else x for x in g_in]
        count = increment(state.count)
        if not g:
            return updates, replace(state, count=count)
        beta1, beta2 = _hp(b1, state.count), _hp(b2, state.count)
        if not nesterov and _fusable(g, state, beta1, beta2, eps, eps_root):
            out, mu, nu, nu_max = _fused_adam(g, state, count, beta1, beta2, eps, amsgrad)
            new = replace(state, count=count, mu=mu, nu=nu)
            return tree_unflatten(treedef, _as(out, g_in)), replace(new, nu_max=nu_max) if amsgrad else new
        mu = _moment(_as(state.mu, g), g, beta1)
        nu = _moment_sq(_as(state.nu, g), g, beta2)
        t = _steps(count, g)
        bc1, bc2 = one_minus_pow(beta1, t), one_minus_pow(beta2, t)
        nu_used = nu
        if amsgrad:
            nu_used = ops.maximum(_as(state.nu_max, g), nu)
        if nesterov:
            m_hat = ops.mul(mu, beta1 / one_minus_pow(beta1, t + 1))
            m_hat = _axpy((1 - beta1) / bc1, g, m_hat)
            out = ops.div(m_hat, _adam_denominator(nu_used, bc2, eps, eps_root))
        elif _is_number(eps_root) and eps_root == 0 and _is_number(eps):
            # (m / bc1) / (sqrt(v) / sqrt(bc2) + eps) = m / (sqrt(v) + eps sqrt(bc2)) * (sqrt(bc2) / bc1):
            # four kernels instead of five
            root_bc2 = _sqrt(bc2)
            denom = _add_scalar(ops.sqrt(nu_used), per_step(eps * root_bc2))
            out = ops.div(mu, denom)
            out = into("mul", out, per_step(root_bc2 / bc1))  # ``out`` is new: in place is pure
        else:
            out = ops.div(ops.div(mu, bc1),
                                     _adam_denominator(nu_used, bc2, eps, eps_root))
        new = replace(state, count=count, mu=_as(mu, state.mu), nu=_as(nu, state.nu))
        if amsgrad:
            new = replace(new, nu_max=_as(nu_used, state.nu_max))
        return tree_unflatten(treedef, _as(out, g_in)), new

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
        expect_state(state, ScaleByNadamState, "scale_by_nadam")
        g, treedef = _leaves(updates, params, "scale_by_nadam", state.mu)
        count = increment(state.count)
        if not g:
            return updates, replace(state, count=count)
        t = count.to(state.mu_product.dtype)
        mu_t = b1 * (1 - 0.5 * 0.96 ** (t * momentum_decay))
        mu_next = b1 * (1 - 0.5 * 0.96 ** ((t + 1) * momentum_decay))
        prod = state.mu_product * mu_t
        m = _moment(_as(state.mu, g), g, b1)
        v = _moment_sq(_as(state.nu, g), g, b2)
        denom = ops.add(ops.sqrt(ops.div(v, one_minus_pow(b2, t))), eps)
        out = ops.mul(m, mu_next / (1 - prod * mu_next))
        out = _axpy((1 - mu_t) / (1 - prod), g, out)
        out = ops.div(out, denom)
        return tree_unflatten(treedef, _as(out, g)), ScaleByNadamState(
            count, prod, _as(m, state.mu), _as(v, state.nu)
        )

    return GradientTransformation(init, update)
