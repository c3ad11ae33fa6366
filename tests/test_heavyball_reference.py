"""HeavyBall 0.7.2 recipes against the 0.7.2 classes (loaded by tests/_heavyball072.py)."""

import pytest
import torch
from _heavyball072 import load

from funcopt import heavyball as hbr
from funcopt.base import apply_updates
from funcopt.transforms.schedule_free import schedule_free_eval_params


def _problem():
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(6, 5, generator=g), "b": torch.randn(5, generator=g)}

    def loss(p, t):
        gb = torch.Generator().manual_seed(t)
        x, y = torch.randn(16, 6, generator=gb), torch.randn(16, 5, generator=gb)
        return ((torch.tanh(x @ p["w"] + p["b"]) - y) ** 2).mean()
    return params, loss


@pytest.mark.parametrize("name,kwargs", [
    ("ForeachSFAdamW", dict(lr=0.01, warmup_steps=5)),
    ("ForeachSFAdamW", dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05,
                            warmup_steps=1)),
    ("PaLMForeachSFAdamW", dict(lr=0.01, warmup_steps=3)),
])
def test_schedule_free_recipes_match_072(name, kwargs):
    hb = load()
    params, loss = _problem()
    ref = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    opt = getattr(hb, name)(list(ref.values()), **kwargs)
    make = {"ForeachSFAdamW": hbr.foreach_sfadamw, "PaLMForeachSFAdamW": hbr.palm_foreach_sfadamw}
    tx = make[name](**kwargs)
    state = tx.init(params)
    for t in range(50):
        opt.zero_grad()
        loss(ref, t).backward()
        opt.step()
        p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        grads = dict(zip(p, torch.autograd.grad(loss(p, t), list(p.values()))))
        u, state = tx.update(grads, state, params)
        params = apply_updates(params, u)
    for k in params:
        torch.testing.assert_close(params[k], ref[k].detach(), rtol=1e-4, atol=1e-6)
    opt.eval()
    ev = schedule_free_eval_params(params, state)
    for k in params:
        torch.testing.assert_close(ev[k], ref[k].detach(), rtol=1e-4, atol=1e-6)


def test_soap_recipes_build_and_step():
    params, loss = _problem()
    for make in [hbr.foreach_soap, hbr.palm_foreach_soap, hbr.precond_schedule_foreach_soap,
                 hbr.precond_schedule_palm_foreach_soap, hbr.sf_palm_foreach_soap,
                 hbr.precond_schedule_sf_palm_foreach_soap]:
        tx = make(lr=1e-2)
        p, state = params, tx.init(params)
        first = None
        for _ in range(20):
            q = {k: v.clone().requires_grad_(True) for k, v in p.items()}
            lv = loss(q, 0)
            first = float(lv) if first is None else first
            u, state = tx.update(dict(zip(q, torch.autograd.grad(lv, list(q.values())))), state, p)
            p = apply_updates(p, u)
        q = {k: v.clone().requires_grad_(True) for k, v in p.items()}
        assert float(loss(q, 0)) < first, make.__name__


@pytest.mark.parametrize("make", [
    lambda: __import__("funcopt").schedule_free_adamw(0.01, weight_decay=0.1),
    lambda: __import__("funcopt").schedule_free_sgd(0.1),
    lambda: __import__("funcopt").soap(0.01, precondition_frequency=__import__("funcopt").precond_schedule()),
    lambda: __import__("funcopt").muon(),
])
def test_contract_properties(make):
    from funcopt.testing import check_transform
    tx = make()
    # SOAP under vmap matches a loop only on full-rank Kronecker factors (see
    # tests/test_contract_table.py); a (4, 3) leaf after 3 steps has rank-deficient ones
    is_soap = "soap" in make.__code__.co_names
    check_transform(tx, {"w": torch.randn(4, 3), "b": torch.randn(3)}, vmap=not is_soap)


# --------------------------------------------------------------------------- ForeachAdamW/LaProp/ADOPT


