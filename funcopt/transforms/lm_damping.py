"""Levenberg-Marquardt options as small frozen objects: the damping rules and geodesic
acceleration of :func:`funcopt.levenberg_marquardt` and :func:`funcopt.least_squares`.

A damping rule owns the damping ``lambda`` of ``(J^T J + lambda D) delta = -J^T r``: its start
value and how it changes after an accepted or rejected step, from the gain ratio ``rho``
(actual over predicted decrease of ``F = 0.5 ||r||^2``):

* :class:`Nielsen` (Nielsen 1999), the transform's default;
* :class:`Classic` (Marquardt 1963): multiply or divide by fixed factors;
* :class:`TrustRegion` (Moré 1978, MINPACK ``lmder``), the default of
  :func:`funcopt.least_squares`: a radius on the step, ``lambda`` the damping whose step has
  that length.

:class:`Geodesic` (Transtrum & Sethna 2012) adds a second-order correction to each step.
Every rule's update is written with ``torch.where`` on tensors, so the eager transform, the
sync-free traced path and the batched drivers share it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Union

import numpy as np
import optree
import torch

from funcopt.base import check_hyperparameter
from funcopt.solvers.operators import scaled_norm

__all__ = ["Nielsen", "Classic", "TrustRegion", "Geodesic", "DampingRule"]

Tensor = torch.Tensor


def _check_bounds(owner: str, min_damping: float, max_damping: float) -> None:
    check_hyperparameter(f"{owner}.min_damping", min_damping, low=0.0)
    check_hyperparameter(f"{owner}.max_damping", max_damping, low=min_damping, low_inclusive=False)


@dataclass(frozen=True)
class Nielsen:
    r"""Nielsen's damping rule (the default of :func:`funcopt.levenberg_marquardt`).

    .. math::
        \text{accept: } \lambda \leftarrow \lambda \max\!\big(\tfrac13, 1 - (2\rho - 1)^3\big),
        \ \nu \leftarrow 2; \qquad
        \text{reject: } \lambda \leftarrow \lambda \nu,\ \nu \leftarrow 2 \nu,

    then ``lambda`` is clipped to ``[min_damping, max_damping]``; ``nu`` starts at 2.

    Args:
        initial_damping: ``lambda_0`` (default 1e-3), relative to ``D`` with Marquardt's
            scaling; without scaling ``lambda_0 = tau * max diag(J^T J)`` with
            ``tau = initial_damping``. Must be > 0.
        min_damping, max_damping: bounds on ``lambda`` (1e-15, 1e16). All attempts of an
            update rejected with ``lambda`` at ``max_damping`` ends :func:`funcopt.least_squares`
            as a failure.

    Reference: Nielsen (1999), "Damping parameter in Marquardt's method", IMM-REP-1999-05.
    """

    initial_damping: float = 1e-3
    min_damping: float = 1e-15
    max_damping: float = 1e16

    def __post_init__(self) -> None:
        check_hyperparameter("Nielsen.initial_damping", self.initial_damping, low=0.0,
                             low_inclusive=False)
        _check_bounds("Nielsen", self.min_damping, self.max_damping)

    def adapt(self, lam: Tensor, nu: Tensor, rho: Tensor, accepted: Tensor) -> tuple[Tensor, Tensor]:
        """Next ``(lambda, nu)`` from the gain ratio ``rho`` and whether the step was accepted
        (tensors of one shape: one problem or a batch)."""
        shrink = torch.clamp(1.0 - (2.0 * rho - 1.0) ** 3, min=1.0 / 3.0)
        lam = torch.where(accepted, lam * shrink, lam * nu)
        nu = torch.where(accepted, torch.full_like(nu, 2.0), nu * 2.0)
        return torch.clamp(lam, self.min_damping, self.max_damping), nu

    def adapt_host(self, lam: Any, nu: Any, rho: Any, accepted: bool) -> tuple[Any, Any]:
        """:meth:`adapt` on host numbers (numpy scalars of :func:`host_type`: the same
        roundings)."""
        T = type(lam)
        if accepted:
            b = T(2.0) * rho - T(1.0)
            lam, nu = lam * max(T(1.0) - b * b * b, T(1.0 / 3.0)), T(2.0)
        else:
            lam, nu = lam * nu, nu * T(2.0)
        return min(max(lam, T(self.min_damping)), T(self.max_damping)), nu

    def exhausted(self, lam: Tensor, radius: Tensor) -> Tensor:
        """Whether further attempts are pointless: ``lambda`` reached ``max_damping``."""
        return lam >= self.max_damping

    @property
    def accepted_decrease(self) -> float:
        """The most an accepted step divides ``lambda`` by (the ``1/3`` floor of the shrink)."""
        return 3.0


@dataclass(frozen=True)
class Classic:
    r"""Marquardt's classic rule: fixed factors.

    .. math::
        \text{accept: } \lambda \leftarrow \lambda / \text{decrease\_factor}; \qquad
        \text{reject: } \lambda \leftarrow \lambda \cdot \text{increase\_factor},

    then ``lambda`` is clipped to ``[min_damping, max_damping]``.

    Args:
        initial_damping: ``lambda_0`` (default 1e-3; see :class:`Nielsen`). Must be > 0.
        increase_factor, decrease_factor: the factors (10, 10), each > 1.
        min_damping, max_damping: bounds on ``lambda`` (1e-15, 1e16).

    Reference: Marquardt (1963), "An algorithm for least-squares estimation of nonlinear
    parameters", SIAM J. Appl. Math. 11(2).
    """

    initial_damping: float = 1e-3
    increase_factor: float = 10.0
    decrease_factor: float = 10.0
    min_damping: float = 1e-15
    max_damping: float = 1e16

    def __post_init__(self) -> None:
        check_hyperparameter("Classic.initial_damping", self.initial_damping, low=0.0,
                             low_inclusive=False)
        check_hyperparameter("Classic.increase_factor", self.increase_factor, low=1.0,
                             low_inclusive=False)
        check_hyperparameter("Classic.decrease_factor", self.decrease_factor, low=1.0,
                             low_inclusive=False)
        _check_bounds("Classic", self.min_damping, self.max_damping)

    def adapt(self, lam: Tensor, nu: Tensor, rho: Tensor, accepted: Tensor) -> tuple[Tensor, Tensor]:
        """Next ``(lambda, nu)`` (``nu`` unused, returned as it is)."""
        lam = torch.where(accepted, lam / self.decrease_factor, lam * self.increase_factor)
        return torch.clamp(lam, self.min_damping, self.max_damping), nu

    def adapt_host(self, lam: Any, nu: Any, rho: Any, accepted: bool) -> tuple[Any, Any]:
        """:meth:`adapt` on host numbers (numpy scalars of :func:`host_type`)."""
        T = type(lam)
        lam = lam / T(self.decrease_factor) if accepted else lam * T(self.increase_factor)
        return min(max(lam, T(self.min_damping)), T(self.max_damping)), nu

    def exhausted(self, lam: Tensor, radius: Tensor) -> Tensor:
        """Whether further attempts are pointless: ``lambda`` reached ``max_damping``."""
        return lam >= self.max_damping

    @property
    def accepted_decrease(self) -> float:
        """The most an accepted step divides ``lambda`` by: ``decrease_factor``."""
        return self.decrease_factor


@dataclass(frozen=True)
class TrustRegion:
    r"""MINPACK's trust-region control of the damping (the default of
    :func:`funcopt.least_squares`).

    A radius ``Delta`` bounds the scaled step ``||d * delta||``; ``lambda >= 0`` is the damping
    whose step has length within ``[0.9, 1.1] Delta`` (or ``lambda = 0`` when the Gauss-Newton
    step is shorter), found from an SVD of ``J / d`` (dense Jacobians only). Start:
    ``Delta_0 = radius_factor * ||d * x_0||`` (``radius_factor`` when that is 0), cut to the
    first step's length. With the ratio ``rho`` of actual to predicted reduction:

    .. math::
        \rho \le \tfrac14:\ \Delta \leftarrow \mu \min(\Delta, 10 \|d \delta\|),\
        \mu \in [0.1, 0.5] \text{ from a quadratic fit}; \qquad
        \rho \ge \tfrac34 \text{ or } \lambda = 0:\ \Delta \leftarrow 2 \|d \delta\|.

    Attempts stop when the radius underflows (the smallest normal number of the dtype), which
    ends :func:`funcopt.least_squares` as a failure. The state's damping starts at
    ``initial_damping`` (1e-3) before the first step (it is recomputed from the radius at every
    attempt); a damping that reaches ``max_damping`` (1e16) with every attempt rejected also
    ends :func:`funcopt.least_squares` as a failure.

    Args:
        radius_factor: MINPACK's ``factor`` (default 10; MINPACK's default is 100 and it
            advises 0.1-100). With 10 and the exact Jacobian :func:`funcopt.least_squares`
            solves all 27 NIST StRD problems from both starts. Must be > 0.

    Reference: Moré (1978), "The Levenberg-Marquardt algorithm: implementation and theory",
    Lecture Notes in Mathematics 630 (MINPACK ``lmder``, ``lmpar``).
    """

    radius_factor: float = 10.0
    initial_damping: ClassVar[float] = 1e-3
    max_damping: ClassVar[float] = 1e16

    def __post_init__(self) -> None:
        check_hyperparameter("TrustRegion.radius_factor", self.radius_factor, low=0.0,
                             low_inclusive=False)

    def initial_radius(self, xnorm: Tensor, rnorm: Tensor | None = None) -> Tensor:
        r"""MINPACK's ``Delta_0 = radius_factor ||d x_0||``; when that is 0, ``radius_factor``
        (MINPACK), or with column scaling (``rnorm = ||r(x_0)||`` given)

        .. math:: \Delta_0 = \text{radius\_factor}\, \|r(x_0)\| \quad (d x_0 = 0),

        capped at the dtype's largest number. MINPACK's ``factor`` is a length in units of
        ``d x``, ``d`` the Jacobian's column norms, so residuals ``s r(x)`` would shrink the
        first steps ``s`` times (from ``s ~ 1e16`` on the first step changes the cost by less
        than ``eps`` and a fit from ``x_0 = 0`` stops there); in the scaled variables
        ``z = d delta`` the columns of ``J / d`` have unit norm and the Gauss-Newton step has
        ``||z|| >= ||P r|| / sqrt(n)`` (``P r`` the part of ``r`` in the range of ``J``), of the
        order of ``||r(x_0)||`` whatever ``s``."""
        f = self.radius_factor
        zero = torch.full_like(xnorm, f) if rnorm is None else \
            (f * rnorm.to(xnorm.dtype)).clamp(max=torch.finfo(xnorm.dtype).max)
        return torch.where(xnorm > 0, f * xnorm, torch.where(zero > 0, zero, f))

    def exhausted(self, lam: Tensor, radius: Tensor) -> Tensor:
        """Whether further attempts are pointless: the radius underflowed."""
        return radius <= torch.finfo(radius.dtype).tiny

    @property
    def accepted_decrease(self) -> float:
        """1: the state keeps the step's own ``lambda`` (found again for every attempt)."""
        return 1.0


