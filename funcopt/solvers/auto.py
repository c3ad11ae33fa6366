"""Choosing a solver: ``get``, the ``Auto`` solver, the ``Fallback`` combinator and ``solve``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from funcopt.solvers.base import (
    DenseOperator,
    LinearOperator,
    LinearSolver,
    MatrixFreeOperator,
    Solution,
    SolveStats,
)
from funcopt.solvers.dense import LU, QR, SVD, Cholesky, Lstsq
from funcopt.solvers.krylov import CG

__all__ = ["Auto", "Fallback", "get", "solve", "SOLVER_NAMES"]

SOLVER_NAMES = ("auto", "cholesky", "lu", "qr", "lstsq", "svd", "eigh", "cg", "pcg", "cupynumeric")
"""The names :func:`get` accepts for a solver (``solver="cholesky"`` ...)."""


def _robust(op: LinearOperator) -> LinearSolver:
    """The fallback that always returns a finite minimum-norm least-squares answer."""
    return Lstsq() if op.device.type == "cpu" else SVD(hermitian=op.symmetric)


class FallbackState(NamedTuple):
    """:class:`Fallback`'s state: the operator, the first solver's state, the second's (made
    in ``init`` when the first factorisation failed, or always when ``eager`` is False; else
    None) and the first factorisation's result code."""

    operator: LinearOperator
    first: Any
    then: Any
    result: Tensor


@dataclass(frozen=True)
class Fallback(LinearSolver):
    """Solve with ``first``; where it reports failure, with ``then``.

    ``eager=True`` (default): ``init`` factorises with ``first`` and reads its result code
    (one host sync); when it failed, ``then`` factorises too and every ``compute`` uses it.
    Otherwise ``compute`` solves with ``first`` and reads its result (one host sync); a failed
    solve is redone with ``then`` (``init`` + ``compute``). ``eager=False``: both factorise in
    ``init`` and both solve in ``compute``; ``torch.where`` picks, with no host read (for
    ``torch.func`` transforms and ``torch.compile``); the solver name is then
    ``"first|then"``.

    Args:
        first: the solver tried first (e.g. :class:`Cholesky`).
        then: the solver used where ``first`` fails (e.g. ``SVD(hermitian=True)``).
        eager: decide on the host (True) or pick with ``torch.where`` (False).
    """

    first: LinearSolver
    then: LinearSolver
    eager: bool = True
    name = "fallback"

    def needs_symmetric(self, operator: LinearOperator) -> bool:
        return self.first.needs_symmetric(operator)

    def _init(self, op: LinearOperator) -> FallbackState:
        first = self.first.init(op)
        if not self.eager or bool(first.result):  # host sync when eager
            return FallbackState(op, first, self.then.init(op), first.result)
        return FallbackState(op, first, None, first.result)

    def _compute(self, state: FallbackState, b: Tensor) -> Solution:
        if not self.eager:
            a, c = self.first.compute(state.first, b), self.then.compute(state.then, b)
            ok = a.success
            its = a.iterations if a.iterations is not None else c.iterations
            return Solution(torch.where(ok, a.value, c.value), torch.where(ok, a.result, c.result),
                            SolveStats(its, None), f"{a.solver}|{c.solver}")
        if state.then is not None:
            return self.then.compute(state.then, b)
        sol = self.first.compute(state.first, b)
        if bool(sol.success):  # host sync
            return sol
        return self.then.solve_unchecked(state.operator, b)

    def __repr__(self) -> str:
        return f"Fallback({self.first!r}, {self.then!r}, eager={self.eager})"


class AutoState(NamedTuple):
    """:class:`Auto`'s state: the operator, the solver it planned (wrapped in the fallback)
    and that solver's state."""

    operator: LinearOperator
    solver: LinearSolver
    state: Any
    result: Tensor


