"""centralize, zero_nans, adaptive_grad_clip, apply_every, freeze, selective_transform and
the skip predicates against optax 0.2.8 (30 float64 steps, or one step on crafted inputs)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from test_breadth_common import P0, assert_same_path, jnp, moved, optax, run_funcopt, run_optax

import funcopt as fo

DEFAULT_DTYPE = torch.float64
MASK = {"w": True, "b": False, "v": True}

PAIRS = {
    "centralize": (lambda: fo.chain(fo.centralize(), fo.sgd(0.05)),
                   lambda: optax.chain(optax.centralize(), optax.sgd(0.05))),
    "agc": (lambda: fo.chain(fo.adaptive_grad_clip(0.1), fo.sgd(0.05)),
            lambda: optax.chain(optax.adaptive_grad_clip(0.1), optax.sgd(0.05))),
    "agc_axis": (lambda: fo.chain(fo.adaptive_grad_clip(0.05, 0.1, axis=-1), fo.sgd(0.05)),
                 lambda: optax.chain(optax.adaptive_grad_clip(0.05, 0.1, axis=-1), optax.sgd(0.05))),
    "apply_every": (lambda: fo.chain(fo.apply_every(3), fo.sgd(0.02)),
                    lambda: optax.chain(optax.apply_every(3), optax.sgd(0.02))),
    "freeze": (lambda: fo.chain(fo.adam(0.05), fo.freeze(MASK)),
               lambda: optax.chain(optax.adam(0.05), optax.freeze(MASK))),
    "selective_transform": (lambda: fo.selective_transform(fo.adam(0.05), freeze_mask=MASK),
                            lambda: optax.selective_transform(optax.adam(0.05), freeze_mask=MASK)),
    "zero_nans": (lambda: fo.chain(fo.zero_nans(), fo.sgd(0.05)),
                  lambda: optax.chain(optax.zero_nans(), optax.sgd(0.05))),
}


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_against_optax(name):
    make, ref = PAIRS[name]
    want = run_optax(ref())
    assert moved(want) > 1e-3
    assert_same_path(run_funcopt(make()), want, what=name)


def test_freeze_keeps_frozen_leaves():
    path = run_funcopt(fo.chain(fo.adam(0.05), fo.freeze(MASK)))
    assert np.array_equal(path[-1]["w"], P0["w"]) and not np.array_equal(path[-1]["b"], P0["b"])


def test_zero_nans_against_optax_on_nans():
    g = {"a": torch.tensor([1.0, float("nan"), float("inf")]), "b": torch.ones(2)}
    u, s = fo.zero_nans().update(g, fo.zero_nans().init(g))
    gj = {k: jnp.asarray(v.numpy()) for k, v in g.items()}
    tx = optax.zero_nans()
    uj, sj = tx.update(gj, tx.init(gj))
    for k in g:
        np.testing.assert_array_equal(u[k].numpy(), np.asarray(uj[k]))
    assert [bool(x) for x in s.found_nan] == [bool(sj.found_nan[k]) for k in sorted(g)]


@pytest.mark.parametrize("shape", [(5,), (4, 3), (2, 3, 4), (2, 2, 3, 4), (1, 2, 2, 3, 4)])
def test_agc_units_against_optax(shape):
    rng = np.random.default_rng(1)
    g, p = rng.normal(size=shape) * 3, rng.normal(size=shape) * 0.1
    u, _ = fo.adaptive_grad_clip(0.2).update({"x": torch.tensor(g)}, fo.EmptyState(),
                                             {"x": torch.tensor(p)})
    want, _ = optax.adaptive_grad_clip(0.2).update({"x": jnp.asarray(g)}, optax.EmptyState(),
                                                   {"x": jnp.asarray(p)})
    np.testing.assert_allclose(u["x"].numpy(), np.asarray(want["x"]), rtol=1e-12)
    assert not np.allclose(u["x"].numpy(), g)


@pytest.mark.parametrize("values", [[1.0, 2.0], [1.0, float("nan")], [float("inf"), 0.0]])
def test_skip_predicates_against_optax(values):
    g = {"a": torch.tensor(values)}
    gj = {"a": jnp.asarray(values)}
    skip, info = fo.skip_not_finite(g, None, None)
    skip_j, info_j = optax.skip_not_finite(gj, None, None)
    assert bool(skip) == bool(skip_j) and int(info["num_not_finite"]) == int(info_j["num_not_finite"])
    big = functools.partial(fo.skip_large_updates, max_squared_norm=4.0)
    big_j = functools.partial(optax.skip_large_updates, max_squared_norm=4.0)
    assert bool(big(g, None, None)[0]) == bool(big_j(gj, None, None)[0])


def test_apply_every_bad_k():
    with pytest.raises(ValueError, match="k="):
        fo.apply_every(0)
