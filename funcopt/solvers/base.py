"""The solver protocol and the :class:`Solution` value (the operators are in
:mod:`funcopt.solvers.operators`, re-exported here).

Solvers take an operator and a right-hand side ``b`` of shape ``(n,)`` or
``(n, k)`` and return a :class:`Solution`; failure is a value (``success`` False), never a
silent NaN.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from funcopt.solvers.operators import *  # noqa: F401,F403  (re-exported: fo.solvers.dense ...)
from funcopt.solvers.operators import (
    BlockDiagonalOperator,
    LinearOperator,
    _require_finite,
    check_rhs,
    scaled_norm,
)
from funcopt.solvers.operators import __all__ as _operators_all

__all__ = ["Result", "SolveStats", "Solution", "LinearSolver", *_operators_all]


class Result(enum.IntEnum):
    """Why a solve ended: the code held (as a 0-d int64 tensor) in :attr:`Solution.result`.

    - ``success``: ``value`` solves the system (to the solver's tolerance).
    - ``not_positive_definite``: a Cholesky pivot was not positive, or CG met ``p^T A p < 0``.
    - ``singular``: the pivots of a triangular factor span more than ``1 / rcond`` (numerically
      singular) or a pivot is exactly zero.
    - ``max_steps``: an iterative solver did not converge within its step limit.
    - ``non_finite``: the (materialised) matrix, the right-hand side or the result holds NaN or
      inf.
    - ``breakdown``: CG met ``p^T A p = 0`` (or NaN): a direction in the null space of ``A``.
    - ``not_symmetric``: a solver that reads one triangle of ``A`` (Cholesky, eigh, CG) got an
      operator not tagged symmetric whose matrix is not symmetric to ``sqrt(eps) max |A|``.
    - ``stagnation``: CG's recursive residual met the tolerance but the true residual
      ``b - A x`` did not after restarts (the tolerance is below what the dtype resolves).
    """

    success = 0
    not_positive_definite = 1
    singular = 2
    max_steps = 3
    non_finite = 4
    breakdown = 5
    not_symmetric = 6
    stagnation = 7


class SolveStats(NamedTuple):
    """What a solver measured: ``iterations`` (0-d int64, iterative solvers) and
    ``residual_norm`` (relative ``||b - A x|| / ||b||``, largest over columns), None where the
    solver does not compute them."""

    iterations: Tensor | None = None
    residual_norm: Tensor | None = None


class Solution(NamedTuple):
    """The result of a solve.

    - ``value``: the solution, shaped like ``b`` (``(n,)`` or ``(n, k)``), in ``b``'s dtype and
      device; zeros where the solver failed, so no NaN leaks.
    - ``result``: 0-d int64 tensor, a :class:`Result` code (``Result(int(sol.result))`` names
      it; one host sync).
    - ``stats``: :class:`SolveStats`.
    - ``solver``: the name of the solver that produced ``value`` (after any fallback).

    ``success`` (0-d bool tensor, ``result == Result.success``), ``x`` (``value``),
    ``iterations`` and ``residual_norm`` (from ``stats``) are derived from these.
    """

    value: Tensor
    result: Tensor
    stats: SolveStats
    solver: str

    @property
    def x(self) -> Tensor:
        """The solution (``value``)."""
        return self.value

    @property
    def success(self) -> Tensor:
        """0-d bool tensor: ``result == Result.success``."""
        return self.result == 0  # Result.success (a plain int: torch.compile traces it)

    @property
    def iterations(self) -> Tensor | None:
        return self.stats.iterations

    @property
    def residual_norm(self) -> Tensor | None:
        return self.stats.residual_norm

    def reason(self) -> Result:
        """The :class:`Result` member of ``result`` (one host sync)."""
        return Result(int(self.result))


def result_code(checks: Sequence[tuple[Tensor | bool, Result]], device: torch.device) -> Tensor:
    """The code of the first ``(failed, code)`` pair whose ``failed`` holds (priority order),
    else ``Result.success``; a 0-d int64 tensor, computed without host reads."""
    out = torch.zeros((), dtype=torch.int64, device=device)
    for failed, code in reversed(checks):
        if not isinstance(failed, Tensor):
            failed = torch.tensor(bool(failed), device=device)
        out = torch.where(failed, torch.full_like(out, int(code)), out)
    return out


def first_failure(*codes: Tensor) -> Tensor:
    """The first code that is not ``Result.success`` (success when all are)."""
    out = codes[-1]
    for code in reversed(codes[:-1]):
        out = torch.where(code != 0, code, out)
    return out


# --------------------------------------------------------------------------- protocol


class BlockState(NamedTuple):
    """A solver's state for a :class:`BlockDiagonalOperator`: one state per block."""

    operator: BlockDiagonalOperator
    blocks: tuple
    result: Tensor


class LinearSolver:
    """The solver protocol, as lineax: ``init(operator) -> state`` plans and factorises once;
    ``compute(state, b) -> Solution`` solves for one right-hand side (of shape ``(n,)`` or
    ``(n, k)``) and may be called for many. Failure is a value (:class:`Result` code in the
    Solution, ``value`` zeros); ``init`` and ``compute`` raise only for misuse (a wrong type,
    shape, dtype or device) and make no host reads unless a solver documents one.

    ``solve(operator, b)`` is ``init`` then ``compute`` after checking the input: it raises
    ValueError for non-finite ``b`` or operator data (one host sync) and, for a solver that
    reads one triangle of ``A``, for an operator not tagged symmetric whose matrix is not
    symmetric. Block-diagonal operators are split into their blocks by ``init``.

    Subclasses implement ``_init(operator) -> state`` (a NamedTuple with ``operator`` and
    ``result`` fields) and ``_compute(state, b) -> Solution``.
    """

    name = "solver"

    def init(self, operator: LinearOperator) -> Any:
        """Plan and factorise ``operator`` once; the state holds the factors and the
        factorisation's :class:`Result` code (``state.result``)."""
        if not isinstance(operator, LinearOperator):
            raise TypeError(f"{self.name}: operator must be a LinearOperator (make one with "
                            f"solvers.dense, solvers.gram, ...); got {type(operator).__name__}")
        if isinstance(operator, BlockDiagonalOperator):
            states = tuple(self.init(op) for op in operator.blocks)
            return BlockState(operator, states, first_failure(*[st.result for st in states]))
        return self._init(operator)

    def compute(self, state: Any, b: Tensor) -> Solution:
        """Solve ``A x = b`` with the factorisation in ``state`` (from :meth:`init`)."""
        check_rhs(state.operator, b)
        if isinstance(state, BlockState):
            return self._compute_blocks(state, b)
        return self._compute(state, b)

    def solve(self, operator: LinearOperator, b: Tensor) -> Solution:
        """``compute(init(operator), b)`` after checking the input (see the class doc)."""
        check_rhs(operator, b)
        _require_finite(b, "the right-hand side b")
        operator.check_finite()
        state = self.init(operator)
        refuse_unsymmetric(self, state)
        return self.compute(state, b)

    def solve_unchecked(self, operator: LinearOperator, b: Tensor) -> Solution:
        """``compute(init(operator), b)`` with no input checks."""
        return self.compute(self.init(operator), b)

    def needs_symmetric(self, operator: LinearOperator) -> bool:
        """Whether this solver reads only one triangle of ``operator`` (then an untagged
        operator's symmetry is checked in :meth:`init`)."""
        return False

    def _compute_blocks(self, state: BlockState, b: Tensor) -> Solution:
        op = state.operator
        sols = [self.compute(st, part) for st, part in zip(state.blocks, op.split(b))]
        result = first_failure(*[s.result for s in sols])
        names = sorted({s.solver for s in sols})
        its = [s.iterations for s in sols if s.iterations is not None]
        stats = SolveStats(torch.stack(its).max() if its else None, None)
        x, result = finite_or_zero(torch.cat([s.value for s in sols], dim=0), result)
        return Solution(x, result, stats, "+".join(names))

    def _init(self, operator: LinearOperator) -> Any:
        raise NotImplementedError

    def _compute(self, state: Any, b: Tensor) -> Solution:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def refuse_unsymmetric(solver: LinearSolver, state: Any) -> None:
    """Raise ValueError when ``state`` (of ``solver``) reports ``not_symmetric`` for an operator
    not tagged symmetric (one host sync, only for such operators and solvers that need
    symmetry); the message gives ``max |A - A^T|``, ``max |A|`` and the fix."""
    if isinstance(state, BlockState):
        for st in state.blocks:
            refuse_unsymmetric(solver, st)
        return
    op = state.operator
    if op.symmetric or not solver.needs_symmetric(op):
        return
    if int(state.result) != Result.not_symmetric:
        return
    A = op.as_matrix()
    asym, size = (A - A.mH).abs().max(), A.abs().max()
    name = getattr(state, "name", solver.name)
    raise ValueError(
        f"solver {name!r} needs a symmetric matrix (it reads one triangle of A), but the "
        f"operator is not tagged symmetric and max|A - A^T| = {float(asym):.3g} with "
        f"max|A| = {float(size):.3g}. Use solver='lu' (or 'auto') for a general square "
        "matrix, or tag a symmetric one: solvers.dense(A, symmetric=True) or "
        "positive_definite=True")


def symmetric_within_tolerance(operator: LinearOperator, A: Tensor) -> Tensor:
    """0-d bool: ``operator`` is tagged symmetric, or ``max |A - A^T| <= sqrt(eps) max |A|``
    for its matrix ``A`` (no host read)."""
    if operator.symmetric:
        return torch.ones((), dtype=torch.bool, device=A.device)
    asym, size = (A - A.mH).abs().max(), A.abs().max()
    return asym <= torch.finfo(A.dtype).eps ** 0.5 * size


def finite_or_zero(x: Tensor, result: Tensor) -> tuple[Tensor, Tensor]:
    """Mark a non-finite ``x`` of a successful solve as ``Result.non_finite`` and replace a
    failed ``x`` by zeros (no NaN leaks). Returns ``(x, result)``."""
    bad = (result == 0) & ~torch.isfinite(x).all()
    result = torch.where(bad, torch.full_like(result, int(Result.non_finite)), result)
    return torch.where(result == 0, x, torch.zeros_like(x)), result


def finished(x: Tensor, result: Tensor, name: str, stats: SolveStats | None = None) -> Solution:
    """The :class:`Solution` of a solve by ``name`` that ended with ``x`` and ``result``, passed
    through :func:`finite_or_zero`; ``stats`` defaults to an empty :class:`SolveStats`."""
    x, result = finite_or_zero(x, result)
    return Solution(x, result, SolveStats() if stats is None else stats, name)


def relative_residual(operator: LinearOperator, x: Tensor, b: Tensor) -> Tensor:
    """``max_j ||b_j - A x_j|| / ||b_j||`` (columns j of a batched ``b``), with norms that
    neither overflow nor underflow (:func:`scaled_norm`); inf where ``b_j = 0`` but
    ``A x_j != 0``, NaN or inf when ``A x`` is not finite."""
    r = scaled_norm(b - operator.matvec(x), dim=0)
    nb = scaled_norm(b, dim=0)
    zero_b = torch.where(r > 0, torch.full_like(r, float("inf")), torch.zeros_like(r))
    return torch.where(nb > 0, r / torch.where(nb > 0, nb, torch.ones_like(nb)), zero_b).max()

