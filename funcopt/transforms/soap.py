"""SOAP: Adam in the eigenbasis of Shampoo's preconditioner, and HeavyBall's refresh schedule.

Reference: Vyas, Morwani, Zhao, Shapira, Brandfonbrener, Janson, Kakade, "SOAP: Improving and
Stabilizing Shampoo using Adam", https://arxiv.org/abs/2409.11321, code
https://github.com/nikhilvyas/SOAP. The numbers follow HeavyBall 0.7.2's ``ForeachSOAP``
(https://github.com/HomebrewML/HeavyBall, v0.7.2), including its dimension merging, the
row-wise eigenvalue estimate in the QR refresh and the first step that only initialises the
preconditioner. Differences from HeavyBall 3.x are listed in :func:`scale_by_soap`.

In an eager step SOAP decides on the host whether this is the first step and whether to
refresh the eigenbasis (one ``.item()`` of the step counter per step; the QR refresh runs only
on refresh steps, reading on the host which factors need more work: ``soap_qr``). While tracing
(``torch.compile``, ``torch.func.vmap``) both branches run every step and ``torch.where`` picks,
on the device: no host read, no recompile, the eager numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from funcopt.base import (
    GradientTransformation,
    ScalarOrSchedule,
    Tensor,
    check_hyperparameter,
    increment,
    replace,
    resolve,
    step_counter,
    tree_unflatten,
)
from funcopt.engine import expect_state, is_tracing, leaves, ops, options_or_default
from funcopt.schedules.one_based import precond_schedule_probability
from funcopt.transforms.soap_qr import _canonical_orthonormal
from funcopt.transforms.soap_refresh import (
    RefreshFn,
    every_n_steps,
    precond_schedule,
    uniform_from_seed,
)

__all__ = [
    "SoapFactors",
    "ScaleBySoapState",
    "scale_by_soap",
    "soap",
    "precond_schedule",
    "precond_schedule_probability",
    "every_n_steps",
    "uniform_from_seed",
]

# --------------------------------------------------------------------------- shapes and projections


def _merged_shape(shape: tuple[int, ...], max_dim: int) -> list[int]:
    """HeavyBall 0.7.2's merge: fold trailing dims together while their product < max_dim."""
    merged, cur = [], 1
    for size in reversed(shape[1:]):
        if cur * size >= max_dim:
            merged.append(cur if cur > 1 else size)
            cur = size if cur > 1 else 1
        else:
            cur *= size
    merged = [*shape[:1], *reversed(merged)]
    if cur > 1 or not merged:
        merged.append(cur)
    return merged


def _work_shape(shape, merge_dims: bool, max_dim: int) -> list[int]:
    if len(shape) <= 1 or not merge_dims or 0 in shape:
        return list(shape) if shape else [1]
    return _merged_shape(tuple(shape), max_dim)


def _has(m: Tensor) -> bool:
    """Whether a factor slot holds a factor: a ``(0, 0)`` tensor marks a dimension without one
    (the state holds tensors only, so ``vmap`` and ``torch.save`` see no ``None``)."""
    return m.numel() > 0


def _project(x: Tensor, qs: tuple, back: bool) -> Tensor:
    """Rotate every dim ``d`` that has a basis: ``Q_d^T x`` (forward) or ``Q_d x`` (back)."""
    for d, q in enumerate(qs):
        if _has(q):
            x = torch.tensordot(x, q.t() if back else q, dims=([d], [0])).movedim(-1, d)
    return x


def _gram(g: Tensor, d: int) -> Tensor:
    other = [i for i in range(g.dim()) if i != d]
    return torch.tensordot(g, g, dims=(other, other))


def _qr_refresh(ggs: list[tuple], qss: list[tuple], vs: list) -> tuple[list[tuple], list]:
    """One power-iteration step and QR per factor of every leaf (the QRs batched, see
    ``soap_qr._orthonormal``); reorders each ``v`` (work shape; None to skip) to match."""
    mats, where, vs = [], [], list(vs)
    for leaf, (gg, qs) in enumerate(zip(ggs, qss)):
        for d, (m, q) in enumerate(zip(gg, qs)):
            if not _has(m):
                continue
            mq = m @ q
            order = torch.argsort((q * mq).sum(1), descending=True)  # HeavyBall 0.7.2: row sums
            mats.append(mq[:, order])
            where.append((leaf, d))
            if vs[leaf] is not None:
                vs[leaf] = vs[leaf].index_select(d, order)
    new = [list(qs) for qs in qss]
    for (leaf, d), q in zip(where, _canonical_orthonormal(mats)):
        new[leaf][d] = q
    return [tuple(qs) for qs in new], vs


