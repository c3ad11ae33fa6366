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

import math
from collections.abc import Callable, Sequence
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
from funcopt.engine import differentiating, expect_state, is_tracing, leaves, ops
from funcopt.engine import leaves as engine_leaves
from funcopt.schedules.one_based import precond_update_prob_schedule, psgd_warmup

__all__ = [
    "ScaleByPsgdKronState",
    "precond_update_prob_schedule",
    "scale_by_psgd_kron",
    "scale_by_trust_region_clip",
    "psgd_kron",
]

_MODES = (None, "one_diag", "smart_one_diag", "one_triu", "all_diag")
_F32_EPS = torch.finfo(torch.float32).eps
_TINY = torch.finfo(torch.float32).tiny


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


def _factor_kinds(shape, max_size, min_ndim, mode) -> list[str]:
    """Per dimension: ``"tri"`` (triangular) or ``"diag"``; ``["scalar"]`` for a 0-d leaf."""
    if not shape:
        return ["scalar"]
    diag = [False] * len(shape)
    biggest = max(range(len(shape)), key=lambda i: shape[i])
    if mode == "one_diag":
        diag[biggest] = True
    elif mode == "smart_one_diag":
        s = sorted(shape)
        diag[biggest] = len(shape) >= 2 and s[-1] > s[-2]
    elif mode == "one_triu":
        smallest = min(range(len(shape)), key=lambda i: (shape[i], i))
        diag = [i != smallest for i in range(len(shape))]
    elif mode == "all_diag":
        diag = [True] * len(shape)
    return ["diag" if (d == 1 or d > max_size or len(shape) < min_ndim or dg) else "tri"
            for d, dg in zip(shape, diag)]


def _init_factor(kind: str, d: int, dtype, device) -> Tensor:
    if kind == "tri":
        return torch.eye(d, dtype=dtype, device=device)
    return torch.ones(() if kind == "scalar" else (d,), dtype=dtype, device=device)


def _kind(q: Tensor) -> str:
    """Kind of a stacked factor: ``(n,)`` for 0-d leaves, ``(n, d)`` diagonal, ``(n, d, d)``."""
    return {1: "scalar", 2: "diag", 3: "tri"}[q.ndim]


def _stack(xs: list[Tensor]) -> Tensor:
    """``torch.stack(xs)``; a single tensor becomes a view with a leading 1 (no copy)."""
    return xs[0][None] if len(xs) == 1 else torch.stack(xs)


# The fit and the preconditioner work on slabs: the leaves of one bucket stacked along a new
# leading dimension ``n`` (each factor stacked the same way), so that every step below is one
# batched op per bucket rather than one op per leaf. Factor ``i`` acts on slab dimension i + 1.

def _along(x: Tensor, i: int, fn) -> Tensor:
    """Apply ``fn`` to ``x`` seen as matrices ``(n, rest, d_i)`` (dimension ``i + 1`` last)."""
    moved = x.movedim(i + 1, -1)
    out = fn(moved.reshape(x.shape[0], -1, moved.shape[-1]))
    return out.reshape(moved.shape).movedim(-1, i + 1)


def _bcast(q: Tensor, i: int, ndim: int) -> Tensor:
    """A diagonal factor ``(n, d_i)`` (or a 0-d leaf's ``(n,)``) shaped to scale dimension
    ``i + 1`` of an ``ndim``-dimensional slab."""
    shape = [1] * ndim
    shape[0] = q.shape[0]
    if q.ndim == 2:
        shape[i + 1] = q.shape[1]
    return q.view(shape)


def _apply_q(qs: list[Tensor], x: Tensor) -> Tensor:
    """``Q x``: each triangular factor multiplies its dimension, diagonal ones scale it."""
    for i, q in enumerate(qs):
        if q.ndim == 3:
            x = _along(x, i, lambda m, q=q: m @ q.mT)
        else:
            x = x * _bcast(q, i, x.ndim)
    return x


def _apply_q_inv_t(qs: list[Tensor], v: Tensor) -> Tensor:
    """``Q^{-T} v``: triangular solves per dimension, divisions for diagonal factors."""
    for i, q in enumerate(qs):
        if q.ndim == 3:
            v = _along(v, i, lambda m, q=q: torch.linalg.solve_triangular(q, m, upper=True,
                                                                            left=False))
        else:
            v = v / _bcast(q, i, v.ndim)
    return v


