"""funcopt.Optimizer against torch.optim: schedulers, GradScaler, groups, state_dict, extras."""

from __future__ import annotations

import copy
import io
from typing import NamedTuple

import pytest
import torch

import funcopt as fo
from funcopt.optim import Optimizer, find_hyperparams

# ----------------------------------------------------------------- reference transforms
# Small float64-exact transcriptions of torch.optim's SGD/Adam/AdamW update rules with the
# learning rate kept in the state, so the adapter is tested whatever else is installed.


class _AdamState(NamedTuple):
    count: torch.Tensor
    mu: list
    nu: list
    learning_rate: torch.Tensor


torch.serialization.add_safe_globals([_AdamState])  # a state class loads with weights_only=True
fo.register_hyperparameters(_AdamState, "learning_rate")  # exposed as group["lr"]


def _adam_ref(lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, decoupled=True):
    def init(params):
        dt = params[0].dtype
        z = [torch.zeros_like(p) for p in params]
        return _AdamState(fo.step_counter(params), z, list(z), torch.tensor(lr, dtype=dt))

    def update(grads, s, params=None, **extra):
        lr_t = s.learning_rate
        if weight_decay and not decoupled:
            grads = [g + weight_decay * p for g, p in zip(grads, params)]
        count = fo.increment(s.count)
        mu = [b1 * m + (1 - b1) * g for m, g in zip(s.mu, grads)]
        nu = [b2 * v + (1 - b2) * g * g for v, g in zip(s.nu, grads)]
        t = count.to(lr_t.dtype)
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        u = [-lr_t / bc1 * m / ((v / bc2).sqrt() + eps) for m, v in zip(mu, nu)]
        if weight_decay and decoupled:
            u = [x - lr_t * weight_decay * p for x, p in zip(u, params)]
        return u, _AdamState(count, mu, nu, s.learning_rate)

    return fo.GradientTransformation(init, update)


class _SgdState(NamedTuple):
    trace: list
    learning_rate: torch.Tensor


torch.serialization.add_safe_globals([_SgdState])  # a state class loads with weights_only=True
fo.register_hyperparameters(_SgdState, "learning_rate")  # exposed as group["lr"]


def _sgd_ref(lr=0.1, momentum=0.9):
    def init(params):
        return _SgdState([torch.zeros_like(p) for p in params], torch.tensor(lr, dtype=params[0].dtype))

    def update(grads, s, params=None, **extra):
        trace = [momentum * t + g for t, g in zip(s.trace, grads)]
        return [-s.learning_rate * t for t in trace], _SgdState(trace, s.learning_rate)

    return fo.GradientTransformation(init, update)


def _pairs():
    """(name, funcopt transform factory, torch.optim factory) for the step-by-step table."""
    table = [
        ("sgd_ref", lambda: _sgd_ref(0.1, 0.9), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
        ("adam_ref", lambda: _adam_ref(1e-2), lambda p: torch.optim.Adam(p, lr=1e-2)),
        ("adamw_ref", lambda: _adam_ref(1e-2, weight_decay=0.1),
         lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1)),
    ]
    if hasattr(fo, "adamw"):
        table += [
            ("fo.sgd", lambda: fo.sgd(learning_rate=0.1, momentum=0.9),
             lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
            ("fo.adam", lambda: fo.adam(learning_rate=1e-2),
             lambda p: torch.optim.Adam(p, lr=1e-2)),
            ("fo.adamw", lambda: fo.adamw(learning_rate=1e-2, weight_decay=0.1),
             lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1)),
        ]
    return table


