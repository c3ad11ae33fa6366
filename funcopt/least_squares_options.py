"""Options of the least-squares drivers (:func:`funcopt.least_squares`, its batched and
data-parallel forms): the stopping :class:`Tolerances`, and the check that turns a keyword
which moved into an option object into a TypeError naming that object."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from funcopt.base import check_hyperparameter
from funcopt.transforms.lm_damping import DampingRule, Nielsen, TrustRegion

__all__ = ["Tolerances", "check_driver_options"]


@dataclass(frozen=True)
class Tolerances:
    """MINPACK's stopping tolerances of :func:`least_squares` (and its batched and
    data-parallel drivers); each a number >= 0.

    ftol: ``|actual| <= ftol`` and ``predicted <= ftol`` (relative reductions of the cost,
    with ``rho <= 2``). xtol: ``||d * delta|| <= xtol * ||d * x||``. gtol: ``max_j |J_j^T r| /
    (||J_j|| ||r||) <= gtol``. Defaults 1e-14, 1e-12, 1e-14: reference-quality fits in float64
    (MINPACK's default is 1.5e-8 for each); 0 leaves only the machine-precision tests.

    Reference: Moré, Garbow & Hillstrom (1980), User Guide for MINPACK-1, ANL-80-74.
    """

    ftol: float = 1e-14
    xtol: float = 1e-12
    gtol: float = 1e-14

    def __post_init__(self) -> None:
        for name in ("ftol", "xtol", "gtol"):
            check_hyperparameter(f"Tolerances.{name}", getattr(self, name), low=0.0)


_MOVED = {
    "damping_rule": "rule=fo.Nielsen(), fo.Classic(...) or fo.TrustRegion(...)",
    "initial_damping": "rule=fo.Nielsen(initial_damping=...) (or fo.Classic(...))",
    "increase_factor": "rule=fo.Classic(increase_factor=...)",
    "decrease_factor": "rule=fo.Classic(decrease_factor=...)",
    "min_damping": "rule=fo.Nielsen(min_damping=...) (or fo.Classic(...))",
    "max_damping": "rule=fo.Nielsen(max_damping=...) (or fo.Classic(...))",
    "trust_radius_factor": "rule=fo.TrustRegion(radius_factor=...)",
    "geodesic_acceleration": "geodesic=fo.Geodesic() (None: off)",
    "geodesic_alpha": "geodesic=fo.Geodesic(alpha=...)",
    "geodesic_fd_step": "geodesic=fo.Geodesic(fd_step=...)",
    "ftol": "tolerances=fo.Tolerances(ftol=...)",
    "xtol": "tolerances=fo.Tolerances(xtol=...)",
    "gtol": "tolerances=fo.Tolerances(gtol=...)",
}
_PASSED_ON = ("scaling", "max_attempts", "accept_ratio", "form", "jacobian_mode", "chunk_size")


def check_driver_options(options: dict, tolerances: object, who: str) -> None:
    """TypeError for a keyword a driver does not take (naming the object that holds it now)
    or ``tolerances`` that are not a :class:`Tolerances`."""
    for name in options:
        if name in _MOVED:
            raise TypeError(f"{who}: {name}= is an option object's field now; pass "
                            f"{_MOVED[name]}")
        if name not in _PASSED_ON:
            raise TypeError(f"{who}: unknown option {name!r}; the keyword options are "
                            f"{list(_PASSED_ON)} (see fo.levenberg_marquardt)")
    if not isinstance(tolerances, Tolerances):
        raise TypeError(f"tolerances={tolerances!r}: pass fo.Tolerances(ftol=..., xtol=..., "
                        "gtol=...)")


def _matrix_free_options(m: int, n: int, dtype: torch.dtype, budget: int,
                         rule: DampingRule, options: dict) -> tuple[Any, DampingRule, dict]:
    """``(solver, rule, options)`` of the matrix-free path: CG with the Jacobi
    preconditioner ``1 / (diag(J^T J) + lambda D)``, MINPACK's scaling ``D`` from the same
    ``diag(J^T J)`` (unless ``scaling=False``), and ``Nielsen()`` in place of the
    trust region (which needs an SVD of J). CG's relative tolerance is ``max(1e-10, 100 eps)``
    (``eps`` of ``dtype``): 1e-10 in float64, 1.2e-5 in float32, where CG's true residual
    stalls near ``eps`` times the condition number and a tolerance of 1e-10 fails every
    solve. ``diag(J^T J)`` is exact, from ``min(m, n)`` products
    (:func:`funcopt.transforms.lm_model.column_norms_sq`) in chunks of ``k`` products, whose
    one-hot vectors and results take ``k (m + n)`` numbers: ``k`` is the largest number with
    ``(4 + k) (m + n)`` numbers within the budget, at most ``JACOBI_CHUNK`` (32), at least 1
    (the chunk's products also hold ``k`` times the intermediate values of one product,
    which the memory model does not count)."""
    from funcopt.solvers import CG
    from funcopt.transforms.lm_model import JACOBI_CHUNK

    itemsize = torch.finfo(dtype).bits // 8
    chunk = max(1, min(JACOBI_CHUNK, budget // ((m + n) * itemsize) - 4))
    rule = Nielsen() if isinstance(rule, TrustRegion) else rule
    tol = max(1e-10, 100 * torch.finfo(dtype).eps)
    return (CG(tol=tol, preconditioner="jacobi"), rule,
            {**options, "scaling": options.get("scaling") is not False,
             "chunk_size": options.get("chunk_size", chunk)})