def _eigenbasis(m: Tensor) -> Tensor:
    """Eigenvectors of ``m``, largest first; NaN where ``m`` is not finite (eigh refuses it)."""
    eye, ok = torch.eye(m.shape[0], dtype=m.dtype, device=m.device), torch.isfinite(m).all()
    q = torch.flip(torch.linalg.eigh(torch.where(ok, m, eye) + 1e-30 * eye)[1], [1])
    return torch.where(ok, q, torch.nan)


# --------------------------------------------------------------------------- the transform


@dataclass(frozen=True)
class SoapFactors:
    """Which dimensions of a tensor get a Kronecker factor (and an eigenbasis) in SOAP.

    Pass one to :func:`scale_by_soap` or :func:`soap` as ``factors=``, e.g.
    ``fo.soap(3e-3, factors=fo.SoapFactors(max_precond_dim=1024))``. Fields are checked when
    the object is built; a bad value raises an error that names the field.

    Attributes:
      max_precond_dim: dimensions larger than this get no factor (int >= 1). Default 2048.
      merge_dims: merge trailing dimensions (conv kernels) as HeavyBall does. Default True.
      precondition_1d: give 1-d tensors a factor too. Default False (plain Adam on them).
    """

    max_precond_dim: int = 2048
    merge_dims: bool = True
    precondition_1d: bool = False

    def __post_init__(self) -> None:
        m = self.max_precond_dim
        if not isinstance(m, int) or isinstance(m, bool) or m < 1:
            raise ValueError(f"SoapFactors.max_precond_dim={m!r} must be a positive integer")
        for name in ("merge_dims", "precondition_1d"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"SoapFactors.{name}={getattr(self, name)!r} must be a bool")


