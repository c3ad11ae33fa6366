"""reduce_on_plateau against optax.contrib.reduce_on_plateau (float64): the scale, the counters
and the scaled updates over 80 steps of a value that falls, stalls, falls again and is noisy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_breadth_common import jax, jnp, optax

import funcopt as fo

_RNG = np.random.default_rng(3)
VALUES = np.concatenate([np.linspace(5.0, 2.0, 15), np.full(25, 2.0), np.linspace(2.0, 1.0, 10),
                         1.0 + 0.05 * _RNG.normal(size=30)])
GRADS = _RNG.normal(size=(len(VALUES), 4))

CASES = [
    {},
    {"factor": 0.5, "patience": 3, "cooldown": 2},
    {"factor": 0.5, "patience": 2, "accumulation_size": 3, "min_scale": 0.1},
    {"factor": 0.3, "patience": 4, "rtol": 0.0, "atol": 0.02, "cooldown": 1},
]


@pytest.mark.parametrize("kwargs", CASES, ids=str)
def test_reduce_on_plateau_against_optax(kwargs):
    tx, ref = fo.reduce_on_plateau(**kwargs), optax.contrib.reduce_on_plateau(**kwargs)
    p, pj = {"a": torch.zeros(4, dtype=torch.float64)}, {"a": jnp.zeros(4)}
    s, sj = tx.init(p), ref.init(pj)
    scales = []
    ref_update = jax.jit(ref.update)  # eager jax dispatch is slow
    for v, g in zip(VALUES, GRADS):
        u, s = tx.update({"a": torch.tensor(g)}, s, p, value=torch.tensor(v))
        uj, sj = ref_update({"a": jnp.asarray(g)}, sj, pj, value=jnp.asarray(v))
        np.testing.assert_allclose(u["a"].numpy(), np.asarray(uj["a"]), rtol=1e-12)
        for f in ("scale", "best_value", "avg_value"):
            np.testing.assert_allclose(float(getattr(s, f)), float(getattr(sj, f)), rtol=1e-12)
        for f in ("plateau_count", "cooldown_count", "count"):
            assert int(getattr(s, f)) == int(getattr(sj, f)), f
        scales.append(float(s.scale))
    assert s.scale.dtype == torch.float64
    if kwargs:
        assert min(scales) < 1.0  # the run did reduce: the comparison covered a reduction


@pytest.mark.parametrize("kwargs, match", [
    ({"factor": 1.0}, "factor"), ({"factor": 0.0}, "factor"), ({"rtol": -1.0}, "rtol"),
    ({"rtol": 2.0}, "rtol"), ({"rtol": 0.0, "atol": 0.0}, "rtol and atol"),
    ({"patience": 0}, "patience"), ({"cooldown": -1}, "cooldown"),
    ({"accumulation_size": 0}, "accumulation_size"), ({"min_scale": -0.1}, "min_scale"),
])
def test_reduce_on_plateau_rejects_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fo.reduce_on_plateau(**kwargs)


def test_reduce_on_plateau_needs_value():
    tx = fo.reduce_on_plateau()
    p = {"a": torch.ones(2)}
    with pytest.raises(TypeError, match="value="):
        tx.update(p, tx.init(p), p)


def test_reduce_on_plateau_in_a_chain_scales_adam():
    tx = fo.chain(fo.adam(0.1), fo.reduce_on_plateau(factor=0.5, patience=1))
    p = {"a": torch.ones(3, dtype=torch.float64)}
    s = tx.init(p)
    for _ in range(4):
        u, s = tx.update(p, s, p, value=1.0)
    assert float(s[1].scale) == 0.125  # 4 equal values: steps 2, 3, 4 do not improve: 3 halvings


def test_reduce_on_plateau_contract():
    """The contract table's checks (purity, state checkpoint, vmap, compile), with value=."""
    from funcopt.testing import check_transform

    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(4, 3, generator=g, dtype=torch.float64),
              "b": torch.randn(3, generator=g, dtype=torch.float64)}
    check_transform(fo.chain(fo.adam(0.1), fo.reduce_on_plateau(0.5, 1)), params, steps=4,
                    value=torch.tensor(1.0, dtype=torch.float64))