@dataclass(frozen=True)
class Auto(LinearSolver):
    """Picks a solver from the operator's shape, tags, size and device, and falls back to a
    robust one when the first reports failure (:class:`Fallback`).

    Rules, in order:

    * matrix-free and positive definite: CG (Jacobi-free; pass ``solver="pcg"`` for Jacobi);
      other matrix-free operators are materialised when ``n <= dense_max``;
    * cuPyNumeric when asked for (``use_cupynumeric=True``) for square systems with
      ``n >= cupynumeric_min_size``; never otherwise (whatever the program has imported);
    * positive definite: Cholesky; other square: LU; rectangular: lstsq on the CPU, QR on GPUs;
    * on failure (not positive definite, numerically singular, CG not converged on a small
      system): lstsq (``gelsd``) on the CPU, eigh/SVD pseudo-inverse on GPUs, giving a finite
      minimum-norm least-squares answer.

    Host reads: ``init`` reads the first factorisation's result, ``compute`` the first
    solve's (see :class:`Fallback`).

    Args:
        use_cupynumeric: send square systems to :class:`~funcopt.solvers.cupynumeric.CuPyNumeric`
            (default False; True needs ``pip install funcopt[cupynumeric]``).
        cupynumeric_min_size: with ``use_cupynumeric``, the smallest n sent to cuPyNumeric
            (default 0: every square system).
        dense_max: largest matrix-free operator that is materialised for a direct solve (4096).
    """

    use_cupynumeric: bool = False
    cupynumeric_min_size: int = 0
    dense_max: int = 4096
    name = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.use_cupynumeric, bool):
            raise TypeError(f"Auto: use_cupynumeric must be True or False; got "
                            f"{self.use_cupynumeric!r}")

    def plan(self, op: LinearOperator) -> LinearSolver:
        """The first solver tried for ``op``."""
        n = op.shape[0]
        if isinstance(op, MatrixFreeOperator):
            if op.positive_definite:
                return CG()
            if n > self.dense_max:
                raise ValueError(
                    f"auto: no matrix-free solver for an operator of size {n} that is not tagged "
                    "positive definite; tag it (CG needs symmetric positive definite), pass a "
                    "dense operator, or choose a solver by name")
        if op.square and self.use_cupynumeric and n >= self.cupynumeric_min_size:
            from funcopt.solvers.cupynumeric import CuPyNumeric

            return CuPyNumeric()
        if op.positive_definite:
            return Cholesky()
        if op.square:
            return LU()
        return Lstsq() if op.device.type == "cpu" else QR()

    def _init(self, op: LinearOperator) -> AutoState:
        first = self.plan(op)
        if isinstance(first, CG) and op.shape[0] > self.dense_max:
            solver: LinearSolver = first  # too large to materialise for the fallback
        else:
            solver = Fallback(first, _robust(op))
        state = solver.init(op)
        return AutoState(op, solver, state, state.result)

    def _compute(self, state: AutoState, b: Tensor) -> Solution:
        return state.solver.compute(state.state, b)


def get(name_or_solver: str | LinearSolver) -> LinearSolver:
    """A solver from its name, or the solver itself.

    Names: "auto" (:class:`Auto`), "cholesky", "lu", "qr", "lstsq", "svd" (pseudo-inverse;
    eigh for symmetric operators), "eigh", "cg", "pcg" (CG with a Jacobi preconditioner),
    "cupynumeric" (needs ``pip install funcopt[cupynumeric]``).
    """
    if isinstance(name_or_solver, LinearSolver):
        return name_or_solver
    table: dict[str, Callable[[], LinearSolver]] = {
        "auto": Auto, "cholesky": Cholesky, "lu": LU, "qr": QR, "lstsq": Lstsq, "svd": SVD,
        "eigh": lambda: SVD(hermitian=True), "cg": CG, "pcg": lambda: CG(preconditioner="jacobi")}
    if name_or_solver == "cupynumeric":
        from funcopt.solvers.cupynumeric import CuPyNumeric

        return CuPyNumeric()
    if name_or_solver not in table:
        raise ValueError(f"unknown solver {name_or_solver!r}; choose one of {', '.join(SOLVER_NAMES)} "
                         "or pass a LinearSolver object")
    return table[name_or_solver]()


def solve(operator: LinearOperator | Tensor, b: Tensor, solver: str | LinearSolver = "auto") -> Solution:
    """Solve ``A x = b`` for ``b`` of shape ``(n,)`` or ``(n, k)``: ``get(solver).solve``, i.e.
    ``init`` (factorise) then ``compute``. To reuse a factorisation for several right-hand
    sides, call ``state = get(solver).init(operator)`` once and ``compute(state, b)`` per ``b``.

    Args:
        operator: a LinearOperator (``dense``, ``gram``, ``matrix_free``, ``block_diagonal``) or
            a dense 2-D tensor (no structure tags).
        b: the right-hand side(s), same dtype and device as the operator.
        solver: a name (see :func:`get`) or a LinearSolver; default "auto".

    Raises:
        ValueError: non-finite operator or ``b``, mismatched shapes, dtypes or devices, an
            untagged unsymmetric matrix for a solver that reads one triangle.
    """
    if isinstance(operator, Tensor):
        operator = DenseOperator(operator)
    return get(solver).solve(operator, b)