def _fixed_grads(steps, shapes=((6, 5), (5,)), seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in zip("wb", shapes)}
            for _ in range(steps)]


def _run_072(name, params, grads, **kwargs):
    hb = load()
    ref = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    opt = getattr(hb, name)(list(ref.values()), **kwargs)
    out = []
    for g in grads:
        for k, p in ref.items():
            p.grad = g[k].clone()
        opt.step()
        out.append({k: v.detach().clone() for k, v in ref.items()})
    return out


def _run_fo(tx, params, grads):
    state, out = tx.init(params), []
    for g in grads:
        u, state = tx.update(g, state, params)
        params = apply_updates(params, u)
        out.append(params)
    return out


def _float64_foreach_adamw(params, grads, lr, b1, b2, eps, warmup):
    """0.7.2's ForeachAdamW (which raises in 0.7.2 itself), transcribed in float64."""
    p = {k: v.clone() for k, v in params.items()}
    m = {k: torch.zeros_like(v) for k, v in p.items()}
    v = {k: torch.zeros_like(x) for k, x in p.items()}
    out = []
    for t, g in enumerate(grads, start=1):
        d1, d2 = (1 - b1) / (1 - b1 ** t), (1 - b2) / (1 - b2 ** t)
        for k in p:
            m[k] = m[k] + d1 * (g[k] - m[k])
            v[k] = (1 - d2) * v[k] + d2 * g[k] ** 2
            p[k] = p[k] - lr * min(t / warmup, 1) * m[k] / v[k].sqrt().clamp(min=eps)
        out.append({k: x.clone() for k, x in p.items()})
    return out


def test_foreach_adamw_matches_072_transcription():
    params = {k: v.double() for k, v in _problem()[0].items()}
    grads = _fixed_grads(50)
    ref = _float64_foreach_adamw(params, grads, 0.01, 0.9, 0.95, 1e-8, 5)
    got = _run_fo(hbr.foreach_adamw(0.01, (0.9, 0.95), 1e-8, warmup_steps=5), params, grads)
    for a, b in zip(got, ref):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-7)


def test_foreach_laprop_matches_072():
    params = {k: v.double() for k, v in _problem()[0].items()}
    grads = _fixed_grads(50)
    kw = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-8, warmup_steps=4)
    ref = _run_072("ForeachLaProp", params, grads, **kw)
    got = _run_fo(hbr.foreach_laprop(**kw), params, grads)
    for a, b in zip(got, ref):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-7)


def test_foreach_adopt_matches_072_one_call_later():
    """0.7.2 applies each momentum one call late: funcopt after t calls == 0.7.2 after t+1."""
    params = {k: v.double() for k, v in _problem()[0].items()}
    grads = _fixed_grads(51)
    kw = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, warmup_steps=3)
    ref = _run_072("ForeachADOPT", params, grads, **kw)
    got = _run_fo(hbr.foreach_adopt(**kw), params, grads[:50])
    torch.testing.assert_close(got[0], params)  # first call only records g^2
    for t, a in enumerate(got):
        for k in a:
            torch.testing.assert_close(a[k], ref[t + 1][k], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("make", [hbr.foreach_adamw, hbr.foreach_laprop, hbr.foreach_adopt])
def test_foreach_recipes_contract_and_decay(make):
    from funcopt.testing import check_transform
    params = {"w": torch.randn(4, 3), "b": torch.randn(3, dtype=torch.bfloat16)}
    check_transform(make(0.01, weight_decay=0.1, warmup_steps=2), params)
    # decoupled decay: with zero gradients after the first call, parameters shrink by (1 - lr wd)
    tx = make(0.1, weight_decay=0.5)
    p = {"w": torch.ones(2, 2, dtype=torch.float64)}
    state = tx.init(p)
    u, state = tx.update({"w": torch.zeros(2, 2, dtype=torch.float64)}, state, p)
    torch.testing.assert_close(apply_updates(p, u)["w"], torch.full((2, 2), 0.95, dtype=torch.float64))
