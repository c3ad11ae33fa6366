"""PSGD Kron: a Kronecker-factored preconditioner fitted by Lie-group (triangular) updates.

Each parameter of shape ``(d_1, ..., d_k)`` (size-1 dimensions dropped) gets one factor per
dimension: an upper-triangular ``Q_i`` (``d_i x d_i``) or, to save memory, a diagonal one.
The preconditioner is :math:`P = Q^T Q` with :math:`Q = Q_1 \\otimes \\dots \\otimes Q_k`;
it is fitted so that :math:`P h \\approx v` for a probe :math:`v` and a damped gradient
:math:`h`, and applied to the momentum.

Reference: Xi-Lin Li, "Preconditioned Stochastic Gradient Descent",
https://arxiv.org/abs/1512.04202 and https://github.com/lixilinx/psgd_torch; defaults and
details as HeavyBall 3.2.1's ``PSGDKron`` (https://github.com/HomebrewML/HeavyBall).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from funcopt.base import (
    GradientTransformation,
    ScalarOrSchedule,
    Tensor,
    check_hyperparameter,
    increment,
    step_counter,
    tree_unflatten,
)
from funcopt.engine import (
    differentiating,
    expect_state,
    is_tracing,
    leaves,
    ops,
    options_or_default,
)
from funcopt.engine import leaves as engine_leaves
from funcopt.schedules.one_based import precond_update_prob_schedule, psgd_warmup
from funcopt.transforms.psgd_factors import (
    _F32_EPS,
    _buckets,
    _factor_kinds,
    _fit,
    _init_factor,
    _initial_scale,
    _precondition,
    _Probes,
    _scaled,
    _select,
    _stack,
)

__all__ = [
    "PsgdKronOptions",
    "ScaleByPsgdKronState",
    "precond_update_prob_schedule",
    "scale_by_psgd_kron",
    "scale_by_trust_region_clip",
    "psgd_kron",
]

_MODES = (None, "one_diag", "smart_one_diag", "one_triu", "all_diag")


@dataclass(frozen=True)
class PsgdKronOptions:
    """The rarely tuned numbers of PSGD Kron's preconditioner, HeavyBall 3.2.1's defaults.

    Pass one to :func:`scale_by_psgd_kron` or :func:`psgd_kron` as ``options=``, e.g.
    ``fo.psgd_kron(1e-3, options=fo.PsgdKronOptions(memory_save_mode="one_diag"))``. Every
    field is checked when the object is built: a bad value is a ``ValueError`` (a wrong type
    a ``TypeError``) that names the field.

    Attributes:
      max_size_triangular: dimensions larger than this get diagonal factors. Default 2048.
      min_ndim_triangular: leaves with fewer dimensions get diagonal factors. Default 2.
      memory_save_mode: which further dimensions get diagonal factors: None (none, default),
        ``"one_diag"`` (the largest), ``"smart_one_diag"`` (the largest when it is strictly
        the largest), ``"one_triu"`` (all but the smallest) or ``"all_diag"`` (all).
      precond_init_scale: a fixed initial scale :math:`s` > 0 (default None: automatic,
        :math:`(\\mathrm{mean}(g^4)^{-1/8}\\,c)^{p}` from the first gradient).
      precond_init_scale_scale: :math:`c` > 0 of the automatic scale. Default 1.0.
      precond_init_scale_power: :math:`p` of the automatic scale (default None: 0.5).
      lower_bound_beta: :math:`\\beta_\\ell` in [0, 1], the decay of the running lower bound
        of each factor's step normaliser. Default 0.9.
      dampening: :math:`\\delta` >= 0, the probe's damping. Default 1e-9.
      precond_update_power_iterations: power iterations (>= 1) for :math:`\\lambda_{max}`.
        Default 2.
      q_dtype: floating dtype of the factors (default None: the leaf's, at least float32).
    """

    max_size_triangular: int = 2048
    min_ndim_triangular: int = 2
    memory_save_mode: str | None = None
    precond_init_scale: float | None = None
    precond_init_scale_scale: float = 1.0
    precond_init_scale_power: float | None = None
    lower_bound_beta: float = 0.9
    dampening: float = 1e-9
    precond_update_power_iterations: int = 2
    q_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        def name(field: str) -> str:
            return f"PsgdKronOptions.{field}"

        for field, low in (("max_size_triangular", 1), ("min_ndim_triangular", 0),
                           ("precond_update_power_iterations", 1)):
            v = getattr(self, field)
            if not isinstance(v, int) or isinstance(v, bool):
                raise TypeError(f"{name(field)} must be an int; got {type(v).__name__}")
            if v < low:
                raise ValueError(f"{name(field)}={v} is out of range: pass an int >= {low}")
        if self.memory_save_mode not in _MODES:
            raise ValueError(f"{name('memory_save_mode')}={self.memory_save_mode!r}: use one "
                             f"of {_MODES}")
        if self.precond_init_scale is not None:
            check_hyperparameter(name("precond_init_scale"), self.precond_init_scale, low=0.0,
                                 low_inclusive=False)
        check_hyperparameter(name("precond_init_scale_scale"), self.precond_init_scale_scale,
                             low=0.0, low_inclusive=False)
        if self.precond_init_scale_power is not None:
            check_hyperparameter(name("precond_init_scale_power"),
                                 self.precond_init_scale_power, low=None)
        check_hyperparameter(name("lower_bound_beta"), self.lower_bound_beta, low=0.0, high=1.0)
        check_hyperparameter(name("dampening"), self.dampening, low=0.0)
        if self.q_dtype is not None and not (isinstance(self.q_dtype, torch.dtype)
                                             and self.q_dtype.is_floating_point):
            raise TypeError(f"{name('q_dtype')}={self.q_dtype!r}: pass None or a floating "
                            "torch.dtype")


class ScaleByPsgdKronState(NamedTuple):
    """``count``; ``prob_sum``: the summed update probabilities (an update happens whenever its
    integer part grows); ``mu``: momentum; ``qs``/``lower_bounds``: per leaf, the factors and the
    running lower bounds of their step normalisers; ``rng``: the probe generator's state."""

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count by design (optax's name)
    prob_sum: Tensor
    mu: list
    qs: list
    lower_bounds: list
    rng: Tensor


def scale_by_psgd_kron(
    b1: float = 0.9,
    preconditioner_update_probability: float | Callable | None = None,
    momentum_into_precond_update: bool = True,
    precond_lr: float = 0.1,
    options: PsgdKronOptions | None = None,
    seed: int = 0,
) -> GradientTransformation:
    """Precondition the momentum with a Kronecker-factored PSGD preconditioner.

    With :math:`m_t = \\hat\\beta_1 m_{t-1} + (1-\\hat\\beta_1) g_t` (debiased EMA,
    :math:`\\hat\\beta_1 = 1 - (1-\\beta_1)/(1-\\beta_1^t)`), probe :math:`v \\sim N(0, I)` and
    :math:`h = b + (\\delta + \\epsilon_{32} |b|) v` (:math:`b = m_t`, or :math:`g_t` when
    ``momentum_into_precond_update=False``), on update steps every factor moves by

    .. math::
        A = Q h, \\quad B = Q^{-T} v, \\quad
        Q_i \\leftarrow Q_i - \\frac{\\eta_Q}{\\ell_i}\\,\\mathrm{triu}(A_{(i)}A_{(i)}^T -
        B_{(i)}B_{(i)}^T)\\,Q_i

    (diagonal factors: element-wise), where :math:`\\ell_i = \\max(\\lambda_{max},
    \\beta_\\ell \\ell_i' + (1-\\beta_\\ell)\\lambda_{max})` is a running bound of the largest
    eigenvalue of :math:`A_{(i)}A_{(i)}^T + B_{(i)}B_{(i)}^T`. Factors are first rebalanced to
    equal max-abs. The output is :math:`Q^T Q m_t`. :math:`Q_i` start as
    :math:`s^{1/k} I`, :math:`s` from the first gradient (``mean(g^4)^{-1/16}``).

    Args:
      b1: :math:`\\beta_1`, momentum. Default 0.9.
      preconditioner_update_probability: ``p(t)`` (float or schedule of the 1-based step); the
        factors update whenever :math:`\\lfloor\\sum_{s\\le t} p(s)\\rfloor` grows (HeavyBall's
        deterministic accumulation). Default :func:`precond_update_prob_schedule`.
      momentum_into_precond_update: fit to :math:`m_t` (True, default) or :math:`g_t`.
      precond_lr: :math:`\\eta_Q`. Default 0.1.
      options: a :class:`PsgdKronOptions` with the rest of the preconditioner's numbers
        (which dimensions get triangular factors, :math:`s`, :math:`\\beta_\\ell`,
        :math:`\\delta`, power iterations, the factors' dtype). Default None: its defaults.
      seed: seed of the probe generator, whose state lives in the state (field ``rng``).

    As HeavyBall, leaves of equal shape, dtype and device share one initial scale (computed
    over all of them) and one probe draw (in order of first appearance); everything else is
    per leaf, computed for all leaves of such a bucket at once (stacked, one batched op per
    bucket rather than one op per leaf). Differences from HeavyBall 3.2.1: an all-zero first
    gradient gives :math:`s = 1` instead of an error; factors are stored as full matrices
    (HeavyBall packs the upper triangle). In eager steps whether this step fits the factors
    is decided on the host (one sync per step, the only one); while
    :func:`funcopt.engine.is_tracing` both branches run and ``torch.where`` picks, so
    ``torch.compile(update, fullgraph=True)`` traces it with no recompiles.

    ``torch.func.vmap``: the probes are drawn from the generator state in ``state.rng``
    through one op (``funcopt::psgd_probe``) with its own batching rule, not from vmap's
    randomness, so any ``randomness`` (``"error"``, the default, ``"same"`` or
    ``"different"``) gives the same numbers: those of a loop whose elements were each
    initialised with this ``seed`` (a state from ``vmap(init)`` draws per element from its
    own row of ``rng``). Zero-size leaves get zero-size updates and draw nothing.
    Reference: https://arxiv.org/abs/1512.04202.
    """
    check_hyperparameter("b1", b1, low=0.0, high=1.0, high_inclusive=False)
    check_hyperparameter("precond_lr", precond_lr, low=0.0)
    opt = options_or_default(options, PsgdKronOptions, "scale_by_psgd_kron", "options")
    prob = (precond_update_prob_schedule() if preconditioner_update_probability is None
            else preconditioner_update_probability)

    def init(params):
        ps, _ = leaves(params, None, "scale_by_psgd_kron")
        count = step_counter(params)
        qs, lbs = [], []
        for p in ps:
            shape = tuple(d for d in p.shape if d != 1)
            dt = opt.q_dtype or torch.promote_types(p.dtype, torch.float32)
            kinds = _factor_kinds(shape, opt.max_size_triangular, opt.min_ndim_triangular,
                                  opt.memory_save_mode)
            qs.append([_init_factor(k, d, dt, p.device) for k, d in zip(kinds, shape or (1,))])
            lbs.append([torch.zeros((), dtype=torch.float64, device=p.device) for _ in kinds])
        gen = torch.Generator(device=count.device).manual_seed(int(seed))  # a 0-d tensor too
        mu = [torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32))
              for p in ps]
        return ScaleByPsgdKronState(count, torch.zeros((), dtype=torch.float64,
                                                       device=count.device),
                                    mu, qs, lbs, gen.get_state())

    def update(updates, state, params=None, **extra):
        expect_state(state, ScaleByPsgdKronState, "scale_by_psgd_kron")
        g, treedef = leaves(updates, params, "scale_by_psgd_kron", state.mu)
        count = increment(state.count)
        t = count.to(torch.float64)
        p_t = torch.as_tensor(prob(count) if callable(prob) else prob, dtype=torch.float64,
                              device=t.device)
        prob_sum = state.prob_sum + p_t
        fit_t = torch.floor(prob_sum) > torch.floor(state.prob_sum)
        # eager: one host sync decides whether the factors are fitted and whether this is the
        # first step; traced (compile, vmap): both branches run and torch.where picks
        fit, first = ((fit_t, count == 1) if is_tracing()
                      else torch.stack([fit_t, count == 1]).tolist())
        beta = 1.0 - (1.0 - b1) / (1.0 - b1 ** t)
        mu, out = list(state.mu), list(g)  # every leaf is replaced below, bucket by bucket
        qs, lbs = [list(q) for q in state.qs], [list(lb) for lb in state.lower_bounds]
        draw = _Probes(state.rng, count.device, traced=isinstance(fit, Tensor))
        for idx in _buckets(g, state.mu, state.qs):
            if g[idx[0]].numel() == 0:  # nothing to precondition: a zero-size update
                for i in idx:
                    out[i] = torch.zeros_like(g[i])
                continue
            # the bucket as slabs: (n, *shape) with size-1 dimensions dropped
            shape = (len(idx),) + tuple(d for d in g[idx[0]].shape if d != 1)
            m_old = _stack([state.mu[i] for i in idx]).reshape(shape)
            g_b = _stack([g[i] for i in idx]).reshape(shape).to(m_old.dtype)
            m = m_old.lerp(g_b, (1.0 - beta).to(m_old.dtype))
            q_b = [_stack(f) for f in zip(*(qs[i] for i in idx))]
            if first is not False:
                s = _initial_scale(g_b, opt.precond_init_scale, opt.precond_init_scale_scale,
                                   opt.precond_init_scale_power)
                q_b = _select(first, _scaled(q_b, s), q_b)
            qd = q_b[0].dtype
            if fit is not False:
                b = m if momentum_into_precond_update else g_b
                v = draw(b)
                h = b + (opt.dampening + _F32_EPS * b.abs()) * v
                lb_b = [_stack(f) for f in zip(*(lbs[i] for i in idx))]
                new_q, new_lb = _fit(q_b, lb_b, h.to(qd), v.to(qd), precond_lr,
                                     opt.lower_bound_beta, opt.precond_update_power_iterations)
                q_b, lb_b = _select(fit, new_q, q_b), _select(fit, new_lb, lb_b)
                for i, lb_i in zip(idx, zip(*(lb.unbind(0) for lb in lb_b))):
                    lbs[i] = list(lb_i)
            if fit is not False or first is not False:
                for i, q_i in zip(idx, zip(*(q.unbind(0) for q in q_b))):
                    qs[i] = list(q_i)
            p_b = _precondition(q_b, m.to(qd))
            x = g[idx[0]]
            for i, m_i, p_i in zip(idx, m.reshape(-1, *state.mu[idx[0]].shape).unbind(0),
                                   p_b.reshape(-1, *x.shape).to(x.dtype).unbind(0)):
                mu[i], out[i] = m_i, p_i
        new = ScaleByPsgdKronState(count, prob_sum, mu, [list(q) for q in qs],
                                   [list(lb) for lb in lbs], draw.state(fit))
        return tree_unflatten(treedef, out), new

    return GradientTransformation(init, update)



