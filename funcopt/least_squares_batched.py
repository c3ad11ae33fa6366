"""Many independent least-squares problems in one vectorised pass: ``least_squares(...,
batched=True)``.

Parameters carry a leading batch dimension ``B``; ``residual_fn`` maps them to residuals of
shape ``(B, m)``, row ``b`` depending on problem ``b``'s parameters only. Each problem has its
own damping, trust region, acceptance, MINPACK stopping tests and result; a problem that has
stopped keeps its parameters while the others go on. Jacobians of all problems come from one
vectorised forward-mode pass (``n`` Jacobian-vector products with the tangent ``e_j`` in every
problem, ``torch.func.vmap`` over ``j``; reverse mode when ``m < n``), and the damped systems
are solved batched (:mod:`funcopt.transforms.lm_batched`). Each pass of the loop makes one
attempt per problem (:func:`run_flat`) and reads one value on the host; ``benchmarks/
lsq_profile.py`` prints the time per phase and the host syncs per pass.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch.func import jvp, vmap

from funcopt import least_squares_stalls
from funcopt.base import PyTree, tree_flatten, tree_unflatten
from funcopt.func.jacobian import _vjp
from funcopt.least_squares_probe import noise_steps, probe_zero_columns, rounding_bound
from funcopt.transforms import lm_batched
from funcopt.transforms.levenberg_marquardt import LevenbergMarquardtState, LMOptions
from funcopt.transforms.lm_damping import TrustRegion, resolve_scaling

__all__ = ["BatchedLeastSquaresInfo", "REASONS", "SUCCESS_CODES", "least_squares_batched",
           "ravel_batched", "batched_jacobian", "stopping_codes"]

Tensor = torch.Tensor

REASONS = (
    "max_steps: the step limit was reached",
    "zero residual",
    "gtol: gradient orthogonal to the residuals",
    "gtol below machine precision: gradient orthogonal to the residuals",
    "ftol and xtol: cost and parameters converged",
    "ftol: relative reduction of the cost below ftol",
    "xtol: relative step below xtol",
    "ftol below machine precision: no further reduction possible",
    "xtol below machine precision: no further improvement possible",
    "residual_fn was not finite at trial points near the current parameters and the steps "
    "shrank until a tolerance test held with the gradient not orthogonal to the residuals: "
    "the edge of the region where residual_fn is finite, not a minimum (failure)",
    "damping reached max_damping: no step reduces the cost (failure)",
    "trust region vanished: no step reduces the cost (failure)",
    "no step was accepted from the start point, so it is not a minimum although a test held",
    "residual_fn gave non-finite residuals or Jacobian at the current parameters (failure)",
    "a stationary point that is not a minimum: a test held where a parameter's Jacobian column "
    "is zero and the cost falls along it or a combination of such parameters (Gauss-Newton "
    "cannot leave such a point; failure: start from another point)",
    "stalled: a tolerance test held (a test on xtol or ftol), but a parameter whose own "
    "Gauss-Newton move exceeds its resolution (xtol |x_j| for a test on xtol) would still "
    "reduce the cost, or (a test below machine precision) the full Gauss-Newton step, solved "
    "in float64, would: not a minimum (failure)",
)
"""The ``info.reason`` codes of batched and data-parallel fits, in order: ``REASONS[code]``
is the text of a code (``info.reasons()`` gives them per problem)."""
LEAST_SQUARES_REASONS = REASONS
"""``REASONS`` under its top-level name, ``fo.LEAST_SQUARES_REASONS``."""
SUCCESS_CODES = (1, 2, 3, 4, 5, 6, 7, 8)
NOT_A_MINIMUM = 14  # the probe of funcopt.least_squares_probe; the stall code is the last
_EDGE_WINDOW = 5
_PASS_NEWTON_STEPS = 4  # trust-region search updates per pass off the CPU (no early exit there)


class BatchedLeastSquaresInfo(NamedTuple):
    """What a batched (or data-parallel) fit did; every field is a tensor of shape ``(B,)``.

    steps: updates run for the problem. cost: final ``0.5 ||r||^2`` in float64 (inf above
    ``||r|| = 1e154``). reason: an index into :data:`REASONS` (``info.reasons()`` gives the
    texts). success: a convergence test held (same rules as :func:`funcopt.least_squares`).
    evaluations: residual evaluations of the problem. residual_norm: final ``||r||``.
    """

    steps: Tensor
    cost: Tensor
    reason: Tensor
    success: Tensor
    evaluations: Tensor
    residual_norm: Tensor

    def reasons(self) -> list[str]:
        """The reason of each problem as text."""
        return [REASONS[int(c)] for c in self.reason.reshape(-1).tolist()]


def ravel_batched(params: PyTree) -> tuple[Tensor, Callable[[Tensor], PyTree]]:
    """``(x, unravel)``: the floating leaves of ``params`` (each ``(B, ...)``) as ``x`` of shape
    ``(B, n)``; ``unravel`` rebuilds the tree (integer leaves kept as they are). Raises
    ValueError when leaves disagree on ``B`` or a leaf has no batch dimension."""
    leaves, treedef = tree_flatten(params)
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, torch.Tensor) or leaf.ndim == 0:
            got = type(leaf).__name__ if not isinstance(leaf, torch.Tensor) else "a 0-d tensor"
            raise ValueError(f"batched=True: parameter leaf {i} is {got}; every leaf needs a "
                             "leading batch dimension B (one row per problem)")
    sizes = [leaf.shape[0] for leaf in leaves]
    if len(set(sizes)) != 1:
        raise ValueError(f"batched=True: the parameter leaves disagree on the batch size "
                         f"(leading dims {sizes}); give every leaf one row per problem")
    if sizes and sizes[0] == 0:
        raise ValueError("batched=True: the batch holds no problems (B = 0); give at least one")
    idx = [i for i, leaf in enumerate(leaves) if leaf.is_floating_point()]
    if not idx:
        raise ValueError("the parameters have no floating-point leaves; there is nothing to fit")
    dtype = leaves[idx[0]].dtype
    for i in idx[1:]:
        dtype = torch.promote_types(dtype, leaves[i].dtype)
    B = sizes[0]
    shapes = [leaves[i].shape for i in idx]
    widths = [leaves[i][0].numel() for i in idx]
    x = torch.cat([leaves[i].detach().reshape(B, -1).to(dtype) for i in idx], dim=1)

    def unravel(v: Tensor) -> PyTree:
        out = list(leaves)
        for i, piece, shape in zip(idx, torch.split(v, widths, dim=1), shapes):
            out[i] = piece.reshape(shape).to(leaves[i].dtype)
        return tree_unflatten(treedef, out)

    return x, unravel


def batched_jacobian(f: Callable[[Tensor], Tensor], x: Tensor,
                     m: int | None = None) -> tuple[Tensor, Tensor]:
    """``(r, J)`` with ``J[b] = d r[b] / d x[b]`` of shape ``(B, m, n)`` for independent rows:
    forward mode (tangent ``e_j`` in every row, ``vmap`` over the ``n`` columns) when
    ``n <= m``, else reverse mode (``vmap`` over the ``m`` rows of cotangents). ``m``: the
    number of residuals per problem when known (else one evaluation finds it)."""
    B, n = x.shape
    with torch.no_grad():
        m = f(x).shape[1] if m is None else m
    if n <= m:
        eye = torch.eye(n, dtype=x.dtype, device=x.device)
        pair = vmap(lambda e: tuple(jvp(f, (x,), (e.expand(B, n),))[:2]),
                    out_dims=(None, 0))(eye)  # type: ignore[arg-type]
        r, cols = pair[0], pair[1]
        return r.detach(), cols.permute(1, 2, 0)  # cols: (n, B, m)
    r, pullback = _vjp(f, x)
    eye = torch.eye(m, dtype=r.dtype, device=r.device)
    rows = vmap(lambda e: pullback(e.expand(B, m))[0])(eye)  # (m, B, n)
    return r.detach(), rows.transpose(0, 1)


def _residuals(residual_fn: Callable[[PyTree], Tensor], unravel, B: int, dtype) -> Callable:
    """``x -> residual_fn(unravel(x))`` checked to be a float tensor of shape ``(B, m)``."""

    def f(x: Tensor) -> Tensor:
        r = residual_fn(unravel(x))
        if not isinstance(r, torch.Tensor) or r.ndim != 2 or r.shape[0] != B:
            got = (f"shape {tuple(r.shape)}" if isinstance(r, torch.Tensor)
                   else f"a {type(r).__name__}")
            raise ValueError(f"batched=True: residual_fn must return residuals of shape (B, m) "
                             f"= ({B}, m), one row per problem; got {got}")
        if r.dtype != dtype:
            raise TypeError(f"residual_fn returned {r.dtype} residuals for {dtype} parameters; "
                            f"return r.to({dtype}) or pass {r.dtype} parameters")
        if r.shape[1] == 0:
            raise ValueError("residual_fn returned no residuals; there is nothing to fit")
        return r

    return f


def _check_independent(f: Callable[[Tensor], Tensor], x: Tensor) -> None:
    """One Jacobian-vector product that moves problem 0 only: the other rows must not move."""
    if x.shape[0] < 2:
        return
    t = torch.zeros_like(x)
    t[0] = 1.0
    out = jvp(f, (x,), (t,))[1]
    if bool(((out[1:] != 0) & torch.isfinite(out[1:])).any()):  # NaN rows fail on their own
        raise ValueError("batched=True: residual_fn mixes problems (row b of the residuals "
                         "depends on the parameters of another row); each problem's residuals "
                         "must depend on its own parameters only")


def stopping_codes(s: LevenbergMarquardtState, tols: tuple) -> tuple[Tensor, Tensor]:
    """``(stationary, converged)`` reason codes (0: none) of MINPACK's tests on a batched
    state: the zero-residual and gtol tests on the current point, then ftol/xtol/eps tests on
    the update (as :func:`funcopt.least_squares`)."""
    ftol, xtol, gtol, eps = tols
    z = torch.zeros_like(s.count)
    stat = torch.where(s.grad_cos <= max(gtol, eps), 3, z)
    stat = torch.where(s.grad_cos <= gtol, 2, stat)
    stat = torch.where(s.residual_norm == 0, 1, stat)
    act, pre = s.actual_reduction, s.predicted_reduction
    ratio_ok = 0.5 * s.gain_ratio <= 1.0
    f_ok = (act.abs() <= ftol) & (pre <= ftol) & ratio_ok
    x_ok = s.step_norm <= xtol * s.x_norm
    conv = torch.where(s.step_norm <= eps * s.x_norm, 8, z)
    conv = torch.where((act.abs() <= eps) & (pre <= eps) & ratio_ok, 7, conv)
    conv = torch.where(x_ok, 6, conv)
    conv = torch.where(f_ok, 5, conv)
    conv = torch.where(f_ok & x_ok, 4, conv)
    return stat, conv


class _Progress(NamedTuple):
    running: Tensor
    code: Tensor
    steps: Tensor
    evaluations: Tensor
    moved: Tensor
    clean: Tensor  # updates since the last one that met a non-finite trial point
    unsure: Tensor  # the stop's gnorm test has no known answer (see _advance)
    last: Any = None  # the final state of every problem, set on return


def _advance(p: _Progress, new: LevenbergMarquardtState, finite: Tensor, tols,
             o: LMOptions) -> tuple:
    """Stopping tests after an update: ``(progress, take)``, ``take`` the problems whose new
    state (and accepted step) is kept."""
    run = p.running
    stat, conv = stopping_codes(new, tols)
    stop_now = run & (~finite | (stat > 0))
    code = torch.where(stop_now, torch.where(finite, stat, 13), p.code)
    take = run & ~stop_now
    clean = torch.where(take, (p.clean + 1).masked_fill(~new.trial_finite, 0), p.clean)
    edge = (clean < _EDGE_WINDOW) & (new.grad_cos > tols[3] ** 0.5)
    failed = new.radius <= torch.finfo(new.radius.dtype).tiny \
        if isinstance(o.rule, TrustRegion) else new.damping >= o.rule.max_damping
    fail = (11 if isinstance(o.rule, TrustRegion) else 10) * (failed & ~new.accepted)
    out = torch.where(conv > 0, conv.masked_fill(edge, 9), fail)
    ends = take & (out > 0)
    # the final point's gnorm test is known to pass only after a rejected update (the point is
    # the update's) whose grad_cos passes it; an accepted step moved to a point not yet judged
    unsure = new.accepted | (new.grad_cos * new.grad_cos > max(tols[0], tols[3]))
    return _Progress(
        take & ~ends, torch.where(ends, out, code), p.steps + run,
        p.evaluations + (new.attempts + 1) * run, p.moved | (take & new.accepted),
        clean, torch.where(ends, unsure, p.unsure)), take


def run_batched(f, x: Tensor, state, o: LMOptions, limits: tuple[int, tuple], model) -> tuple:
    """The loop shared by the batched and data-parallel drivers: ``model(x, state)`` gives the
    local model, ``f`` evaluates trial norms. Returns ``(x, progress)``."""
    max_steps, tols = limits
    B = x.shape[0]
    z = torch.zeros(B, dtype=torch.int64, device=x.device)
    p = _Progress(torch.ones(B, dtype=torch.bool, device=x.device), z, z, z + 1,
                  torch.zeros_like(z, dtype=torch.bool), z + _EDGE_WINDOW, z != 0)
    for _ in range(max_steps):
        if not bool(p.running.any()):  # host sync: one per update
            break
        loc = model(x, state)
        step, new = lm_batched.iterate(loc, state, f, o, frozen=~p.running)
        p, take = _advance(p, new, loc.finite, tols, o)
        state = LevenbergMarquardtState(*(
            torch.where(take.reshape(-1, *([1] * (a.ndim - 1))), a, b) for a, b in zip(new, state)))
        x = x + torch.where((take & new.accepted)[:, None], step, torch.zeros_like(step))
    success = torch.isin(p.code, torch.tensor(SUCCESS_CODES, device=x.device))
    never = success & ~p.moved & (p.code > 3)
    return x, p._replace(code=torch.where(never, 12, p.code), last=state)


def _select(mask: Tensor, new: Any, old: Any) -> Any:
    """``new`` where ``mask`` (per problem), else ``old``, field by field."""
    return type(old)(*(torch.where(mask.reshape(-1, *([1] * (a.ndim - 1))), a, b)
                       for a, b in zip(new, old)))


def _newton_per_pass(device: torch.device) -> int:
    """Trust-region search updates per pass: all of them on the CPU, where the search stops
    early once every problem is done (a free read there), else ``_PASS_NEWTON_STEPS``."""
    return lm_batched.NEWTON_STEPS if device.type == "cpu" else _PASS_NEWTON_STEPS


def run_flat(f, x: Tensor, state, o: LMOptions, limits: tuple[int, tuple], model) -> tuple:
    """The batched loop with one attempt per problem and pass: a problem whose update ends
    (accepted, rejected ``o.max_attempts`` times, or the rule exhausted) takes its stopping
    tests and, where it moved, a new model on the next pass, while the others go on trying;
    each problem takes the steps :func:`run_batched` gives it, in fewer passes (as many as
    the most evaluations any problem needs). ``model(x, state, idx)`` gives the local model
    of the rows ``idx`` (all when None), ``f`` evaluates trial norms. One host sync per pass
    (whether any problem runs, with the number needing a model): off the CPU the trust-region
    search makes ``_PASS_NEWTON_STEPS`` updates per pass, a problem whose search needs more
    resuming it on the next pass (the same damping, so the same steps). Returns
    ``(x, progress)``."""
    max_steps, tols = limits
    B = x.shape[0]
    z = torch.zeros(B, dtype=torch.int64, device=x.device)
    p = _Progress(z == 0, z, z, z + 1, z != 0, z + _EDGE_WINDOW, z != 0)
    loc = model(x, state, None)
    t = lm_batched.start_trial(loc, state, o)
    fresh = need = z != 0
    newton = _newton_per_pass(x.device)
    while max_steps > 0:
        flags = torch.stack([p.running.any().long(), need.sum()]).tolist()  # the host sync
        if not flags[0]:
            break
        if flags[1]:
            idx = None if flags[1] == B else torch.nonzero_static(need, size=flags[1])[:, 0]
            part = model(x, state, idx)
            loc = part if idx is None else lm_batched.BatchedLocal(
                *(a.index_copy(0, idx, b) for a, b in zip(loc, part)))
        t = lm_batched.restart_trial(loc, state, t, fresh)  # fresh: past a first update
        trying = p.running & loc.finite
        t = lm_batched.attempt(loc, t, state, f, o, trying, newton)
        over = p.running & (~loc.finite | lm_batched.update_over(t, o))
        step, new = lm_batched.finish(loc, state, t)
        q, take = _advance(p._replace(running=over), new, loc.finite, tols, o)
        running = ((p.running & ~over) | q.running) & (q.steps < max_steps)
        p = q._replace(running=running)
        state = _select(take, new, state)
        moved = take & new.accepted
        x = x + torch.where(moved[:, None], step, 0.0)
        fresh, need = over & running, moved & running
    success = torch.isin(p.code, torch.tensor(SUCCESS_CODES, device=x.device))
    never = success & ~p.moved & (p.code > 3)
    return x, p._replace(code=torch.where(never, 12, p.code), last=state)


def _state_rows(state: LevenbergMarquardtState, idx: Tensor) -> LevenbergMarquardtState:
    """The rows ``idx`` of what a model reads of the state (count, damping and scale)."""
    return state._replace(**{k: getattr(state, k).index_select(0, idx)
                             for k in ("count", "damping", "scale")})


def _spectral_model(J: Tensor, r: Tensor, x: Tensor, state: LevenbergMarquardtState,
                    o: LMOptions) -> lm_batched.BatchedLocal:
    """The model of every problem from the eigendecomposition of its ``Jt^T Jt`` (several
    times cheaper than an SVD of ``Jt``), and from the SVD for the problems where that cannot
    be trusted: an eigenvalue of a Gram matrix carries an absolute error of about ``eps`` times
    the largest, so a relative eigenvalue at or below ``4 eps n`` may be a zero singular value
    (a rank-deficient or wide ``J``: the step would get a component in ``J``'s null space) or
    a small one that the Gram matrix lost (an ill-conditioned fit such as NIST MGH09). The
    SVD's singular values are exact to ``eps`` relative: its step is the single fit's. One
    host read (how many problems need the SVD)."""
    loc = lm_batched.local_model(J, r, x, state, o, "gram")
    n = J.shape[-1]
    ill = loc.finite & (loc.sh2 <= 4 * torch.finfo(J.dtype).eps * n).any(-1)
    k = int(ill.sum())  # host sync
    if k == 0:
        return loc
    idx = torch.nonzero_static(ill, size=k)[:, 0]
    part = lm_batched.local_model(J[idx], r[idx], x[idx], _state_rows(state, idx), o, "svd")
    pad = n - part.sh2.shape[-1]  # an SVD of a wide J has m < n directions: the rest dropped
    part = part._replace(sh2=torch.nn.functional.pad(part.sh2, (0, pad)),
                         w=torch.nn.functional.pad(part.w, (0, pad)),
                         V=torch.nn.functional.pad(part.V, (0, pad)))
    return lm_batched.BatchedLocal(*(a.index_copy(0, idx, b)  # type: ignore[union-attr,arg-type]
                                     for a, b in zip(loc, part)))  # scale is set by both


def least_squares_batched(residual_fn: Callable[[PyTree], Tensor], params: PyTree,
                          max_steps: int, tolerances: Any, o: LMOptions):
    """The batched driver behind ``least_squares(..., batched=True)`` (see there);
    ``tolerances`` a :class:`funcopt.Tolerances`, ``o`` the validated options."""
    bad = sorted(k for k in ("geodesic", "jacobian_mode", "chunk_size", "form", "solver")
                 if getattr(o, k) not in (None, "auto"))
    if bad:
        raise ValueError(f"batched=True solves every problem by the batched spectral path; "
                         f"the options {bad} are not supported there: leave them at their "
                         "defaults")
    x, unravel = ravel_batched(params)
    B = x.shape[0]
    f = _residuals(residual_fn, unravel, B, x.dtype)
    m = f(x).shape[1]
    o = resolve_scaling(o, m, x.shape[1])
    _check_independent(f, x)

    def model(xb: Tensor, state, idx: Tensor | None) -> lm_batched.BatchedLocal:
        r, J = batched_jacobian(f, xb, m)
        if idx is not None:
            r, J, xb, state = r[idx], J[idx], xb[idx], _state_rows(state, idx)
        return _spectral_model(J, r, xb, state, o)

    def trial_norm(xb: Tensor) -> Tensor:
        with torch.no_grad():
            return lm_batched.batched_norm(f(xb))

    eps = torch.finfo(x.dtype).eps
    tols = (tolerances.ftol, tolerances.xtol, tolerances.gtol, eps)
    x, p = run_flat(trial_norm, x, lm_batched.init_state(x, o.rule.initial_damping), o,
                    (max_steps, tols), model)
    jac = functools.cache(lambda: batched_jacobian(f, x, m))  # at most one for both checks
    code = least_squares_stalls.check_stalls(f, x, (p.code, p.unsure), m, tols, jac,
                                             (p.last, o.rule))
    code, probes = _check_maxima(f, x, code, jac)
    rnorm = trial_norm(x).double()
    cost = torch.where(rnorm < 1e154, 0.5 * rnorm * rnorm, torch.full_like(rnorm, float("inf")))
    success = torch.isin(code, torch.tensor(SUCCESS_CODES, device=x.device))
    return unravel(x), BatchedLeastSquaresInfo(p.steps, cost, code, success,
                                               p.evaluations + probes, rnorm)


def _check_maxima(f: Callable[[Tensor], Tensor], x: Tensor, code: Tensor,
                  jac: Callable[[], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """``(code, probes)``: the successes other than a zero residual whose cost falls along a
    parameter with a zero Jacobian column turned into :data:`NOT_A_MINIMUM`
    (:func:`funcopt.least_squares_probe.probe_zero_columns`, with its rounding bound from
    ``J``; ``probes`` its residual evaluations per problem). Two host reads (this one and the
    probe's), and ``jac()``, the batched ``(r, J)`` at ``x``, only when some problem ends
    with such a success."""
    candidates = torch.isin(code, torch.tensor(SUCCESS_CODES[1:], device=x.device))
    if not bool(candidates.any()):  # host sync: one
        return code, torch.zeros_like(code)
    r, J = jac()
    rnorm, col = lm_batched.batched_norm(r.double()), lm_batched.batched_norm(J.mT)

    def norms(xb: Tensor) -> Tensor:
        with torch.no_grad():
            return lm_batched.batched_norm(f(xb).double())

    def noise(moving: Tensor) -> Tensor:
        with torch.no_grad():
            ds = [f(x + v) - r - (J @ v[..., None])[..., 0]
                  for v in noise_steps(x, moving, rnorm, col)]
        return rounding_bound(r, ds, rnorm)

    falls, _, probes = probe_zero_columns(norms, x, J.abs().amax(-2) == 0, rnorm, candidates,
                                          noise)
    return torch.where(falls, NOT_A_MINIMUM, code), probes
