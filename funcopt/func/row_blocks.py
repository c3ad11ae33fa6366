"""Row blocks of a Jacobian, so ``J`` is never whole: :func:`jacobian_row_blocks` gives the
residuals ``r`` and a generator of consecutive row blocks of ``J = dr/dx`` (rows by
vector-Jacobian products, or whole samples per block for residuals declared per sample). The
Levenberg-Marquardt path of ``fo.solvers.CuPyNumeric(row_block=k)`` reads them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.func import jacfwd, jacrev, vmap

from funcopt.base import PyTree, tree_map
from funcopt.func.jacobian import (
    PerSampleResiduals,
    _num_samples,
    _vjp,
    check_jacobian_options,
    ravel_params,
    residual_vector_fn,
)

__all__ = ["jacobian_row_blocks"]

Tensor = torch.Tensor


def jacobian_row_blocks(
    residual_fn: Callable[..., Tensor], params: PyTree, *args: Any, rows: int,
    mode: str = "auto",
) -> tuple[Tensor, Iterator[Tensor]]:
    """``(r, blocks)``: the residuals ``r`` (``m``, detached) and a generator of consecutive
    row blocks of ``J = dr/dx``, each formed when it is read, so ``J`` is never whole.

    A generic ``residual_fn`` gives blocks of ``rows`` rows, ``J[s:s+rows] = vmap(vjp)(E)``
    for the one-hot rows ``E`` (``rows x m``) of the identity, from one forward pass.
    :class:`PerSampleResiduals` give blocks of ``max(1, rows // m_s)`` whole samples (``m_s``
    residuals each), the Jacobian of each sample's residuals by ``jacrev`` (``jacfwd`` when
    ``mode="forward"``, or ``"auto"`` with ``8 n < m_s``) under ``vmap``, with the scale
    ``c(N)`` of the whole batch. Blocks are ``(m_k, n)`` in the parameters' dtype.
    """
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 1:
        raise ValueError(f"jacobian_row_blocks: rows={rows!r}; pass a positive int")
    check_jacobian_options(mode)
    x, unravel = ravel_params(params)
    if isinstance(residual_fn, PerSampleResiduals):
        return _per_sample_row_blocks(residual_fn, args, x, unravel, rows, mode)
    r, pullback = _vjp(residual_vector_fn(residual_fn, unravel, *args), x)
    r = r.detach()

    def blocks() -> Iterator[Tensor]:
        m = r.numel()
        for s in range(0, m, rows):
            k = min(rows, m - s)
            idx = torch.arange(k, device=r.device)
            onehot = torch.zeros(k, m, dtype=r.dtype, device=r.device)
            onehot[idx, idx + s] = 1.0
            yield vmap(pullback)(onehot)[0].to(x.dtype)

    return r, blocks()


def _per_sample_row_blocks(res: PerSampleResiduals, args: tuple[Any, ...], x: Tensor,
                           unravel: Callable[[Tensor], PyTree], rows: int, mode: str
                           ) -> tuple[Tensor, Iterator[Tensor]]:
    """:func:`jacobian_row_blocks` for per-sample residuals: whole samples per block."""
    batch = res.batch_of(args)
    num = _num_samples(batch)
    one = res.sample_fn(num)

    def value_and_value(v: Tensor, sample: Any) -> tuple[Tensor, Tensor]:
        r = one(unravel(v), sample)
        return r, r

    with torch.no_grad():
        r = vmap(one, in_dims=(None, 0))(unravel(x), batch).reshape(-1).detach()
    per = max(r.numel() // num, 1)
    if mode == "auto":
        mode = "forward" if 8 * x.numel() < per else "reverse"
    jac = (jacrev if mode == "reverse" else jacfwd)(value_and_value, has_aux=True)
    step = max(1, rows // per)

    def blocks() -> Iterator[Tensor]:
        for s in range(0, num, step):
            part = tree_map(lambda t, s=s: t[s:s + step], batch)
            J, _ = vmap(jac, in_dims=(None, 0))(x, part)
            yield J.reshape(-1, x.numel()).to(x.dtype)

    return r, blocks()