def scale_by_trust_region_clip(lerp: float = 0.9, scale: float = 1.5) -> GradientTransformation:
    """Soft element-wise clipping of the update (HeavyBall's ``trust_region_clip_``).

    .. math::
        u \\leftarrow \\mathrm{clip}\\big(s\\,[(1-\\alpha)\\,\\mathrm{sign}(u)\\log(1+|u|/s) +
        \\alpha \\tanh(u/s)],\\ -2,\\ 2\\big)

    Args:
      lerp: :math:`\\alpha`, weight of the tanh branch. Default 0.9.
      scale: :math:`s`. Default 1.5.
    """
    check_hyperparameter("lerp", lerp, low=0.0, high=1.0)
    check_hyperparameter("scale", scale, low=0.0, low_inclusive=False)

    def update(updates, state, params=None, **extra):
        leaves, treedef = engine_leaves(updates, params, "scale_by_trust_region_clip")
        if not leaves:
            return updates, state
        # one _foreach op per step of the formula (not one op per leaf); copysign(log1p|x|,
        # tanh x) is sign(x) log1p|x|
        y = ops.div([u.to(torch.promote_types(u.dtype, torch.float32))
                                for u in leaves], scale)
        th = ops.tanh(y)
        if differentiating(leaves):
            # differentiable: out of place (autograd and torch.func keep tanh's output and
            # copysign's for the backward pass); a compiled step plans its own buffers
            y = ops.log1p(ops.abs(y))
            y = [torch.copysign(a, t) for a, t in zip(y, th)]  # no _foreach_copysign
            y = ops.add(ops.mul(y, 1 - lerp), ops.mul(th, lerp))
            y = ops.clamp_max(ops.clamp_min(ops.mul(y, scale),
                                                                  -2.0), 2.0)
        else:  # eager: in place in the two buffers made above (peak: two temporaries)
            ops.abs_(y)
            ops.log1p_(y)
            for a, t in zip(y, th):
                a.copysign_(t)
            ops.mul_(y, 1 - lerp)
            ops.mul_(th, lerp)
            ops.add_(y, th)
            del th
            ops.mul_(y, scale)
            ops.clamp_min_(y, -2.0)
            ops.clamp_max_(y, 2.0)
        return tree_unflatten(treedef, [o.to(u.dtype) for o, u in zip(y, leaves)]), state

    return GradientTransformation(lambda params: (), update)


