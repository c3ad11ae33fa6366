"""multi_steps against optax.MultiSteps (float64, 30 micro-steps): mean and sum accumulation,
a schedule for k, and the skip predicates on gradients that are sometimes NaN or large."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from test_breadth_common import P0, assert_same_path, jax, jax_loss, jnp, moved, optax, torch_loss

import funcopt as fo

BAD = {4: float("nan"), 9: float("inf"), 13: 1e3}  # micro-step -> what one gradient entry becomes


def _poison(g, i, lib):
    if i not in BAD:
        return g
    if lib == "torch":
        w = g["w"].clone()
        w[0, 0] = BAD[i]
        return {**g, "w": w}
    return {**g, "w": g["w"].at[0, 0].set(BAD[i])}


def _run_fo(tx, steps=30, poison=False):
    p = {k: torch.tensor(v) for k, v in P0.items()}
    state, out = tx.init(p), []
    for i in range(steps):
        g = torch.func.grad(torch_loss)(p)
        g = _poison(g, i, "torch") if poison else g
        u, state = tx.update(g, state, p)
        p = fo.apply_updates(p, u)
        out.append({k: v.numpy().copy() for k, v in p.items()})
    return out, state


def _run_optax(tx, steps=30, poison=False):
    p = {k: jnp.asarray(v) for k, v in P0.items()}
    state, out = tx.init(p), []
    update, grad = jax.jit(tx.update), jax.jit(jax.grad(jax_loss))  # eager jax dispatch is slow
    for i in range(steps):
        g = grad(p)
        g = _poison(g, i, "jax") if poison else g
        u, state = update(g, state, p)
        p = optax.apply_updates(p, u)
        out.append({k: np.asarray(v) for k, v in p.items()})
    return out, state


def _k(step):
    return 2 + (step >= 3)


CASES = {
    "mean": (lambda: fo.multi_steps(fo.adam(0.1), 3),
             lambda: functools.partial(optax.MultiSteps, accumulator_dtype=jnp.float64)(optax.adam(0.1), 3), False),
    "sum": (lambda: fo.multi_steps(fo.sgd(0.02), 4, use_grad_mean=False),
            lambda: functools.partial(optax.MultiSteps, accumulator_dtype=jnp.float64)(optax.sgd(0.02), 4, use_grad_mean=False), False),
    "schedule": (lambda: fo.multi_steps(fo.adam(0.1), lambda s: 2 + (s >= 3).long()),
                 lambda: functools.partial(optax.MultiSteps, accumulator_dtype=jnp.float64)(optax.adam(0.1), lambda s: 2 + (s >= 3)), False),
    "skip_not_finite": (
        lambda: fo.multi_steps(fo.adam(0.1), 3, should_skip_update_fn=fo.skip_not_finite),
        lambda: functools.partial(optax.MultiSteps, accumulator_dtype=jnp.float64)(optax.adam(0.1), 3, should_skip_update_fn=optax.skip_not_finite),
        True),
    "skip_large": (
        lambda: fo.multi_steps(fo.sgd(0.05), 2, False, functools.partial(
            fo.skip_large_updates, max_squared_norm=100.0)),
        lambda: functools.partial(optax.MultiSteps, accumulator_dtype=jnp.float64)(optax.sgd(0.05), 2, False, functools.partial(
            optax.skip_large_updates, max_squared_norm=100.0)),
        True),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_multi_steps_against_optax(name):
    make, ref, poison = CASES[name]
    # optax 0.2.8 keeps acc_grads in float32 unless told (accumulator_dtype): ask for float64
    want, sj = _run_optax(ref().gradient_transformation(), poison=poison)
    got, s = _run_fo(make(), poison=poison)
    assert moved(want) > 1e-3
    assert_same_path(got, want, what=name)
    assert int(s.mini_step) == int(sj.mini_step) and int(s.gradient_step) == int(sj.gradient_step)
    if poison:
        assert np.isfinite(got[-1]["w"]).all()


def test_multi_steps_skip_state_reports_the_predicate():
    tx = fo.multi_steps(fo.sgd(0.1), 2, should_skip_update_fn=fo.skip_not_finite)
    p = {"a": torch.ones(3)}
    s = tx.init(p)
    assert int(s.skip_state["num_not_finite"]) == 0
    u, s = tx.update({"a": torch.tensor([1.0, float("nan"), 2.0])}, s, p)
    assert bool(s.skip_state["should_skip"]) and int(s.skip_state["num_not_finite"]) == 1
    assert int(s.mini_step) == 0 and torch.equal(u["a"], torch.zeros(3))


@pytest.mark.parametrize("kwargs, err", [
    ({"every_k_schedule": 0}, ValueError), ({"every_k_schedule": 2, "use_grad_mean": 1}, TypeError),
    ({"every_k_schedule": 2, "should_skip_update_fn": 3}, TypeError),
])
def test_multi_steps_rejects_bad_arguments(kwargs, err):
    with pytest.raises(err, match="multi_steps"):
        fo.multi_steps(fo.sgd(0.1), **kwargs)


def test_multi_steps_rejects_a_predicate_that_returns_no_bool():
    tx = fo.multi_steps(fo.sgd(0.1), 2, should_skip_update_fn=lambda u, s, p: (0.0, ()))
    p = {"a": torch.ones(2)}
    with pytest.raises(TypeError, match="0-d bool"):
        tx.update(p, tx.init(p), p)
