"""``fo.tree`` against ``optax.tree`` (0.2.8) on the same trees."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_breadth_common import jnp, optax

import funcopt as fo

DEFAULT_DTYPE = torch.float64

RNG = np.random.default_rng(3)
X = {"a": RNG.normal(size=(3, 2)), "b": [RNG.normal(size=4), RNG.normal(size=())]}
Y = {"a": RNG.uniform(1, 2, size=(3, 2)), "b": [RNG.uniform(1, 2, size=4), RNG.uniform(1, 2, size=())]}


def _t(tree):
    return _conv(tree, torch.tensor)


def _conv(tree, fn):
    import optree
    return optree.tree_map(fn, tree, none_is_leaf=False)


def _j(tree):
    return _conv(tree, jnp.asarray)


def _np(tree):
    import optree
    return optree.tree_leaves(_conv(tree, np.asarray))


def _close(a, b):
    for x, y in zip(_np(a), _np(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-12)


@pytest.mark.parametrize("name", ["max", "min", "sum", "size"])
def test_reductions(name):
    got, want = getattr(fo.tree, name)(_t(X)), getattr(optax.tree, name)(_j(X))
    np.testing.assert_allclose(float(got), float(want), rtol=1e-12)


@pytest.mark.parametrize("ord", [None, 1, 2, math.inf, "inf"])
@pytest.mark.parametrize("squared", [False, True])
def test_norm(ord, squared):
    got = fo.tree.norm(_t(X), ord, squared)
    want = optax.tree.norm(_j(X), ord, squared)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-12)


def test_norm_bad_ord():
    with pytest.raises(ValueError, match="ord"):
        fo.tree.norm(_t(X), 3)


@pytest.mark.parametrize("name", ["mul", "div"])
def test_elementwise(name):
    _close(getattr(fo.tree, name)(_t(X), _t(Y)), getattr(optax.tree, name)(_j(X), _j(Y)))


def test_where_clip_and_moments():
    _close(fo.tree.where(torch.tensor(True), _t(X), _t(Y)), optax.tree.where(True, _j(X), _j(Y)))
    _close(fo.tree.where(torch.tensor(False), _t(X), _t(Y)), optax.tree.where(False, _j(X), _j(Y)))
    _close(fo.tree.clip(_t(X), -0.5, 0.3), optax.tree.clip(_j(X), -0.5, 0.3))
    _close(fo.tree.clip(_t(X), None, 0.3), optax.tree.clip(_j(X), None, 0.3))
    _close(fo.tree.bias_correction(_t(X), 0.9, torch.tensor(3)),
           optax.tree.bias_correction(_j(X), 0.9, jnp.asarray(3)))
    for order in (1, 2, 3):
        _close(fo.tree.update_moment(_t(X), _t(Y), 0.8, order),
               optax.tree.update_moment(_j(X), _j(Y), 0.8, order))
        _close(fo.tree.update_moment_per_elem_norm(_t(X), _t(Y), 0.8, order),
               optax.tree.update_moment_per_elem_norm(_j(X), _j(Y), 0.8, order))
    _close(fo.tree.update_infinity_moment(_t(X), _t(Y), 0.8, 1e-3),
           optax.tree.update_infinity_moment(_j(X), _j(Y), 0.8, 1e-3))


def test_dtype_and_cast_like():
    mixed = {"a": torch.zeros(2, dtype=torch.float32), "b": torch.zeros(2, dtype=torch.float64)}
    with pytest.raises(ValueError, match="mixed_dtype_handler"):
        fo.tree.dtype(mixed)
    assert fo.tree.dtype(mixed, "promote") == torch.float64
    assert fo.tree.dtype(mixed, "highest") == torch.float64
    assert fo.tree.dtype(mixed, "lowest") == torch.float32
    cast = fo.tree.cast_like({"a": torch.ones(2), "b": torch.ones(2)}, mixed)
    assert cast["a"].dtype == torch.float32 and cast["b"].dtype == torch.float64


def test_allclose():
    assert fo.tree.allclose(_t(X), _t(X))
    assert not fo.tree.allclose(_t(X), _t(Y))


def test_get_and_set_on_an_optimizer_state():
    params = {"w": torch.ones(2)}
    state = fo.adam(0.1).init(params)
    lr = fo.tree.get(state, "learning_rate")
    assert float(lr) == pytest.approx(0.1)
    with pytest.raises(KeyError, match="count"):
        fo.tree.get(state, "count")  # scale_by_adam's and scale_by_learning_rate's
    new = fo.tree.set(state, learning_rate=torch.tensor(0.5))
    assert float(fo.tree.get(new, "learning_rate")) == 0.5
    assert float(fo.tree.get(state, "learning_rate")) == pytest.approx(0.1)  # a copy
    assert fo.tree.get(state, "missing", default="d") == "d"
    adam_state = fo.tree.get(state, "ScaleByAdamState")
    assert isinstance(adam_state, fo.ScaleByAdamState)
    only_adam = fo.tree.get(state, "count", filtering=lambda path, node: path[0] == 0)
    assert int(only_adam) == 0
    with pytest.raises(KeyError, match="nope"):
        fo.tree.set(state, nope=1)


def test_get_matches_optax_on_the_same_state_shape():
    ps = {"w": jnp.ones(2)}
    ostate = optax.inject_hyperparams(optax.adam)(learning_rate=0.1).init(ps)
    assert float(optax.tree.get(ostate, "learning_rate")) == pytest.approx(0.1)
    fstate = fo.inject_hyperparams(fo.adam)(learning_rate=0.1).init({"w": torch.ones(2)})
    hyper = fo.tree.get(fstate, "learning_rate", filtering=lambda path, node: len(path) == 2)
    assert float(hyper) == pytest.approx(0.1)
