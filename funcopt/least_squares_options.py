"""Options of the least-squares drivers (:func:`funcopt.least_squares`, its batched and
data-parallel forms): the stopping :class:`Tolerances`, and the check that turns a keyword
which moved into an option object into a TypeError naming that object."""

from __future__ import annotations

from dataclasses import dataclass

from funcopt.base import check_hyperparameter

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