DampingRule = Union[Nielsen, Classic, TrustRegion]
"""A damping rule object: :class:`Nielsen`, :class:`Classic` or :class:`TrustRegion`."""
_RULE_TYPES = (Nielsen, Classic, TrustRegion)


def check_rule(rule: object, name: str = "rule") -> None:
    """Raise TypeError unless ``rule`` is a damping rule object (naming ``name``)."""
    if not isinstance(rule, _RULE_TYPES):
        raise TypeError(
            f"{name}={rule!r}: pass a damping rule object, fo.Nielsen(...), fo.Classic(...) or "
            "fo.TrustRegion(...) (e.g. rule=fo.Classic(increase_factor=10.0)), not a "
            f"{type(rule).__name__}")


@dataclass(frozen=True)
class Geodesic:
    r"""Transtrum & Sethna's geodesic acceleration: the step is ``delta + a / 2`` with

    .. math::
        (J^\top J + \lambda D)\, a = -J^\top r_{vv},

    ``r_vv`` the second directional derivative of ``r`` along ``delta`` (the factorisation of
    ``J^T J + lambda D`` is reused). A step with ``2 ||a||_D / ||delta||_D > alpha`` is
    rejected.

    Args:
        alpha: the acceptance bound above (default 0.75), > 0.
        fd_step: ``h`` of the finite difference ``r_vv = (2/h) ((r(x + h delta) - r(x)) / h -
            J delta)`` (one residual call), default 0.1, > 0; None: exact, by forward-over-
            forward ``jvp`` (slower).

    Reference: Transtrum & Sethna (2012), "Improvements to the Levenberg-Marquardt algorithm
    for nonlinear least-squares minimization", arXiv:1201.5885.
    """

    alpha: float = 0.75
    fd_step: float | None = 0.1

    def __post_init__(self) -> None:
        check_hyperparameter("Geodesic.alpha", self.alpha, low=0.0, low_inclusive=False)
        if self.fd_step is not None:
            check_hyperparameter("Geodesic.fd_step", self.fd_step, low=0.0, low_inclusive=False)


