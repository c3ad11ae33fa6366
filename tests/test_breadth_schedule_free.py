"""schedule_free with an optax-style base (one that already includes the learning rate)
against optax.contrib.schedule_free in float64 (30 steps, rtol 1e-12), the evaluation point in
optax's argument order, and the refusal of weight decay / warmup given twice."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_breadth_common import P0, assert_same_path, jax, jax_loss, jnp, moved, optax, torch_loss

import funcopt as fo

DEFAULT_DTYPE = torch.float64
LR = fo.schedules.warmup_constant(0.0, 0.2, 5)
_LR_J = optax.warmup_constant_schedule(0.0, 0.2, 5)


def LR_J(count):  # optax evaluates a schedule on its int32 counter in float32: ask for float64
    return _LR_J(jnp.asarray(count, dtype=jnp.float64))


CASES = {
    "adamw": (lambda: fo.schedule_free(fo.adamw(0.1, weight_decay=0.01), 0.1),
              lambda: optax.contrib.schedule_free(optax.adamw(0.1, weight_decay=0.01), 0.1)),
    "sgd": (lambda: fo.schedule_free(fo.sgd(0.1), 0.1, b1=0.8),
            lambda: optax.contrib.schedule_free(optax.sgd(0.1), 0.1, b1=0.8)),
    # the base's own schedule is given in float64 (scale_by_learning_rate evaluates a schedule
    # in float32); schedule_free's weighting evaluates LR in the parameters' float64 itself
    "schedule": (lambda: fo.schedule_free(fo.adam(lambda t: LR(t, dtype=torch.float64)), LR,
                                          weight_lr_power=1.5),
                 lambda: optax.contrib.schedule_free(optax.adam(LR_J), LR_J, weight_lr_power=1.5)),
    "declared": (lambda: fo.schedule_free(fo.chain(fo.scale_by_adam(), fo.scale(-0.1)), 0.1,
                                          base_includes_learning_rate=True),
                 lambda: optax.contrib.schedule_free(optax.adam(0.1), 0.1)),
    "direction": (lambda: fo.schedule_free(fo.scale_by_adam(), 0.1),
                  lambda: optax.contrib.schedule_free(optax.adam(0.1), 0.1)),
    "adamw_alias": (lambda: fo.schedule_free_adamw(0.05, b1=0.9, b2=0.99, weight_decay=0.1),
                    lambda: optax.contrib.schedule_free_adamw(0.05, b1=0.9, b2=0.99,
                                                              weight_decay=0.1)),
}


def _runs(name):
    make, ref = CASES[name]
    p = {k: torch.tensor(v) for k, v in P0.items()}
    tx, state, path = make(), None, []
    state = tx.init(p)
    pj = {k: jnp.asarray(v) for k, v in P0.items()}
    rx = ref()
    sj, path_j = rx.init(pj), []
    for _ in range(30):
        u, state = tx.update(torch.func.grad(torch_loss)(p), state, p)
        p = fo.apply_updates(p, u)
        path.append({k: v.numpy().copy() for k, v in p.items()})
        uj, sj = rx.update(jax.grad(jax_loss)(pj), sj, pj)
        pj = optax.apply_updates(pj, uj)
        path_j.append({k: np.asarray(v) for k, v in pj.items()})
    return path, path_j, (state, p), (sj, pj)


@pytest.mark.parametrize("name", sorted(CASES))
def test_schedule_free_against_optax(name):
    got, want, (state, p), (sj, pj) = _runs(name)
    assert moved(want) > 1e-2
    assert_same_path(got, want, rtol=1e-12, atol=1e-14, what=name)
    ev = fo.schedule_free_eval_params(state, p)
    ev_j = optax.contrib.schedule_free_eval_params(sj, pj)
    for k in ev:
        np.testing.assert_allclose(ev[k].numpy(), np.asarray(ev_j[k]), rtol=1e-12, atol=1e-14)
    ev_old_order = fo.schedule_free_eval_params(p, state)
    assert all(torch.equal(ev[k], ev_old_order[k]) for k in ev)
    sf = state if isinstance(state, fo.ScheduleFreeState) else state[0]
    assert sf.weight_sum.dtype == sf.lr_max.dtype == sf.learning_rate.dtype == torch.float64


def test_optax_style_base_goes_downhill():
    """A port of optax code (base = fo.sgd(lr)) descends: before, its step was taken uphill."""
    p = {k: torch.tensor(v) for k, v in P0.items()}
    tx = fo.schedule_free(fo.sgd(0.05), 0.05)
    s = tx.init(p)
    start = float(torch_loss(p))
    for _ in range(30):
        u, s = tx.update(torch.func.grad(torch_loss)(p), s, p)
        p = fo.apply_updates(p, u)
    assert float(torch_loss(fo.schedule_free_eval_params(s, p))) < start - 1.0


@pytest.mark.parametrize("kw", [{"weight_decay": 0.1}, {"warmup_steps": 10}])
def test_optax_style_base_refuses_double_settings(kw):
    tx = fo.schedule_free(fo.sgd(0.1), 0.1, **kw)
    with pytest.raises(ValueError, match="already includes the learning rate"):
        tx.init({"a": torch.ones(2)})


def test_bad_flag():
    with pytest.raises(TypeError, match="base_includes_learning_rate"):
        fo.schedule_free(fo.sgd(0.1), 0.1, base_includes_learning_rate="yes")


def test_schedule_in_float64_for_float64_params():
    """A schedule learning rate is evaluated in float64: 0.1 is not rounded to float32."""
    sched = fo.schedules.constant(0.1)
    lin = fo.schedules.linear(0.1, 0.3, 7)
    for lr in (sched, lin):
        tx = fo.schedule_free(fo.scale_by_adam(), lr)
        p = {"a": torch.ones(3, dtype=torch.float64)}
        s = tx.init(p)
        _, s = tx.update(p, s, p)
        _, s = tx.update(p, s, p)
        assert s.learning_rate.dtype == torch.float64
        assert float(s.learning_rate) == lr(1)
