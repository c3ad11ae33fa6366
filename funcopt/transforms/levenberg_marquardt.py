"""Levenberg-Marquardt: damped Gauss-Newton steps on a residual function.

For residuals ``r(x)`` (cost ``F(x) = 0.5 ||r(x)||^2``) with Jacobian ``J``, one step solves

    (J^T J + lambda D) delta = -J^T r

accepts ``x + delta`` when the gain ratio ``rho = (F(x) - F(x + delta)) / (L(0) - L(delta))``
(actual over predicted decrease of the linear model ``L``) exceeds a threshold, and adapts the
damping ``lambda`` from ``rho``. The linear system goes through :mod:`funcopt.solvers`, so any
solver (Cholesky, QR, CG, cuPyNumeric across GPUs ...) can be chosen by name.

The Jacobian is either formed densely (:func:`funcopt.func.jacobian`) or, with a matrix-free
solver (``solver="cg"``), used only through Jacobian-vector and vector-Jacobian products
(:func:`funcopt.func.gauss_newton_products`); that local model lives in
:mod:`funcopt.transforms.lm_model`. The options are small frozen objects: the damping rules
:class:`Nielsen`, :class:`Classic`, :class:`TrustRegion` and geodesic acceleration
:class:`Geodesic` (:mod:`funcopt.transforms.lm_damping`).

Host synchronisation: in eager mode the accept/reject decision is a Python ``if`` on the gain
ratio, so each attempt in :func:`levenberg_marquardt`'s ``update`` reads one boolean from the
device, and the finiteness check of the residuals (and Jacobian) at the current point reads one
more; the solver layer adds its own checks (see :mod:`funcopt.solvers`). Under ``torch.func``
transforms (``vmap`` over independent problems) and ``torch.compile`` the update takes the
sync-free path of :mod:`funcopt.transforms.lm_batched` instead: the same steps up to rounding,
every decision a ``torch.where``, a fixed number of attempts with finished ones masked
(:mod:`funcopt.transforms.lm_device`, which also replays an update from CUDA graphs with
``cuda_graph=True``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import optree
import torch

from funcopt.base import (
    GradientTransformation,
    Params,
    PyTree,
    check_hyperparameter,
    increment,
    require_params,
    step_counter,
    tree_check_structure,
)
from funcopt.engine import is_tracing
from funcopt.func.jacobian import check_jacobian_options, ravel_params
from funcopt.solvers import Auto, get
from funcopt.solvers.base import scaled_norm
from funcopt.solvers.operators import norm_parts
from funcopt.transforms.lm_damping import (
    Classic,
    DampingRule,
    Geodesic,
    Nielsen,
    TrustRegion,
    _min,
    adapt_radius_host,
    check_geodesic,
    check_params,
    check_rule,
    host_values,
    read_host,
    relative_reductions,
    trust_region_damping,
)
from funcopt.transforms.lm_model import (
    _is_matrix_free,
    _linearize,
    _propose,
    damped_gauss_newton_step,
    trial_residuals,
)

__all__ = ["LevenbergMarquardtState", "levenberg_marquardt", "damped_gauss_newton_step",
           "lm_options", "LMOptions", "Nielsen", "Classic", "TrustRegion", "Geodesic"]

Tensor = torch.Tensor


class LevenbergMarquardtState(NamedTuple):
    """State of :func:`levenberg_marquardt`; statistics describe the last attempted step.

    count: updates done (int64). damping: ``lambda`` for the next step (with the trust-region
    rule: of the last attempt). nu: Nielsen's growth factor. radius: ``Delta``, the trust-region
    radius on ``||d * delta||`` (trust-region rule; 0 before the first step).
    scale: ``d``, running maximum of the Jacobian column norms (MINPACK's ``diag``;
    ones before the first step; -1 after steps with ``D = I``). cost: ``F(x)`` at the params
    given to the last update.
    new_cost: ``F`` after the returned step. predicted: ``L(0) - L(delta)``. gain_ratio: ``rho``.
    step_norm: ``||d * delta||`` (NaN, as ``predicted`` and ``predicted_reduction``, when the
    last attempt was rejected because its linear solve failed: there is no step to measure).
    x_norm: ``||d * x_new||``. grad_cos: MINPACK's ``gnorm``,
    ``max_j |J_j^T r| / (||J_j|| ||r||)`` at ``x``. accepted: the step was taken.
    attempts: solves in the last update (int64). residual_norm: ``||r(x)||``, computed without
    overflow or underflow (``cost`` and ``new_cost`` are ``0.5 ||r||^2`` and can overflow to inf
    or underflow to 0 where the norm does not). actual_reduction, predicted_reduction:
    MINPACK's scale-free ``1 - (||r_new|| / ||r||)^2`` (``-1`` when ``||r_new|| >= 10 ||r||``
    or not finite) and ``(L(0) - L(delta)) / F(x)``; ``gain_ratio`` is their quotient.
    trial_finite: the residuals were finite at every point tried in the last update.
    """

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count by design (optax's name)
    damping: Tensor
    nu: Tensor
    radius: Tensor
    scale: Tensor
    cost: Tensor
    new_cost: Tensor
    predicted: Tensor
    gain_ratio: Tensor
    step_norm: Tensor
    x_norm: Tensor
    grad_cos: Tensor
    accepted: Tensor
    attempts: Tensor
    residual_norm: Tensor
    actual_reduction: Tensor
    predicted_reduction: Tensor
    trial_finite: Tensor


@dataclass(frozen=True)
class LMOptions:
    """The validated options of :func:`levenberg_marquardt`, as its step functions (eager,
    traced and batched) read them; made by :func:`lm_options`. Fields as the arguments there;
    ``scaling`` is a bool, or None on the dense path: decided per problem by its shape
    (:func:`funcopt.transforms.lm_damping.resolve_scaling`); ``matrix_free`` says the solver
    only needs products with ``J`` (conjugate gradients)."""

    rule: DampingRule
    geodesic: Geodesic | None
    scaling: bool | None
    max_attempts: int
    accept_ratio: float
    solver: Any
    form: str
    jacobian_mode: str
    chunk_size: int | None
    matrix_free: bool


def lm_options(
    rule: DampingRule = Nielsen(),  # noqa: B008  (frozen, immutable)
    geodesic: Geodesic | None = None,
    scaling: bool | None = None,
    max_attempts: int = 10,
    accept_ratio: float = 1e-4,
    solver: Any = "auto",
    form: str = "auto",
    jacobian_mode: str = "auto",
    chunk_size: int | None = None,
) -> LMOptions:
    """The options of :func:`levenberg_marquardt` (same names and defaults), validated, as an
    :class:`LMOptions`; raises ValueError/TypeError naming a bad one."""
    check_rule(rule)
    check_geodesic(geodesic)
    if not isinstance(max_attempts, int) or isinstance(max_attempts, bool) or max_attempts < 1:
        raise ValueError(f"max_attempts={max_attempts!r}: pass an int >= 1")
    check_hyperparameter("accept_ratio", accept_ratio, low=0.0, high=1.0, high_inclusive=False)
    if scaling is not None and not isinstance(scaling, bool):
        raise TypeError(f"scaling={scaling!r}: pass True, False or None (automatic)")
    # unchecked, a misspelt form ran the primal one and a bad chunk_size failed in torch.cat
    if form not in ("auto", "primal", "dual"):
        raise ValueError(f"form={form!r}: pass one of 'auto', 'primal', 'dual'")
    check_jacobian_options(jacobian_mode, chunk_size, "jacobian_mode")
    matrix_free = _is_matrix_free(solver)
    if scaling is None and (matrix_free or getattr(solver, "row_block", None) is not None):
        scaling = not matrix_free  # the row-block path keeps MINPACK's scaling
    if matrix_free and isinstance(rule, TrustRegion):
        raise ValueError("rule=TrustRegion() needs a dense Jacobian (an SVD of J / d); "
                         "use rule=fo.Nielsen() or fo.Classic() with a matrix-free solver")
    return LMOptions(rule, geodesic, scaling, max_attempts, accept_ratio, solver, form,
                     jacobian_mode, chunk_size, matrix_free)


def levenberg_marquardt(
    residual_fn: Callable[..., Tensor],
    *,
    rule: DampingRule = Nielsen(),  # noqa: B008  (frozen, immutable)
    geodesic: Geodesic | None = None,
    scaling: bool | None = None,
    max_attempts: int = 10,
    accept_ratio: float = 1e-4,
    solver: Any = "auto",
    form: str = "auto",
    jacobian_mode: str = "auto",
    chunk_size: int | None = None,
    cuda_graph: bool = False,
) -> GradientTransformation:
    r"""Levenberg-Marquardt as a pure transform whose ``updates`` are the accepted step.

    .. math::
        (J^\top J + \lambda D)\,\delta = -J^\top r, \qquad
        \rho = \frac{F(x) - F(x+\delta)}{\tfrac12\|J\delta\|^2 + \lambda\,\delta^\top D\delta},

    with ``r = residual_fn(params, batch)`` flattened, ``J = dr/dx`` over the floating
    parameter leaves (integer leaves get zero updates), ``F = 0.5 ||r||^2``. The step is
    accepted when ``rho > accept_ratio``; otherwise ``rule`` changes ``lambda`` and the step is
    solved again, up to ``max_attempts`` times per update (a zero update when all fail).

    Args:
        residual_fn: ``(params) -> r`` or ``(params, batch) -> r`` (given when ``batch`` is
            passed to ``update``); any shape, flattened.
        rule: the damping rule, an object: :class:`Nielsen` (default, ``Nielsen()``:
            ``lambda_0 = 1e-3``, bounds ``[1e-15, 1e16]``), :class:`Classic` (Marquardt 1963:
            fixed factors) or :class:`TrustRegion` (Moré 1978, MINPACK ``lmder``: a radius on
            ``||d * delta||``, dense Jacobians only). Each holds its own numbers; see there.
        geodesic: None (default, off) or :class:`Geodesic` (Transtrum & Sethna 2012): add the
            second-order correction ``a / 2``, ``(J^T J + lambda D) a = -J^T r_vv``, and reject
            steps with ``2 ||a||_D / ||delta||_D > alpha``.
        scaling: Marquardt/MINPACK scaling: ``D = diag(d^2)``, ``d_j`` the running maximum over
            steps of the norm of column ``j`` of ``J`` (1 while the column has been zero at
            every step so far; unlike MINPACK that 1 does not enter the maximum); the rule's
            ``initial_damping`` is then relative to ``D``. False: ``D = I`` and ``lambda_0 =
            tau * max diag(J^T J)`` with ``tau = initial_damping`` (Nielsen 1999). Default
            None: with a dense Jacobian True where the residuals are at least as many as the
            parameters (``m >= n``: curve fits) and False on a wider problem, False on the
            matrix-free path; True there
            takes the columns' norms from ``diag(J^T J)``, ``min(m, n)`` Jacobian products
            per update (:func:`funcopt.transforms.lm_model.column_norms_sq`), which the Jacobi
            preconditioner computes anyway. Wide networks (many more parameters than
            residuals): the column norms there spread over 4-5 orders of magnitude (an MLP's
            hidden-to-hidden weights scale with the next layer's weights), ``D`` damps every
            column by its own curvature, and the step moves the weakly coupled weights far;
            ``D = I`` (the minimum-norm step as ``lambda -> 0``) took torch-lm's 4 steps to
            the target at 1e6 parameters and 4096 samples on an H100 where ``D`` took 19
            (``docs/least_squares.md``, "Step counts on wide networks"), hence the default by
            shape, taken on the first step and kept (mini-batches whose ``m`` crosses ``n``,
            also under vmap/compile); or pass True/False.
        max_attempts: solves per update before giving up with a zero step (10).
        accept_ratio: smallest gain ratio accepted (1e-4, as MINPACK), in ``[0, 1)``.
        solver, form: passed to :func:`funcopt.solvers.damped_least_squares` (``"auto"``:
            primal ``J^T J`` or dual ``J J^T`` form by shape; or any named solver).
            ``"cg"``, ``"pcg"`` or a :class:`funcopt.solvers.CG` object select the matrix-free
            path: ``J`` is never formed; CG runs on ``v -> J^T (J v) + lambda D v`` built
            from :func:`funcopt.func.gauss_newton_products`. Where ``diag(J^T J)`` is known
            (scaling, or Jacobi) it also gives ``grad_cos`` (MINPACK's gtol test, one more
            product); with plain CG and ``scaling=False``, ``D = I``, ``lambda_0 =
            initial_damping`` and ``grad_cos`` is ``inf`` (unknown).
        jacobian_mode, chunk_size: passed to :func:`funcopt.func.jacobian` (dense path).
            Residuals declared per sample (:func:`funcopt.per_sample_residuals`, or the
            adapters' ``per_sample=True``) get their Jacobian sample by sample there, ``O(N)``
            instead of ``O(N^2)`` for ``N`` independent samples; ``chunk_size`` counts rows.
        cuda_graph: False (default) or True: each update's device work runs as two CUDA
            graphs (the linearization, one attempt), captured on the first update of each
            shape of (params, batch) and replayed; one host read per attempt remains. For
            small networks whose eager step is the host's cost of dispatching a few hundred
            operations. Cholesky of the damped Gram matrix (primal or dual by ``form``) with
            :class:`Nielsen` or :class:`Classic`; a failed factorization is a rejected attempt;
            float32 or float64 parameters (torch has no 16-bit Cholesky).
            ``residual_fn`` must be capturable (no host reads, no new shapes; a Python number
            it reads is fixed at capture). On a CPU the same two pieces run eagerly. See
            :mod:`funcopt.transforms.lm_device`.

    Example: ``fo.levenberg_marquardt(fn, rule=fo.Classic(increase_factor=4.0),
    geodesic=fo.Geodesic(alpha=0.75))``.

    Scale: the gain ratio, the trust-region damping and the statistics in the state use
    norms computed without overflow or underflow and only their ratios (as MINPACK), so a
    problem whose residuals are multiplied by ``10^k`` takes the same steps for any ``k`` the
    dtype can hold (with ``scaling``; with ``scaling=False`` the damping is absolute and
    ``lambda_0 = tau max diag(J^T J)`` can underflow). ``residual_fn`` must return the
    parameters' dtype (TypeError otherwise).

    ``update(updates, state, params, *, batch=None)``: ``updates`` is not read (LM computes
    its own step; pass the gradients or ``None``); ``params`` is required. Host syncs: one per
    attempt (accept/reject) and one finiteness check of ``r`` and ``J``.

    References: Levenberg (1944); Marquardt (1963), SIAM J. Appl. Math. 11(2); Moré (1978),
    "The Levenberg-Marquardt algorithm: implementation and theory" (MINPACK); Nielsen (1999),
    "Damping parameter in Marquardt's method", IMM-REP-1999-05; Transtrum & Sethna (2012),
    "Improvements to the Levenberg-Marquardt algorithm for nonlinear least-squares minimization".
    """
    from funcopt.transforms import lm_device

    opts = lm_options(rule, geodesic, scaling, max_attempts, accept_ratio, solver, form,
                      jacobian_mode, chunk_size)
    if not isinstance(cuda_graph, bool):
        raise TypeError(f"cuda_graph={cuda_graph!r}: pass True or False")
    graphed = lm_device.GraphedSteps(residual_fn, opts) if cuda_graph else None

    def init(params: Params) -> LevenbergMarquardtState:
        x, _ = ravel_params(params)
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        false = torch.zeros((), dtype=torch.bool, device=x.device)
        return LevenbergMarquardtState(
            step_counter(params), zero + rule.initial_damping, zero + 2.0, zero,
            torch.ones_like(x), zero, zero, zero, zero, zero, zero, zero, false,
            step_counter(params), zero, zero, zero, ~false,
        )

    def update(updates: Any, state: LevenbergMarquardtState, params: Params | None = None,
               *, batch: Any = None, **extra: Any):
        params = require_params(params, "levenberg_marquardt")
        check_params(rule, params)
        if updates is not None:
            tree_check_structure(updates, params, ("updates", "params"))
            _check_shapes(updates, params)
        args = () if batch is None else (batch,)
        unravel = None
        if graphed is not None:
            delta, new_state, unravel = graphed(params, args, state)
        elif is_tracing():
            delta, new_state = lm_device.traced_step(residual_fn, params, args, state, opts)
        else:
            with np.errstate(all="ignore"):  # host numbers overflow as the dtype's do
                delta, new_state, unravel = _step(residual_fn, params, args, state, opts)
        return _to_tree(delta, params, unravel), new_state

    return GradientTransformation(init, update)


def _step(residual_fn, params, args, state: LevenbergMarquardtState, o: LMOptions):
    """Propose, evaluate and accept/reject up to ``max_attempts`` times. The scalars the
    decisions need are read once per attempt (with the linearisation's on the dense path)
    and the rule's arithmetic runs on the host in the parameters' dtype
    (:func:`funcopt.transforms.lm_damping.host_type`), as 0-d tensors would compute it."""
    loc = _linearize(residual_fn, params, args, state, o)
    o = loc.options  # scaling decided by the problem's shape
    assert o.scaling is not None
    x, d, rule = loc.x, loc.d, o.rule
    host = loc.host or read_host(loc.rnorm, loc.damping, state, rule, d, x,
                                    scaling=o.scaling)
    fn, lam, nu, radius, first = host
    T = type(fn)
    fn_pos = fn if 0 < fn < math.inf else T(1.0)
    all_finite = True
    for attempt in range(1, o.max_attempts + 1):
        if isinstance(rule, TrustRegion):
            assert loc.svd is not None  # _linearize computes it under the trust-region rule
            lam = T(trust_region_damping(*loc.svd, float(radius / fn_pos)).item())  # host sync
        _require_finite_damping(lam, x.dtype, o.scaling)
        trial = _attempt(loc, lam, o, attempt == 1)
        new_fn, pnorm, ok, solved = trial[2:6]
        finite = math.isfinite(new_fn)
        all_finite = all_finite and finite
        rho, actual, predicted = relative_reductions(fn, new_fn, trial[6], pnorm, lam)
        accepted = ok and finite and rho > T(o.accept_ratio)
        if isinstance(rule, TrustRegion):
            if attempt == 1 and first and ok:  # a failed solve measured no step: no radius
                radius = _min(radius, pnorm)
            far = not (T(0.1) * new_fn < fn)
            radius = adapt_radius_host(radius, lam, (actual, predicted, far), pnorm / fn_pos,
                                       pnorm, ok)
            exhausted = radius <= T(torch.finfo(x.dtype).tiny)
        else:
            lam, nu = rule.adapt_host(lam, nu, rho, accepted)
            exhausted = lam >= T(rule.max_damping)
        if accepted or exhausted:
            break
    stats = (fn, lam, nu, radius, rho, actual, predicted, all_finite, solved)
    return (*_finish_step(state, loc, trial, stats, accepted, attempt), loc.unravel)


def _require_finite_damping(lam: Any, dtype: torch.dtype, scaling: bool) -> None:
    """A damping beyond the dtype (``lambda`` is in units of ``J^T J``: with ``scaling=False``
    a Jacobian of norm above ~sqrt(max) overflows it) is one ValueError saying so."""
    if not math.isfinite(lam):
        fix = ("pass scaling=True, whose damping is relative to the column norms, or "
               "rescale" if not scaling else "rescale")
        raise ValueError(
            f"the damping lambda = {float(lam)} is beyond the largest {dtype} number: the "
            f"Jacobian's scale is too large for it; {fix} the residuals or the parameters")


def _attempt(loc, lam, o: LMOptions, first: bool) -> tuple:
    """One trial at damping ``lam``: ``(step, x + step, ||r(x + step)||, ||d delta||, ok,
    solved, ||J delta||, ||d step||)``, the norms and flags read in one host sync (with the
    check of the direct solve's right-hand side on the ``first`` attempt). Under "auto", a
    failed Cholesky solve is solved again by the solver's fallback."""
    for generic in (False, True):
        delta, step, Jd, ok, solved = _propose(loc, lam, o, generic)
        x_new = loc.x + step
        vecs = [trial_residuals(loc.f, x_new, loc.r.shape), loc.d * delta, Jd]
        if o.geodesic is not None:
            vecs.append(loc.d * step)
        parts = [_norm_parts(v) for v in vecs]
        flags = [ok] if solved is ok else [ok, solved]  # one tensor on the direct path
        finite = loc.direct.finite if first and loc.direct is not None else True
        check = isinstance(finite, Tensor)  # else known on the host
        vals = host_values(*(t for p in parts for t in p), *flags,
                           *((finite,) if check else ()))  # sync
        if not (vals.pop() if check else finite):
            raise ValueError("the right-hand side b contains NaN or inf; a linear solve of "
                             "non-finite data has no meaning. Check the computation that "
                             "produced it (e.g. the residuals or the Jacobian).")
        (new_fn, pnorm, jdn, *snorm), rest = _host_norms(vals, parts)
        snorm = snorm[0] if o.geodesic is not None else pnorm
        ok, solved = rest[0], rest[-1]
        if generic or solved or loc.direct is None or not isinstance(get(o.solver), Auto):
            break
    return (step, x_new, new_fn, pnorm, ok, solved, jdn, snorm)


def _norm_parts(v: Tensor) -> list[Tensor]:
    """``||v||`` as 0-d tensors for one host read: ``[c, nu]`` with ``||v|| = c nu``
    (:func:`funcopt.solvers.operators.norm_parts`; the product is the host's, one operation
    fewer) where the host's numbers round as ``v``'s dtype does, else ``[||v||]``."""
    if v.dtype in (torch.float64, torch.float32, torch.float16):
        return list(norm_parts(v))
    return [scaled_norm(v)]


def _host_norms(vals: list, parts: list) -> tuple[list, list]:
    """``(norms, rest)`` from the host values of ``parts`` (made by :func:`_norm_parts`)
    followed by others: a pair's product (rounded as the device's), or the norm itself."""
    norms, i = [], 0
    for p in parts:
        norms.append(vals[i] * vals[i + 1] if len(p) == 2 else vals[i])
        i += len(p)
    return norms, vals[i:]


def _finish_step(state, loc, trial, stats, accepted, attempt):
    """The accepted step (zeros when every attempt failed) and the new state; ``trial`` is
    the last attempt's (see :func:`_attempt`), ``stats`` ``(lambda, nu, radius, rho,
    actual, predicted, whether every trial point gave finite residuals, whether the last
    attempt's linear solves succeeded)``, host numbers. A rejected last attempt whose solve
    failed has no step to measure: its step norm and predicted reductions are NaN."""
    x, d = loc.x, loc.d
    step, x_new, new_fn, pnorm, _, _, _, snorm = trial
    fn, lam, nu, radius, rho, actual, predicted, all_finite, solved = stats
    T, dtype, dev = type(fn), x.dtype, x.device
    cost = T(0.5) * fn * fn  # informational: may overflow or underflow where fn does not
    kept = new_fn if accepted else fn
    nan = T(math.nan)
    unsolved = not accepted and not solved
    predicted = nan if unsolved else predicted

    running = d if loc.scale is None else loc.scale  # the state's scale (see running_scale)
    (lam_t, nu_t, radius_t, cost_t, new_cost, pred_cost, rho_t, snorm_t, act_t, pred_t,
     accepted_t, finite_t, attempts_t) = _tensors(
        (lam, nu, radius, cost, T(0.5) * kept * kept, predicted * cost,
         rho if math.isfinite(rho) else T(torch.finfo(dtype).min),
         nan if unsolved else (snorm if accepted else pnorm), actual, predicted), dtype, dev,
        (accepted, all_finite), attempt)
    new_state = LevenbergMarquardtState(
        increment(state.count), lam_t, nu_t, radius_t, running, cost_t, new_cost, pred_cost,
        rho_t, snorm_t, scaled_norm(d * (x_new if accepted else x)), loc.cos, accepted_t,
        attempts_t, loc.rnorm, act_t, pred_t, finite_t,
    )
    return (step if accepted else torch.zeros_like(x)), new_state


def _tensors(values: tuple, dtype: torch.dtype, dev: torch.device, flags: tuple,
             count: int) -> tuple[Tensor, ...]:
    """Host numbers as 0-d tensors of ``dtype`` on ``dev``, then the bools ``flags`` as bool
    tensors and ``count`` as an int64 one: one tensor made on the host (the flags as 0 and 1,
    the count where ``dtype`` holds it exactly, ``count <= 2 / eps``), moved in one copy that
    the host does not wait for (its memory is staged at once), unbound and cast."""
    exact = count <= 2.0 / torch.finfo(dtype).eps
    t = torch.tensor([float(v) for v in (*values, *flags, *((count,) if exact else ()))],
                     dtype=dtype)
    out = (t if dev.type == "cpu" else t.to(dev, non_blocking=True)).unbind()
    k = len(values)
    counted = (out[-1].long() if exact
               else torch.full((), count, dtype=torch.int64, device=dev))
    return (*out[:k], *(f.bool() for f in out[k:k + len(flags)]), counted)


def _check_shapes(updates: PyTree, params: PyTree) -> None:
    """Leaf shapes of ``updates`` against ``params`` (metadata only; the values are unused)."""
    paths = optree.tree_paths(params)
    for path, u, p in zip(paths, optree.tree_leaves(updates), optree.tree_leaves(params)):
        if isinstance(u, torch.Tensor) and isinstance(p, torch.Tensor) and u.shape != p.shape:
            raise ValueError(
                f"levenberg_marquardt: leaf {list(path)} of the updates has shape "
                f"{tuple(u.shape)} but the parameter has {tuple(p.shape)}; pass gradients shaped "
                "like the parameters, or None (LM does not read them)")


def _to_tree(delta: Tensor, params: PyTree, unravel: Callable | None = None) -> PyTree:
    """The flat step as a tree like ``params`` (zeros for integer leaves); ``unravel`` that of
    ``ravel_params(params)`` when the caller has it."""
    if unravel is None:
        _, unravel = ravel_params(params)
    tree = unravel(delta)
    return optree.tree_map(
        lambda u, p: u if p.is_floating_point() else torch.zeros_like(p), tree, params
    )
