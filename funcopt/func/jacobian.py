"""Jacobians of residual functions and Gauss-Newton products, built on torch.func.

A residual function maps a parameter pytree (and optional data) to a tensor of residuals
``r``; the least-squares cost is ``0.5 * ||r||^2``. These helpers flatten the floating-point
leaves of the parameter tree into one vector ``x`` of ``n`` entries (integer leaves are held
fixed) and return

* :func:`jacobian` - the dense ``(m, n)`` matrix ``J = dr/dx`` and ``r``, by reverse mode
  (``m`` vector-Jacobian products, rows chunked) or forward mode (``n`` Jacobian-vector
  products, columns chunked), chosen by shape; for residuals declared per sample with
  :func:`per_sample_residuals`, sample by sample (``vmap`` over samples of the Jacobian of one
  sample's residuals), which costs ``O(N)`` instead of ``O(N^2)`` for ``N`` samples;
* :func:`gauss_newton_products` - the matrix-free path: ``J v`` (jvp), ``J^T u`` (vjp) and
  the Gauss-Newton product ``J^T J v`` without forming ``J``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch.func import jacfwd, jacrev, jvp, vjp, vmap

from funcopt.base import (
    PyTree,
    tree_flatten_tensors,
    tree_leaves,
    tree_map,
    tree_unflatten,
)
from funcopt.func.ravel import concat, split

__all__ = [
    "ravel_params",
    "residual_vector_fn",
    "PerSampleResiduals",
    "per_sample_residuals",
    "jacobian",
    "jacobian_chunk_size",
    "GaussNewtonProducts",
    "gauss_newton_products",
]

Tensor = torch.Tensor


def ravel_params(params: PyTree) -> tuple[Tensor, Callable[[Tensor], PyTree]]:
    """Concatenate the floating-point leaves of ``params`` into one 1-D vector.

    Returns ``(x, unravel)``: ``x`` has the promoted floating dtype of the leaves and lives on
    the first floating leaf's device; ``unravel(v)`` rebuilds a tree shaped like ``params``
    from a vector of the same length, casting each piece back to its leaf's dtype. Integer and
    boolean leaves are not part of ``x``; ``unravel`` puts the original tensors back in place.

    Raises ValueError when the tree has no floating-point leaf (nothing to fit).
    """
    leaves, treedef = tree_flatten_tensors(
        params, "parameter leaf %d", "pass a pytree of tensors (wrap numbers with torch.tensor)")
    float_idx = [i for i, leaf in enumerate(leaves) if leaf.is_floating_point()]
    if not float_idx:
        raise ValueError(
            "the parameters have no floating-point leaves, so there is nothing to fit; "
            "pass parameters as float tensors (e.g. torch.tensor([1.0, 2.0], dtype=torch.float64))"
        )
    dtypes = [leaf.dtype for leaf in leaves]
    dtype = dtypes[float_idx[0]]
    for i in float_idx[1:]:
        if dtypes[i] != dtype:
            dtype = torch.promote_types(dtype, dtypes[i])
    shapes = [leaf.shape for leaf in leaves]
    (x,) = concat(leaves, [float_idx], dtype=dtype)
    x = x.detach()

    def unravel(v: Tensor) -> PyTree:
        if v.shape != x.shape:
            raise ValueError(f"unravel: expected a vector of shape {tuple(x.shape)}, got {tuple(v.shape)}")
        return tree_unflatten(treedef, split([v], [float_idx], shapes, list(leaves), dtypes))

    return x, unravel


def _vjp(
    f: Callable[[Tensor], Tensor], x: Tensor
) -> tuple[Tensor, Callable[[Tensor], tuple[Tensor, ...]]]:
    """``torch.func.vjp(f, x)`` without aux, as ``(f(x), pullback)`` (torch annotates the
    result as a pair or a triple, whichever ``has_aux`` gives)."""
    out = vjp(f, x)
    return out[0], out[1]


def residual_vector_fn(
    residual_fn: Callable[..., Tensor], unravel: Callable[[Tensor], PyTree], *args: Any
) -> Callable[[Tensor], Tensor]:
    """``x -> residual_fn(unravel(x), *args).reshape(-1)``, checking the result is a float tensor."""

    def f(x: Tensor) -> Tensor:
        r = residual_fn(unravel(x), *args)
        if not isinstance(r, torch.Tensor):
            raise TypeError(
                f"residual_fn returned a {type(r).__name__}; it must return a tensor of residuals"
            )
        if not r.is_floating_point():
            raise TypeError(
                f"residual_fn returned a {r.dtype} tensor; residuals must be floating point "
                "(cast with .to(torch.float64) or compute them from float parameters)"
            )
        return r.reshape(-1)

    return f


# --------------------------------------------------------------------------- per-sample residuals


def _num_samples(batch: Any) -> int:
    """``N``, the common leading size of the tensors of ``batch``; raises on a malformed batch."""
    leaves = tree_leaves(batch)
    if not leaves:
        raise ValueError(
            "per-sample residuals got a batch with no tensors; pass the batch as a tensor or a "
            "pytree of tensors whose dim 0 indexes the samples, e.g. (inputs, targets)"
        )
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"batch leaf {i} is a {type(leaf).__name__}, not a tensor; every leaf of a "
                "per-sample batch must be a tensor with one entry per sample along dim 0 "
                "(bind constants into the per-sample function instead)"
            )
        if leaf.ndim == 0:
            raise ValueError(
                f"batch leaf {i} is a 0-d tensor; every leaf of a per-sample batch needs a "
                "leading sample dimension (bind constants into the per-sample function instead)"
            )
    sizes = [leaf.shape[0] for leaf in leaves]
    if any(size != sizes[0] for size in sizes):
        raise ValueError(
            f"the batch's tensors disagree in leading size {sizes}; per-sample residuals need "
            "every leaf to hold one entry per sample along dim 0"
        )
    if sizes[0] == 0:
        raise ValueError("the batch holds no samples (leading size 0); there is nothing to fit")
    return int(sizes[0])


class PerSampleResiduals:
    r"""Residuals declared sample by sample: made by :func:`per_sample_residuals`.

    For a batch of ``N`` samples ``s_1 .. s_N`` (dim 0 of every tensor in the batch) the
    residual vector is

    .. math::
        r = c(N)\,\bigl[\, f(w, s_1);\ f(w, s_2);\ \dots;\ f(w, s_N) \,\bigr],

    each ``f(w, s_i)`` flattened, ``c(N)`` the constant ``scale``. Calling the object as
    ``residual_fn(params, batch)`` (or ``residual_fn(params)`` once bound with :meth:`bind`)
    returns ``r``, so it goes wherever a residual function does. :func:`jacobian` recognises it
    and builds ``J`` block by block, ``J_i = c(N) df(w, s_i)/dw``, by ``vmap`` over samples of
    the Jacobian of one sample's residuals: ``O(N)`` work, where the generic reverse-mode path
    runs a backward pass over the whole batch for each of the ``m`` rows (``O(N m)``).

    This is exact only when samples are independent: ``r`` restricted to sample ``i`` must not
    depend on any other sample. A model that mixes samples sees a batch of one here and gives
    other residuals, *silently* unless it fails under ``vmap`` (``BatchNorm`` in training mode
    and dropout do; a hand-written ``x - x.mean(0)`` does not): use the generic path for such
    models.
    """

    def __init__(
        self,
        fn: Callable[..., Tensor],
        scale: float | Callable[[int], float] = 1.0,
        pass_num_samples: bool = False,
        batch: Any = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"per_sample_residuals needs a function, got a {type(fn).__name__}")
        if not callable(scale) and not isinstance(scale, (int, float)):
            raise TypeError(
                f"scale is a {type(scale).__name__}; pass a number or a function "
                "num_samples -> number"
            )
        self.fn = fn
        self.scale = scale
        self.pass_num_samples = bool(pass_num_samples)
        self.batch = batch
        self._per: dict[tuple, int] = {}  # residuals per sample, by input shapes and dtypes
        if batch is not None:
            _num_samples(batch)

    def bind(self, batch: Any) -> PerSampleResiduals:
        """The same residuals with ``batch`` fixed: callable as ``residual_fn(params)`` (for
        :func:`funcopt.least_squares`), still evaluated and differentiated sample by sample."""
        if batch is None:
            raise ValueError("bind(batch): pass the batch, not None")
        return PerSampleResiduals(self.fn, self.scale, self.pass_num_samples, batch)

    def batch_of(self, args: tuple[Any, ...]) -> Any:
        """The batch from the arguments after ``params`` (the bound one when there are none)."""
        if self.batch is not None:
            if args:
                raise TypeError(
                    "these per-sample residuals are bound to a batch by bind(); call them as "
                    "residual_fn(params) without another batch"
                )
            return self.batch
        if len(args) != 1:
            raise TypeError(
                f"per-sample residuals take (params, batch), got {len(args)} argument(s) after "
                "params; pass the batch (to levenberg_marquardt: update(..., batch=batch)) or "
                "fix one with .bind(batch)"
            )
        return args[0]

    def scale_for(self, num_samples: int) -> float:
        """``c(N)`` as a finite float."""
        c = self.scale(num_samples) if callable(self.scale) else self.scale
        if isinstance(c, torch.Tensor) and c.numel() == 1:
            c = c.item()
        if not isinstance(c, (int, float)) or not math.isfinite(c):
            raise ValueError(f"scale gave {c!r} for {num_samples} samples; it must be a finite number")
        return float(c)

    def sample_fn(self, num_samples: int) -> Callable[[PyTree, Any], Tensor]:
        """``(params, sample) -> c(N) f(params, sample).reshape(-1)`` for ONE sample (no
        leading sample dimension), with ``N = num_samples``; checks ``f``'s result."""
        c = self.scale_for(num_samples)
        fn, extra = self.fn, ((num_samples,) if self.pass_num_samples else ())

        def one(params: PyTree, sample: Any) -> Tensor:
            r = fn(params, sample, *extra)
            if not isinstance(r, torch.Tensor):
                raise TypeError(
                    f"the per-sample function returned a {type(r).__name__}; it must return a "
                    "tensor of the residuals of one sample"
                )
            if not r.is_floating_point():
                raise TypeError(
                    f"the per-sample function returned a {r.dtype} tensor; residuals must be "
                    "floating point"
                )
            r = r.reshape(-1)
            return r if c == 1.0 else r * c

        return one

    def residuals_per_sample(self, params: PyTree, batch: Any, num: int,
                             count: Callable[[], int]) -> int:
        """Residuals of one sample: ``count()`` (one sample's residuals evaluated) the first
        time for these shapes and dtypes of ``params`` and ``batch`` and this ``num``, then
        remembered (the shape of a function's output is fixed by those of its inputs)."""
        key = (num, *((t.shape, t.dtype) for t in tree_leaves(params)),
               *((t.shape, t.dtype) for t in tree_leaves(batch)))
        if key not in self._per:
            with torch.no_grad():
                self._per[key] = int(count())
        return self._per[key]

    def __call__(self, params: PyTree, *args: Any) -> Tensor:
        """``r`` for the batch: ``vmap`` of the per-sample function over dim 0, flattened."""
        batch = self.batch_of(args)
        n = _num_samples(batch)
        return vmap(self.sample_fn(n), in_dims=(None, 0))(params, batch).reshape(-1)

    def __repr__(self) -> str:
        bound = "" if self.batch is None else ", bound"
        return f"PerSampleResiduals({getattr(self.fn, '__name__', self.fn)!r}{bound})"


