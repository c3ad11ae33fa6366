"""Prodigy, D-Adaptation AdamW, AdEMAMix (and simplified) and SAM against optax 0.2.8
(``optax.contrib``), 30 steps in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_breadth_common import (
    P0,
    assert_same_path,
    jax,
    jax_loss,
    jnp,
    moved,
    optax,
    run_funcopt,
    run_optax,
    torch_loss,
)

import funcopt as fo

DEFAULT_DTYPE = torch.float64
C = optax.contrib

PAIRS = {
    "prodigy": (lambda: fo.prodigy(), lambda: C.prodigy()),
    "prodigy_options": (
        lambda: fo.prodigy(lambda c: 1.0 / (1.0 + 0.1 * c), (0.8, 0.99), 0.9, 1e-6, 1e-4, 0.5,
                           0.01, True),
        lambda: C.prodigy(lambda c: 1.0 / (1.0 + 0.1 * c), (0.8, 0.99), 0.9, 1e-6, 1e-4, 0.5,
                          0.01, True)),
    "dadapt_adamw": (lambda: fo.dadapt_adamw(), lambda: C.dadapt_adamw()),
    "dadapt_adamw_options": (lambda: fo.dadapt_adamw(0.5, (0.8, 0.99), 1e-6, 1e-4, 0.01),
                             lambda: C.dadapt_adamw(0.5, (0.8, 0.99), 1e-6, 1e-4, 0.01)),
    "ademamix": (lambda: fo.ademamix(0.05), lambda: C.ademamix(0.05)),
    "ademamix_schedules": (
        lambda: fo.ademamix(0.05, 0.8, 0.99, lambda c: 0.9 + 0.0 * c, lambda c: 2.0 + 0.1 * c,
                            1e-6, 1e-9, None, 0.01, {"w": True, "b": False, "v": True}),
        lambda: C.ademamix(0.05, 0.8, 0.99, lambda c: 0.9 + 0.0 * c, lambda c: 2.0 + 0.1 * c,
                           1e-6, 1e-9, None, 0.01, {"w": True, "b": False, "v": True})),
    "simplified_ademamix": (lambda: fo.simplified_ademamix(0.01, alpha=2.0, weight_decay=0.01),
                            lambda: C.simplified_ademamix(0.01, alpha=2.0, weight_decay=0.01)),
    "sam": (lambda: fo.sam(fo.sgd(0.05, 0.9), fo.chain(fo.normalize_by_update_norm(1.0, 0.0),
                                                      fo.scale(0.05))),
            lambda: C.sam(optax.sgd(0.05, 0.9), optax.chain(C.normalize(), optax.scale(0.05)))),
    "sam_period3_keep_state": (
        lambda: fo.sam(fo.adam(0.05), fo.chain(fo.adam(0.05), fo.scale(-1.0)), 3, False),
        lambda: C.sam(optax.adam(0.05), optax.chain(optax.adam(0.05), optax.scale(-1.0)), 3,
                      False)),
}


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_against_optax(name):
    make, ref = PAIRS[name]
    want = run_optax(ref())
    assert moved(want) > 1e-3
    assert_same_path(run_funcopt(make()), want, what=name)


def test_sam_opaque_mode_against_optax():
    tx = fo.sam(fo.sgd(0.05), fo.chain(fo.normalize_by_update_norm(1.0, 0.0), fo.scale(0.05)),
                sync_period=3, opaque_mode=True)
    ref = C.sam(optax.sgd(0.05), optax.chain(C.normalize(), optax.scale(0.05)), sync_period=3,
                opaque_mode=True)
    p = {k: torch.tensor(v) for k, v in P0.items()}
    q = {k: jnp.asarray(v) for k, v in P0.items()}
    s, r = tx.init(p), ref.init(q)
    for _ in range(20):
        u, s = tx.update(torch.func.grad(torch_loss)(p), s, p,
                         grad_fn=lambda w, i: torch.func.grad(torch_loss)(w))
        p = fo.apply_updates(p, u)
        v, r = ref.update(jax.grad(jax_loss)(q), r, q, grad_fn=lambda w, i: jax.grad(jax_loss)(w))
        q = optax.apply_updates(q, v)
        for k in p:
            np.testing.assert_allclose(p[k].numpy(), np.asarray(q[k]), rtol=1e-6, atol=1e-12)
    assert float(np.abs(p["w"].numpy() - P0["w"]).max()) > 1e-3


def test_prodigy_estimate_grows_from_estim_lr0():
    tx = fo.prodigy()
    p = {k: torch.tensor(v) for k, v in P0.items()}
    s = tx.init(p)
    for _ in range(30):
        u, s = tx.update(torch.func.grad(torch_loss)(p), s, p)
        p = fo.apply_updates(p, u)
    assert float(s.estim_lr) > 1e-3  # from 1e-6


@pytest.mark.parametrize("make, name", [
    (lambda: fo.prodigy(betas=(0.9,)), "betas"), (lambda: fo.prodigy(estim_lr0=0.0), "estim_lr0"),
    (lambda: fo.dadapt_adamw(eps=-1.0), "eps"), (lambda: fo.ademamix(0.1, b3=1.0), "b3"),
    (lambda: fo.sam(fo.sgd(0.1), fo.scale(0.1), 0), "sync_period"),
    (lambda: fo.sam(fo.sgd(0.1), fo.scale(0.1), batch_axis_name="i"), "batch_axis_name"),
])
def test_bad_hyperparameters_raise_at_construction(make, name):
    with pytest.raises((ValueError, TypeError), match=name):
        make()
