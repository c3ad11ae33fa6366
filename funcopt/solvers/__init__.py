"""The linear-solver layer: operators, solvers and the damped least-squares step.

Second-order methods (Gauss-Newton, Levenberg-Marquardt, natural gradient) reduce to a damped
linear solve. Build an operator (``dense``, ``gram``, ``gram_dual``, ``matrix_free``,
``gauss_newton``, ``block_diagonal``), then ``solve(operator, b, solver="auto")`` or
``get(name).solve(operator, b)``; ``damped_least_squares(J, r, damping)`` does the whole
Levenberg-Marquardt step in the primal or dual form. Every solver is a small frozen
object with ``init(operator) -> state`` (factorise once) and ``compute(state, b) -> Solution``
(one right-hand side); a :class:`Solution` carries a :class:`Result` code (``success`` is
derived from it), so failure is a value, never a silent NaN. ``solve`` is ``init`` then
``compute`` with input checks. cuPyNumeric is used only when asked for (``solver="cupynumeric"``
or ``Auto(use_cupynumeric=True)``); :func:`normal_equations` and :func:`factor_normal` form and
solve the damped normal equations in cuPyNumeric from row blocks of a Jacobian
(:mod:`funcopt.solvers.cupynumeric_normal`).

Example::

    import torch, funcopt as fo
    J, r = torch.randn(200, 50, dtype=torch.float64), torch.randn(200, dtype=torch.float64)
    step = fo.solvers.damped_least_squares(J, r, damping=1e-3, diag="marquardt")
    assert bool(step.success)
"""

from funcopt.solvers.auto import *  # noqa: F401,F403
from funcopt.solvers.auto import __all__ as _auto_all
from funcopt.solvers.base import *  # noqa: F401,F403
from funcopt.solvers.base import __all__ as _base_all
from funcopt.solvers.damped import *  # noqa: F401,F403
from funcopt.solvers.damped import __all__ as _damped_all
from funcopt.solvers.dense import *  # noqa: F401,F403
from funcopt.solvers.dense import __all__ as _dense_all
from funcopt.solvers.krylov import *  # noqa: F401,F403
from funcopt.solvers.krylov import __all__ as _krylov_all

_NORMAL = ("NormalEquations", "NormalFactor", "row_blocks", "normal_equations",
           "transposed_product", "factor_normal", "damped_step")

__all__ = [*_base_all, *_dense_all, *_krylov_all, *_auto_all, *_damped_all, "CuPyNumeric",  # noqa: F405
           *_NORMAL]


def __getattr__(name: str):
    if name == "CuPyNumeric":  # imported on first use: cupynumeric starts the Legate runtime
        from funcopt.solvers.cupynumeric import CuPyNumeric

        return CuPyNumeric
    if name in _NORMAL:  # the cuPyNumeric normal equations, also on first use
        from funcopt.solvers import cupynumeric_normal

        return getattr(cupynumeric_normal, name)
    raise AttributeError(f"module 'funcopt.solvers' has no attribute {name!r}")
