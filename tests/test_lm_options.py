"""The Levenberg-Marquardt options as small frozen objects (``fo.Nielsen``, ``fo.Classic``,
``fo.TrustRegion``, ``fo.Geodesic``, ``fo.Tolerances``).

``lm_options_reference.json`` was recorded in float64 with the keyword-flag API these objects
replace (``damping_rule="classic", increase_factor=3.0, ...``) before the change; each case
below is the same configuration written with the objects and must give the same numbers, up to
what rounding decides (``_lm_rounding``): the file was recorded on another CPU, and at the
solution of expfit the gain ratios, the decisions taken on them and the test that stops a fit
are rounding (the 5th update's gain ratio there differs by 2e-4 on an AMD CPU with AVX2: by
4 units of 1.0 in the last place of the measured reduction ``1 - (||r_new|| / ||r||)^2``,
over a predicted reduction of 4e-12).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import pytest
import torch
from _lm_rounding import FLOOR_STOPS, RTOL, assert_within, flip_radius, resolved

import funcopt as fo
from funcopt.least_squares_parallel import least_squares_parallel

F64 = torch.float64
REF = json.loads((Path(__file__).parent / "lm_options_reference.json").read_text())
T = torch.linspace(0, 3, 12, dtype=F64)
Y = 2.5 * torch.exp(-1.3 * T) + 0.01 * torch.sin(7 * T)


def _expfit(p):
    return p[0] * torch.exp(-p[1] * T) - Y


def _rosen(p):
    return torch.stack([10 * (p[1] - p[0] ** 2), 1 - p[0]])


PROBLEMS = {"expfit": (_expfit, [1.0, 0.2]), "rosen": (_rosen, [-1.2, 1.0])}
# name: the options as objects (the recorded run used the flags in the comment)
LM_CASES = {
    "default": {},
    # damping_rule="nielsen", initial_damping=1e-1, min_damping=1e-8, max_damping=1e8
    "nielsen_tuned": dict(rule=fo.Nielsen(initial_damping=1e-1, min_damping=1e-8,
                                          max_damping=1e8)),
    "nielsen_noscale": dict(scaling=False, rule=fo.Nielsen(initial_damping=1e-2)),
    # damping_rule="classic", initial_damping=1e-2, increase_factor=3, decrease_factor=5, ...
    "classic": dict(rule=fo.Classic(initial_damping=1e-2, increase_factor=3.0,
                                    decrease_factor=5.0, min_damping=1e-6, max_damping=1e6)),
    "classic_noscale": dict(rule=fo.Classic(), scaling=False),
    "trust": dict(rule=fo.TrustRegion()),  # damping_rule="trust_region"
    "trust_100": dict(rule=fo.TrustRegion(radius_factor=100.0)),  # trust_radius_factor=100
    # geodesic_acceleration=True, geodesic_alpha=0.9, geodesic_fd_step=0.05
    "geodesic_fd": dict(geodesic=fo.Geodesic(alpha=0.9, fd_step=0.05)),
    "geodesic_exact": dict(geodesic=fo.Geodesic(fd_step=None)),
    "attempts": dict(max_attempts=2, accept_ratio=0.3),
    "cg": dict(solver="cg", rule=fo.Nielsen(initial_damping=1e-2)),
    "cg_classic": dict(solver="pcg", rule=fo.Classic()),
}
LS_CASES = {
    "default": {},
    "nielsen": dict(rule=fo.Nielsen()),
    "classic": dict(rule=fo.Classic(increase_factor=4.0)),
    "geodesic": dict(rule=fo.Nielsen(), geodesic=fo.Geodesic()),
    "tols": dict(tolerances=fo.Tolerances(ftol=1e-8, xtol=1e-8, gtol=1e-8)),
    "budget": dict(memory_budget=400),
}


def _close(got: list[float], want_hex: list[str], rtol: float = 1e-10) -> None:
    torch.testing.assert_close(torch.tensor(got, dtype=F64).reshape(-1), _hex(want_hex),
                               rtol=rtol, atol=1e-300)


def _hex(want_hex: list[str]) -> torch.Tensor:
    return torch.tensor([float.fromhex(h) for h in want_hex], dtype=F64)


@pytest.mark.parametrize("problem", PROBLEMS)
@pytest.mark.parametrize("case", LM_CASES)
def test_transform_with_option_objects_gives_the_recorded_numbers(problem, case):
    """Each recorded update while it is ``resolved``: the parameters to 1e-10, the damping, nu,
    radius and gain ratio to ``RTOL``, the attempts exactly. (The damping carried in is off by
    ``NOISE / predicted``, which moves the next step by that fraction of its size, at most
    ``NOISE / sqrt(predicted) ||r|| / sigma_min``: 1e-11 on expfit.) From the first update that
    is not (expfit's 5th to 7th, at its solution; rosen is far from its own after 8), the rule's
    numbers are rounding and the parameters are compared within ``flip_radius`` (3e-8)."""
    fn, p0 = PROBLEMS[problem]
    tx = fo.levenberg_marquardt(fn, **LM_CASES[case])
    p = torch.tensor(p0, dtype=F64)
    s = tx.init(p)
    radius = None
    for want in REF["lm"][f"{problem}/{case}"]:
        u, s = tx.update(None, s, p)
        p = p + u
        if radius is None and not resolved(s.predicted_reduction):
            radius = flip_radius(fn, _hex(REF["lm"][f"{problem}/{case}"][-1]["params"]))
        if radius is not None:
            assert_within(p, _hex(want["params"]), radius)
            continue
        _close(p.tolist(), want["params"])
        for field in ("damping", "nu", "radius", "gain_ratio"):
            _close([float(getattr(s, field))], want[field], rtol=RTOL)
        assert [int(s.attempts)] == want["attempts"]


@pytest.mark.parametrize("problem", PROBLEMS)
@pytest.mark.parametrize("case", LS_CASES)
def test_least_squares_with_option_objects_gives_the_recorded_fit(problem, case):
    """A fit whose updates are all ``resolved`` (rosen's) gives the recorded result, steps,
    evaluations and reason. One that reaches the rounding of its solution (expfit's) takes the
    recorded run's resolved updates and then some that rounding decides: the recorded run took
    more updates and evaluations than the resolved ones, stopped on a tolerance test and ended
    within ``flip_radius`` of this run."""
    fn, p0 = PROBLEMS[problem]
    x0 = torch.tensor(p0, dtype=F64)
    p, info = fo.least_squares(fn, x0, **LS_CASES[case])
    want = REF["ls"][f"{problem}/{case}"]
    assert (info.success, info.path) == (want["success"], want["path"])
    n = next((k for k, h in enumerate(info.history) if not resolved(h["predicted_reduction"])),
             None)
    if n is None:
        _close(p.tolist(), want["params"])
        assert (info.steps, info.reason, info.evaluations) == (
            want["steps"], want["reason"], want["evaluations"])
        return
    assert_within(p, _hex(want["params"]), flip_radius(fn, _hex(want["params"])))
    assert info.reason in FLOOR_STOPS and want["reason"] in FLOOR_STOPS
    _, head = fo.least_squares(fn, x0, max_steps=n, **LS_CASES[case])  # the resolved updates
    assert want["steps"] > n and want["evaluations"] > head.evaluations


@pytest.mark.parametrize("case, options", [
    ("default", {}), ("nielsen", dict(rule=fo.Nielsen())),
    ("classic", dict(rule=fo.Classic(decrease_factor=3.0)))])
def test_batched_fit_with_option_objects_gives_the_recorded_fit(case, options):
    Yb = torch.stack([2.5 * torch.exp(-k * T) for k in (0.5, 1.0, 2.0)])
    P, info = fo.least_squares(lambda P: P[:, :1] * torch.exp(-P[:, 1:] * T) - Yb,
                               torch.tensor([[1.0, 0.3]] * 3, dtype=F64), batched=True, **options)
    want = REF["batched"][case]
    _close(P.reshape(-1).tolist(), want["params"])
    assert info.steps.tolist() == want["steps"] and info.reason.tolist() == want["reason"]
    assert info.evaluations.tolist() == want["evaluations"]


@pytest.mark.parametrize("case, options", [
    ("default", {}), ("nielsen", dict(rule=fo.Nielsen(initial_damping=1e-2)))])
def test_parallel_fit_with_option_objects_gives_the_recorded_fit(case, options):
    """expfit ends at the rounding of its solution (see above): within ``flip_radius`` of the
    recorded end, on a tolerance test, one update either way (which test holds first, and
    after which of the last updates, is rounding; as in test_least_squares_parallel)."""
    p, info = least_squares_parallel(_expfit, torch.tensor([1.0, 0.2], dtype=F64), **options)
    want = REF["parallel"][case]
    assert_within(p, _hex(want["params"]), flip_radius(_expfit, _hex(want["params"])))
    assert abs(int(info.steps[0]) - want["steps"][0]) <= 1
    assert info.reasons()[0] in FLOOR_STOPS and fo.LEAST_SQUARES_REASONS[want["reason"][0]] in \
        FLOOR_STOPS


# --------------------------------------------------------------------------- each rule's update


def test_nielsen_adapt_is_nielsens_formula():
    rule = fo.Nielsen(min_damping=1e-6, max_damping=1e6)
    lam, nu = torch.tensor([1e-2, 1e-2, 1e-2, 5e5], dtype=F64), torch.full((4,), 4.0, dtype=F64)
    rho = torch.tensor([0.9, 0.2, -1.0, -1.0], dtype=F64)
    acc = torch.tensor([True, True, False, False])
    new_lam, new_nu = rule.adapt(lam, nu, rho, acc)
    want = [1e-2 * max(1 / 3, 1 - (2 * 0.9 - 1) ** 3), 1e-2 * max(1 / 3, 1 - (2 * 0.2 - 1) ** 3),
            1e-2 * 4.0, 1e6]  # the last one clipped at max_damping
    torch.testing.assert_close(new_lam, torch.tensor(want, dtype=F64), rtol=1e-15, atol=0)
    assert new_nu.tolist() == [2.0, 2.0, 8.0, 8.0]
    assert rule.exhausted(new_lam, new_lam).tolist() == [False, False, False, True]


def test_classic_adapt_divides_and_multiplies():
    rule = fo.Classic(increase_factor=3.0, decrease_factor=5.0, min_damping=1e-4)
    lam, nu = torch.tensor([1.0, 1.0, 2e-4], dtype=F64), torch.tensor([2.0, 2.0, 2.0], dtype=F64)
    new_lam, new_nu = rule.adapt(lam, nu, torch.zeros(3, dtype=F64),
                                 torch.tensor([True, False, True]))
    assert new_lam.tolist() == [0.2, 3.0, 1e-4] and new_nu.tolist() == [2.0, 2.0, 2.0]


def test_trust_region_initial_radius_and_stop():
    rule = fo.TrustRegion(radius_factor=100.0)
    r0 = rule.initial_radius(torch.tensor([0.0, 2.5], dtype=F64))
    assert r0.tolist() == [100.0, 250.0]  # factor itself when ||d x_0|| = 0
    tiny = torch.finfo(F64).tiny
    assert rule.exhausted(None, torch.tensor([tiny, 1.0], dtype=F64)).tolist() == [True, False]


def test_defaults_are_the_documented_numbers():
    assert dataclasses.asdict(fo.Nielsen()) == dict(initial_damping=1e-3, min_damping=1e-15,
                                                    max_damping=1e16)
    assert dataclasses.asdict(fo.Classic()) == dict(
        initial_damping=1e-3, increase_factor=10.0, decrease_factor=10.0, min_damping=1e-15,
        max_damping=1e16)
    assert dataclasses.asdict(fo.TrustRegion()) == dict(radius_factor=10.0)
    assert dataclasses.asdict(fo.Geodesic()) == dict(alpha=0.75, fd_step=0.1)
    assert dataclasses.asdict(fo.Tolerances()) == dict(ftol=1e-14, xtol=1e-12, gtol=1e-14)
    assert inspect.signature(fo.levenberg_marquardt).parameters["rule"].default == fo.Nielsen()
    # None: TrustRegion() with a dense solver, Nielsen() with a matrix-free one
    assert inspect.signature(fo.least_squares).parameters["rule"].default is None


# --------------------------------------------------------------------------- bad options


@pytest.mark.parametrize("make, exc, words", [
    (lambda: fo.Nielsen(initial_damping=0.0), ValueError, "Nielsen.initial_damping"),
    (lambda: fo.Nielsen(min_damping=1.0, max_damping=0.5), ValueError, "Nielsen.max_damping"),
    (lambda: fo.Nielsen(min_damping=-1.0), ValueError, "Nielsen.min_damping"),
    (lambda: fo.Nielsen(initial_damping="1e-3"), TypeError, "Nielsen.initial_damping"),
    (lambda: fo.Classic(increase_factor=1.0), ValueError, "Classic.increase_factor"),
    (lambda: fo.Classic(decrease_factor=0.5), ValueError, "Classic.decrease_factor"),
    (lambda: fo.Classic(max_damping=float("inf")), ValueError, "Classic.max_damping"),
    (lambda: fo.TrustRegion(radius_factor=0.0), ValueError, "TrustRegion.radius_factor"),
    (lambda: fo.Geodesic(alpha=-1.0), ValueError, "Geodesic.alpha"),
    (lambda: fo.Geodesic(fd_step=0.0), ValueError, "Geodesic.fd_step"),
    (lambda: fo.Tolerances(ftol=-1e-8), ValueError, "Tolerances.ftol"),
    (lambda: fo.Tolerances(gtol=None), TypeError, "Tolerances.gtol"),
])
def test_bad_option_objects_raise_at_construction_naming_the_field(make, exc, words):
    with pytest.raises(exc, match=words.replace(".", r"\.")):
        make()


def _fn(p):
    return p - 1.0


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(rule="nielsen"), TypeError, "rule='nielsen': pass a damping rule object, fo.Nielsen"),
    (dict(rule=fo.Nielsen), TypeError, "pass a damping rule object"),  # the class, not one
    (dict(geodesic=True), TypeError, r"geodesic=True: pass fo.Geodesic\("),
    (dict(max_attempts=0), ValueError, "max_attempts=0"),
    (dict(accept_ratio=1.0), ValueError, "accept_ratio"),
    (dict(scaling="yes"), TypeError, "scaling='yes'"),
    (dict(rule=fo.TrustRegion(), solver="cg"), ValueError, "dense Jacobian"),
])
def test_transform_rejects_bad_options_before_any_work(kwargs, exc, words):
    with pytest.raises(exc, match=words):
        fo.levenberg_marquardt(_fn, **kwargs)


@pytest.mark.parametrize("kwargs, words", [
    (dict(damping_rule="classic"), r"damping_rule= .* pass rule=fo\.Nielsen\(\)"),
    (dict(increase_factor=3.0), r"rule=fo\.Classic\(increase_factor=\.\.\.\)"),
    (dict(trust_radius_factor=100.0), r"rule=fo\.TrustRegion\(radius_factor=\.\.\.\)"),
    (dict(geodesic_acceleration=True), r"geodesic=fo\.Geodesic\(\)"),
    (dict(ftol=1e-8), r"tolerances=fo\.Tolerances\(ftol=\.\.\.\)"),
    (dict(tolerances=1e-8), r"tolerances=1e-08: pass fo\.Tolerances"),
    (dict(colour="red"), r"unknown option 'colour'"),
    (dict(rule="trust_region"), r"rule='trust_region': pass a damping rule object"),
])
def test_least_squares_names_the_object_that_holds_a_moved_option(kwargs, words):
    with pytest.raises(TypeError, match=words):
        fo.least_squares(_fn, torch.zeros(2, dtype=F64), **kwargs)
    if "rule" not in kwargs:
        with pytest.raises(TypeError, match=words.replace("least_squares", "")):
            least_squares_parallel(_fn, torch.zeros(2, dtype=F64), **kwargs)


def test_option_objects_are_frozen_and_hashable():
    rule = fo.Classic(increase_factor=3.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.increase_factor = 4.0  # type: ignore[misc]
    assert len({fo.Nielsen(), fo.Nielsen(), fo.Classic(), fo.TrustRegion()}) == 3
    assert fo.Geodesic(alpha=0.5) == fo.Geodesic(alpha=0.5) != fo.Geodesic()


# --------------------------------------------------------------------------- width and size


@pytest.mark.parametrize("fn", [fo.levenberg_marquardt, fo.least_squares, fo.lm_options,
                                least_squares_parallel], ids=lambda f: f.__name__)
def test_no_public_function_of_the_family_is_wider_than_eleven_parameters(fn):
    assert len(inspect.signature(fn).parameters) <= 11


def test_no_module_of_the_family_is_over_500_lines():
    root = Path(fo.__file__).parent
    files = [root / "least_squares.py", root / "least_squares_batched.py",
             root / "least_squares_parallel.py", root / "least_squares_options.py", *sorted((root / "transforms").glob("l*m*.py"))]
    assert root / "transforms" / "lm_damping.py" in files
    for f in files:
        assert len(f.read_text().splitlines()) <= 500, f.name