def resolve_scaling(o: Any, m: int, n: int) -> Any:
    """The options ``o`` (an ``LMOptions``) with ``scaling`` decided for a problem of ``m``
    residuals and ``n`` parameters: as given, else (None) ``m >= n``: MINPACK's column scaling
    where the residuals are at least as many as the parameters (curve fits, NIST), ``D = I``
    on a wider problem (a network with more weights than residuals; see
    :func:`funcopt.levenberg_marquardt`)."""
    return o if o.scaling is not None else replace(o, scaling=m >= n)


def check_params(rule: DampingRule, params: Any) -> None:
    """Raise ValueError for parameters without elements (nothing to fit), and TypeError when
    :class:`TrustRegion` (an SVD of ``J / d``, which torch has for float32 and float64 only)
    meets 16-bit parameters, naming the leaf's dtype and the fix."""
    if not any(isinstance(x, Tensor) and x.numel() for x in optree.tree_leaves(params)):
        raise ValueError("levenberg_marquardt: params have no elements (n = 0), so there is "
                         "nothing to fit; pass at least one parameter")
    if isinstance(rule, TrustRegion):
        for leaf in optree.tree_leaves(params):
            if isinstance(leaf, Tensor) and leaf.dtype in (torch.float16, torch.bfloat16):
                raise TypeError(
                    f"rule=TrustRegion() needs an SVD, which torch lacks for {leaf.dtype} "
                    "parameters: pass float32 parameters, or rule=fo.Nielsen() or "
                    "fo.Classic() for 16-bit ones")