def per_sample_residuals(
    fn: Callable[..., Tensor],
    *,
    scale: float | Callable[[int], float] = 1.0,
    pass_num_samples: bool = False,
) -> PerSampleResiduals:
    r"""Declare residuals that come sample by sample, so Jacobians cost ``O(N)``.

    ``fn(params, sample) -> residuals of that one sample`` (any shape, the same for every
    sample), where ``sample`` is the batch with dim 0 of every tensor indexed away: for
    ``batch = (inputs, targets)`` of shapes ``(N, d)`` and ``(N, k)``, ``sample`` is a pair of
    shapes ``(d,)`` and ``(k,)``. The residual vector of the batch is

    .. math::
        r = c(N)\,\bigl[ f(w, s_1); \dots; f(w, s_N) \bigr],

    with ``c(N)`` = ``scale`` (a number, or a function of ``N`` such as
    ``lambda n: n ** -0.5`` for a mean). With ``pass_num_samples=True``, ``fn`` is called as
    ``fn(params, sample, N)``, for residuals whose form depends on ``N`` otherwise than by a
    factor.

    The result is called as ``residual_fn(params, batch)`` like any residual function
    (``.bind(batch)`` gives ``residual_fn(params)``), so Levenberg-Marquardt, its gain ratio,
    geodesic acceleration and the matrix-free products use it unchanged; :func:`jacobian`, and
    hence the dense Levenberg-Marquardt step, take per-sample Jacobians from it.

    ``fn`` runs under ``torch.func.vmap``: it must be functional (a model through
    ``torch.func.functional_call``, no in-place updates of captured state) and samples must be
    independent: a model that mixes samples (batch statistics, ``x - x.mean(0)``) sees a batch
    of one and gives other residuals, silently unless it fails under ``vmap`` as ``BatchNorm``
    in training mode and dropout do.
    :func:`funcopt.mse_residuals` and :func:`funcopt.cross_entropy_residuals` with
    ``per_sample=True`` build such residuals from a batched model.
    """
    return PerSampleResiduals(fn, scale=scale, pass_num_samples=pass_num_samples)