def _precondition(qs: list[Tensor], x: Tensor) -> Tensor:
    """``P x = Q^T Q x`` factor by factor (``Q_i^T Q_i`` formed once: ``d_i^3`` flops, less
    than a second pass of ``Q_i`` over ``x`` whenever the other dimensions hold more than
    ``d_i`` elements)."""
    for i, q in enumerate(qs):
        if q.ndim == 3:
            x = _along(x, i, lambda m, q=q: m @ (q.mT @ q).mT)
        else:
            x = x * _bcast(q * q, i, x.ndim)
    return x


def _gram_along(x: Tensor, i: int, kind: str) -> Tensor:
    """Contract ``x`` with itself over every dimension but ``i + 1`` (and the leading ``n``)."""
    if kind == "scalar":
        return x * x
    m = x.movedim(i + 1, 1).reshape(x.shape[0], x.shape[i + 1], -1)
    return m @ m.mT if kind == "tri" else (m * m).sum(-1)


def _max_eigenvalue(a: Tensor, iterations: int) -> Tensor:
    """Largest eigenvalue of each symmetric PSD matrix of ``a`` ``(n, d, d)``: start at its
    largest row, power-iterate on ``a^2``, return ``||a x||`` (shape ``(n,)``)."""
    x_norm, idx = a.norm(dim=-1).max(dim=-1)
    x_norm = x_norm.clamp(min=_TINY)[:, None, None]
    a = a / x_norm
    # the row as a gather (indexing with a 0-d tensor reads it on the host: a device sync)
    x = torch.take_along_dim(a, idx[:, None, None], dim=1)

    def mv(v):
        return (v @ a.mT) @ a.mT

    for _ in range(iterations):
        x = torch.nn.functional.normalize(mv(x), dim=-1)
    return ((x * mv(x)).sum(-1).sqrt() * x_norm[:, 0]).view(-1)


def _upper(m: Tensor) -> Tensor:
    """The upper triangles of ``m`` (a masked select: ``torch.triu`` is slow on small CPU
    inputs)."""
    idx = torch.arange(m.shape[-1], device=m.device)
    return torch.where(idx[:, None] <= idx[None, :], m, torch.zeros((), dtype=m.dtype,
                                                                   device=m.device))


def _balance(qs: list[Tensor]) -> list[Tensor]:
    """Rescale each leaf's factors to equal max-abs (geometric mean), leaving their product
    unchanged."""
    if len(qs) < 2:
        return qs
    logs = [q.abs().amax(dim=tuple(range(1, q.ndim))).log() for q in qs]
    mean = sum(logs) / len(qs)
    return [q * _bcast((mean - n).exp(), 0, q.ndim) for q, n in zip(qs, logs)]


def _fit(qs, lbs, h, v, precond_lr, lb_beta, power_iter):
    """One Lie-group step on every (stacked) factor from the pair (probe ``v``, damped
    gradient ``h``); ``lbs``: the lower bounds, ``(n,)`` float64 per factor."""
    qs = _balance(qs)
    a, conj_b = _apply_q(qs, h), _apply_q_inv_t(qs, v)
    new_q, new_lb = [], []
    for i, (q, lb) in enumerate(zip(qs, lbs)):
        kind = _kind(q)
        t1, t2 = _gram_along(a, i, kind), _gram_along(conj_b, i, kind)
        if kind == "tri":
            ell = _max_eigenvalue(t1 + t2, power_iter)
            step = _upper(t1 - t2) @ q
        else:
            ell = (t1 + t2).amax(-1) if kind == "diag" else t1 + t2
            step = q * (t1 - t2)
        # ell <- max(ell, lb + (1 - beta_l) (ell - lb)), kept in float64
        ell = torch.maximum(ell.to(torch.float64), lb + (ell - lb) * (1 - lb_beta))
        new_lb.append(ell)
        new_q.append(q - step / _bcast(ell.to(q.dtype), 0, q.ndim) * precond_lr)
    return new_q, new_lb


# --------------------------------------------------------------------------- the probe draw


