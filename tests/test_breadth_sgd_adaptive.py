"""Adan, NovoGrad, Adadelta, Rprop, signSGD, Signum, noisy SGD, optimistic GD / Adam and the
Polyak step against optax 0.2.8 (30 float64 steps) or torch.optim (rtol 1e-8)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_breadth_common import (
    P0,
    assert_same_path,
    moved,
    optax,
    run_funcopt,
    run_optax,
    torch_loss,
)

import funcopt as fo

DEFAULT_DTYPE = torch.float64

PAIRS = {
    "adan": (lambda: fo.adan(0.05), lambda: optax.adan(0.05)),
    "adan_wd": (lambda: fo.adan(0.05, 0.9, 0.8, 0.95, 1e-6, 0.0, 0.01),
                lambda: optax.adan(0.05, 0.9, 0.8, 0.95, 1e-6, 0.0, 0.01)),
    "novograd": (lambda: fo.novograd(0.05), lambda: optax.novograd(0.05)),
    "novograd_wd": (lambda: fo.novograd(0.05, 0.8, 0.5, 1e-8, 1e-10, 0.01),
                    lambda: optax.novograd(0.05, 0.8, 0.5, 1e-8, 1e-10, 0.01)),
    "adadelta_lr": (lambda: fo.adadelta(0.5, 0.8, 1e-4, 0.01),
                    lambda: optax.adadelta(0.5, 0.8, 1e-4, 0.01)),
    "sign_sgd": (lambda: fo.sign_sgd(0.01), lambda: optax.sign_sgd(0.01)),
    "signum": (lambda: fo.signum(0.01, 0.8), lambda: optax.signum(0.01, 0.8)),
    "optimistic_gd": (lambda: fo.optimistic_gradient_descent(0.05, 0.5, 0.8),
                      lambda: optax.optimistic_gradient_descent(0.05, 0.5, 0.8)),
    "optimistic_adam": (lambda: fo.optimistic_adam(0.05, 0.02),
                        lambda: optax.optimistic_adam(0.05, 0.02)),
}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("name", sorted(PAIRS))
def test_against_optax(name):
    make, ref = PAIRS[name]
    want = run_optax(ref())
    assert moved(want) > 1e-3
    assert_same_path(run_funcopt(make()), want, what=name)


@pytest.mark.parametrize("make, ref", [
    (lambda: fo.polyak_sgd(), lambda: optax.polyak_sgd()),
    (lambda: fo.polyak_sgd(0.3, 0.5, -2.0, 1e-3, "sps+"),
     lambda: optax.polyak_sgd(0.3, 0.5, -2.0, 1e-3, "sps+")),
], ids=["polyak", "polyak_options"])
def test_polyak_against_optax(make, ref):
    want = run_optax(ref(), extras="value")
    assert moved(want) > 1e-3
    assert_same_path(run_funcopt(make(), extras="value"), want, what="polyak")


def _torch_path(opt_cls, steps=30, **kw):
    p = {k: torch.tensor(v, requires_grad=True) for k, v in P0.items()}
    opt = opt_cls([p[k] for k in sorted(p)], **kw)
    out = []
    for _ in range(steps):
        opt.zero_grad()
        torch_loss(p).backward()
        opt.step()
        out.append({k: v.detach().numpy().copy() for k, v in p.items()})
    return out


@pytest.mark.parametrize("make, cls, kw", [
    (lambda: fo.adadelta(), torch.optim.Adadelta, {}),
    (lambda: fo.adadelta(0.5, 0.8, 1e-4, 0.01), torch.optim.Adadelta,
     dict(lr=0.5, rho=0.8, eps=1e-4, weight_decay=0.01)),
    (lambda: fo.rprop(0.01), torch.optim.Rprop, dict(lr=0.01)),
    (lambda: fo.rprop(0.05, 0.3, 1.5, 1e-3, 0.2), torch.optim.Rprop,
     dict(lr=0.05, etas=(0.3, 1.5), step_sizes=(1e-3, 0.2))),
], ids=["adadelta_default", "adadelta", "rprop", "rprop_options"])
def test_against_torch(make, cls, kw):
    want = _torch_path(cls, **kw)
    assert moved(want) > 1e-3
    assert_same_path(run_funcopt(make()), want, rtol=1e-8, what=cls.__name__)


def test_optax_adadelta_without_learning_rate_ascends_funcopt_descends():
    """The documented difference: optax.adadelta(None) moves uphill."""
    import jax.numpy as jnp
    g = {k: jnp.asarray(v) for k, v in P0.items()}
    u, _ = optax.adadelta().update(g, optax.adadelta().init(g), g)
    assert all(float((u[k] * g[k]).sum()) > 0 for k in g)
    path = run_funcopt(fo.adadelta())
    p = {k: torch.tensor(v) for k, v in path[-1].items()}
    assert float(torch_loss(p)) < float(torch_loss({k: torch.tensor(v) for k, v in P0.items()}))


def test_optax_rprop_lags_one_step():
    """The documented difference: optax's first Rprop update is zero, torch's is not."""
    want = run_optax(optax.rprop(0.01), steps=1)
    assert np.array_equal(want[0]["w"], P0["w"])
    assert not np.array_equal(run_funcopt(fo.rprop(0.01), steps=1)[0]["w"], P0["w"])


def test_noisy_sgd_is_add_noise_then_sgd():
    got = run_funcopt(fo.noisy_sgd(0.05, 0.1, 0.55, seed=3))
    want = run_funcopt(fo.chain(fo.add_noise(0.1, 0.55, seed=3), fo.sgd(0.05)))
    assert_same_path(got, want, rtol=0, what="noisy_sgd")
    assert not np.allclose(got[-1]["w"], run_funcopt(fo.sgd(0.05))[-1]["w"])


def test_polyak_needs_value():
    tx = fo.polyak_sgd()
    p = {k: torch.tensor(v) for k, v in P0.items()}
    with pytest.raises(ValueError, match="value"):
        tx.update(p, tx.init(p), p)


@pytest.mark.parametrize("make, name", [
    (lambda: fo.adan(0.1, b3=1.0), "b3"), (lambda: fo.novograd(0.1, eps=-1.0), "eps"),
    (lambda: fo.adadelta(rho=1.5), "rho"), (lambda: fo.rprop(0.0), "learning_rate"),
    (lambda: fo.rprop(0.1, eta_minus=2.0), "eta_minus"),
    (lambda: fo.polyak_sgd(variant="x"), "variant"),
    (lambda: fo.optimistic_adam(lambda c: 0.1), "learning_rate"),
])
def test_bad_hyperparameters_raise_at_construction(make, name):
    with pytest.raises((ValueError, TypeError), match=name):
        make()


def _with_value(tx):
    def update(updates, state, params=None, **extra):
        value = sum((x * x).sum() + 1.0 for x in fo.tree_leaves(params))
        return tx.update(updates, state, params, value=value)

    return fo.GradientTransformation(tx.init, update)


@pytest.mark.parametrize("make", [lambda: fo.polyak_sgd(), lambda: fo.scale_by_polyak(variant="sps+")],
                         ids=["polyak_sgd", "scale_by_polyak"])
def test_contract(make):
    from funcopt.testing import check_transform
    check_transform(_with_value(make()), {k: torch.tensor(v) for k, v in P0.items()})
