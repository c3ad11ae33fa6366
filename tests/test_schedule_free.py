"""Schedule-Free AdamW / SGD against schedulefree 1.4.1 (the reference package)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from funcopt.base import apply_updates
from funcopt.transforms.schedule_free import (
    schedule_free_adamw,
    schedule_free_eval_params,
    schedule_free_sgd,
)

schedulefree = pytest.importorskip("schedulefree")


def _problem(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    params = {"w": torch.randn(5, 3, generator=g, dtype=dtype),
              "b": torch.randn(3, generator=g, dtype=dtype)}
    x = torch.randn(16, 5, generator=g, dtype=dtype)
    y = torch.randn(16, 3, generator=g, dtype=dtype)

    def loss(p):
        return ((x @ p["w"] + p["b"] - y) ** 2).mean() + (p["w"] ** 4).sum() * 1e-2
    return params, loss


def _grads(loss, params):
    p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    return dict(zip(p, torch.autograd.grad(loss(p), list(p.values()))))


def _run_reference(opt_cls, kwargs, params, loss, steps):
    ref = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    opt = opt_cls(list(ref.values()), **kwargs)
    opt.train()
    for _ in range(steps):
        opt.zero_grad()
        loss(ref).backward()
        opt.step()
    train = {k: v.detach().clone() for k, v in ref.items()}
    opt.eval()
    return train, {k: v.detach().clone() for k, v in ref.items()}


def _run_funcopt(tx, params, loss, steps):
    state = tx.init(params)
    for _ in range(steps):
        updates, state = tx.update(_grads(loss, params), state, params)
        params = apply_updates(params, updates)
    return params, schedule_free_eval_params(params, state)


CASES = [
    (schedulefree.AdamWScheduleFree, dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8),
     lambda: schedule_free_adamw(0.01, b1=0.9, b2=0.999, eps=1e-8)),
    (schedulefree.AdamWScheduleFree,
     dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, warmup_steps=10, r=0.5,
          weight_lr_power=1.5),
     lambda: schedule_free_adamw(0.02, b1=0.8, b2=0.99, eps=1e-6, weight_decay=0.1,
                                 warmup_steps=10, r=0.5, weight_lr_power=1.5)),
    (schedulefree.SGDScheduleFree, dict(lr=0.05, momentum=0.9),
     lambda: schedule_free_sgd(0.05, b1=0.9)),
    (schedulefree.SGDScheduleFree,
     dict(lr=0.05, momentum=0.7, weight_decay=0.01, warmup_steps=7, r=1.0, weight_lr_power=2.0),
     lambda: schedule_free_sgd(0.05, b1=0.7, weight_decay=0.01, warmup_steps=7, r=1.0)),
]


@pytest.mark.parametrize("opt_cls,kwargs,make", CASES)
def test_matches_schedulefree(opt_cls, kwargs, make):
    """float64 throughout (the scalars too): schedulefree's numbers to rounding."""
    params, loss = _problem()
    ref_train, ref_eval = _run_reference(opt_cls, kwargs, params, loss, 50)
    train, evalp = _run_funcopt(make(), params, loss, 50)
    for k in params:
        torch.testing.assert_close(train[k], ref_train[k], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(evalp[k], ref_eval[k], rtol=1e-10, atol=1e-12)


def test_learning_rate_state_is_used():
    params, loss = _problem()
    tx = schedule_free_sgd(0.05)
    state = tx.init(params)
    state = state._replace(learning_rate=torch.tensor(0.0))
    updates, _ = tx.update(_grads(loss, params), state, params)
    # zero learning rate: no weight (0/0 -> 0), y unchanged
    for u in updates.values():
        assert torch.equal(u, torch.zeros_like(u))


def test_schedule_learning_rate_stored():
    params, loss = _problem()
    tx = schedule_free_adamw(lambda c: 0.1 / (1.0 + c))
    state = tx.init(params)
    for _ in range(3):
        _, state = tx.update(_grads(loss, params), state, params)
    # float64 parameters: the schedule-free scalars are float64 too
    torch.testing.assert_close(state.learning_rate, torch.tensor(0.1 / 3.0, dtype=torch.float64))


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**16), st.sampled_from([torch.float32, torch.float64]))
def test_pure_and_dtype(seed, dtype):
    params, loss = _problem(seed, dtype)
    tx = schedule_free_adamw(0.01, weight_decay=0.1)
    state = tx.init(params)
    grads = _grads(loss, params)
    before = {k: v.clone() for k, v in params.items()}
    gbefore = {k: v.clone() for k, v in grads.items()}
    updates, new_state = tx.update(grads, state, params)
    for k in params:
        assert torch.equal(params[k], before[k]) and torch.equal(grads[k], gbefore[k])
        assert updates[k].dtype == dtype and updates[k].shape == params[k].shape
    assert new_state.count.dtype == torch.int64 and new_state.count.dim() == 0


def test_missing_params_error():
    params, loss = _problem()
    tx = schedule_free_sgd(0.1)
    with pytest.raises(ValueError, match="needs the current parameters"):
        tx.update(_grads(loss, params), tx.init(params))


def test_eval_params_needs_state():
    params, _ = _problem()
    with pytest.raises(ValueError, match="no ScheduleFreeState"):
        schedule_free_eval_params(params, ())


def test_checkpoint_roundtrip(tmp_path):
    params, loss = _problem()
    tx = schedule_free_adamw(0.01, warmup_steps=3)
    state = tx.init(params)
    for _ in range(3):
        u, state = tx.update(_grads(loss, params), state, params)
        params = apply_updates(params, u)
    torch.save(state, tmp_path / "s.pt")
    loaded = torch.load(tmp_path / "s.pt", weights_only=False)
    g = _grads(loss, params)
    a, _ = tx.update(g, state, params)
    b, _ = tx.update(g, loaded, params)
    for k in a:
        assert torch.equal(a[k], b[k])