@torch.library.custom_op("funcopt::psgd_probe", mutates_args=())
def _probe_op(rng: Tensor, shape: Sequence[int], dtype: torch.dtype, device: torch.device
              ) -> tuple[Tensor, Tensor]:
    """A standard normal draw of ``shape`` from the generator whose state is ``rng``, and the
    generator's state after it: the eager draw as one op, so that ``torch.compile`` keeps it
    in its graph and ``torch.func.vmap`` batches it by the rule below."""
    gen = torch.Generator(device=device)
    gen.set_state(rng.clone())  # a copy: set_state on a view into a larger tensor crashes
    v = torch.randn(tuple(shape), dtype=dtype, device=device, generator=gen)
    return v, gen.get_state()


@_probe_op.register_fake
def _probe_fake(rng, shape, dtype, device):
    return torch.empty(tuple(shape), dtype=dtype, device=device), torch.empty_like(rng)


def _probe_vmap(info, in_dims, rng, shape, dtype, device):
    """Under vmap: one draw when the generator state is shared (not batched), as every element
    of a loop whose transforms were built with the same ``seed`` would draw; one draw per
    element from its own generator state when the state is batched."""
    if in_dims[0] is None:
        return _probe_op(rng, shape, dtype, device), (None, None)
    rows = [_probe_op(r, shape, dtype, device) for r in rng.movedim(in_dims[0], 0).unbind(0)]
    return (torch.stack([v for v, _ in rows]), torch.stack([r for _, r in rows])), (0, 0)


_probe_op.register_vmap(_probe_vmap)


def _initial_scale(g: Tensor, scale, scale_scale, scale_power) -> Tensor:
    """HeavyBall's automatic initial scale ``(mean(g^4)^{-1/8} * scale_scale)^power``."""
    if scale is not None:
        return torch.as_tensor(float(scale), dtype=torch.float64, device=g.device)
    x = g.double().abs().clamp(min=1e-12).log().mul(4).flatten()
    lse = (torch.logsumexp(x, 0) - math.log(max(g.numel(), 1))) / 8
    s = (torch.exp(-lse) * scale_scale) ** (0.5 if scale_power is None else scale_power)
    return torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s))


