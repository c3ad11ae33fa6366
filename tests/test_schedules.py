"""Schedules against optax (where it has them) and float64 transcriptions (where it does not)."""

import math

import numpy as np
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from funcopt import schedules as S

optax = pytest.importorskip("optax")

STEPS = list(range(0, 130)) + [199, 200, 201, 500, 1000, 12345]

# (funcopt schedule, optax schedule) pairs built from the same arguments.
PAIRS = {
    "constant": (S.constant(0.3), optax.constant_schedule(0.3)),
    "linear": (S.linear(1.0, 0.1, 50, 10), optax.linear_schedule(1.0, 0.1, 50, 10)),
    "linear_up": (S.linear(0.0, 2.0, 100), optax.linear_schedule(0.0, 2.0, 100)),
    "polynomial": (S.polynomial(1.0, 0.01, 2.5, 80, 5),
                   optax.polynomial_schedule(1.0, 0.01, 2.5, 80, 5)),
    "exponential": (S.exponential_decay(0.5, 10, 0.9), optax.exponential_decay(0.5, 10, 0.9)),
    "exponential_staircase_end": (
        S.exponential_decay(0.5, 7, 0.8, transition_begin=3, staircase=True, end_value=0.1),
        optax.exponential_decay(0.5, 7, 0.8, transition_begin=3, staircase=True, end_value=0.1)),
    "exponential_growth_cap": (
        S.exponential_decay(0.1, 10, 1.5, end_value=2.0),
        optax.exponential_decay(0.1, 10, 1.5, end_value=2.0)),
    "piecewise_constant": (
        S.piecewise_constant(1.0, {10: 0.5, 40: 0.1, 100: 3.0}),
        optax.piecewise_constant_schedule(1.0, {10: 0.5, 40: 0.1, 100: 3.0})),
    "cosine_decay": (S.cosine_decay(2.0, 100, alpha=0.1, exponent=1.5),
                     optax.cosine_decay_schedule(2.0, 100, alpha=0.1, exponent=1.5)),
    "warmup_cosine_decay": (
        S.warmup_cosine_decay(0.01, 1.0, 20, 150, end_value=0.05, exponent=2.0),
        optax.warmup_cosine_decay_schedule(0.01, 1.0, 20, 150, end_value=0.05, exponent=2.0)),
    "warmup_cosine": (S.warmup_cosine(1e-3, 10, 120),
                      optax.warmup_cosine_decay_schedule(0.0, 1e-3, 10, 120)),
    "warmup_constant": (S.warmup_constant(0.0, 0.5, 30),
                        optax.warmup_constant_schedule(0.0, 0.5, 30)),
    "linear_onecycle": (S.linear_onecycle(200, 1.0), optax.linear_onecycle_schedule(200, 1.0)),
    "linear_onecycle_args": (
        S.linear_onecycle(101, 3.0, pct_start=0.2, pct_final=0.7, div_factor=10,
                          final_div_factor=100),
        optax.linear_onecycle_schedule(101, 3.0, pct_start=0.2, pct_final=0.7, div_factor=10,
                                       final_div_factor=100)),
    "join": (S.join_schedules([S.constant(0.1), S.linear(1.0, 0.0, 50)], [20]),
             optax.join_schedules([optax.constant_schedule(0.1),
                                   optax.linear_schedule(1.0, 0.0, 50)], [20])),
}


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_matches_optax(name):
    ours, ref = PAIRS[name]
    expected = np.array([float(ref(t)) for t in STEPS])
    as_int = np.array([float(ours(t)) for t in STEPS])
    as_tensor = np.array([float(ours(torch.tensor(t))) for t in STEPS])
    # optax computes in float32; ours in float64 (int steps) or float32 (tensor steps)
    np.testing.assert_allclose(as_int, expected, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(as_tensor, expected, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_return_types(name):
    ours, _ = PAIRS[name]
    assert isinstance(ours(3), float)
    v = ours(torch.tensor(3))
    if name != "constant":
        assert isinstance(v, torch.Tensor) and v.ndim == 0 and v.dtype == torch.float32


def test_palm_beta2_matches_heavyball_formula():
    # HeavyBall 3.2.1 chainable.palm_beta2: beta2 = 1 - step ** -beta2_scale, step 1-based.
    for scale in (0.8, 0.5):
        f = S.palm_beta2(scale)
        for t in range(0, 300, 7):
            k = t + 1
            assert f(t) == pytest.approx(1.0 - k ** (-scale), rel=1e-12, abs=1e-15)
            assert float(f(torch.tensor(t))) == pytest.approx(1.0 - k ** (-scale), rel=1e-6)
    assert S.palm_beta2()(0) == 0.0


def test_palm_beta2_against_heavyball_group_value():
    heavyball_utils = pytest.importorskip("heavyball.utils")
    for step in (1, 2, 10, 1000):
        group = {"palm": True, "beta2_scale": 0.8, "step": step, "betas": (0.9, 0.99)}
        assert S.palm_beta2(0.8)(step - 1) == pytest.approx(
            float(heavyball_utils.get_beta2(group)), rel=1e-12)


def test_heavyball_palm_beta2_is_the_schedule_at_the_1_based_step():
    # one function, two conventions: funcopt.heavyball's takes the 1-based step t, the
    # schedule the 0-based count t - 1; float64 reference 1 - max(t, 1) ** -scale
    from funcopt.heavyball import palm_beta2 as one_based

    for scale in (0.8, 0.5, 1.7):
        f, g = S.palm_beta2(scale), one_based(scale)
        for t in (0, 1, 2, 3, 10, 999, 2**24 + 1, 10**9):
            ref = 1.0 - torch.clamp(torch.tensor(float(t), dtype=torch.float64), min=1.0) ** -scale
            got = g(torch.tensor(t))
            assert got.dtype == torch.float64 and torch.equal(got, ref)
            assert g(t) == f(max(t, 1) - 1) == pytest.approx(float(ref), rel=1e-15)


def test_inverse_sqrt_transcription():
    f = S.inverse_sqrt(2.0, warmup_steps=16)
    for t in range(0, 400, 3):
        ref = 2.0 * t / 16 if t < 16 else 2.0 * math.sqrt(16 / t)
        assert f(t) == pytest.approx(ref, rel=1e-12)
        assert float(f(torch.tensor(t))) == pytest.approx(ref, rel=1e-6)
    g = S.inverse_sqrt(1.0)
    assert g(0) == 1.0 and g(1) == 1.0 and g(4) == pytest.approx(0.5)


@pytest.mark.parametrize("bad", [
    lambda: S.linear(1.0, 0.0, 0),
    lambda: S.cosine_decay(1.0, 0),
    lambda: S.exponential_decay(1.0, 10, 0.0),
    lambda: S.warmup_cosine_decay(0.0, 1.0, 10, 10),
    lambda: S.piecewise_constant(1.0, {3: -1.0}),
    lambda: S.join_schedules([S.constant(1.0)], [3]),
    lambda: S.palm_beta2(0.0),
])
def test_bad_arguments_raise(bad):
    with pytest.raises(ValueError):
        bad()


def test_bad_step_raises():
    f = S.linear(1.0, 0.0, 10)
    with pytest.raises(ValueError, match="0-d"):
        f(torch.arange(3))
    with pytest.raises(TypeError):
        f("3")


def test_tensor_step_keeps_device_and_is_graph_friendly():
    f = S.warmup_cosine_decay(0.0, 1.0, 5, 50)
    t = torch.tensor(7, dtype=torch.int64)
    v = f(t)
    assert v.device == t.device
    # traced with fake tensors (no values: a host sync would fail), then replayed at other steps
    gm = make_fx(f, tracing_mode="fake")(t)
    for step in (0, 3, 7, 40, 60):
        assert torch.equal(gm(torch.tensor(step)), f(torch.tensor(step)))


def test_host_sync_is_detected_by_fake_tracing():
    # guards the test above: a schedule that reads the step's value cannot be traced
    with pytest.raises(RuntimeError, match="data-dependent"):
        make_fx(lambda step: torch.tensor(float(step.item())), tracing_mode="fake")(
            torch.tensor(1))


# --------------------------------------------------------------------------- the Schedule type

EXTRA = {"inverse_sqrt": S.inverse_sqrt(2.0, 16), "palm_beta2": S.palm_beta2(0.8),
         "as_schedule": S.as_schedule(lambda t: 0.5 * t + 1.0)}
ALL = {**{k: v for k, (v, _) in PAIRS.items()}, **EXTRA}


@pytest.mark.parametrize("name", sorted(ALL))
def test_constructors_return_schedules(name):
    sched = ALL[name]
    assert isinstance(sched, S.Schedule) and callable(sched)
    assert repr(sched).startswith(f"{sched.name}(")
    assert S.as_schedule(sched) is sched


def test_repr_names_the_constructor_and_its_arguments():
    assert repr(S.linear(1.0, 0.1, 50, 10)) == (
        "linear(init_value=1.0, end_value=0.1, transition_steps=50, transition_begin=10)")
    assert repr(S.warmup_cosine(1e-3, 10, 120)) == (
        "warmup_cosine(peak_value=0.001, warmup_steps=10, decay_steps=120, init_value=0.0, "
        "end_value=0.0)")

    def my_lr(t):
        return 0.1

    assert repr(S.join_schedules([S.constant(0.1), my_lr], [5])) == (
        "join_schedules(schedules=[constant(value=0.1), as_schedule(fn="
        "test_repr_names_the_constructor_and_its_arguments.<locals>.my_lr)], boundaries=[5])")
    assert dict(S.palm_beta2(0.5).args) == {"beta2_scale": 0.5}


def test_schedule_is_frozen_and_copies_are_itself():
    import copy

    sched = S.cosine_decay(1.0, 10)
    with pytest.raises(AttributeError, match="immutable"):
        sched.name = "other"
    with pytest.raises(AttributeError, match="immutable"):
        del sched.args
    assert copy.copy(sched) is sched and copy.deepcopy({"lr": sched})["lr"] is sched


def test_as_schedule_wraps_plain_callables():
    def fn(t):
        return 1.0 / (1.0 + t)

    sched = S.as_schedule(fn)
    assert isinstance(sched, S.Schedule) and S.as_schedule(sched) is sched
    assert dict(sched.args) == {"fn": fn}
    assert sched(3) == 0.25
    t = torch.tensor(3)
    assert torch.equal(sched(t), fn(t))  # the step passes unchanged: int64 in, float32 out
    assert sched(t, dtype=torch.float64).dtype == torch.float64
    assert sched(-3) == fn(-3)  # a plain function sees negative steps as they are
    with pytest.raises(TypeError, match="as_schedule: fn must be a callable"):
        S.as_schedule(0.1)


@pytest.mark.parametrize("name", sorted(ALL))
def test_float64_dtype_matches_python_steps(name):
    sched = ALL[name]
    for t in STEPS:
        v = sched(torch.tensor(t), dtype=torch.float64)
        if name != "constant":
            assert v.dtype == torch.float64
        assert float(v) == pytest.approx(sched(t), rel=1e-13, abs=1e-15)


def test_float64_dtype_resolves_large_steps():
    # float32 rounds 2**24 + 1 to 2**24; float64 keeps it
    f = S.linear(0.0, 2.0**25, 2**25)
    t = torch.tensor(2**24 + 1)
    assert float(f(t, dtype=torch.float64)) == 2**24 + 1 == f(2**24 + 1)
    assert float(f(t)) == 2**24


@pytest.mark.parametrize("name", sorted(ALL))
def test_compiles_fullgraph_and_vmaps(name):
    sched = ALL[name]
    torch._dynamo.reset()
    f32 = torch.compile(lambda t: sched(t), fullgraph=True, backend="eager")
    f64 = torch.compile(lambda t: sched(t, dtype=torch.float64), fullgraph=True, backend="eager")
    steps = torch.arange(-3, 130)
    for t in (0, 5, 29, 129):
        assert f32(torch.tensor(t)) == sched(torch.tensor(t))
        assert f64(torch.tensor(t)) == sched(torch.tensor(t), dtype=torch.float64)
    if name != "constant":  # constant returns its number, which vmap cannot batch
        batched = torch.func.vmap(sched)(steps)
        # vectorised pow/cos kernels may differ from the 0-d ones in the last bit
        torch.testing.assert_close(batched, torch.stack([sched(t) for t in steps]),
                                   rtol=1e-6, atol=1e-7)