def _model(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(dtype)


def _data(n=16, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=dtype), torch.randn(n, 1, generator=g, dtype=dtype)


def _loss(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def _close(a: torch.nn.Module, b: torch.nn.Module, rtol=1e-6, atol=1e-9):
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=lambda m, n=n: f"{n}: {m}")


SCHEDULERS = {
    "steplr": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
    "onecycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=0.05, total_steps=12, cycle_momentum=False),
}


@pytest.mark.parametrize("sched", sorted(SCHEDULERS))
@pytest.mark.parametrize("name,make_fo,make_torch", _pairs(), ids=[p[0] for p in _pairs()])
def test_matches_torch_optim_with_scheduler(name, make_fo, make_torch, sched):
    m_fo, m_t = _model(), _model()
    opt_fo, opt_t = Optimizer(m_fo.parameters(), make_fo()), make_torch(m_t.parameters())
    assert "lr" in opt_fo.param_groups[0]
    s_fo, s_t = SCHEDULERS[sched](opt_fo), SCHEDULERS[sched](opt_t)
    x, y = _data()
    for _ in range(12):
        for m, o, s in ((m_fo, opt_fo, s_fo), (m_t, opt_t, s_t)):
            o.zero_grad()
            _loss(m, x, y).backward()
            o.step()
            s.step()
        _close(m_fo, m_t)
        assert opt_fo.param_groups[0]["lr"] == pytest.approx(opt_t.param_groups[0]["lr"], rel=1e-6)


@pytest.mark.parametrize("name,make_fo,make_torch", _pairs(), ids=[p[0] for p in _pairs()])
def test_gradscaler_bf16_autocast(name, make_fo, make_torch):
    m_fo, m_t = _model(torch.float32), _model(torch.float32)
    opt_fo, opt_t = Optimizer(m_fo.parameters(), make_fo()), make_torch(m_t.parameters())
    sc_fo, sc_t = torch.amp.GradScaler("cpu", init_scale=2.0**8), torch.amp.GradScaler("cpu", init_scale=2.0**8)
    x, y = _data(dtype=torch.float32)
    for step in range(8):
        for m, o, sc in ((m_fo, opt_fo, sc_fo), (m_t, opt_t, sc_t)):
            o.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = _loss(m, x, y)
            if step == 4:  # an overflowing step: both must skip it and lower the scale
                loss = loss * float("inf")
            sc.scale(loss).backward()
            sc.step(o)
            sc.update()
        assert sc_fo.get_scale() == sc_t.get_scale()
        _close(m_fo, m_t, rtol=1e-5, atol=1e-6)
    assert sc_fo.get_scale() < 2.0**8


def test_gradient_accumulation_equals_full_batch():
    m_acc, m_full = _model(), _model()
    o_acc = Optimizer(m_acc.parameters(), _adam_ref(1e-2))
    o_full = torch.optim.Adam(m_full.parameters(), lr=1e-2)
    x, y = _data(16)
    for _ in range(4):
        o_acc.zero_grad()
        for xb, yb in zip(x.chunk(4), y.chunk(4)):
            (_loss(m_acc, xb, yb) / 4).backward()
        o_acc.step()
        o_full.zero_grad()
        _loss(m_full, x, y).backward()
        o_full.step()
    _close(m_acc, m_full, rtol=1e-9, atol=1e-12)


def _train(model, opt, steps, seed=3):
    x, y = _data(seed=seed)
    for _ in range(steps):
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()


def test_state_dict_roundtrip_continues_identically():
    model = _model()
    opt = Optimizer(model.parameters(), _adam_ref(1e-2), lr=0.02)
    _train(model, opt, 5)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _train(model, opt, 5)

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = _model(seed=99)
    resumed.load_state_dict(ckpt["model"])
    opt2 = Optimizer(resumed.parameters(), _adam_ref(0.5))
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.param_groups[0]["lr"] == 0.02
    _train(resumed, opt2, 5)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_load_state_dict_errors():
    model = _model()
    opt = Optimizer(model.parameters(), _adam_ref())
    _train(model, opt, 1)
    sd = opt.state_dict()
    with pytest.raises(ValueError, match="different transform"):
        Optimizer(_model().parameters(), _sgd_ref()).load_state_dict(sd)
    wide = torch.nn.Sequential(torch.nn.Linear(4, 9), torch.nn.Tanh(), torch.nn.Linear(9, 1)).double()
    with pytest.raises(ValueError, match="shape"):
        Optimizer(wide.parameters(), _adam_ref()).load_state_dict(sd)
    with pytest.raises(ValueError, match="not written by funcopt"):
        opt.load_state_dict(torch.optim.Adam(model.parameters()).state_dict())
    with pytest.raises(ValueError, match="param groups"):
        Optimizer([{"params": [p]} for p in _model().parameters()], _adam_ref()).load_state_dict(sd)


def test_param_groups_with_own_transform_and_lr():
    m_fo, m_t = _model(), _model()
    w_fo, b_fo = [p for n, p in m_fo.named_parameters() if "weight" in n], [
        p for n, p in m_fo.named_parameters() if "bias" in n]
    w_t, b_t = [p for n, p in m_t.named_parameters() if "weight" in n], [
        p for n, p in m_t.named_parameters() if "bias" in n]
    opt = Optimizer([{"params": w_fo, "lr": 0.03}, {"params": b_fo, "transform": _sgd_ref(0.05)}],
                    _adam_ref(1e-2))
    assert [g["lr"] for g in opt.param_groups] == [0.03, pytest.approx(0.05)]
    ref = [torch.optim.Adam(w_t, lr=0.03), torch.optim.SGD(b_t, lr=0.05, momentum=0.9)]
    x, y = _data()
    for _ in range(5):
        opt.zero_grad()
        _loss(m_fo, x, y).backward()
        opt.step()
        for o in ref:
            o.zero_grad()
        _loss(m_t, x, y).backward()
        for o in ref:
            o.step()
    _close(m_fo, m_t)


def test_unknown_hyperparameter_is_an_error():
    with pytest.raises(ValueError, match="does not expose"):
        Optimizer(_model().parameters(), _adam_ref(), momentum=0.9)
    with pytest.raises(TypeError, match="factory"):
        Optimizer(_model().parameters(), _adam_ref)  # type: ignore[arg-type]


def _adam_factory(learning_rate=1e-2, b1=0.9, b2=0.999):
    """For inject_hyperparams: b1/b2 may be 0-d tensors."""
    def init(params):
        z = [torch.zeros_like(p) for p in params]
        return (fo.step_counter(params), z, list(z))

    def update(grads, s, params=None, **extra):
        count, mu, nu = s
        count = fo.increment(count)
        mu = [b1 * m + (1 - b1) * g for m, g in zip(mu, grads)]
        nu = [b2 * v + (1 - b2) * g * g for v, g in zip(nu, grads)]
        # torch.optim.Adam with a changing beta1 bias-corrects with the current beta1
        t = count.to(grads[0].dtype)
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        u = [-learning_rate / bc1 * m / ((v / bc2).sqrt() + 1e-8) for m, v in zip(mu, nu)]
        return u, (count, mu, nu)

    return fo.GradientTransformation(init, update)


_FACTORIES = [_adam_factory] + ([fo.adam] if hasattr(fo, "adam") else [])


@pytest.mark.parametrize("factory", _FACTORIES, ids=lambda f: f.__name__)
def test_inject_hyperparams_exposes_betas_for_onecycle_momentum(factory):
    m_fo, m_t = _model(), _model()
    tx = fo.inject_hyperparams(factory)(learning_rate=1e-2)
    opt_fo = Optimizer(m_fo.parameters(), tx)
    assert {"lr", "betas"} <= set(opt_fo.defaults)
    assert opt_fo.param_groups[0]["betas"] == pytest.approx((0.9, 0.999))
    opt_t = torch.optim.Adam(m_t.parameters(), lr=1e-2)
    mk = lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=10)
    s_fo, s_t = mk(opt_fo), mk(opt_t)
    x, y = _data()
    for _ in range(10):
        last_b1 = opt_t.param_groups[0]["betas"][0]
        for m, o, s in ((m_fo, opt_fo, s_fo), (m_t, opt_t, s_t)):
            o.zero_grad()
            _loss(m, x, y).backward()
            o.step()
            s.step()
        _close(m_fo, m_t)
    assert find_hyperparams(opt_fo.transform_states[0])["b1"].item() == pytest.approx(last_b1)
    assert last_b1 != pytest.approx(0.9)


