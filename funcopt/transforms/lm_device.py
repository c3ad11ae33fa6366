"""The Levenberg-Marquardt steps whose decisions are device operations: the iteration of
:mod:`funcopt.transforms.lm_batched` on a batch of one.

:func:`traced_step` runs under ``torch.func`` transforms and ``torch.compile``: ``J`` by
``jacrev``, the damped system through an SVD of ``J / d``, a fixed number of attempts with
finished ones masked, no host read at all. It takes the eager step's steps up to rounding.

:class:`GraphedSteps` is ``levenberg_marquardt(..., cuda_graph=True)``. An update is two
pieces of device work, each a function of tensors only:

* *linearize*: ``r`` and ``J`` at ``x`` (:func:`funcopt.func.jacobian`'s machinery), the
  scaling and ``Jn = J / (d c)`` (:func:`funcopt.transforms.lm_batched.normalised_jacobian`,
  ``c`` a power of two near ``max |J / d|``), the Gram matrix of the smaller side (``Jn^T Jn``,
  or ``Jn Jn^T`` when ``m < n``) and the first trial;
* *attempt*: with ``mu = lambda / c^2``, the Cholesky factor of ``Gram + mu I``
  (``torch.linalg.cholesky_ex``: a failed factorization is a rejected attempt, no host read),
  the step ``u = -(Jn^T Jn + mu I)^{-1} Jn^T r / ||r||`` (dual: ``u = -Jn^T (Jn Jn^T + mu
  I)^{-1} r / ||r||``, the same vector), ``delta = u ||r|| / (c d)``, the residual norm at
  ``x + delta``, the gain ratio and the damping rule
  (:func:`funcopt.transforms.lm_batched.attempt`, every decision a ``torch.where``).

On a CUDA device each piece is captured once per shape of the parameters and the batch (a
graph pool shared by the two) and replayed: an update is one launch of *linearize*, then one
launch of *attempt* and one host read of "is the update over?" per attempt, as the eager step
reads one per attempt, but without the host's cost of dispatching each of the step's few
hundred operations. Elsewhere the same two functions run eagerly, with the same host reads.

The steps are those of the traced step (:func:`funcopt.levenberg_marquardt` under
``torch.func``) with the damped system solved by Cholesky instead of an SVD, and those of the
eager step up to rounding, where its Cholesky solve succeeds (the eager step then solves again
by a fallback; here the attempt is rejected and the damping raised).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch.func import jacrev

from funcopt.base import tree_flatten
from funcopt.engine import is_tracing
from funcopt.func.jacobian import (
    _jacobian,
    jacobian_chunk_size,
    ravel_params,
    residual_vector_fn,
)
from funcopt.transforms import lm_batched
from funcopt.transforms.levenberg_marquardt import (
    LevenbergMarquardtState,
    LMOptions,
    _require_finite_damping,
)
from funcopt.transforms.lm_damping import TrustRegion, resolve_scaling
from funcopt.transforms.lm_model import (
    _evaluate,
    _require_dtype,
    _require_finite_residuals,
    check_state,
)

__all__ = ["traced_step", "check_graph_options", "GraphedSteps", "MANY_PROGRAMS"]

Tensor = torch.Tensor
# programs past which GraphedSteps warns (once): more are a number or shape that changes with
# every call, and the cache, which keeps them all, grows by a copy of the batch each update
MANY_PROGRAMS = 16


def traced_step(residual_fn, params, args, state: LevenbergMarquardtState, o: LMOptions):
    """The update with no host sync (see the module's doc): ``(step, new_state)``."""
    if o.matrix_free or o.geodesic is not None:
        what = "a matrix-free solver" if o.matrix_free else "geodesic=Geodesic(...)"
        raise ValueError(
            f"levenberg_marquardt with {what} cannot run under torch.func transforms or "
            "torch.compile: its CG loop and second-derivative acceptance decide on the host. "
            "Use a dense solver without geodesic acceleration there, or call update eagerly")
    x, unravel = _raveled(params, state)
    f = residual_vector_fn(residual_fn, unravel, *args)
    J, r = jacrev(lambda v: (f(v), f(v)), has_aux=True)(x)
    _require_dtype(r, x)
    o, o_model = resolve_scaling(o, r.numel(), x.numel()), o  # None: the first step's choice
    batched = LevenbergMarquardtState(*(t[None] for t in state))

    def trial_norm(x_new: Tensor) -> Tensor:
        return _evaluate(f, x_new[0], r.shape)[None]

    loc = lm_batched.local_model(J[None], r.detach()[None], x[None], batched, o_model)
    step, new = lm_batched.iterate(loc, batched, trial_norm, o)
    return step[0], LevenbergMarquardtState(*(t[0] for t in new))


def _raveled(params: Any, state: LevenbergMarquardtState) -> tuple[Tensor, Callable]:
    """``ravel_params(params)``, checked against the state's number of parameters and dtype."""
    x, unravel = ravel_params(params)
    check_state(state.scale, x)
    return x, unravel


class CholeskyLocal(NamedTuple):
    """The model of one problem (leading dimension 1) for :func:`_cholesky_step`: ``x, rnorm,
    d, cos, damping, finite, scale`` as :class:`funcopt.transforms.lm_batched.BatchedLocal`;
    ``sigma = c``; ``Jn = J / (d c)``; ``gram``: ``Jn^T Jn`` (``Jn Jn^T`` if ``dual``);
    ``rhs``: ``Jn^T r / ||r||`` (``r / ||r||`` if ``dual``)."""

    x: Tensor
    rnorm: Tensor
    d: Tensor
    cos: Tensor
    damping: Tensor
    finite: Tensor
    scale: Tensor
    sigma: Tensor
    Jn: Tensor
    gram: Tensor
    rhs: Tensor
    dual: bool


def check_graph_options(o: LMOptions) -> None:
    """ValueError for the options the graphed step does not have (it solves by Cholesky of
    the damped Gram matrix, with a damping rule that needs no search)."""
    bad = ("rule=TrustRegion() (its damping comes from an SVD)" if isinstance(o.rule, TrustRegion)
           else "geodesic=Geodesic(...)" if o.geodesic is not None
           else f"solver={o.solver!r}" if o.solver not in ("auto", "cholesky") else None)
    if bad is not None:
        raise ValueError(f"levenberg_marquardt(cuda_graph=True) solves the damped system by "
                         f"Cholesky with Nielsen or Classic damping and cannot use {bad}; "
                         "pass solver='auto' or 'cholesky' and no geodesic or trust region, "
                         "or cuda_graph=False")


def local_model(J: Tensor, r: Tensor, x: Tensor, state: LevenbergMarquardtState, o: LMOptions,
                form: str) -> CholeskyLocal:
    """The model from ``J`` ``(1, m, n)``, ``r`` ``(1, m)`` and ``x`` ``(1, n)``."""
    Jn, gt, c, (x, rnorm, d, cos, lam, finite, kept) = lm_batched.normalised_jacobian(
        J, r, x, state, o)
    m, n = J.shape[-2:]
    dual = form == "dual" or (form == "auto" and m < n)
    # a non-finite J is left as it is (no pass over it to mask it): such a model makes no
    # attempt (``finite`` False) and the update raises at its host read
    gram = Jn @ Jn.mT if dual else Jn.mT @ Jn
    rhs = r / torch.where(rnorm > 0, rnorm, 1.0)[:, None] if dual else gt
    rhs = torch.where(finite[:, None], rhs, 0.0)
    return CholeskyLocal(x, torch.where(finite, rnorm, torch.nan), d, cos, lam, finite, kept, c,
                         Jn, gram, rhs, dual)


def _cholesky_step(loc: CholeskyLocal, mu: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(delta, ||Jt z|| / ||r||, ||z|| / ||r||)`` for ``mu = lambda / c^2`` (as
    :func:`funcopt.transforms.lm_batched._step`); ``delta`` NaN where the factorization fails."""
    eye = torch.eye(loc.gram.shape[-1], dtype=loc.gram.dtype, device=loc.gram.device)
    L, info = torch.linalg.cholesky_ex(loc.gram + mu[:, None, None] * eye)
    v = torch.cholesky_solve(loc.rhs[..., None], L)
    u = -(loc.Jn.mT @ v)[..., 0] if loc.dual else -v[..., 0]
    t1 = torch.linalg.vector_norm(loc.Jn @ u[..., None], dim=(-2, -1))
    t2 = torch.linalg.vector_norm(u, dim=-1) / loc.sigma
    delta = u * (loc.rnorm / loc.sigma)[:, None] / loc.d
    return torch.where((info == 0)[:, None], delta, torch.nan), t1, t2


class _Program(NamedTuple):
    """The two pieces of one shape: ``inputs`` (x, the state's tensors, the params' integer
    leaves, the batch's tensors) that a call copies into, the pieces (replays of their graphs
    on CUDA) and ``out``, where *attempt* leaves ``flags`` (the update is over, the model is
    finite, the attempt's damping is finite) and ``result`` (the step, then the new state's
    fields)."""

    inputs: list[Tensor]
    linearize: Callable[[], None]
    attempt: Callable[[], None]
    out: dict[str, Any]


class GraphedSteps:
    """The update of ``levenberg_marquardt(residual_fn, cuda_graph=True)``: a program per
    shape of (params, batch), captured on first use on a CUDA device."""

    def __init__(self, residual_fn: Callable[..., Tensor], o: LMOptions):
        check_graph_options(o)
        self.residual_fn, self.o = residual_fn, o
        self.programs: dict[Any, _Program] = {}
        self.pool: Any = None

    def __call__(self, params: Any, args: tuple, state: LevenbergMarquardtState):
        """``(step, new_state, unravel)`` for ``params`` (a tree) and ``args`` (``()`` or
        ``(batch,)``)."""
        if is_tracing():
            raise ValueError("levenberg_marquardt(cuda_graph=True) replays captured device "
                             "work and cannot run under torch.func transforms or "
                             "torch.compile; build it with cuda_graph=False for those")
        x, unravel = _raveled(params, state)
        if x.dtype in (torch.float16, torch.bfloat16):
            raise TypeError(f"levenberg_marquardt(cuda_graph=True) solves by Cholesky, which "
                            f"torch lacks for {x.dtype} parameters: pass float32 parameters, or "
                            "build it with cuda_graph=False")
        leaves, spec = tree_flatten(args)
        p_leaves, p_spec = tree_flatten(params)  # unravel's tree, shapes and dtypes
        fixed = [t for t in p_leaves if not t.is_floating_point()]  # read, not fitted
        tensors = [x, *state, *fixed, *(t for t in leaves if isinstance(t, Tensor))]
        shapes = tuple((t.shape, t.dtype) for t in p_leaves)
        # a program made under torch.inference_mode holds inference tensors, which cannot be
        # copied into outside it: one program per mode
        key = (p_spec, shapes, spec, tuple((t.shape, t.dtype, t.device) for t in tensors),
               tuple(_hashable(t) for t in leaves if not isinstance(t, Tensor)),
               torch.is_inference_mode_enabled())
        prog = self.programs.get(key)
        if prog is None:
            prog = self.programs[key] = self._build((p_leaves, p_spec), leaves, spec, tensors)
            if len(self.programs) == MANY_PROGRAMS:
                warnings.warn(
                    f"levenberg_marquardt(cuda_graph=True) has built {MANY_PROGRAMS} programs, "
                    "one per params tree, batch shape and value of a number in the batch, each "
                    "holding copies of the batch (and on CUDA two captured graphs): pass "
                    "numbers that change as tensors in the batch, and batches of a few shapes",
                    stacklevel=3)
        with torch.no_grad():
            for dst, src in zip(prog.inputs, tensors):
                dst.copy_(src)
            prog.linearize()
            for _ in range(self.o.max_attempts):
                prog.attempt()
                over, finite, damped = prog.out["flags"].tolist()  # host sync: one per attempt
                _require_finite_residuals(finite)
                if not damped:  # lambda_0 = tau max diag(J^T J) overflowed (scaling=False)
                    _require_finite_damping(math.inf, x.dtype, prog.out["resolved"].scaling)
                if over:
                    break
            step, *new = (t.clone() for t in prog.out["result"])
        return step, LevenbergMarquardtState(*new), unravel

    def _build(self, params, leaves, spec, tensors) -> _Program:
        """The pieces on copies of ``tensors``, run once, then captured on a CUDA device.
        ``params``: the leaves and tree of the parameters, whose integer leaves (which
        ``unravel`` puts back) are read from the copies, so each call's values count."""
        o, residual_fn = self.o, self.residual_fn
        inputs = [t.detach().clone() for t in tensors]
        k = len(LevenbergMarquardtState._fields)
        sx, ss = inputs[0], LevenbergMarquardtState(*(t[None] for t in inputs[1:1 + k]))
        batch = iter(inputs[1 + k:])
        p_leaves, p_spec = params
        _, unravel = ravel_params(p_spec.unflatten(
            [t if t.is_floating_point() else next(batch) for t in p_leaves]))
        args = spec.unflatten([next(batch) if isinstance(t, Tensor) else t for t in leaves])
        f = residual_vector_fn(residual_fn, unravel, *args)
        out: dict[str, Any] = {}
        chunk = o.chunk_size
        if chunk is None and sx.device.type == "cuda":  # no free-memory query in a capture
            with torch.no_grad():
                chunk = jacobian_chunk_size(f(sx).numel(), sx.numel(), sx.dtype, sx.device)

        def linearize() -> None:
            J, r = _jacobian(residual_fn, unravel(sx), args, o.jacobian_mode, chunk,
                             raveled=(sx, unravel))
            _require_dtype(r, sx)
            # a CholeskyLocal, read by lm_batched's functions in the fields they share
            loc: Any = local_model(J[None], r.detach()[None], sx[None], ss, o, o.form)
            trial = lm_batched.start_trial(loc, ss, o)
            if "trial" in out:  # the buffers that attempt reads and writes
                for a, b in zip(out["trial"], trial):
                    a.copy_(b)
            else:
                out["trial"] = lm_batched.Trial(*(t.clone() for t in trial))
            out.update(loc=loc, shape=r.shape, resolved=resolve_scaling(o, r.numel(), sx.numel()))

        def trial_norm(x_new: Tensor) -> Tensor:
            return _evaluate(f, x_new[0], out["shape"])[None]

        def attempt() -> None:
            loc, t, oo = out["loc"], out["trial"], out["resolved"]
            # the first attempt is made whatever the damping (as the eager step's): a damping
            # at max_damping (or a first one above it) is exhausted only once tried
            active = loc.finite & ((t.attempts == 0) | ~lm_batched.update_over(t, oo))
            new = lm_batched.attempt(loc, t, ss, trial_norm, oo, active, solve=_cholesky_step)
            damped = torch.isfinite(t.lam[0])  # the attempt's damping (the eager step's check)
            for a, b in zip(t, new):
                a.copy_(b)
            over = ~loc.finite | lm_batched.update_over(new, oo)
            step, state = lm_batched.finish(loc, ss, new)
            out.update(flags=torch.stack([over[0], loc.finite[0], damped]),
                       result=[step[0], *(s[0] for s in state)])

        with torch.no_grad():
            if sx.device.type != "cuda":
                return _Program(inputs, linearize, attempt, out)
            side = torch.cuda.Stream(sx.device)
            side.wait_stream(torch.cuda.current_stream(sx.device))
            with torch.cuda.stream(side):  # warm-up: lazy set-up (handles, kernels) first
                linearize()
                attempt()
            torch.cuda.current_stream(sx.device).wait_stream(side)
            graphs: list[torch.cuda.CUDAGraph] = []
            for fn in (linearize, attempt):
                graphs.append(torch.cuda.CUDAGraph())
                try:
                    with torch.cuda.graph(graphs[-1], pool=self.pool, stream=side):
                        fn()
                except RuntimeError as e:
                    raise RuntimeError(
                        "levenberg_marquardt(cuda_graph=True): the update cannot be captured "
                        "as a CUDA graph; residual_fn reads a device value on the host "
                        "(.item(), a data-dependent branch) or synchronises. Build it with "
                        f"cuda_graph=False, or remove the host read. The CUDA error: {e}") from e
                self.pool = graphs[0].pool()
        return _Program(inputs, graphs[0].replay, graphs[1].replay, out)


def _hashable(v: Any) -> Any:
    try:
        hash(v)
    except TypeError:
        raise TypeError(f"levenberg_marquardt(cuda_graph=True): the batch holds a "
                        f"{type(v).__name__}, which a captured step cannot key on; pass "
                        "tensors (and hashable constants) in the batch") from None
    return v