def _per_sample_jacobian(
    res: PerSampleResiduals, params: PyTree, args: tuple[Any, ...], mode: str,
    chunk_size: int | None, max_memory: int | None,
    raveled: tuple[Tensor, Callable[[Tensor], PyTree]] | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`jacobian` for :class:`PerSampleResiduals`: ``vmap`` over samples of ``jacrev``
    (or ``jacfwd``) of one sample's residuals, ``chunk_size`` rows rounded to whole samples;
    ``raveled``: ``ravel_params(params)`` when the caller has it. One residual per sample in
    reverse mode is one vector-Jacobian product with cotangent 1 (the numbers of ``jacrev``)."""
    batch = res.batch_of(args)
    num = _num_samples(batch)
    x, unravel = ravel_params(params) if raveled is None else raveled
    one = res.sample_fn(num)
    per = res.residuals_per_sample(params, batch, num, lambda: vmap(one, in_dims=(None, 0))(
        unravel(x), tree_map(lambda t: t[:1], batch)).shape[1])
    n = x.numel()
    if mode == "auto":
        mode = "forward" if 8 * n < per else "reverse"
    rows = chunk_size or jacobian_chunk_size(per, n, x.dtype, x.device, max_memory)
    samples = max(1, rows // max(per, 1))

    def value_and_value(v: Tensor, sample: Any) -> tuple[Tensor, Tensor]:
        r = one(unravel(v), sample)
        return r, r

    def row_and_value(v: Tensor, sample: Any) -> tuple[Tensor, Tensor]:
        r, pullback = _vjp(lambda w: one(unravel(w), sample), v)
        return pullback(torch.ones_like(r))[0][None], r

    if mode == "reverse" and per == 1:
        jac = row_and_value
    else:
        jac = (jacrev if mode == "reverse" else jacfwd)(value_and_value, has_aux=True)
    blocks, r = vmap(jac, in_dims=(None, 0), chunk_size=samples if samples < num else None)(x, batch)
    return blocks.reshape(num * per, n).to(x.dtype), r.reshape(-1).detach()


def jacobian_chunk_size(
    m: int, n: int, dtype: torch.dtype, device: torch.device, max_memory: int | None = None
) -> int:
    """Rows (or columns) computed per vectorised batch so the work fits in ``max_memory`` bytes.

    A batch of ``k`` products holds about ``4 * k * (m + n)`` numbers (tangents, outputs and
    intermediates of a residual function whose activations are of the order of its inputs and
    outputs). ``max_memory=None`` uses half of the free memory of a CUDA device and no bound
    (one batch) elsewhere. Returns at least 1.
    """
    if max_memory is None:
        if device.type != "cuda":
            return max(m, n, 1)
        free, _ = torch.cuda.mem_get_info(device)
        max_memory = free // 2
    per = 4 * (m + n) * torch.empty((), dtype=dtype).element_size()
    return max(1, int(max_memory // per))


def check_jacobian_options(mode: Any, chunk_size: Any = None, name: str = "mode") -> None:
    """ValueError for a Jacobian mode (the argument ``name``) other than "auto", "forward"
    and "reverse", or a ``chunk_size`` that is neither None nor a positive int."""
    if mode not in ("auto", "forward", "reverse"):
        raise ValueError(f"{name}={mode!r}: pass 'auto', 'forward' or 'reverse'")
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r}: pass a positive int (Jacobian rows per "
                         "vectorised batch) or None (chosen from the free memory)")


def jacobian(
    residual_fn: Callable[..., Tensor],
    params: PyTree,
    *args: Any,
    mode: str = "auto",
    chunk_size: int | None = None,
    max_memory: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The Jacobian ``J = dr/dx`` of ``r = residual_fn(params, *args).reshape(-1)``.

    ``x`` is the vector of floating-point parameter leaves in tree order (see
    :func:`ravel_params`); integer leaves are held fixed.

    Args:
        residual_fn: ``(params, *args) -> Tensor`` of residuals (any shape; flattened to ``m``).
        params: the parameter pytree.
        *args: data passed through to ``residual_fn``.
        mode: ``"reverse"`` (``m`` vector-Jacobian products, chunked over rows), ``"forward"``
            (``n`` Jacobian-vector products, chunked over columns) or ``"auto"`` (default:
            forward when ``8 n < m``; a forward-mode product costs several reverse-mode ones in
            eager PyTorch, and reverse mode also gives ``r`` from the same pass).
        chunk_size: products per vectorised batch; ``None`` derives it from ``max_memory``.
        max_memory: bytes one batch may use (see :func:`jacobian_chunk_size`); ``None`` uses
            half the free CUDA memory, or one batch on the CPU.

    Returns:
        ``(J, r)``: ``J`` of shape ``(m, n)`` in the promoted dtype of the floating parameter
        leaves, on their device, and ``r`` of shape ``(m,)`` as ``residual_fn`` returns it.

    Per-sample residuals: when ``residual_fn`` is a :class:`PerSampleResiduals` (see
    :func:`per_sample_residuals`), ``J`` is built from the ``N`` blocks ``J_i = c(N)
    df(w, s_i)/dw`` of ``m_s`` rows each, by ``vmap`` over samples of ``jacrev`` (``jacfwd``
    when ``mode="forward"``, or ``"auto"`` with ``8 n < m_s``) of one sample's residuals, at
    ``O(N)`` cost instead of ``O(N m)``. ``chunk_size`` (or the one ``max_memory`` gives for
    ``m_s`` rows) still counts rows; it is rounded down to whole samples, at least one.
    """
    check_jacobian_options(mode, chunk_size)
    return _jacobian(residual_fn, params, args, mode, chunk_size, max_memory)


def _jacobian(residual_fn: Callable[..., Tensor], params: PyTree, args: tuple[Any, ...],
              mode: str, chunk_size: int | None, max_memory: int | None = None,
              raveled: tuple[Tensor, Callable[[Tensor], PyTree]] | None = None
              ) -> tuple[Tensor, Tensor]:
    """:func:`jacobian` with checked arguments; ``raveled``: ``ravel_params(params)`` when the
    caller has it."""
    if isinstance(residual_fn, PerSampleResiduals):
        return _per_sample_jacobian(residual_fn, params, args, mode, chunk_size, max_memory,
                                    raveled)
    x, unravel = ravel_params(params) if raveled is None else raveled
    f = residual_vector_fn(residual_fn, unravel, *args)
    pullback: Callable[[Tensor], tuple[Tensor, ...]] | None = None
    if mode == "forward":
        r0 = f(x)
    else:
        r0, pullback = _vjp(f, x)
    r0 = r0.detach()
    m, n = r0.numel(), x.numel()
    if m == 0:
        raise ValueError("residual_fn returned no residuals (a tensor with no elements); "
                         "there is nothing to fit: check the residual function and its data")
    if mode == "auto":
        mode = "forward" if 8 * n < m else "reverse"
    k = chunk_size or jacobian_chunk_size(m, n, x.dtype, x.device, max_memory)
    if mode == "reverse":
        assert pullback is not None  # mode was "reverse" or "auto", so the pullback exists
        eye = torch.eye(m, dtype=r0.dtype, device=r0.device)
        rows = [vmap(pullback)(eye[s:s + k])[0] for s in range(0, m, k)]
        return torch.cat(rows).to(x.dtype), r0
    eye = torch.eye(n, dtype=x.dtype, device=x.device)
    push = vmap(lambda v: jvp(f, (x,), (v,))[1])
    cols = [push(eye[s:s + k]) for s in range(0, n, k)]
    return torch.cat(cols).T.contiguous(), r0


class GaussNewtonProducts(NamedTuple):
    """Matrix-free products with the Jacobian ``J`` of the residuals at a point.

    ``residuals``: ``r`` (m,); ``jvp(v)``: ``J v`` (m,); ``vjp(u)``: ``J^T u`` (n,);
    ``gnvp(v)``: ``J^T J v`` (n,); ``size``: n.
    """

    residuals: Tensor
    jvp: Callable[[Tensor], Tensor]
    vjp: Callable[[Tensor], Tensor]
    gnvp: Callable[[Tensor], Tensor]
    size: int


def gauss_newton_products(
    residual_fn: Callable[..., Tensor], params: PyTree, *args: Any
) -> GaussNewtonProducts:
    """Jacobian-vector, vector-Jacobian and Gauss-Newton-vector products without forming ``J``.

    ``gnvp(v) = J^T (J v)`` costs one forward-mode and one reverse-mode pass; it is the
    matvec of the Gauss-Newton matrix ``J^T J`` used by matrix-free (CG) Levenberg-Marquardt.
    Vectors are 1-D in the flat parameter order of :func:`ravel_params`.
    """
    x, unravel = ravel_params(params)
    f = residual_vector_fn(residual_fn, unravel, *args)
    r, pullback = _vjp(f, x)

    def jv(v: Tensor) -> Tensor:
        return jvp(f, (x,), (v.to(x.dtype),))[1]

    def vj(u: Tensor) -> Tensor:
        return pullback(u.to(r.dtype))[0]

    def gnvp(v: Tensor) -> Tensor:
        return vj(jv(v))

    return GaussNewtonProducts(r.detach(), jv, vj, gnvp, x.numel())