def psgd_kron(
    learning_rate: ScalarOrSchedule = 0.001,
    b1: float = 0.9,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    update_clipping: bool = True,
    preconditioner_update_probability: float | Callable | None = None,
    momentum_into_precond_update: bool = True,
    precond_lr: float = 0.1,
    options: PsgdKronOptions | None = None,
    seed: int = 0,
) -> GradientTransformation:
    """PSGD Kron with HeavyBall 3.2.1 ``PSGDKron`` defaults.

    .. math::
        u_t = -\\gamma_t\\,(\\mathrm{clip}(Q^T Q m_t) + \\lambda \\theta_t), \\qquad
        \\gamma_t = \\gamma\\, t / \\max(t, T_w + 1)

    Args:
      learning_rate: :math:`\\gamma`. Default 0.001. A plain number is held in the state
        field ``learning_rate`` of the last chain element (when ``warmup_steps=0``).
      b1: momentum :math:`\\beta_1`. Default 0.9.
      weight_decay: :math:`\\lambda`, decoupled (scaled by the learning rate). Default 0.
      warmup_steps: :math:`T_w`, HeavyBall's linear warmup. Default 0.
      update_clipping: apply :func:`scale_by_trust_region_clip` (HeavyBall's default). Default True.
      preconditioner_update_probability: passed to :func:`scale_by_psgd_kron` (default
        HeavyBall's schedule :func:`precond_update_prob_schedule`).
      momentum_into_precond_update: passed on (default True).
      precond_lr: passed on (default 0.1).
      options: passed on (default ``PsgdKronOptions()``).
      seed: passed on (default 0).

    Reference: https://arxiv.org/abs/1512.04202; HeavyBall 3.2.1 ``PSGDKron``.
    """
    from funcopt.compose import chain
    from funcopt.transforms.first_order import scale_by_learning_rate
    from funcopt.transforms.weight_decay import add_decayed_weights

    check_hyperparameter("warmup_steps", warmup_steps, low=0.0)
    lr = learning_rate
    if warmup_steps > 0:
        if callable(learning_rate):
            raise ValueError("psgd_kron: pass warmup inside the learning-rate schedule, or a "
                             "number with warmup_steps, not both")
        lr = psgd_warmup(learning_rate, warmup_steps)
    parts = [scale_by_psgd_kron(b1, preconditioner_update_probability,
                                momentum_into_precond_update, precond_lr, options, seed)]
    if update_clipping:
        parts.append(scale_by_trust_region_clip())
    if weight_decay:
        parts.append(add_decayed_weights(weight_decay))
    parts.append(scale_by_learning_rate(lr))
    return chain(*parts)
