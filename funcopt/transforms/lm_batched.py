"""One Levenberg-Marquardt iteration on a batch of independent problems, with no host sync.

Every tensor carries a leading batch dimension ``B`` (``x``: ``(B, n)``, ``r``: ``(B, m)``,
``J``: ``(B, m, n)``, statistics ``(B,)``), and every decision (accept/reject, damping and
trust-region updates, the Newton iteration for the trust-region damping) is a ``torch.where``
on tensors, so the same code serves

* :func:`funcopt.least_squares` with ``batched=True`` (``B`` problems in one pass),
* :func:`funcopt.levenberg_marquardt` under ``torch.func.vmap`` and ``torch.compile``
  (``B = 1``, the batching done by ``vmap``), and
* :func:`funcopt.least_squares_parallel` (the model built from an all-reduced ``J^T J``).

The damped system is solved through a spectral model of ``Jt = J / d`` (``d`` MINPACK's
column scaling): ``Jt = U diag(s) V^T`` from an SVD of ``Jt`` (``method="svd"``) or from the
eigendecomposition of ``Jt^T Jt`` (``method="gram"``). With ``sigma = max s``, ``sh = s /
sigma``, ``w = sh * U^T r / ||r||`` and ``mu = lambda / sigma^2``, the step in scaled variables
``z = d * delta`` solving ``(Jt^T Jt + lambda I) z = -Jt^T r`` is

    z = -(||r|| / sigma) V [w / (sh^2 + mu)],

``||Jt z|| / ||r|| = ||sh w / (sh^2 + mu)||`` and ``||z|| / ||r|| = ||w / (sh^2 + mu)|| /
sigma``: only O(1) numbers enter, whatever the scale of ``J`` and ``r``. Directions with
``sh <= eps k`` (SVD) or ``sh^2 <= eps k`` (Gram) are dropped, as a pseudo-inverse does.

In eager mode on a CPU the loops (attempts, the Newton iteration) stop once every problem is
done, which reads one boolean per pass (free on a CPU); elsewhere and while tracing they run
their full length with finished problems masked, which gives the same numbers. The batched
driver calls :func:`attempt` once per pass instead of :func:`iterate`, so an update's attempts
spread over passes, and off the CPU it lets the trust-region search of a problem resume on the
next pass (:class:`Trial` keeps it) rather than run 30 masked Newton updates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from funcopt.engine import is_tracing
from funcopt.transforms.levenberg_marquardt import LevenbergMarquardtState, LMOptions
from funcopt.transforms.lm_damping import TrustRegion, _positive, adapt_radius, newton_terms
from funcopt.transforms.lm_model import running_scale

__all__ = ["BatchedLocal", "Trial", "local_model", "gram_local_model", "iterate", "init_state",
           "start_trial", "restart_trial", "attempt", "update_over", "finish", "batched_norm",
           "normalised_jacobian", "gauss_newton_gain", "NEWTON_STEPS"]

Tensor = torch.Tensor
NEWTON_STEPS = 30  # iterations of the trust-region damping (Newton on 1/phi)


def batched_norm(v: Tensor) -> Tensor:
    """``||v_b||`` over the last dim without overflow or underflow (MINPACK's ``enorm``)."""
    s = v.abs().amax(dim=-1)
    s = torch.where((s > 0) & torch.isfinite(s), s, 1.0)
    return torch.linalg.vector_norm(v / s[..., None], dim=-1) * s


class BatchedLocal(NamedTuple):
    """The Gauss-Newton model of each problem at ``x``.

    x: ``(B, n)``. rnorm: ``||r||``. d: scaling ``(B, n)``. cos: MINPACK's ``gnorm``.
    damping: ``lambda`` to start from. sh2, w: ``sh^2`` and ``w`` (``(B, k)``, zero where a
    direction is dropped). sigma: ``max s``. V: ``(B, n, k)``. finite: ``r`` and ``J`` finite.
    """

    x: Tensor
    rnorm: Tensor
    d: Tensor
    cos: Tensor
    damping: Tensor
    sh2: Tensor
    w: Tensor
    sigma: Tensor
    V: Tensor
    finite: Tensor
    scale: Tensor | None = None  # the running maximum the state keeps (see running_scale)


def init_state(x: Tensor, initial_damping: float) -> LevenbergMarquardtState:
    """The state of :func:`iterate` for ``x`` of shape ``(B, n)`` (every field ``(B,)``,
    ``scale`` ``(B, n)``), as :func:`funcopt.levenberg_marquardt`'s ``init`` for each row."""
    B = x.shape[0]
    zero = torch.zeros(B, dtype=x.dtype, device=x.device)
    count = torch.zeros(B, dtype=torch.int64, device=x.device)
    false = torch.zeros(B, dtype=torch.bool, device=x.device)
    return LevenbergMarquardtState(count, zero + initial_damping, zero + 2.0, zero,
                                   torch.ones_like(x), zero, zero, zero, zero, zero, zero, zero,
                                   false, count, zero, zero, zero, ~false)


def _scaling(col: Tensor, state: LevenbergMarquardtState, o: LMOptions,
             wide: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """``(d, lambda, kept)``: MINPACK's running maximum of column norms (or ones), the damping
    to start from (``tau max col^2`` on the first step when ``scaling`` is off) and the scale
    the state keeps (:func:`funcopt.transforms.lm_model.running_scale`). ``scaling=None``
    (the traced step): per problem, ``D = I`` on a first step with ``wide`` (``n > m``) or
    after one with ``D = I`` (a kept scale of -1), else ``D``; the eager step's choice."""
    first = (state.count == 0)[:, None]
    lam = state.damping
    if o.scaling:
        d, kept = running_scale(state.scale, col, first)
        return d, lam, kept
    start = o.rule.initial_damping * (col * col).amax(dim=-1)
    ones = torch.ones_like(col)  # kept -1: "D = I" (lm_model._scaling)
    lam_i = torch.where(first[:, 0] & (start > 0), start, lam)
    if o.scaling is None:
        use = torch.where(first, not wide, state.scale[:, :1] >= 0)  # (B, 1)
        d, kept = running_scale(state.scale, col, first)
        return (torch.where(use, d, ones), torch.where(use[:, 0], lam, lam_i),
                torch.where(use, kept, -ones))
    return ones, lam_i, -ones


def local_model(J: Tensor, r: Tensor, x: Tensor, state: LevenbergMarquardtState, o: LMOptions,
                method: str = "svd") -> BatchedLocal:
    """The model at ``x`` from ``J`` ``(B, m, n)`` and ``r`` ``(B, m)``. Problems whose ``r``
    or ``J`` is not finite get a zero model (``finite`` False) so the others are unaffected."""
    if method == "gram":
        return _gram_model(J, r, x, state, o)
    finite = torch.isfinite(r).all(-1) & torch.isfinite(J).all(-1).all(-1)
    J = torch.where(finite[:, None, None], J, torch.zeros_like(J))
    r = torch.where(finite[:, None], r, torch.zeros_like(r))
    rnorm = batched_norm(r)
    col = batched_norm(J.mT)
    rn = r / _positive(rnorm)[:, None]
    g = ((J / _positive(col)[:, None, :]).mT @ rn[..., None])[..., 0]
    cos = torch.where((col > 0) & (rnorm > 0)[:, None], g.abs(), torch.zeros_like(g))
    cos = cos.amax(-1) if cos.shape[-1] else torch.zeros_like(rnorm)
    d, lam, kept = _scaling(col, state, o, J.shape[-1] > J.shape[-2])
    Jt = J / d[:, None, :]
    eps = torch.finfo(J.dtype).eps
    U, s, Vh = torch.linalg.svd(Jt, full_matrices=False)
    sigma = _positive(s.amax(-1)) if s.shape[-1] else torch.ones_like(rnorm)
    sh = s / sigma[:, None]
    keep = sh > eps * max(s.shape[-1], 1)
    w = torch.where(keep, sh * (U.mT @ rn[..., None])[..., 0], 0.0)
    return BatchedLocal(x, torch.where(finite, rnorm, torch.nan), d, cos, lam,
                        torch.where(keep, sh * sh, 0.0), w, sigma, Vh.mT, finite, kept)


def _gram_model(J: Tensor, r: Tensor, x: Tensor, state: LevenbergMarquardtState,
                o: LMOptions) -> BatchedLocal:
    """:func:`local_model` by the eigendecomposition of ``Jt^T Jt`` (of ``Jn``, see
    :func:`normalised_jacobian`)."""
    Jn, gt, c, (x, rnorm, d, cos, lam, finite, kept) = normalised_jacobian(J, r, x, state, o)
    G = torch.where(finite[:, None, None], Jn.mT @ Jn, 0.0)
    loc = _from_gram(G, gt, (x, rnorm, d, cos, lam, finite))
    return loc._replace(sigma=loc.sigma * c, scale=kept)


def normalised_jacobian(J: Tensor, r: Tensor, x: Tensor, state: LevenbergMarquardtState,
                        o: LMOptions):
    """``(Jn, gt, c, (x, rnorm, d, cos, lam, finite, kept))`` with few passes over ``J``: its
    column maxima give the finiteness test, the scales of the column norms and the power of
    two ``c`` near ``max |Jt|``; ``Jn = J / (d c)`` (exact scaling, so a scaled Jacobian far
    below one does not underflow when squared), ``gt = Jn^T r / ||r||`` and MINPACK's
    ``gnorm`` from ``J_j^T r / ||J_j|| = (Jn^T r)_j d_j c / ||J_j||``. Non-finite problems
    are zeroed in the small results (as a zero ``J`` and ``r`` would give) rather than in
    ``J``."""
    colmax = J.abs().amax(-2)  # (B, n); NaN propagates
    rmax = r.abs().amax(-1)
    finite = torch.isfinite(rmax) & torch.isfinite(colmax).all(-1)
    fin2 = finite[:, None]
    rs = torch.where((rmax > 0) & finite, rmax, 1.0)
    rnorm = torch.where(finite, torch.linalg.vector_norm(r / rs[:, None], dim=-1) * rs, 0.0)
    sc = torch.where((colmax > 0) & fin2, colmax, 1.0)
    col = torch.where(fin2, torch.linalg.vector_norm(J / sc[:, None, :], dim=-2) * sc, 0.0)
    rn = r / _positive(rnorm)[:, None]
    d, lam, kept = _scaling(col, state, o, J.shape[-1] > J.shape[-2])
    top = torch.where(finite, (colmax / d).amax(-1), 0.0) if d.shape[-1] else torch.ones_like(rnorm)
    c = torch.where(top > 0, torch.exp2(torch.floor(torch.log2(_positive(top)))), 1.0)
    dc = d * c[:, None]
    Jn = J / dc[:, None, :]
    gt = torch.where(fin2, (Jn.mT @ rn[..., None])[..., 0], 0.0)
    g = (gt * dc).abs() / _positive(col)
    cos = torch.where((col > 0) & (rnorm > 0)[:, None], g, 0.0)
    cos = cos.amax(-1) if cos.shape[-1] else torch.zeros_like(rnorm)
    return Jn, gt, c, (x, rnorm, d, cos, lam, finite, kept)


# cuSOLVER's batched symmetric eigensolver failed with CUSOLVER_STATUS_INTERNAL_ERROR on
# 100,000 3x3 float64 matrices (H100, torch 2.11): CUDA batches go in chunks of this size
_EIGH_CHUNK = 1 << 15


def _batched_eigh(G: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh`` of a batch of matrices, in chunks on CUDA (see above)."""
    if not G.is_cuda or G.shape[0] <= _EIGH_CHUNK or is_tracing():
        return torch.linalg.eigh(G)
    parts = [torch.linalg.eigh(c) for c in G.split(_EIGH_CHUNK)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _from_gram(G: Tensor, gt: Tensor, rest) -> BatchedLocal:
    """The spectral model from ``Gt = Jt^T Jt`` and ``gt = Jt^T r / ||r||``."""
    x, rnorm, d, cos, lam, finite = rest
    ev, V = _batched_eigh(G)
    s2 = ev.clamp(min=0.0)
    top = s2.amax(-1) if s2.shape[-1] else torch.ones_like(rnorm)
    sigma = torch.sqrt(_positive(top))
    sh2 = s2 / (sigma * sigma)[:, None]
    keep = sh2 > (torch.finfo(G.dtype).eps * max(s2.shape[-1], 1)) ** 2
    w = torch.where(keep, (V.mT @ gt[..., None])[..., 0] / sigma[:, None], 0.0)
    return BatchedLocal(x, torch.where(finite, rnorm, torch.nan), d, cos, lam,
                        torch.where(keep, sh2, 0.0), w, sigma, V, finite)


def gram_local_model(G: Tensor, g: Tensor, rnorm: Tensor, x: Tensor,
                     state: LevenbergMarquardtState, o: LMOptions) -> BatchedLocal:
    """The model from ``G = J^T J`` ``(B, n, n)``, ``g = J^T r`` and ``||r||`` (as a
    data-parallel fit all-reduces them): column norms ``sqrt(diag G)``, ``Gt = G / (d d^T)``."""
    finite = torch.isfinite(G).all(-1).all(-1) & torch.isfinite(g).all(-1) & torch.isfinite(rnorm)
    G = torch.where(finite[:, None, None], G, torch.zeros_like(G))
    g = torch.where(finite[:, None], g, torch.zeros_like(g))
    rnorm = torch.where(finite, rnorm, torch.zeros_like(rnorm))
    col = torch.sqrt(torch.diagonal(G, dim1=-2, dim2=-1).clamp(min=0.0))
    gn = g / _positive(rnorm)[:, None]
    cos = torch.where((col > 0) & (rnorm > 0)[:, None], gn.abs() / _positive(col), 0.0)
    cos = cos.amax(-1) if cos.shape[-1] else torch.zeros_like(rnorm)
    d, lam, kept = _scaling(col, state, o)
    Gt = G / (d[:, :, None] * d[:, None, :])
    return _from_gram(Gt, gn / d, (x, rnorm, d, cos, lam, finite))._replace(scale=kept)


def _early_exit(t: Tensor) -> bool:
    """Whether loops may stop early by reading a boolean (eager, CPU): see the module doc."""
    return t.device.type == "cpu" and not is_tracing()


def _trust_region_mu(loc: BatchedLocal, radius: Tensor, mask: Tensor, start: tuple[Tensor, Tensor],
                     steps: int = NEWTON_STEPS) -> tuple[Tensor, Tensor, Tensor]:
    """``mu >= 0`` with ``phi(mu) <= 1.1 rho`` (``rho = sigma Delta / ||r||``), ``phi(mu)^2 =
    sum w^2 / (sh^2 + mu)^2``: Newton's method on ``1/phi`` from ``mu = 0`` (Hebden; Moré
    1978), at most ``NEWTON_STEPS`` updates, masked per problem (see
    :class:`funcopt.TrustRegion`); the update is ``(phi - rho) / rho * phi^2 / sum w^2 /
    (sh^2 + mu)^3``. ``start = (mu, updates so far)`` resumes a search; this call makes at most
    ``steps`` updates. Returns ``(mu, updates, searching)``, ``searching`` where the search is
    not over. Problems outside ``mask`` (and those with ``rho <= 0``) are left as they are."""
    rho = radius / _positive(loc.rnorm) * loc.sigma
    ok = (rho > 0) & mask
    limit = torch.where(ok, 1.1 * rho, torch.inf)  # phi > limit: not yet inside the region
    rho1 = torch.where(ok, rho, 1.0)
    w2 = loc.w * loc.w
    s2 = torch.where(loc.sh2 > 0, loc.sh2, 1.0)  # w = 0 where a direction is dropped
    mu, count = start
    early = _early_exit(mu)

    def outside(mu: Tensor) -> tuple[Tensor, Tensor]:
        # phi > limit implies a positive denominator in the step
        phi, step = newton_terms(w2, s2 + mu[:, None], rho, rho1)
        return (phi > limit) & (count < NEWTON_STEPS), step

    for _ in range(steps):
        active, step = outside(mu)
        if early and not bool(active.any()):
            return mu, count, active
        mu = torch.where(active, mu + step, mu)
        count = count + active.long()
    return mu, count, outside(mu)[0]


def _step(loc: BatchedLocal, mu: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(delta, ||Jt z|| / ||r||, ||z|| / ||r||)`` for ``mu = lambda / sigma^2``."""
    keep = loc.sh2 > 0
    q = torch.where(keep, loc.sh2 + mu[:, None], torch.ones_like(loc.sh2))
    c = torch.where(keep, loc.w / q, 0.0)
    t1 = torch.linalg.vector_norm(torch.sqrt(loc.sh2) * c, dim=-1)  # O(1) numbers: c is at
    t2 = torch.linalg.vector_norm(c, dim=-1) / loc.sigma  # most 1 / (eps k)^2 times w
    z = -(loc.rnorm / loc.sigma)[:, None] * (loc.V @ c[..., None])[..., 0]
    return z / loc.d, t1, t2


def _reductions(fn: Tensor, new_fn: Tensor, t1: Tensor, t2: Tensor, lam: Tensor):
    """MINPACK's relative reductions (see ``lm_model._reductions``) from
    ``t1 = ||J delta|| / ||r||`` and ``t2 = ||d delta|| / ||r||``."""
    ratio = new_fn / _positive(fn)
    actual = torch.where(0.1 * new_fn < fn, 1.0 - ratio * ratio, -1.0)
    predicted = t1 * t1 + 2.0 * lam * t2 * t2
    pos = (predicted > 0) & (fn > 0)
    rho = torch.where(pos, actual / torch.where(pos, predicted, 1.0), -float("inf"))
    rho = torch.where(torch.isfinite(new_fn), rho, -float("inf"))
    return torch.where(torch.isnan(rho), -float("inf"), rho), actual, predicted


class Trial(NamedTuple):
    """The attempts of the current update of each problem: what the last one gave (all
    ``(B,)`` but ``delta`` ``(B, n)``); ``attempts`` counts them, ``finite`` says every trial
    point so far gave finite residuals; ``mu`` and ``newton`` hold a trust-region search for
    the current radius that is not over (value, updates made)."""

    lam: Tensor
    nu: Tensor
    radius: Tensor
    delta: Tensor
    new_fn: Tensor
    rho: Tensor
    actual: Tensor
    predicted: Tensor
    pnorm: Tensor
    accepted: Tensor
    attempts: Tensor
    finite: Tensor
    mu: Tensor
    newton: Tensor


def _keep(done: Tensor, old: Trial, new: Trial) -> Trial:
    return Trial(*(torch.where(done.reshape(-1, *([1] * (a.ndim - 1))), a, b)
                   for a, b in zip(old, new)))


def start_trial(loc: BatchedLocal, state: LevenbergMarquardtState, o: LMOptions) -> Trial:
    """The trial of a new update at ``loc.x``: the state's damping (``loc.damping`` on the
    first update), ``nu`` and radius (``initial_radius(||d x||)`` on the first update)."""
    x, fn = loc.x, loc.rnorm
    first = state.count == 0
    radius = state.radius
    if isinstance(o.rule, TrustRegion):
        rn = fn if o.scaling else None
        radius = torch.where(first, o.rule.initial_radius(batched_norm(loc.d * x), rn), radius)
    zero = torch.zeros_like(fn)
    none = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    count = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    return Trial(torch.where(first, loc.damping, state.damping), state.nu, radius,
                 torch.zeros_like(x), fn, zero, zero, zero, zero, none, count, ~none, zero, count)


def restart_trial(loc: BatchedLocal, state: LevenbergMarquardtState, t: Trial,
                  fresh: Tensor) -> Trial:
    """``t`` with the ``fresh`` problems starting a new update at ``loc.x``: as
    :func:`start_trial` for problems past their first update (``state.count >= 1``, the only
    ones the batched driver restarts), in one masked operation per field."""
    f2 = fresh[:, None]
    return Trial(torch.where(fresh, state.damping, t.lam), torch.where(fresh, state.nu, t.nu),
                 torch.where(fresh, state.radius, t.radius), t.delta.masked_fill(f2, 0.0),
                 torch.where(fresh, loc.rnorm, t.new_fn), t.rho.masked_fill(fresh, 0.0),
                 t.actual.masked_fill(fresh, 0.0), t.predicted.masked_fill(fresh, 0.0),
                 t.pnorm.masked_fill(fresh, 0.0), t.accepted & ~fresh,
                 t.attempts.masked_fill(fresh, 0), t.finite | fresh, t.mu.masked_fill(fresh, 0.0),
                 t.newton.masked_fill(fresh, 0))


def attempt(loc: BatchedLocal, t: Trial, state, trial_norm, o: LMOptions, active: Tensor,
            newton_steps: int = NEWTON_STEPS, solve: Callable = _step) -> Trial:
    """One proposal, evaluation (``trial_norm(x_new)`` gives ``||r(x_new)||`` per problem)
    and accept/reject for the ``active`` problems; the others keep ``t``. The trust-region
    search makes at most ``newton_steps`` updates here: a problem whose search is not over
    keeps ``t`` with the search's state and makes its attempt on a later call (with the
    default, every search ends within the call). ``solve(loc, mu)`` gives the step as
    :func:`_step` does (another model: :mod:`funcopt.transforms.lm_device`)."""
    fn, rule = loc.rnorm, o.rule
    lam, nu, radius = t.lam, t.nu, t.radius
    trust = isinstance(rule, TrustRegion)
    if trust:
        mu, newton, searching = _trust_region_mu(loc, radius, active, (t.mu, t.newton),
                                                 newton_steps)
        lam = mu * loc.sigma * loc.sigma
        t = t._replace(mu=mu, newton=newton)  # masked: unchanged outside ``active``
        active = active & ~searching
    else:
        mu = lam / (loc.sigma * loc.sigma)
    delta, t1, t2 = solve(loc, mu)
    ok = torch.isfinite(delta).all(-1)
    delta = torch.where(ok[:, None], delta, 0.0)
    new_fn = trial_norm(loc.x + delta)
    finite = torch.isfinite(new_fn)
    new_fn = torch.where(finite, new_fn, torch.inf)
    pnorm = t2 * fn
    rho, actual, predicted = _reductions(fn, new_fn, t1, t2, lam)
    acc = ok & finite & (rho > o.accept_ratio)
    if isinstance(rule, TrustRegion):  # the first step of a fit cuts the radius to its length
        first = (state.count == 0) & (t.attempts == 0) & ok  # a failed solve has no length
        radius = torch.where(first, torch.minimum(radius, pnorm), radius)
        radius = adapt_radius(radius, lam, (actual, predicted, ~(0.1 * new_fn < fn)), t2, pnorm, ok)
    else:
        lam, nu = rule.adapt(lam, nu, rho, acc)
    new = Trial(lam, nu, radius, delta, new_fn, rho, actual, predicted, pnorm, acc,
                t.attempts + 1, t.finite & finite, torch.zeros_like(fn), torch.zeros_like(t.newton))
    return _keep(~active, t, new)


def update_over(t: Trial, o: LMOptions) -> Tensor:
    """Whether each problem's update is over: a step was accepted, the damping rule is
    exhausted, or ``o.max_attempts`` attempts were made."""
    return t.accepted | o.rule.exhausted(t.lam, t.radius) | (t.attempts >= o.max_attempts)


def iterate(loc: BatchedLocal, state: LevenbergMarquardtState,
            trial_norm: Callable[[Tensor], Tensor], o: LMOptions,
            frozen: Tensor | None = None) -> tuple[Tensor, LevenbergMarquardtState]:
    """Up to ``o.max_attempts`` proposals per problem; returns ``(step, new_state)`` with
    ``step`` zero where no attempt was accepted. ``trial_norm(x_new)`` gives ``||r(x_new)||``
    per problem. ``frozen`` problems (and those with a non-finite model) make no attempt."""
    t = start_trial(loc, state, o)
    done = ~loc.finite if frozen is None else (frozen | ~loc.finite)
    early = _early_exit(loc.rnorm)
    for _ in range(o.max_attempts):
        if early and bool(done.all()):
            break
        t = attempt(loc, t, state, trial_norm, o, ~done)
        done = done | t.accepted | o.rule.exhausted(t.lam, t.radius)
    return finish(loc, state, t)


def finish(loc: BatchedLocal, state: LevenbergMarquardtState, t: Trial):
    """The accepted step and the new state (as ``levenberg_marquardt._finish_step``, one problem)."""
    x, d, fn = loc.x, loc.d, loc.rnorm
    step = torch.where(t.accepted[:, None], t.delta, 0.0)
    cost = 0.5 * fn * fn
    kept = torch.where(t.accepted, t.new_fn, fn)
    min_rho = torch.finfo(t.rho.dtype).min
    new = LevenbergMarquardtState(
        state.count + 1, t.lam, t.nu, t.radius, d if loc.scale is None else loc.scale, cost, 0.5 * kept * kept, t.predicted * cost,
        torch.where(torch.isfinite(t.rho), t.rho, min_rho), t.pnorm,
        batched_norm(d * (x + step)), loc.cos, t.accepted, t.attempts, fn, t.actual,
        t.predicted, t.finite,
    )
    return step, new


def gauss_newton_gain(A: Tensor, b: Tensor, rest: Tensor, x: Tensor,
                      rows: int) -> tuple[Tensor, Tensor]:
    """``(gain, ulps)`` per problem of the full Gauss-Newton step, solved in float64 (as
    :func:`funcopt.least_squares_options.gauss_newton_gain` for one problem).

    The linear model is ``||A delta + b||^2 + rest^2``: ``A = J`` ``(B, m, n)``, ``b = r``,
    ``rest = 0`` for a batch of Jacobians, or the triangular factor of ``[J r]`` (``A =
    R_11``, ``b = R_12``, ``rest = |R_22|``) for residuals spread over processes. With ``c``
    the column norms of ``A`` and ``A / c = U S V^T`` (singular values at most ``rows
    eps_64 s_max`` dropped), ``delta = -V S^+ U^T b / c`` and

        gain = ||U^T b||^2 / (||b||^2 + rest^2),   ulps = max_j |delta_j| / (eps |x_j|),

    the linear model's relative reduction and the move in units of the parameters'
    resolution (``eps`` of ``x``'s dtype). Problems whose ``A`` or ``b`` is not finite, or
    whose residuals are zero, get ``(0, 0)``."""
    Ad, bd, restd = A.double(), b.double(), rest.double()
    ok = torch.isfinite(Ad).all(-1).all(-1) & torch.isfinite(bd).all(-1) & torch.isfinite(restd)
    Ad = torch.where(ok[:, None, None], Ad, 0.0)
    rnorm = batched_norm(torch.cat([torch.where(ok[:, None], bd, 0.0), restd[:, None]], -1))
    ok = ok & (rnorm > 0)
    bn = torch.where(ok[:, None], bd, 0.0) / torch.where(ok, rnorm, 1.0)[:, None]
    c = batched_norm(Ad.mT)
    c = torch.where(c > 0, c, 1.0)
    U, sv, Vh = torch.linalg.svd(Ad / c[:, None, :], full_matrices=False)
    top = sv[:, :1] if sv.shape[-1] else sv
    keep = sv > top * max(rows, x.shape[-1]) * torch.finfo(torch.float64).eps
    proj = torch.where(keep, (U.mT @ bn[..., None])[..., 0], 0.0)
    gain = torch.where(ok, (proj * proj).sum(-1), 0.0)
    coef = proj / torch.where(keep, sv, 1.0) * rnorm[:, None]
    delta = -(Vh.mT @ coef[..., None])[..., 0] / c
    res = torch.finfo(x.dtype).eps * x.double().abs()
    ulps = delta.abs() / torch.where(res > 0, res, torch.finfo(x.dtype).tiny)
    ulps = ulps.amax(-1) if ulps.shape[-1] else torch.zeros_like(gain)
    return gain, torch.where(ok, ulps, 0.0)
