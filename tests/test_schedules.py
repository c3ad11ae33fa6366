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
