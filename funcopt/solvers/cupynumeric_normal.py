"""The damped normal equations formed in cuPyNumeric (Legate) from row blocks of the Jacobian.

For a Jacobian ``J`` (``m x n``) given as row blocks ``J_k`` (``m_k x n`` torch tensors, on any
device) with residual blocks ``r_k``, each block is handed to cuPyNumeric alone and added to

.. math::

    A = \\sum_k J_k^T J_k \\quad (n \\times n), \\qquad g = \\sum_k J_k^T r_k \\quad (n \\text{ or } n \\times p),

which stay in cuPyNumeric as arrays that Legate partitions over the processors it was given
(``legate --gpus N``), so ``J`` never has to be whole in torch nor in any one memory. The
Levenberg-Marquardt step

.. math::  (A + \\lambda D) \\, \\delta = -g

is then factorised by Cholesky in cuPyNumeric once per damping, for as many dampings as wanted
without forming ``A`` again; only ``delta`` (``n`` numbers) comes back to torch, on the device
and in the dtype of the first Jacobian block. A damped matrix that is not positive definite
(a pivot of its Cholesky factor that is not positive) gives the result code
``not_positive_definite`` and a zero step; one that is not finite gives ``non_finite``.

This is the split of cuPyLMA (Jacobians computed by the model in torch, the normal equations
held and solved by the optimiser in cuPyNumeric). ``fo.least_squares(..., solver=
fo.solvers.CuPyNumeric(row_block=k))`` uses it for every step, with ``J`` formed ``k`` rows at
a time and never whole (:func:`funcopt.func.jacobian_row_blocks`, then
:func:`gram_damped_solver`); :func:`damped_normal_solver` does the same for a ``J`` given
whole.

Example::

    ne = normal_equations(row_blocks(J, r, 4096))      # or any iterable of (J_k, r_k)
    for lam in (1e-3, 1e-1, 10.0):                     # A is formed once
        sol = damped_step(factor_normal(ne, lam))      # sol.x solves (A + lam I) x = -g
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from funcopt.solvers.base import Result, Solution, SolveStats, finite_or_zero, result_code
from funcopt.solvers.cupynumeric import _from_cn, _to_cn, import_cupynumeric
from funcopt.solvers.krylov import _power_of_two

__all__ = ["NormalEquations", "NormalFactor", "row_blocks", "normal_equations",
           "transposed_product", "factor_normal", "damped_step", "damped_normal_solver",
           "gram_damped_solver"]

_NAME = "cupynumeric-normal-cholesky"


class NormalEquations(NamedTuple):
    """``A = sum_k J_k^T J_k`` and ``g = sum_k J_k^T r_k`` as cuPyNumeric arrays (``g`` None
    when the blocks carried no residuals); ``rows`` the rows summed, ``dtype`` and ``device``
    those of the first Jacobian block (the results come back there), ``work`` the dtype of the
    arrays (float32 for half precision)."""

    A: Any
    g: Any
    rows: int
    dtype: torch.dtype
    device: torch.device
    work: torch.dtype


class NormalFactor(NamedTuple):
    """``A + lambda D`` factorised: the cuPyNumeric ``cho_factor`` result (None where it
    failed), the damping and the result code (0-d int64)."""

    normal: NormalEquations
    factors: Any
    damping: float
    result: Tensor


def row_blocks(J: Tensor, r: Tensor | None = None, size: int = 4096
               ) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Consecutive blocks of ``size`` rows of ``J`` and ``r`` (views, no copies). The
    arguments are checked at the call (ValueError), not when the blocks are first read; ``r``
    must have ``J``'s rows."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"row_blocks: size={size!r}; pass a positive int (rows per block)")
    if not isinstance(J, Tensor) or J.ndim != 2:
        raise ValueError(f"row_blocks: J must be a 2-D tensor; got "
                         f"{getattr(J, 'shape', type(J).__name__)!r}")
    if r is not None and (not isinstance(r, Tensor) or r.ndim == 0 or r.shape[0] != J.shape[0]):
        raise ValueError(f"row_blocks: r must have J's {J.shape[0]} rows; got "
                         f"{getattr(r, 'shape', type(r).__name__)!r}")
    return ((J[s:s + size], None if r is None else r[s:s + size])
            for s in range(0, J.shape[0], size))


def _check_block(k: int, J: Any, r: Any, first: tuple | None) -> None:
    """ValueError/TypeError naming block ``k`` when it does not fit the blocks before it."""
    if not isinstance(J, Tensor) or J.ndim != 2 or not J.is_floating_point():
        raise ValueError(f"normal_equations: block {k}: J_k must be a 2-D floating tensor "
                         f"(rows x unknowns); got {getattr(J, 'shape', type(J).__name__)!r}")
    if r is not None and (not isinstance(r, Tensor) or r.ndim not in (1, 2)
                          or r.shape[0] != J.shape[0] or not r.is_floating_point()):
        raise ValueError(f"normal_equations: block {k}: r_k must be a floating tensor of shape "
                         f"({J.shape[0]},) or ({J.shape[0]}, p) for J_k of shape "
                         f"{tuple(J.shape)}; got {getattr(r, 'shape', type(r).__name__)!r}")
    if first is None:
        return
    n, dtype, device, r_shape = first
    if J.shape[1] != n or J.dtype != dtype or J.device != device:
        raise ValueError(f"normal_equations: block {k} is {tuple(J.shape)} {J.dtype} on "
                         f"{J.device}, but block 0 has {n} columns, {dtype} on {device}; every "
                         "block must have the same columns, dtype and device")
    if (r is None) != (r_shape is None) or (r is not None and r.shape[1:] != r_shape):
        raise ValueError(f"normal_equations: block {k}: the residual blocks must all be given "
                         f"(with the same trailing shape {r_shape}) or all be None")


def _accumulate(blocks: Iterable[tuple[Tensor, Tensor | None]], gram: bool):
    """``(A, g, rows, first J block, work dtype)``: one pass over ``blocks``, one block in
    cuPyNumeric at a time."""
    cn = import_cupynumeric()
    A = g = first = like = None
    rows, work = 0, torch.float64
    for k, block in enumerate(blocks):
        if not isinstance(block, tuple) or len(block) not in (2, 3):
            raise TypeError(f"normal_equations: block {k} must be a pair (J_k, r_k) (r_k may "
                            f"be None) or a triple (J_k, r_k, f_k); got {type(block).__name__}")
        J, r = block[:2]
        _check_block(k, J, r, first)
        f = block[2] if len(block) == 3 and first is not None else None
        if f is not None:  # the sums so far in the columns' new scale
            if not isinstance(f, Tensor) or f.shape != (J.shape[1],):
                raise ValueError(f"normal_equations: block {k}: f_k must be a tensor of shape "
                                 f"({J.shape[1]},); got {getattr(f, 'shape', f)!r}")
            fc = _to_cn(cn, f.detach().to(work))
            A = None if A is None else A * cn.outer(fc, fc)
            g = None if g is None else g * (fc if g.ndim == 1 else fc[:, None])
        if first is None:
            first = (J.shape[1], J.dtype, J.device, None if r is None else r.shape[1:])
            like = J
            work = torch.float32 if J.dtype in (torch.float16, torch.bfloat16) else J.dtype
        Jc = _to_cn(cn, J.detach().to(work))
        if gram:
            AtA = Jc.T @ Jc
            A = AtA if A is None else A + AtA
        if r is not None:
            Jr = Jc.T @ _to_cn(cn, r.detach().to(work))
            g = Jr if g is None else g + Jr
        rows += J.shape[0]
    if first is None:
        raise ValueError("normal_equations: no blocks were given; pass at least one (J_k, r_k)")
    return A, g, rows, like, work


def normal_equations(blocks: Iterable[tuple[Tensor, Tensor | None]]) -> NormalEquations:
    """``A = sum_k J_k^T J_k`` and ``g = sum_k J_k^T r_k`` in cuPyNumeric, one block at a time.

    Args:
        blocks: an iterable (a generator is fine: it is read once) of pairs ``(J_k, r_k)``:
            ``J_k`` of shape ``(m_k, n)``, every block with the same ``n``, dtype and device;
            ``r_k`` of shape ``(m_k,)`` or ``(m_k, p)``, or None in every block (then ``g`` is
            None). Half precision is accumulated in float32. An item may be a triple
            ``(J_k, r_k, f_k)``, ``f_k`` of shape ``(n,)``: the sums so far are rescaled
            first, ``A <- diag(f_k) A diag(f_k)``, ``g <- diag(f_k) g``; with blocks
            ``J_k / c_k`` for a growing column scale ``c_k`` and ``f_k = c_{k-1} / c_k``
            (powers of two: exact), ``A = diag(1/c) J^T J diag(1/c)`` for the last ``c``, and
            no entry overflows however large ``J`` is.

    Returns:
        A :class:`NormalEquations`. Non-finite entries are not checked here (that needs a host
        read); :func:`factor_normal` reports them as ``Result.non_finite``.
    """
    A, g, rows, like, work = _accumulate(blocks, gram=True)
    return NormalEquations(A, g, rows, like.dtype, like.device, work)


def transposed_product(blocks: Iterable[tuple[Tensor, Tensor | None]]) -> Any:
    """``sum_k J_k^T u_k`` as a cuPyNumeric array, for a right-hand side other than the ``g``
    of :func:`normal_equations` (``blocks`` as there, every ``u_k`` given)."""
    _, g, _, _, _ = _accumulate(blocks, gram=False)
    if g is None:
        raise ValueError("transposed_product: the blocks carried no right-hand side u_k")
    return g


def factor_normal(normal: NormalEquations, damping: float | Tensor,
                  diag: Tensor | str | None = None) -> NormalFactor:
    """Cholesky factor of ``M = A + damping * diag(d)`` in cuPyNumeric (``A`` is not formed
    again: call this for each damping).

    Args:
        normal: the :class:`NormalEquations`.
        damping: ``lambda >= 0`` (float or 0-d tensor; ValueError when negative or NaN). An
            infinite one gives ``Result.non_finite``.
        diag: ``d``: None (``D = I``, default), a tensor of shape ``(n,)`` with ``d >= 0``, or
            ``"marquardt"`` for ``diag(A)``.

    Returns:
        A :class:`NormalFactor` whose ``result`` is ``success``, ``non_finite`` (``M`` holds
        NaN or inf) or ``not_positive_definite`` (cuPyNumeric's Cholesky failed, or a pivot
        of its factor is not positive); ``factors`` is None unless it is ``success``.
    """
    cn = import_cupynumeric()
    lam = float(damping)  # host read of a tensor damping
    if not lam >= 0:
        raise ValueError(f"factor_normal: damping={lam} must be >= 0 (the lambda of A + lambda D)")
    n = normal.A.shape[0]
    if diag is None:
        d = cn.ones(n, dtype=normal.A.dtype)
    elif isinstance(diag, str):
        if diag != "marquardt":
            raise ValueError(f"factor_normal: diag={diag!r}; pass None, a tensor or 'marquardt'")
        d = cn.diag(normal.A)
    else:
        if not isinstance(diag, Tensor) or diag.shape != (n,) or not bool((diag >= 0).all()):
            raise ValueError(f"factor_normal: diag must be a tensor of shape ({n},) with "
                             f"entries >= 0; got {getattr(diag, 'shape', diag)!r}")
        d = _to_cn(cn, diag.detach().to(normal.work))
    M = normal.A + cn.diag(lam * d)
    finite = bool(cn.isfinite(M).all())
    factors, failed = None, False
    if finite:
        try:
            factors = cn.linalg.cho_factor(M, lower=True)
            pivots = cn.diag(factors[0])
            failed = not bool(((pivots > 0) & cn.isfinite(pivots)).all())
        except np.linalg.LinAlgError:
            failed = True
    result = result_code([(not finite, Result.non_finite),
                          (failed, Result.not_positive_definite)], normal.device)
    return NormalFactor(normal, None if failed else factors, lam, result)


def damped_step(factor: NormalFactor, g: Any = None) -> Solution:
    """``delta = -(A + lambda D)^{-1} g`` from the Cholesky factor.

    Args:
        factor: a :class:`NormalFactor` from :func:`factor_normal`.
        g: None for the ``g`` of the normal equations (ValueError when their blocks had no
            residuals), a torch tensor of shape ``(n,)`` or ``(n, p)``, or a cuPyNumeric
            array (e.g. from :func:`transposed_product`).

    Returns:
        A :class:`funcopt.solvers.Solution` on the first block's device and dtype; where the
        factorisation failed (or the step is not finite) ``value`` is zeros and ``result``
        says why.
    """
    cn = import_cupynumeric()
    normal = factor.normal
    if g is None:
        if normal.g is None:
            raise ValueError("damped_step: the normal equations hold no g (their blocks had no "
                             "residuals); pass g")
        g = normal.g
    elif isinstance(g, Tensor):
        g = _to_cn(cn, g.detach().to(normal.work))
    n = normal.A.shape[0]
    if g.shape[0] != n:
        raise ValueError(f"damped_step: g has {g.shape[0]} rows for {n} unknowns")
    like = torch.empty(0, dtype=normal.dtype, device=normal.device)
    if factor.factors is None:
        x = torch.zeros(tuple(g.shape), dtype=normal.dtype, device=normal.device)
        return Solution(x, factor.result, SolveStats(), _NAME)
    x = _from_cn(-cn.linalg.cho_solve(factor.factors, g), like)
    x, result = finite_or_zero(x, factor.result)
    return Solution(x, result, SolveStats(), _NAME)


def damped_normal_solver(J: Tensor, scale: Tensor | None, row_block: int, form: str = "auto"):
    """``(factor, solve)`` for one dense ``J`` with ``J^T J`` formed in cuPyNumeric from row
    blocks of ``row_block`` rows: the Levenberg-Marquardt path's contract
    (:func:`funcopt.transforms.lm_model._damped_solver`), used when the solver is
    ``CuPyNumeric(row_block=k)``.

    In the scaled variables ``z = S delta`` (``S = diag(scale)``, None for ``S = I``) and with
    ``gamma`` the power of two nearest below ``max |J S^{-1}|`` (exact scalings, so the Gram
    matrix neither overflows nor underflows), ``factor(lambda)`` factorises
    ``Jh^T Jh + (lambda / gamma^2) I`` with ``Jh = J S^{-1} / gamma`` once, and
    ``solve(state, u) = (delta, success)`` with ``delta = -S^{-1} (Jh^T Jh + ...)^{-1}
    Jh^T (u / gamma)``, ``Jh^T u`` also summed block by block in cuPyNumeric. Always the primal
    (``n x n``) form: ``form="dual"`` raises ValueError.
    """
    if form == "dual":
        raise ValueError("CuPyNumeric(row_block=...) forms the primal n x n normal equations "
                         "J^T J; use form='auto' or 'primal', or a solver without row_block")
    Js = J if scale is None else J / scale
    gamma = _power_of_two(Js.abs().amax()) if Js.numel() else Js.new_ones(())
    Jh = Js / gamma
    normal = normal_equations(row_blocks(Jh, None, row_block))
    inv_g2 = float(1.0 / (gamma * gamma))

    def factor(lam: Tensor | float) -> NormalFactor:
        return factor_normal(normal, float(lam) * inv_g2)

    def solve(state: NormalFactor, u: Tensor) -> tuple[Tensor, Tensor]:
        sol = damped_step(state, transposed_product(row_blocks(Jh, u / gamma, row_block)))
        x = sol.value.to(J.dtype)
        return (x if scale is None else x / scale), sol.success

    return factor, solve


def gram_damped_solver(normal: NormalEquations, t: Tensor, gamma: Tensor,
                       scale: Tensor | None, rhs):
    """``(factor, solve)`` of :func:`damped_normal_solver` from a Gram matrix formed already:
    ``normal.A = diag(1/c) J^T J diag(1/c)`` (:func:`normal_equations` with ``f_k``) and
    ``t = c / (S gamma)`` (``c / gamma`` for ``S = I``), so ``diag(t) A diag(t) = Jh^T Jh``
    with ``Jh = J S^{-1} / gamma``. ``rhs(u)`` gives ``Jh^T (u / gamma)`` (an ``(n,)``
    tensor, from products with ``J``, not from ``J``). ``factor(lambda)`` factorises
    ``Jh^T Jh + (lambda / gamma^2) I``; ``solve(state, u) = (delta, success)``, ``delta =
    -S^{-1} (Jh^T Jh + ...)^{-1} rhs(u)``."""
    cn = import_cupynumeric()
    tc = _to_cn(cn, t.detach().to(normal.work))
    scaled = normal._replace(A=normal.A * cn.outer(tc, tc))
    inv_g2 = float(1.0 / (gamma * gamma))

    def factor(lam: Tensor | float) -> NormalFactor:
        return factor_normal(scaled, float(lam) * inv_g2)

    def solve(state: NormalFactor, u: Tensor) -> tuple[Tensor, Tensor]:
        sol = damped_step(state, rhs(u))
        x = sol.value.to(normal.dtype)
        return (x if scale is None else x / scale), sol.success

    return factor, solve