class ScaleBySoapState(NamedTuple):
    """State of :func:`scale_by_soap`: ``count``, the step t; ``seed``, the 0-d int64 seed of
    the refresh draws; ``exp_avg`` and ``exp_avg_sq``, Adam's moments in the eigenbasis; ``gg``,
    the Shampoo factor statistics :math:`L, R` per leaf; ``q``, their eigenbases
    :math:`Q_L, Q_R`."""

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count by design (optax's name)
    seed: Tensor
    exp_avg: list
    exp_avg_sq: list
    gg: list
    q: list


def _debias(beta, step):
    """The debiased EMA weight ``1 - (1 - beta) / (1 - beta^step)`` (numbers or tensors)."""
    return 1.0 - (1.0 - beta) / (1.0 - beta**step)


def _init_leaf(p: Tensor, merge_dims, max_dim, precondition_1d):
    """Per work dimension the factor ``L_d`` (zeros) and basis ``Q_d`` (identity); ``(0, 0)``
    for a dimension without one (too large, 1-d leaves unless ``precondition_1d``, and every
    dimension of a zero-size leaf, whose update is zero-size)."""
    f32 = torch.promote_types(p.dtype, torch.float32)
    shape = _work_shape(p.shape, merge_dims, max_dim)
    use = (lambda s: s <= max_dim) if p.dim() > 1 else (lambda s: precondition_1d and s <= max_dim)
    size = [s if use(s) and p.numel() > 0 else 0 for s in shape]
    gg = tuple(torch.zeros(s, s, dtype=f32, device=p.device) for s in size)
    q = tuple(torch.eye(s, dtype=f32, device=p.device) for s in size)
    return gg, q


def scale_by_soap(
    b1: float = 0.9, b2: ScalarOrSchedule = 0.95, shampoo_beta: ScalarOrSchedule | None = 0.95,
    eps: float = 1e-8, precondition_frequency: int | RefreshFn = 2,
    factors: SoapFactors | None = None, seed: int = 0, moment_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """SOAP's direction: Adam run in the eigenbasis of Shampoo's Kronecker factors.

    For each tensor (dims merged as HeavyBall does), with factors :math:`L_d` and bases
    :math:`Q_d`, :math:`\\tilde x = x \\times_d Q_d^T` (all dims with a basis):

    .. math::
        m_t &= \\hat\\beta_1 m_{t-1} + (1-\\hat\\beta_1) g_t, \\quad
        v_t = \\hat\\beta_2 v_{t-1} + (1-\\hat\\beta_2)\\tilde g_t^2 \\\\
        u_t &= \\big(\\tilde m_t / \\max(\\sqrt{v_t}, \\epsilon)\\big) \\times_d Q_d \\\\
        L_d &\\leftarrow \\beta_s L_d + (1-\\beta_s)\\, g_t g_t^T|_d

    with :math:`\\hat\\beta = 1 - (1-\\beta)/(1-\\beta^t)` (debiased EMA). On refresh steps each
    :math:`Q_d` becomes ``qr(L_d Q_d)`` with columns sorted by the estimated eigenvalues, and
    :math:`v` is permuted to match. The first step only initialises :math:`L_d` from
    :math:`g_0` and :math:`Q_d` by ``eigh`` followed by one refresh; it returns a zero update.

    Args:
      b1: :math:`\\beta_1`. Default 0.9.
      b2: :math:`\\beta_2`, float or schedule of the step :math:`t` (PaLM: ``1 - t**-0.8``).
        Default 0.95.
      shampoo_beta: :math:`\\beta_s`, float or schedule. Default 0.95 (the SOAP paper's and
        HeavyBall 3.x's value). ``None`` follows HeavyBall 0.7.2, :math:`1-\\beta_s =
        \\hat\\beta_2`: the newest outer product then gets weight ~0.95, the factors stay
        nearly rank-deficient and training can diverge (a 256-wide MLP on digits at lr 3e-3
        does); the 0.7.2 recipes in :mod:`funcopt.heavyball` use it to match 0.7.2.
      eps: :math:`\\epsilon` (a floor on :math:`\\sqrt{v}`). Default 1e-8.
      precondition_frequency: refresh every ``n`` steps (int, default 2) or a rule
        ``refresh(step, seed) -> bool tensor`` such as :func:`precond_schedule`.
      factors: a :class:`SoapFactors`: which dims get a factor (``max_precond_dim`` 2048,
        ``merge_dims`` True, ``precondition_1d`` False). Default None: those defaults.
      seed: the seed stored in the state for random refresh rules. Default 0.
      moment_dtype: storage dtype of :math:`m, v` (e.g. ``torch.bfloat16``); math is float32+.

    Differences from HeavyBall 3.x: 3.x debiases ``shampoo_beta`` itself, estimates the
    eigenvalues column-wise, adds a spectral lift before QR and rotates the momentum on a basis
    change; funcopt follows 0.7.2 here.
    """
    check_hyperparameter("b1", b1, low=0.0, high=1.0, high_inclusive=False)
    check_hyperparameter("b2", b2, low=0.0, high=1.0, high_inclusive=False)
    check_hyperparameter("eps", eps, low=0.0)
    fac = options_or_default(factors, SoapFactors, "scale_by_soap", "factors")
    max_precond_dim, merge_dims, precondition_1d = (fac.max_precond_dim, fac.merge_dims,
                                                    fac.precondition_1d)
    refresh = (precondition_frequency if callable(precondition_frequency)
               else every_n_steps(precondition_frequency))

    def init(params):
        ps, _ = leaves(params, None, "scale_by_soap")
        count = step_counter(params)
        per_leaf = [_init_leaf(p, merge_dims, max_precond_dim, precondition_1d) for p in ps]
        mdt = lambda p: moment_dtype or torch.promote_types(p.dtype, torch.float32)  # noqa: E731
        return ScaleBySoapState(
            count, torch.tensor(seed, dtype=torch.int64, device=count.device),
            [torch.zeros_like(p, dtype=mdt(p)) for p in ps],
            [torch.zeros_like(p, dtype=mdt(p)) for p in ps],
            [gg for gg, _ in per_leaf], [q for _, q in per_leaf])

    def update(updates, state, params=None, **extra):
        expect_state(state, ScaleBySoapState, "scale_by_soap")
        g, treedef = leaves(updates, params, "scale_by_soap", state.exp_avg, state.exp_avg_sq)
        _check_factors(g, state, merge_dims, max_precond_dim)
        count = increment(state.count)
        if not g:  # an empty tree: nothing to precondition
            return updates, replace(state, count=count)
        g32 = [x.to(torch.promote_types(x.dtype, torch.float32)) for x in g]
        shapes = [_work_shape(x.shape, merge_dims, max_precond_dim) for x in g]
        if is_tracing():  # both branches, picked on the device
            return _traced_step(g, g32, shapes, state, count, treedef, hp)
        step = int(state.count.item())  # host sync: SOAP branches on the step
        if step == 0:
            gg, q = _first_step(g32, shapes, state.gg)
            zeros = [torch.zeros_like(x) for x in g]
            return tree_unflatten(treedef, zeros), replace(state, count=count, gg=gg, q=q)
        bh1, bh2, bs = hp.betas(state.count, step)
        out, m, v = _adam_step(g, g32, shapes, state, bh1, bh2, eps)
        gg = _factor_step(g32, shapes, state.gg, bs)
        q = list(state.q)
        if bool(refresh(state.count, state.seed)):
            q, v = _qr_refresh(gg, q, v)
        new_state = ScaleBySoapState(count, state.seed, _store(m, state.exp_avg),
                                     _store(v, state.exp_avg_sq), gg, q)
        return tree_unflatten(treedef, out), new_state

    hp = _Hyper(b1, b2, shampoo_beta, eps, refresh)
    return GradientTransformation(init, update)


class _Hyper(NamedTuple):
    b1: float
    b2: ScalarOrSchedule
    shampoo_beta: ScalarOrSchedule | None
    eps: float
    refresh: RefreshFn

    def betas(self, count: Tensor, step):
        """The debiased :math:`\\hat\\beta_1, \\hat\\beta_2` and :math:`\\beta_s` of step
        ``step`` (a number in eager steps: numbers; a tensor while tracing: tensors)."""
        b2 = resolve(self.b2, count)
        traced = isinstance(step, Tensor)
        bh1 = _debias(self.b1, step)
        bh2 = _debias(torch.as_tensor(b2, dtype=torch.float64, device=count.device)
                      if traced else float(b2), step)
        if self.shampoo_beta is None:
            return bh1, bh2, 1.0 - bh2
        bs = resolve(self.shampoo_beta, count)
        return bh1, bh2, (torch.as_tensor(bs, dtype=torch.float64, device=count.device)
                          if traced else float(bs))


def _check_factors(g: list[Tensor], state: ScaleBySoapState, merge_dims, max_dim) -> None:
    """The state's factors must fit each leaf's work shape (a ValueError naming the leaf)."""
    for i, (x, gg) in enumerate(zip(g, state.gg)):
        shape = _work_shape(x.shape, merge_dims, max_dim)
        if len(gg) != len(shape) or any(_has(m) and m.shape[-1] != s for m, s in zip(gg, shape)):
            raise ValueError(
                f"scale_by_soap: leaf #{i} of the updates has shape {tuple(x.shape)}, but the "
                f"state's factors ({[tuple(m.shape) for m in gg]}) were made for another shape;"
                " re-run init on these params")


def _store(xs: list[Tensor], ref: list[Tensor]) -> list[Tensor]:
    return [a.reshape(r.shape).to(r.dtype) for a, r in zip(xs, ref)]


def _first_step(g32, shapes, state_gg):
    """The first step's factors :math:`L_d = g_0 g_0^T|_d` and bases (``eigh``, then one QR
    refresh, as HeavyBall 0.7.2)."""
    gg = [tuple(m if not _has(m) else _gram(x.reshape(s), d) for d, m in enumerate(ms))
          for x, s, ms in zip(g32, shapes, state_gg)]
    q = [tuple(m if not _has(m) else _eigenbasis(m) for m in ms) for ms in gg]
    return gg, _qr_refresh(gg, q, [None] * len(gg))[0]


def _adam_step(g, g32, shapes, state, bh1, bh2, eps):
    """Adam in the current eigenbasis: the update, the new ``m`` and ``v`` (work dtype)."""
    gp = [_project(x.reshape(s), qs, False) for x, s, qs in zip(g32, shapes, state.q)]
    m = [e.to(x.dtype) for e, x in zip(state.exp_avg, g32)]
    v = [e.to(x.dtype).reshape(x.shape) for e, x in zip(state.exp_avg_sq, gp)]
    if isinstance(bh1, Tensor):  # traced: 0-d float64 coefficients, cast leaf by leaf
        m = [torch.lerp(a, x, (1 - bh1).to(x.dtype)) for a, x in zip(m, g32)]
        v = [a * bh2.to(a.dtype) + x * x * (1 - bh2).to(a.dtype) for a, x in zip(v, gp)]
    else:
        m = ops.lerp(m, g32, 1 - bh1)
        v = list(ops.add(ops.mul(v, bh2), ops.mul(ops.mul(gp, gp), 1 - bh2)))
    denom = ops.maximum(ops.sqrt(v), eps)
    del gp  # each temporary goes as soon as it is used: one parameter-sized copy less
    mp = [_project(e.reshape(s), qs, False) for e, s, qs in zip(m, shapes, state.q)]
    out = [_project(a / d, qs, True).reshape(x.shape).to(x.dtype)
           for a, d, qs, x in zip(mp, denom, state.q, g)]
    return out, m, v


def _factor_step(g32, shapes, state_gg, bs):
    """:math:`L_d \\leftarrow \\beta_s L_d + (1-\\beta_s) g g^T|_d`."""
    w = lambda a: (1 - bs).to(a.dtype) if isinstance(bs, Tensor) else 1 - bs  # noqa: E731
    return [tuple(a if not _has(a) else torch.lerp(a, _gram(x.reshape(s), d), w(a))
                  for d, a in enumerate(ms)) for x, s, ms in zip(g32, shapes, state_gg)]


def _where(cond: Tensor, new, old):
    """``torch.where(cond, new, old)`` over matching lists/tuples of tensors."""
    if isinstance(new, Tensor):
        return torch.where(cond, new, old) if _has(new) else new
    return type(new)(_where(cond, a, b) for a, b in zip(new, old))


def _traced_step(g, g32, shapes, state, count, treedef, hp):
    """One step with no host read: the first-step, Adam, refresh and no-refresh results are
    all computed and ``torch.where`` (on 0-d bool tensors) picks the eager path's."""
    first = state.count == 0
    bh1, bh2, bs = hp.betas(state.count, state.count.clamp(min=1).to(torch.float64))
    out, m, v = _adam_step(g, g32, shapes, state, bh1, bh2, hp.eps)
    gg = _factor_step(g32, shapes, state.gg, bs)
    q_r, v_r = _qr_refresh(gg, list(state.q), v)
    do = hp.refresh(state.count, state.seed)
    q, v = _where(do, q_r, list(state.q)), _where(do, v_r, v)
    gg0, q0 = _first_step(g32, shapes, state.gg)
    m = _where(first, list(state.exp_avg), _store(m, state.exp_avg))
    v = _where(first, list(state.exp_avg_sq), _store(v, state.exp_avg_sq))
    out = [torch.where(first, torch.zeros_like(o), o) for o in out]
    new_state = ScaleBySoapState(count, state.seed, m, v, _where(first, gg0, gg),
                                 _where(first, q0, q))
    return tree_unflatten(treedef, out), new_state


def soap(
    learning_rate: ScalarOrSchedule = 3e-3, b1: float = 0.9, b2: ScalarOrSchedule = 0.95,
    shampoo_beta: ScalarOrSchedule | None = 0.95, eps: float = 1e-8, weight_decay: float = 0.0,
    precondition_frequency: int | RefreshFn = 2, factors: SoapFactors | None = None,
    seed: int = 0, moment_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """SOAP: ``chain(scale_by_soap(...), add_decayed_weights(weight_decay),
    scale_by_learning_rate(learning_rate))``.

    :math:`p \\leftarrow p - \\eta_t (u_t + \\lambda p)`; see :func:`scale_by_soap` for
    :math:`u_t` and every other argument. ``learning_rate`` (:math:`\\eta`, default 3e-3) may be a
    schedule (HeavyBall's warmup ``min(t/T, 1)`` is ``lambda t: lr * min(t / T, 1)``, counting
    the initialising first step as 0). ``weight_decay`` (:math:`\\lambda`, default 0) is
    decoupled AdamW decay; HeavyBall 0.7.2 multiplies by ``1 + lr*wd`` (a sign slip), so its
    reference tests use ``weight_decay=0``.
    Reference: https://arxiv.org/abs/2409.11321.
    """
    from funcopt.compose import chain
    from funcopt.transforms.first_order import scale_by_learning_rate
    from funcopt.transforms.weight_decay import add_decayed_weights

    soap_ = scale_by_soap(b1, b2, shampoo_beta, eps, precondition_frequency, factors, seed,
                          moment_dtype)
    decay = [add_decayed_weights(weight_decay)] if weight_decay else []
    return chain(soap_, *decay, scale_by_learning_rate(learning_rate))
