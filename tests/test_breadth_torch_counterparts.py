"""torch.optim counterparts, step for step in float64 (rtol 1e-8): ASGD with its averaged
parameters, ``maximize`` as a transform chained first, and parameter averaging (EMA / SWA)
against torch.optim.swa_utils.AveragedModel."""

from __future__ import annotations

import pytest
import torch

import funcopt as fo

DEFAULT_DTYPE = torch.float64  # conftest sets it per test (torch keeps ASGD's eta in it)
_G = torch.Generator().manual_seed(0)
SHAPES = {"w": (4, 3), "b": (3,)}
P0 = {k: torch.randn(s, generator=_G, dtype=torch.float64) for k, s in SHAPES.items()}
TARGET = {k: torch.randn(s, generator=_G, dtype=torch.float64) for k, s in SHAPES.items()}


def objective(p):
    return sum(((p[k] - TARGET[k]) ** 2 * (1 + 0.5 * torch.cos(p[k]))).sum() for k in p)


def run_torch(make_opt, steps=50, after_step=None):
    params = {k: torch.nn.Parameter(v.clone()) for k, v in P0.items()}
    opt = make_opt(list(params.values()))
    path = []
    for t in range(steps):
        opt.zero_grad()
        objective(params).backward()
        opt.step()
        if after_step is not None:
            after_step(t, params)
        path.append({k: v.detach().clone() for k, v in params.items()})
    return path, opt, params


def run_fo(tx, steps=50):
    p = {k: v.clone() for k, v in P0.items()}
    state = tx.init(p)
    path = []
    for _ in range(steps):
        u, state = tx.update(torch.func.grad(objective)(p), state, p)
        p = fo.apply_updates(p, u)
        path.append(p)
    return path, state


def assert_paths(got, want):
    for i, (a, b) in enumerate(zip(got, want)):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-8, atol=1e-12,
                                       msg=lambda m, i=i, k=k: f"step {i + 1} leaf {k}: {m}")
    moved = max(float((want[-1][k] - P0[k]).abs().max()) for k in P0)
    assert moved > 1e-2


ASGD = [dict(), dict(lr=0.05, lambd=1e-3, alpha=0.5, t0=10, weight_decay=0.1),
        dict(lr=0.02, t0=0)]


@pytest.mark.parametrize("kw", ASGD, ids=str)
def test_asgd_against_torch(kw):
    want, opt, params = run_torch(lambda ps: torch.optim.ASGD(ps, **kw))
    args = {("learning_rate" if k == "lr" else k): v for k, v in kw.items()}
    got, state = run_fo(fo.asgd(**args))
    assert_paths(got, want)
    ax = fo.asgd_averaged_params(state)
    for k, p in params.items():
        torch.testing.assert_close(ax[k], opt.state[p]["ax"], rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(state.eta, opt.state[p]["eta"].to(torch.float64), rtol=1e-12,
                                   atol=0)
    if kw.get("t0", 1e6) < 50:  # averaging started: the average differs from the iterate
        assert not torch.allclose(ax["w"], got[-1]["w"])


def test_asgd_maximize_and_errors():
    want, _, _ = run_torch(lambda ps: torch.optim.ASGD(ps, lr=0.01, maximize=True), steps=10)
    got, state = run_fo(fo.chain(fo.maximize(), fo.asgd(0.01)), steps=10)
    assert_paths(got, want)
    assert fo.asgd_averaged_params(state) is state[1].ax
    for bad in (dict(learning_rate=0.0), dict(lambd=-1.0), dict(t0=-1.0), dict(alpha=-0.5)):
        with pytest.raises(ValueError, match="asgd"):
            fo.asgd(**bad)
    with pytest.raises(ValueError, match="no ASGDState"):
        fo.asgd_averaged_params(fo.adam(0.1).init(P0))


@pytest.mark.parametrize("make_tx, make_opt", [
    (lambda: fo.chain(fo.maximize(), fo.adam(0.01)),
     lambda ps: torch.optim.Adam(ps, lr=0.01, maximize=True)),
    (lambda: fo.chain(fo.maximize(), fo.adamw(0.01, weight_decay=0.1)),
     lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1, maximize=True)),
    (lambda: fo.chain(fo.maximize(), fo.sgd(0.005, momentum=0.9)),
     lambda ps: torch.optim.SGD(ps, lr=0.005, momentum=0.9, maximize=True)),
])
def test_maximize_against_torch(make_tx, make_opt):
    want, _, _ = run_torch(make_opt)
    got, _ = run_fo(make_tx())
    assert_paths(got, want)
    assert float(objective(got[-1])) > float(objective(P0))  # it went uphill


def _averaged_model_run(avg_kw, start=0, every=1):
    model = torch.nn.ParameterDict({k: torch.nn.Parameter(v.clone()) for k, v in P0.items()})
    avg = torch.optim.swa_utils.AveragedModel(model, **avg_kw)

    def after(t, params):
        if t + 1 > start and (t + 1 - start) % every == 0:
            avg.update_parameters(model)

    params = dict(model.items())
    opt = torch.optim.Adam(list(params.values()), lr=0.05)
    path = []
    for t in range(40):
        opt.zero_grad()
        objective(params).backward()
        opt.step()
        after(t, params)
        path.append({k: v.detach().clone() for k, v in params.items()})
    return path, {k: v.detach() for k, v in avg.module.items()}, int(avg.n_averaged)


@pytest.mark.parametrize("name, tx, avg_kw, start, every", [
    ("ema", lambda: fo.ema_params(0.9), "ema", 0, 1),
    ("ema_late", lambda: fo.ema_params(0.8, start=10, every=3), "ema", 10, 3),
    ("swa", lambda: fo.swa(), {}, 0, 1),
    ("swa_late", lambda: fo.swa(start=15, every=5), {}, 15, 5),
])
def test_averaging_against_swa_utils(name, tx, avg_kw, start, every):
    if avg_kw == "ema":
        decay = 0.9 if name == "ema" else 0.8
        avg_kw = {"multi_avg_fn": torch.optim.swa_utils.get_ema_multi_avg_fn(decay)}
    want_path, want_avg, n = _averaged_model_run(avg_kw, start, every)
    got_path, state = run_fo(fo.chain(fo.adam(0.05), tx()), steps=40)
    assert_paths(got_path, want_path)
    got_avg = fo.averaged_params(state)
    assert int(state[1].n_averaged) == n > 1
    for k in P0:
        torch.testing.assert_close(got_avg[k], want_avg[k], rtol=1e-8, atol=1e-12)
        assert not torch.allclose(got_avg[k], got_path[-1][k])


def test_averaging_errors():
    with pytest.raises(ValueError, match="decay"):
        fo.ema_params(1.5)
    with pytest.raises(ValueError, match="every"):
        fo.swa(every=0)
    with pytest.raises(ValueError, match="start"):
        fo.swa(start=-1)
    with pytest.raises(ValueError, match="no AveragedParamsState"):
        fo.averaged_params(fo.adam(0.1).init(P0))