def check_geodesic(geodesic: object) -> None:
    """Raise TypeError unless ``geodesic`` is a :class:`Geodesic` or None."""
    if geodesic is not None and not isinstance(geodesic, Geodesic):
        raise TypeError(f"geodesic={geodesic!r}: pass fo.Geodesic(alpha=..., fd_step=...) to "
                        "turn geodesic acceleration on, or None (off)")


# --------------------------------------------------------------------------- trust region (MINPACK)


def _positive(t: Tensor) -> Tensor:
    """``t`` where it is positive and finite, else 1 (a safe divisor)."""
    t = t.nan_to_num(1.0, 1.0, 1.0)
    return t.masked_fill(t <= 0, 1.0)


def trust_region_damping(s: Tensor, w: Tensor, sigma: Tensor, radius: Tensor | float) -> Tensor:
    """``lambda >= 0`` with ``||z(lambda)|| <= 1.1 Delta`` (and ``>= 0.9 Delta`` when
    ``lambda > 0``), ``z(lambda) = (Jt^T Jt + lambda I)^{-1} Jt^T r`` for ``Jt = J / d``.

    From the SVD ``Jt = U diag(sigma s) V^T`` (``s`` normalised to ``max s = 1``):
    ``||z|| = (||r|| / sigma) phi(lambda / sigma^2)`` with ``phi(mu)^2 = sum_i w_i^2 /
    (s_i^2 + mu)^2``, ``w = s * U^T r / ||r||``. ``radius`` is ``Delta / ||r||``; Newton's method
    on ``1/phi - 1/(sigma Delta / ||r||)`` from ``mu = 0`` (Hebden; Moré 1978, section 5) increases
    monotonically to the root, and ``lambda = sigma^2 mu``. Only these O(1) numbers enter, so the
    damping does not depend on the scale of ``J`` or ``r``. One host sync per iteration;
    MINPACK's ``lmpar`` does the same with a QR factorisation.
    """
    radius = radius * sigma
    keep = ~dropped_directions(s)
    s2 = torch.where(keep, s * s, torch.ones_like(s))
    w2 = torch.where(keep, w * w, torch.zeros_like(w))
    mu = torch.zeros_like(radius)
    for _ in range(30):
        phi, step = newton_terms(w2, s2 + mu, radius, radius)
        if bool(phi <= 1.1 * radius):  # host sync
            break
        mu = mu + step
    return mu * sigma * sigma


def dropped_directions(s: Tensor) -> Tensor:
    """Where the normalised singular values ``s`` (``max s = 1``) are at most ``eps n``: a
    direction that rounding alone could have made (``J``'s singular values carry an error of
    about ``eps`` times the largest). :func:`trust_region_damping` leaves them out."""
    return s <= torch.finfo(s.dtype).eps * max(s.numel(), 1)


