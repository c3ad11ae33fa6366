"""The cyclic/restarting schedules against optax 0.2.8 and torch.optim.lr_scheduler at every
step of long runs (float64), and optax's ``*_schedule`` names as aliases."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from test_breadth_common import jnp, optax

import funcopt as fo
from funcopt import schedules as S

STEPS = np.arange(0, 400)
SGDR = [dict(init_value=0.0, peak_value=1.0, warmup_steps=10, decay_steps=100),
        dict(init_value=0.1, peak_value=0.5, warmup_steps=5, decay_steps=60, end_value=0.01),
        dict(init_value=0.0, peak_value=0.3, warmup_steps=0, decay_steps=150, exponent=2.0)]

OPTAX = {
    "cosine_onecycle": (lambda: S.cosine_onecycle(300, 2.0),
                        lambda: optax.cosine_onecycle_schedule(300, 2.0)),
    "cosine_onecycle_args": (
        lambda: S.cosine_onecycle(151, 1.0, pct_start=0.1, div_factor=5, final_div_factor=100),
        lambda: optax.cosine_onecycle_schedule(151, 1.0, 0.1, 5, 100)),
    "sgdr": (lambda: S.sgdr(SGDR), lambda: optax.sgdr_schedule(SGDR)),
    "warmup_exponential_decay": (
        lambda: S.warmup_exponential_decay(0.0, 1.0, 20, 30, 0.5, 10, False, 0.01),
        lambda: optax.warmup_exponential_decay_schedule(0.0, 1.0, 20, 30, 0.5, 10, False, 0.01)),
    "warmup_exponential_decay_staircase": (
        lambda: S.warmup_exponential_decay(0.1, 2.0, 7, 25, 0.8, staircase=True),
        lambda: optax.warmup_exponential_decay_schedule(0.1, 2.0, 7, 25, 0.8, staircase=True)),
    "piecewise_linear": (
        lambda: S.piecewise_interpolate("linear", 1.0, {50: 2.0, 120: 0.1, 300: 0.5}),
        lambda: optax.piecewise_interpolate_schedule("linear", 1.0, {50: 2.0, 120: 0.1, 300: 0.5})),
    "piecewise_cosine": (
        lambda: S.piecewise_interpolate("cosine", 0.5, {0: 3.0, 80: 0.2, 81: 4.0}),
        lambda: optax.piecewise_interpolate_schedule("cosine", 0.5, {0: 3.0, 80: 0.2, 81: 4.0})),
}


@pytest.mark.parametrize("name", sorted(OPTAX))
def test_against_optax(name):
    make, ref = OPTAX[name]
    s, r = make(), ref()
    want = np.array([float(r(jnp.asarray(t))) for t in STEPS])
    got_tensor = np.array([float(s(torch.tensor(int(t)), dtype=torch.float64)) for t in STEPS])
    got_float = np.array([s(int(t)) for t in STEPS])
    np.testing.assert_allclose(got_tensor, want, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(got_float, want, rtol=1e-12, atol=1e-15)
    assert np.ptp(want) > 0.1


def _torch_lrs(make_sched, steps=400):
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = make_sched(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return np.array(out)


TORCH = {
    "triangular": (lambda: S.cyclic(0.01, 0.5, 20),
                   lambda o: torch.optim.lr_scheduler.CyclicLR(
                       o, 0.01, 0.5, 20, cycle_momentum=False)),
    "triangular_asym": (lambda: S.cyclic(0.1, 1.0, 7, 30),
                        lambda o: torch.optim.lr_scheduler.CyclicLR(
                            o, 0.1, 1.0, 7, 30, cycle_momentum=False)),
    "triangular2": (lambda: S.cyclic(0.01, 0.5, 15, 25, mode="triangular2"),
                    lambda o: torch.optim.lr_scheduler.CyclicLR(
                        o, 0.01, 0.5, 15, 25, mode="triangular2", cycle_momentum=False)),
    "exp_range": (lambda: S.cyclic(0.01, 0.5, 10, mode="exp_range", gamma=0.995),
                  lambda o: torch.optim.lr_scheduler.CyclicLR(
                      o, 0.01, 0.5, 10, mode="exp_range", gamma=0.995, cycle_momentum=False)),
    "restarts": (lambda: S.cosine_warm_restarts(1.0, 25),
                 lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, 25)),
    "restarts_mult2": (lambda: S.cosine_warm_restarts(1.0, 10, 2, 0.05),
                       lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
                           o, 10, 2, 0.05)),
    "restarts_mult3": (lambda: S.cosine_warm_restarts(1.0, 3, 3),
                       lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, 3, 3)),
}


@pytest.mark.parametrize("name", sorted(TORCH))
def test_against_torch_lr_scheduler(name):
    make, ref = TORCH[name]
    s, want = make(), _torch_lrs(ref)
    got_tensor = np.array([float(s(torch.tensor(int(t)), dtype=torch.float64)) for t in STEPS])
    got_float = np.array([s(int(t)) for t in STEPS])
    np.testing.assert_allclose(got_tensor, want, rtol=1e-8, atol=1e-14)
    np.testing.assert_allclose(got_float, want, rtol=1e-8, atol=1e-14)
    assert np.ptp(want) > 0.1


def test_cyclic_drives_sgd_as_torch():
    """The schedule inside a transform: SGD with fo.cyclic equals SGD under CyclicLR."""
    w0 = torch.linspace(-1, 2, 5, dtype=torch.float64)
    p = torch.nn.Parameter(w0.clone())
    opt = torch.optim.SGD([p], lr=1.0)
    sched = torch.optim.lr_scheduler.CyclicLR(opt, 0.01, 0.2, 6, mode="triangular2",
                                              cycle_momentum=False)
    sched64 = S.cyclic(0.01, 0.2, 6, mode="triangular2")
    tx = fo.sgd(lambda t: sched64(t, dtype=torch.float64))  # a float32 rate would cost 1e-7
    q = {"w": w0.clone()}
    st = tx.init(q)
    for _ in range(40):
        opt.zero_grad()
        (torch.sin(p) * p).sum().backward()
        opt.step()
        sched.step()
        u, st = tx.update({"w": torch.sin(q["w"]) + q["w"] * torch.cos(q["w"])}, st, q)
        q = fo.apply_updates(q, u)
    torch.testing.assert_close(q["w"], p.detach(), rtol=1e-8, atol=0)


@pytest.mark.parametrize("name", [n for n in dir(optax) if n.endswith("_schedule")
                                  and n not in ("scale_by_schedule", "inject_hyperparams")])
def test_optax_names_are_aliases(name):
    fn = getattr(S, name)
    ref = getattr(optax, name)
    assert list(inspect.signature(fn).parameters) == list(inspect.signature(ref).parameters)


@pytest.mark.parametrize("make, match", [
    (lambda: S.piecewise_interpolate("cubic", 1.0), "interpolate_type"),
    (lambda: S.piecewise_interpolate("linear", 1.0, {10: -1.0}), "scale"),
    (lambda: S.cosine_onecycle(0, 1.0), "transition_steps"),
    (lambda: S.cosine_onecycle(10, 1.0, pct_start=1.5), "pct_start"),
    (lambda: S.sgdr([]), "cosine_kwargs"),
    (lambda: S.warmup_exponential_decay(0.0, 1.0, -1, 10, 0.5), "warmup_steps"),
    (lambda: S.warmup_exponential_decay(0.0, 1.0, 5, 10, -0.5), "decay_rate"),
    (lambda: S.cyclic(0.1, 1.0, 0), "step_size_up"),
    (lambda: S.cyclic(0.1, 1.0, 5, mode="sine"), "mode"),
    (lambda: S.cyclic(0.1, 1.0, 5, gamma=0.0), "gamma"),
    (lambda: S.cosine_warm_restarts(1.0, 0), "t_0"),
    (lambda: S.cosine_warm_restarts(1.0, 5, t_mult=0), "t_mult"),
])
def test_bad_arguments_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()
