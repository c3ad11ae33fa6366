"""HeavyBall 0.7.2 recipes against the 0.7.2 classes (loaded by tests/_heavyball072.py)."""

import pytest
import torch

from funcopt import heavyball as hbr
from funcopt.base import apply_updates
from funcopt.transforms.schedule_free import schedule_free_eval_params
from _heavyball072 import load


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
        for t in range(20):
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
    check_transform(make(), {"w": torch.randn(4, 3), "b": torch.randn(3)})