def singular_gauss_newton(svd: tuple[Tensor, Tensor, Tensor] | None) -> bool:
    """Whether the trust region's Gauss-Newton step (``lambda = 0``) meets a ``Jt`` with a
    :func:`dropped_directions` (``svd`` from the model's :func:`trust_region_damping` inputs,
    None under another rule: False; one host read). ``Jt^T Jt`` is then singular to working
    precision, and Cholesky may meet a zero pivot or factor the rounding (a last pivot of a
    few ``eps`` of the largest passes its pivot test and sends the step along the null
    space), which differs from one CPU's kernels to another's. The eager update then takes
    the minimum-norm step under "auto" (:class:`~funcopt.solvers.Lstsq`), and a named
    solver's attempt fails (rejected: the radius shrinks and ``lambda > 0``)."""
    return svd is not None and bool(dropped_directions(svd[0]).any())  # host sync


def newton_terms(w2: Tensor, q: Tensor, rho: Tensor, rho1: Tensor) -> tuple[Tensor, Tensor]:
    """``(phi, step)`` of the trust region's Newton iteration over the last dimension:
    ``phi = sqrt(sum w2 / q^2)`` and ``step = (phi - rho) / rho1 * phi^2 / sum w2 / q^3``
    (``q = s^2 + mu``). The sums are taken of ``q / c``, ``c = 2^k >= max q``: the same bits as
    of ``q``, without overflowing ``q^2`` and ``q^3`` when ``mu ~ 1 / radius`` is large (radius
    below ~1e-102)."""
    c = torch.ldexp(torch.ones_like(q[..., 0]), torch.frexp(q.amax(-1))[1])
    qh = q / c[..., None]
    phi_c = (w2 / (qh * qh)).sum(-1).sqrt()  # phi c
    phi = phi_c / c
    return phi, (phi - rho) / rho1 * phi_c * phi_c / (w2 / (qh * qh * qh)).sum(-1) * c


def adapt_radius(radius, lam, reductions, t2, pnorm, ok):
    """MINPACK ``lmder``'s update of ``Delta`` from the ratio of actual to predicted reduction.

    ratio <= 1/4: ``Delta = mu * min(Delta, 10 ||D p||)``, ``mu`` from a quadratic fit in
    [0.1, 0.5]; ratio >= 3/4 or ``lambda = 0``: ``Delta = 2 ||D p||``. ``reductions`` is
    ``(actual, predicted, far)``: MINPACK's relative reductions (see
    :func:`funcopt.transforms.levenberg_marquardt`) and whether ``||r_new|| >= 10 ||r||``;
    ``t2 = ||D p|| / ||r||``.
    """
    actual, predicted, far = reductions
    actred = torch.where(ok, actual, -1.0)
    lam_term = lam * t2 * t2
    dirder = -(predicted - lam_term)  # -(t1^2 + lambda t2^2)
    ratio = torch.where(predicted > 0, actred / torch.where(predicted > 0, predicted, 1.0), 0.0)
    mu = torch.where(actred >= 0, torch.full_like(ratio, 0.5),
                     0.5 * dirder / torch.where(dirder + 0.5 * actred != 0, dirder + 0.5 * actred, -1.0))
    mu = torch.where(far | (mu < 0.1) | ~torch.isfinite(mu), 0.1, mu)
    shrink = ratio <= 0.25
    grow = ~shrink & ((lam == 0) | (ratio >= 0.75))
    # a failed solve (not ok) has no step: shrink the radius itself, not its zero length
    base = torch.where(ok, torch.minimum(radius, pnorm / 0.1), radius)
    return torch.where(shrink, mu * base,
                       torch.where(grow, pnorm / 0.5, radius))


# --------------------------------------------------------------------------- host numbers


def host_type(dtype: torch.dtype) -> type:
    """The numpy scalar type whose arithmetic rounds as ``dtype``'s does (each operation
    correctly rounded), so decisions taken on the host after one read of the device's numbers
    reproduce those of 0-d tensors; float32 for bfloat16, which numpy lacks."""
    return _HOST_TYPES.get(dtype, np.float32)


_HOST_TYPES = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16}