class _ValueState(NamedTuple):
    learning_rate: torch.Tensor


torch.serialization.add_safe_globals([_ValueState])  # a state class loads with weights_only=True


def _polyak_like(lr):
    """u = -lr * value * g: needs the loss value, as line-search and Polyak steps do."""
    def init(params):
        return _ValueState(torch.tensor(lr, dtype=params[0].dtype))

    def update(grads, s, params=None, *, value=None, **extra):
        if value is None:
            raise ValueError("needs value")
        return [-s.learning_rate * value * g for g in grads], s

    return fo.GradientTransformation(init, update)


def test_closure_value_and_extra_inputs():
    model = _model()
    x, y = _data()
    opt = Optimizer(model.parameters(), _polyak_like(0.1))
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        opt.zero_grad()
        loss = _loss(model, x, y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    grads = [p.grad for p in model.parameters()]
    for p, b, g in zip(model.parameters(), before, grads):
        torch.testing.assert_close(p, b - 0.1 * loss.detach() * g)
    with pytest.raises(ValueError, match="needs value"):
        opt.step()
    opt.step(value=torch.tensor(2.0, dtype=torch.float64))  # extras reach update()


class _KeepParams(NamedTuple):
    prev: list


def test_state_that_references_params_is_not_corrupted():
    """A pure transform may keep the params it was given; in-place updates must not touch it."""
    tx = fo.GradientTransformation(
        lambda params: _KeepParams(list(params)),
        lambda g, s, params=None, **e: ([-0.1 * x for x in g], _KeepParams(list(params))),
    )
    model = _model()
    opt = Optimizer(model.parameters(), tx)
    x, y = _data()
    init = [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(opt.transform_states[0].prev, init))
    _loss(model, x, y).backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(opt.transform_states[0].prev, init))
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), init))


def test_params_without_grad_stay_put():
    model = _model()
    frozen = copy.deepcopy(model[2].weight.detach())
    opt = Optimizer(model.parameters(), _sgd_ref(0.1))
    x, y = _data()
    out = model[2](model[1](model[0](x))).sum() + 0 * model[2].bias.sum()
    model[2].weight.grad = None
    out.backward(inputs=[model[0].weight, model[0].bias, model[2].bias])
    opt.step()
    assert torch.equal(model[2].weight, frozen)