def scale_by_psgd_kron(
    b1: float = 0.9,
    preconditioner_update_probability: float | Callable | None = None,
    max_size_triangular: int = 2048,
    min_ndim_triangular: int = 2,
    memory_save_mode: str | None = None,
    momentum_into_precond_update: bool = True,
    precond_lr: float = 0.1,
    precond_init_scale: float | None = None,
    precond_init_scale_scale: float = 1.0,
    precond_init_scale_power: float | None = None,
    lower_bound_beta: float = 0.9,
    dampening: float = 1e-9,
    precond_update_power_iterations: int = 2,
    q_dtype: torch.dtype | None = None,
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
      max_size_triangular: dimensions larger than this get diagonal factors. Default 2048.
      min_ndim_triangular: leaves with fewer dimensions get diagonal factors. Default 2.
      memory_save_mode: None, "one_diag", "smart_one_diag", "one_triu" or "all_diag".
      momentum_into_precond_update: fit to :math:`m_t` (True, default) or :math:`g_t`.
      precond_lr: :math:`\\eta_Q`. Default 0.1.
      precond_init_scale: fixed :math:`s` (default None: automatic, as above).
      precond_init_scale_scale, precond_init_scale_power: factor (1) and power (None = 0.5)
        of the automatic :math:`s`.
      lower_bound_beta: :math:`\\beta_\\ell`. Default 0.9.
      dampening: :math:`\\delta`. Default 1e-9.
      precond_update_power_iterations: power iterations for :math:`\\lambda_{max}`. Default 2.
      q_dtype: dtype of the factors (default: the leaf's dtype, at least float32).
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
    check_hyperparameter("lower_bound_beta", lower_bound_beta, low=0.0, high=1.0)
    check_hyperparameter("dampening", dampening, low=0.0)
    if memory_save_mode not in _MODES:
        raise ValueError(f"memory_save_mode={memory_save_mode!r}: use one of {_MODES}")
    prob = (precond_update_prob_schedule() if preconditioner_update_probability is None
            else preconditioner_update_probability)

    def init(params):
        ps, _ = leaves(params, None, "scale_by_psgd_kron")
        count = step_counter(params)
        qs, lbs = [], []
        for p in ps:
            shape = tuple(d for d in p.shape if d != 1)
            dt = q_dtype or torch.promote_types(p.dtype, torch.float32)
            kinds = _factor_kinds(shape, max_size_triangular, min_ndim_triangular,
                                  memory_save_mode)
            qs.append([_init_factor(k, d, dt, p.device) for k, d in zip(kinds, shape or (1,))])
            lbs.append([torch.zeros((), dtype=torch.float64, device=p.device) for _ in kinds])
        gen = torch.Generator(device=count.device).manual_seed(seed)
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
                s = _initial_scale(g_b, precond_init_scale, precond_init_scale_scale,
                                   precond_init_scale_power)
                q_b = _select(first, _scaled(q_b, s), q_b)
            qd = q_b[0].dtype
            if fit is not False:
                b = m if momentum_into_precond_update else g_b
                v = draw(b)
                h = b + (dampening + _F32_EPS * b.abs()) * v
                lb_b = [_stack(f) for f in zip(*(lbs[i] for i in idx))]
                new_q, new_lb = _fit(q_b, lb_b, h.to(qd), v.to(qd), precond_lr,
                                     lower_bound_beta, precond_update_power_iterations)
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


def _select(cond, new: list[Tensor], old: list[Tensor]) -> list[Tensor]:
    """``new`` where ``cond`` holds, else ``old``: a Python bool in eager steps, a bool tensor
    (``torch.where``, no host read) in traced ones."""
    if isinstance(cond, Tensor):
        return [torch.where(cond, a, b) for a, b in zip(new, old)]
    return new if cond else old


class _Probes:
    """The probe draws of one step, bucket after bucket, from the generator state ``rng``.

    Eager: one ``torch.Generator`` on ``device`` (as HeavyBall's ``randn_like`` on the global
    one). Traced: the same draws through the ``funcopt::psgd_probe`` op, which
    ``torch.compile`` keeps in its graph and ``vmap`` batches; the generator state is threaded
    from draw to draw, and :meth:`state` keeps the old one where no fit ran.
    """

    def __init__(self, rng: Tensor, device: torch.device, traced: bool):
        self.start, self.rng, self.traced = rng, rng, traced
        if not traced:
            self.gen = torch.Generator(device=device)
            self.gen.set_state(rng)

    def __call__(self, b: Tensor) -> Tensor:
        if self.traced:
            v, self.rng = _probe_op(self.rng, list(b.shape), b.dtype, b.device)
            return v
        return torch.randn(b.shape, dtype=b.dtype, device=b.device, generator=self.gen)

    def state(self, fit) -> Tensor:
        if not self.traced:
            return self.gen.get_state()
        return torch.where(fit.to(self.rng.device), self.rng, self.start)


def _buckets(leaves: list[Tensor], mu: list[Tensor], qs: list[list[Tensor]]) -> list[list[int]]:
    """Leaf indices grouped by (shape, dtype, device), in order of first appearance.

    HeavyBall stacks such leaves: they share one initial scale and one probe draw. The dtypes
    of the momentum and the factors join the key, so that stacking never promotes a leaf's
    state to another leaf's dtype.
    """
    groups: dict[tuple, list[int]] = {}
    for i, x in enumerate(leaves):
        key = (tuple(x.shape), x.dtype, x.device, mu[i].dtype, qs[i][0].dtype)
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def _scaled(q: list[Tensor], s: Tensor) -> list[Tensor]:
    """The unit factors times ``s^{1/k}`` (``k`` factors; a 0-d leaf's one factor gets ``s``)."""
    return [qi * (s ** (1.0 / len(q))).to(qi.dtype) for qi in q]


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
    **kwargs,
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
      **kwargs: passed to :func:`scale_by_psgd_kron` (preconditioner options, ``seed``).

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
    parts = [scale_by_psgd_kron(b1, **kwargs)]
    if update_clipping:
        parts.append(scale_by_trust_region_clip())
    if weight_decay:
        parts.append(add_decayed_weights(weight_decay))
    parts.append(scale_by_learning_rate(lr))
    return chain(*parts)