def relative_reductions(rnorm: Any, new_rnorm: Any, jdnorm: Any, pnorm: Any,
                        lam: Any) -> tuple[Any, Any, Any]:
    """MINPACK's scale-free relative reductions of ``F = 0.5 ||r||^2`` on host numbers (numpy
    scalars of one :func:`host_type`), from ``||r||``, ``||r_new||``, ``||J delta||``,
    ``||d delta||`` and ``lambda``:

    ``actual = 1 - (||r_new|| / ||r||)^2`` (``-1`` when ``||r_new|| >= 10 ||r||`` or it is not
    finite), ``predicted = (||J delta|| / ||r||)^2 + 2 lambda (||d delta|| / ||r||)^2``, which
    is ``(L(0) - L(delta)) / F(x)``, and ``rho = actual / predicted`` (``-inf`` when undefined
    or ``r_new`` is not finite). Only ratios of norms appear, so the result does not depend on
    the scale of ``r``. Returns ``(rho, actual, predicted)``.
    """
    T = type(rnorm)
    fn = rnorm if 0 < rnorm < math.inf else T(1.0)
    finite = math.isfinite(new_rnorm)
    ratio = new_rnorm / fn
    actual = T(1.0) - ratio * ratio if finite and T(0.1) * new_rnorm < rnorm else T(-1.0)
    t1, t2 = jdnorm / fn, pnorm / fn
    predicted = t1 * t1 + T(2.0) * lam * t2 * t2
    rho = actual / predicted if predicted > 0 and rnorm > 0 and finite else T(-math.inf)
    return (T(-math.inf) if math.isnan(rho) else rho), actual, predicted


def adapt_radius_host(radius, lam, reductions, t2, pnorm, ok: bool):
    """:func:`adapt_radius` on host numbers (numpy scalars of one :func:`host_type`)."""
    T = type(radius)
    actual, predicted, far = reductions
    actred = actual if ok else T(-1.0)
    dirder = -(predicted - lam * t2 * t2)  # -(t1^2 + lambda t2^2)
    ratio = actred / predicted if predicted > 0 else T(0.0)
    den = dirder + T(0.5) * actred
    mu = T(0.5) if actred >= 0 else T(0.5) * dirder / (den if den != 0 else T(-1.0))
    if far or mu < T(0.1) or not math.isfinite(mu):
        mu = T(0.1)
    if ratio <= T(0.25):  # a failed solve (not ok) has no step: shrink the radius itself
        return mu * (_min(radius, pnorm / T(0.1)) if ok else radius)
    return pnorm / T(0.5) if (lam == 0 or ratio >= T(0.75)) else radius


def _min(a: Any, b: Any) -> Any:
    """``torch.minimum`` of two host numbers: NaN when either is."""
    return a if math.isnan(a) else b if math.isnan(b) else min(a, b)


def read_host(rnorm: Tensor, lam: Tensor, state: Any, rule: DampingRule, d: Tensor, x: Tensor,
              *more: Tensor, scaling: bool = False, first: Tensor | None = None) -> list:
    """One host read for an eager Levenberg-Marquardt step: ``(||r||, lambda, nu, radius,
    first step, *more)``, numbers as numpy scalars of :func:`host_type`, boolean tensors as
    bools. ``state`` is the transform's; under the trust-region rule the radius is
    ``Delta_0`` of ``||d x||`` (and of ``||r||`` with ``scaling``, see
    :meth:`TrustRegion.initial_radius`) on the first step. ``first``: ``state.count == 0``
    when the caller has it."""
    first = state.count == 0 if first is None else first
    radius = state.radius
    if isinstance(rule, TrustRegion):
        start = rule.initial_radius(scaled_norm(d * x), rnorm if scaling else None)
        radius = torch.where(first, start, radius)
    return host_values(rnorm, lam, state.nu, radius, first, *more)


def host_values(*items: Tensor) -> list:
    """0-d tensors read in one host sync: those of the first one's dtype (and any other
    floating one) as numpy scalars of its :func:`host_type`, boolean ones as bools."""
    vals = torch.stack(items).tolist()  # host sync; stack promotes bools to the float dtype
    T = host_type(items[0].dtype)
    return [bool(v) if t.dtype == torch.bool else T(v) for v, t in zip(vals, items)]


def power_of_two_host(b: Any) -> Any:
    """``gamma = 2^e <= b < 2^(e+1)`` (1 where ``b`` is 0 or not finite) for a host number, as
    :func:`funcopt.solvers.krylov._power_of_two` for tensors."""
    T = type(b)
    return T(math.ldexp(1.0, math.frexp(b)[1] - 1)) if 0 < b < math.inf else T(1.0)
