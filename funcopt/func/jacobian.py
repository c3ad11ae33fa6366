"""Jacobians of residual functions and Gauss-Newton products, built on torch.func.

A residual function maps a parameter pytree (and optional data) to a tensor of residuals
``r``; the least-squares cost is ``0.5 * ||r||^2``. These helpers flatten the floating-point
leaves of the parameter tree into one vector ``x`` of ``n`` entries (integer leaves are held
fixed) and return

* :func:`jacobian` - the dense ``(m, n)`` matrix ``J = dr/dx`` and ``r``, by reverse mode
  (``m`` vector-Jacobian products, rows chunked) or forward mode (``n`` Jacobian-vector
  products, columns chunked), chosen by shape;
* :func:`gauss_newton_products` - the matrix-free path: ``J v`` (jvp), ``J^T u`` (vjp) and
  the Gauss-Newton product ``J^T J v`` without forming ``J``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch.func import jvp, vjp, vmap

from funcopt.base import PyTree, tree_flatten, tree_unflatten

__all__ = [
    "ravel_params",
    "residual_vector_fn",
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
    leaves, treedef = tree_flatten(params)
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"parameter leaf {i} is a {type(leaf).__name__}, not a tensor; "
                "pass a pytree of tensors (wrap numbers with torch.tensor)"
            )
    float_idx = [i for i, leaf in enumerate(leaves) if leaf.is_floating_point()]
    if not float_idx:
        raise ValueError(
            "the parameters have no floating-point leaves, so there is nothing to fit; "
            "pass parameters as float tensors (e.g. torch.tensor([1.0, 2.0], dtype=torch.float64))"
        )
    dtype = leaves[float_idx[0]].dtype
    for i in float_idx[1:]:
        dtype = torch.promote_types(dtype, leaves[i].dtype)
    shapes = [leaves[i].shape for i in float_idx]
    sizes = [leaves[i].numel() for i in float_idx]
    dtypes = [leaves[i].dtype for i in float_idx]
    x = torch.cat([leaves[i].detach().reshape(-1).to(dtype) for i in float_idx])

    def unravel(v: Tensor) -> PyTree:
        if v.shape != x.shape:
            raise ValueError(f"unravel: expected a vector of shape {tuple(x.shape)}, got {tuple(v.shape)}")
        out = list(leaves)
        for i, piece, shape, dt in zip(float_idx, torch.split(v, sizes), shapes, dtypes):
            out[i] = piece.reshape(shape).to(dt)
        return tree_unflatten(treedef, out)

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
        ``(J, r)``: ``J`` of shape ``(m, n)`` and ``r`` of shape ``(m,)``, in the promoted
        dtype of the floating parameter leaves, on their device.
    """
    if mode not in ("auto", "forward", "reverse"):
        raise ValueError(f"mode={mode!r}: use 'auto', 'forward' or 'reverse'")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r}: pass a positive int or None")
    x, unravel = ravel_params(params)
    f = residual_vector_fn(residual_fn, unravel, *args)
    pullback: Callable[[Tensor], tuple[Tensor, ...]] | None = None
    if mode == "forward":
        r0 = f(x)
    else:
        r0, pullback = _vjp(f, x)
    r0 = r0.detach()
    m, n = r0.numel(), x.numel()
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
