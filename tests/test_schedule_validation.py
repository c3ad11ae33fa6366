"""Schedules refuse out-of-range arguments when built, treat negative steps as step 0, and give
the numbers of float64 transcriptions of their formulas for random valid arguments."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from funcopt import schedules as S

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
NONFINITE = [math.nan, math.inf, -math.inf]

# --------------------------------------------------------------------------- validation

# constructor, valid keyword arguments, the number-valued ones, the step-count ones (lowest)
VALID = {
    "constant": (S.constant, dict(value=0.1), ["value"], {}),
    "linear": (S.linear, dict(init_value=1.0, end_value=0.1, transition_steps=10,
                              transition_begin=2), ["init_value", "end_value"],
               {"transition_steps": 1, "transition_begin": 0}),
    "polynomial": (S.polynomial, dict(init_value=1.0, end_value=0.1, power=2.0,
                                      transition_steps=10, transition_begin=2),
                   ["init_value", "end_value", "power"],
                   {"transition_steps": 1, "transition_begin": 0}),
    "exponential_decay": (S.exponential_decay, dict(init_value=1.0, transition_steps=10,
                                                    decay_rate=0.9, transition_begin=2,
                                                    end_value=0.1),
                          ["init_value", "decay_rate", "end_value"],
                          {"transition_steps": 1, "transition_begin": 0}),
    "piecewise_constant": (S.piecewise_constant, dict(init_value=1.0), ["init_value"], {}),
    "cosine_decay": (S.cosine_decay, dict(init_value=1.0, decay_steps=10, alpha=0.1,
                                          exponent=2.0), ["init_value", "alpha", "exponent"],
                     {"decay_steps": 1}),
    "warmup_cosine_decay": (S.warmup_cosine_decay, dict(init_value=0.0, peak_value=1.0,
                                                        warmup_steps=3, decay_steps=10,
                                                        end_value=0.1, exponent=1.0),
                            ["init_value", "peak_value", "end_value", "exponent"],
                            {"warmup_steps": 0, "decay_steps": 1}),
    "warmup_cosine": (S.warmup_cosine, dict(peak_value=1.0, warmup_steps=3, decay_steps=10,
                                            init_value=0.0, end_value=0.1),
                      ["peak_value", "init_value", "end_value"],
                      {"warmup_steps": 0, "decay_steps": 1}),
    "warmup_constant": (S.warmup_constant, dict(init_value=0.0, peak_value=1.0, warmup_steps=3),
                        ["init_value", "peak_value"], {"warmup_steps": 0}),
    "linear_onecycle": (S.linear_onecycle, dict(transition_steps=100, peak_value=1.0),
                        ["peak_value", "pct_start", "pct_final", "div_factor",
                         "final_div_factor"], {"transition_steps": 1}),
    "inverse_sqrt": (S.inverse_sqrt, dict(peak_value=0.1, warmup_steps=5), ["peak_value"],
                     {"warmup_steps": 0}),
    "palm_beta2": (S.palm_beta2, dict(beta2_scale=0.8), ["beta2_scale"], {}),
}
NUMBER_ARGS = [(n, a) for n, (_, _, nums, _) in VALID.items() for a in nums]
STEP_ARGS = [(n, a, low) for n, (_, _, _, steps) in VALID.items() for a, low in steps.items()]


def build(name, **change):
    make, kwargs, _, _ = VALID[name]
    return make(**{**kwargs, **change})


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_arguments_build(name):
    assert isinstance(build(name), S.Schedule)


@pytest.mark.parametrize("bad", NONFINITE + [True, "0.1", None])
@pytest.mark.parametrize("name, arg", NUMBER_ARGS)
def test_non_finite_or_non_number_arguments_raise(name, arg, bad):
    if bad is None and (name, arg) == ("exponential_decay", "end_value"):
        return  # None is end_value's default: no bound
    with pytest.raises(ValueError, match=rf"{name}: {arg}=.* must be a finite number"):
        build(name, **{arg: bad})


@pytest.mark.parametrize("name, arg, low", STEP_ARGS)
def test_step_counts_must_be_ints_in_range(name, arg, low):
    for bad in (low - 1, -5, 2.5, True, math.nan):
        with pytest.raises(ValueError, match=rf"{name}: {arg}=.* must be an int >= {low}"):
            build(name, **{arg: bad})


@pytest.mark.parametrize("name, change, message", [
    ("polynomial", dict(power=0.0), r"power=0.0 must be a finite number in \(0"),
    ("polynomial", dict(power=-1.0), r"power=-1.0 must be a finite number in \(0"),
    ("cosine_decay", dict(exponent=0.0), r"exponent=0.0 must be a finite number in \(0"),
    ("warmup_cosine_decay", dict(exponent=-2.0), r"exponent=-2.0 .* in \(0"),
    ("exponential_decay", dict(decay_rate=0.0), r"decay_rate=0.0 .* in \(0"),
    ("exponential_decay", dict(decay_rate=-0.5), r"decay_rate=-0.5 .* in \(0"),
    ("warmup_cosine_decay", dict(decay_steps=3), r"decay_steps=3 must exceed warmup_steps=3"),
    ("warmup_cosine", dict(decay_steps=2), r"decay_steps=2 must exceed warmup_steps=3"),
    ("warmup_cosine_decay", dict(peak_value=0.0), r"peak_value=0 cannot decay to end_value"),
    ("linear_onecycle", dict(pct_start=1.5), r"pct_start=1.5 .* in \(0, 1\)"),
    ("linear_onecycle", dict(pct_start=0.0), r"pct_start=0.0 .* in \(0, 1\)"),
    ("linear_onecycle", dict(pct_start=1.0), r"pct_start=1.0 .* in \(0, 1\)"),
    ("linear_onecycle", dict(pct_final=0.2), r"pct_final=0.2 .* in \(0.3, 1\]"),
    ("linear_onecycle", dict(pct_final=1.2), r"pct_final=1.2 .* in \(0.3, 1\]"),
    ("linear_onecycle", dict(div_factor=0.0), r"div_factor=0.0 .* in \(0"),
    ("linear_onecycle", dict(final_div_factor=-1.0), r"final_div_factor=-1.0 .* in \(0"),
    ("palm_beta2", dict(beta2_scale=0.0), r"beta2_scale=0.0 .* in \(0"),
    ("piecewise_constant", dict(boundaries_and_scales={-3: 0.5}),
     r"a boundary in boundaries_and_scales=-3 .* in \[0"),
    ("piecewise_constant", dict(boundaries_and_scales={3: -0.5}),
     r"boundaries_and_scales\[3\]=-0.5 .* in \[0"),
    ("piecewise_constant", dict(boundaries_and_scales={3: math.nan}),
     r"boundaries_and_scales\[3\]=nan must be a finite number"),
    ("piecewise_constant", dict(boundaries_and_scales={math.inf: 0.5}),
     r"a boundary in boundaries_and_scales=inf must be a finite number"),
])
def test_out_of_range_arguments_raise(name, change, message):
    with pytest.raises(ValueError, match=f"{name}: {message}"):
        build(name, **change)


def test_warmup_cosine_decay_peak_zero_needs_end_zero():
    f = S.warmup_cosine_decay(0.5, 0.0, 3, 10, end_value=0.0)
    assert [f(t) for t in (0, 3, 10, 20)] == pytest.approx([0.5, 0.0, 0.0, 0.0])


@pytest.mark.parametrize("schedules, boundaries, message", [
    ([S.constant(1.0), S.constant(2.0), S.constant(3.0)], [5, 3],
     r"boundaries must be non-decreasing, got \[5, 3\]"),
    ([S.constant(1.0), S.constant(2.0)], [-1], r"boundaries\[0\]=-1 .* in \[0"),
    ([S.constant(1.0), S.constant(2.0)], [math.nan], r"boundaries\[0\]=nan must be a finite"),
    ([S.constant(1.0), S.constant(2.0)], [], r"2 schedules need 1 boundaries, got 0"),
    ([S.constant(1.0), S.constant(2.0)], [1, 2], r"2 schedules need 1 boundaries, got 2"),
    ([], [], r"schedules must be a non-empty list"),
])
def test_join_schedules_refuses_bad_boundaries(schedules, boundaries, message):
    with pytest.raises(ValueError, match=f"join_schedules: {message}"):
        S.join_schedules(schedules, boundaries)


def test_join_schedules_refuses_numbers_as_schedules():
    with pytest.raises(TypeError, match=r"schedules\[1\] must be a schedule .* constant\(x\)"):
        S.join_schedules([S.constant(1.0), 0.5], [3])


def test_join_schedules_equal_boundaries_skip_a_schedule():
    f = S.join_schedules([S.constant(1.0), S.constant(2.0), S.constant(3.0)], [4, 4])
    assert [f(t) for t in (3, 4, 9)] == [1.0, 3.0, 3.0]
    assert [float(f(torch.tensor(t))) for t in (3, 4, 9)] == [1.0, 3.0, 3.0]


def test_warmup_constant_without_warmup_is_the_peak():
    f = S.warmup_constant(0.0, 0.5, 0)
    assert [f(t) for t in (-2, 0, 1, 100)] == [0.5] * 4
    assert float(f(torch.tensor(0))) == 0.5


# --------------------------------------------------------------------------- steps


def test_inverse_sqrt_negative_step_is_step_zero():
    # the warmup formula p t / w gave -0.1 at t = -5
    f = S.inverse_sqrt(0.1, 5)
    assert f(-5) == 0.0 and f(-5.5) == 0.0
    assert float(f(torch.tensor(-5))) == 0.0


def test_palm_beta2_negative_step_is_step_zero():
    # 1 - (t + 1)^(-c) gave -inf at t = -1 and NaN below
    f = S.palm_beta2()
    for t in (-1, -3, -1000):
        assert f(t) == 0.0
        assert float(f(torch.tensor(t))) == 0.0


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_python_step_raises(bad):
    for f in (S.linear(1.0, 0.0, 10), S.constant(1.0), S.join_schedules(
            [S.constant(1.0), S.constant(2.0)], [3])):
        with pytest.raises(ValueError, match="finite step"):
            f(bad)


def test_bool_step_and_bad_dtype_raise():
    f = S.cosine_decay(1.0, 10)
    with pytest.raises(TypeError, match="int or a 0-d tensor"):
        f(True)
    with pytest.raises(TypeError, match="dtype=torch.int64 must be None or a floating"):
        f(torch.tensor(3), dtype=torch.int64)
    with pytest.raises(TypeError, match="dtype='float64' must be None or a floating"):
        f(3, dtype="float64")


# --------------------------------------------------------------------------- values

VALUES = st.one_of(st.just(0.0), st.floats(1e-6, 10.0), st.floats(-10.0, -1e-6))
SPANS = st.integers(1, 60)
STEPS = list(range(0, 81)) + [100, 150, 199, 200, 201, 500, 1000, 5000]
NEGATIVE = [-1, -2, -7, -1000]


def _poly(v0, v1, p, T, t0):
    def ref(t):
        s = min(max(t - t0, 0), T)
        return (v0 - v1) * (1 - s / T) ** p + v1
    return ref


def _cos(v0, T, alpha, e):
    def ref(t):
        c = 0.5 * (1 + math.cos(math.pi * min(t, T) / T))
        return v0 * ((1 - alpha) * c**e + alpha)
    return ref


def _warm_cos(v0, vp, w, D, end, e):
    def ref(t):
        if t < w:
            return v0 + (vp - v0) * t / w
        c = 0.5 * (1 + math.cos(math.pi * min(t - w, D - w) / (D - w)))
        return end + (vp - end) * c**e
    return ref


@st.composite
def polynomial_case(draw):
    v0, v1, p, T, t0 = (draw(VALUES), draw(VALUES), draw(st.floats(0.25, 4)), draw(SPANS),
                        draw(st.integers(0, 20)))
    return S.polynomial(v0, v1, p, T, t0), _poly(v0, v1, p, T, t0), (v0, v1)


@st.composite
def linear_case(draw):
    v0, v1, T, t0 = draw(VALUES), draw(VALUES), draw(SPANS), draw(st.integers(0, 20))
    return S.linear(v0, v1, T, t0), _poly(v0, v1, 1.0, T, t0), (v0, v1)


@st.composite
def exponential_case(draw):
    v0, T, t0, stair = draw(VALUES), draw(SPANS), draw(st.integers(0, 20)), draw(st.booleans())
    grow = draw(st.booleans())
    v0 = abs(v0) if grow else v0  # the cap end_value bounds growth from v0 >= 0 only
    r = draw(st.floats(1.01, 2.0)) if grow else draw(st.floats(0.05, 1.0))
    end = v0 * draw(st.floats(1.0, 50.0)) if grow else draw(st.one_of(
        st.none(), st.just(v0 * 0.1)))

    def ref(t):
        s = t - t0
        e = math.floor(s / T) if stair else s / T
        v = v0 if s <= 0 or v0 == 0 else v0 * math.exp(min(e * math.log(r), 700.0))
        if end is not None:
            v = max(v, end) if r < 1 else min(v, end)
        return v

    return S.exponential_decay(v0, T, r, t0, stair, end), ref, (v0, end or 0.0)


@st.composite
def piecewise_case(draw):
    v0 = draw(VALUES)
    table = draw(st.dictionaries(st.integers(0, 100), st.floats(0.0, 3.0), max_size=4))

    def ref(t):
        v = v0
        for b in sorted(table):
            v = v * table[b] if t >= b else v
        return v

    return S.piecewise_constant(v0, table), ref, (v0 * 3.0 ** len(table),)


@st.composite
def cosine_case(draw):
    v0, T, alpha, e = draw(VALUES), draw(SPANS), draw(st.floats(-2, 2)), draw(st.floats(0.25, 4))
    return S.cosine_decay(v0, T, alpha, e), _cos(v0, T, alpha, e), (v0, v0 * alpha)


@st.composite
def warmup_cosine_decay_case(draw):
    v0, vp, w, extra = draw(VALUES), draw(VALUES), draw(st.integers(0, 30)), draw(SPANS)
    end, e = (0.0 if vp == 0 else draw(VALUES)), draw(st.floats(0.25, 4))
    return (S.warmup_cosine_decay(v0, vp, w, w + extra, end, e),
            _warm_cos(v0, vp, w, w + extra, end, e), (v0, vp, end))


@st.composite
def warmup_cosine_case(draw):
    v0, vp, w, extra = draw(VALUES), draw(VALUES), draw(st.integers(0, 30)), draw(SPANS)
    end = 0.0 if vp == 0 else draw(VALUES)
    return (S.warmup_cosine(vp, w, w + extra, v0, end), _warm_cos(v0, vp, w, w + extra, end, 1.0),
            (v0, vp, end))


@st.composite
def warmup_constant_case(draw):
    v0, vp, w = draw(VALUES), draw(VALUES), draw(st.integers(0, 30))
    return (S.warmup_constant(v0, vp, w), lambda t: v0 + (vp - v0) * t / w if t < w else vp,
            (v0, vp))


@st.composite
def onecycle_case(draw):
    T, p = draw(st.integers(1, 200)), draw(VALUES)
    ps = draw(st.floats(0.01, 0.9))
    pf = draw(st.floats(ps, 1.0).filter(lambda x: x > ps))
    d, D = draw(st.floats(1.0, 100.0)), draw(st.floats(1.0, 1e4))
    b1, b2 = int(ps * T), int(pf * T)

    def ref(t):
        if t < b1:
            return p / d + (p - p / d) * t / max(b1, 1)
        if t < b2:
            return p + (p / d - p) * (t - b1) / max(b2 - b1, 1)
        if t < T:
            return p / d + (p / (d * D) - p / d) * (t - b2) / max(T - b2, 1)
        return p / (d * D)

    return S.linear_onecycle(T, p, ps, pf, d, D), ref, (p,)


@st.composite
def join_case(draw):
    v0, v1, v2, T = draw(VALUES), draw(VALUES), draw(VALUES), draw(SPANS)
    b = sorted(draw(st.lists(st.integers(0, 60), min_size=2, max_size=2)))
    ref_lin, ref_cos = _poly(v1, v2, 1.0, T, 0), _cos(v2, T, 0.5, 1.0)

    def ref(t):
        return v0 if t < b[0] else ref_lin(t - b[0]) if t < b[1] else ref_cos(t - b[1])

    sched = S.join_schedules([S.constant(v0), S.linear(v1, v2, T), S.cosine_decay(v2, T, 0.5)],
                             b)
    return sched, ref, (v0, v1, v2)


@st.composite
def inverse_sqrt_case(draw):
    p, w = draw(VALUES), draw(st.integers(0, 30))
    return (S.inverse_sqrt(p, w),
            lambda t: p * t / w if t < w else p * math.sqrt(max(w, 1) / max(t, 1)), (p,))


@st.composite
def palm_case(draw):
    c = draw(st.floats(0.05, 2.0))
    return S.palm_beta2(c), lambda t: 1 - (t + 1) ** (-c), (1.0,)


@st.composite
def constant_case(draw):
    v = draw(VALUES)
    return S.constant(v), lambda t: v, (v,)


CASES = {
    "constant": constant_case(), "linear": linear_case(), "polynomial": polynomial_case(),
    "exponential_decay": exponential_case(), "piecewise_constant": piecewise_case(),
    "cosine_decay": cosine_case(), "warmup_cosine_decay": warmup_cosine_decay_case(),
    "warmup_cosine": warmup_cosine_case(), "warmup_constant": warmup_constant_case(),
    "linear_onecycle": onecycle_case(), "join_schedules": join_case(),
    "inverse_sqrt": inverse_sqrt_case(), "palm_beta2": palm_case(),
}


def test_every_constructor_has_a_case():
    constructors = set(S.__all__) - {"Schedule", "as_schedule"}
    assert constructors == set(CASES) == set(VALID) | {"join_schedules"}


@settings(max_examples=15, **SETTINGS)
@given(data=st.data())
@pytest.mark.parametrize("name", sorted(CASES))
def test_values_match_float64_formulas(name, data):
    sched, ref, magnitudes = data.draw(CASES[name])
    assert isinstance(sched, S.Schedule)
    scale = max(abs(m) for m in magnitudes) or 1.0
    for t in STEPS:
        want = ref(t)
        # Python steps and float64 tensor steps: float64 throughout
        assert sched(t) == pytest.approx(want, rel=1e-9, abs=1e-12 * scale), (sched, t)
        v64 = sched(torch.tensor(t), dtype=torch.float64)
        assert float(v64) == pytest.approx(want, rel=1e-9, abs=1e-12 * scale), (sched, t)
        # float32 tensor steps (the default): float32 rounding of the same formula
        v32 = sched(torch.tensor(t))
        if name != "constant":
            assert v32.dtype == torch.float32 and v64.dtype == torch.float64
        assert float(v32) == pytest.approx(want, rel=1e-5, abs=1e-5 * scale), (sched, t)
    start, start_tensor = sched(0), float(sched(torch.tensor(0)))
    for t in NEGATIVE:
        assert sched(t) == start and math.isfinite(start)
        assert float(sched(torch.tensor(t))) == start_tensor and math.isfinite(start_tensor)


def test_exponential_growth_from_zero_is_zero_not_nan():
    # r^p overflows (float32 past 2^128, float64 past 2^1024) and 0 * inf was NaN
    f = S.exponential_decay(0.0, 1, 2.0, end_value=0.0)
    assert float(f(torch.tensor(150))) == 0.0 and f(2000) == 0.0
    g = S.exponential_decay(0.0, 1, 2.0)
    assert float(g(torch.tensor(150))) == 0.0 and g(2000) == 0.0
    h = S.exponential_decay(0.5, 1, 2.0, end_value=3.0)
    assert float(h(torch.tensor(150))) == 3.0 and h(2000) == 3.0
