"""DoG, DoWG, COCOB, ACProp, Momo and Momo-Adam against optax.contrib 0.2.8, 30 float64 steps."""

from __future__ import annotations

import pytest
import torch
from test_breadth_common import P0, assert_same_path, moved, optax, run_funcopt, run_optax

import funcopt as fo

DEFAULT_DTYPE = torch.float64
C = optax.contrib
MASK = {"w": True, "b": False, "v": True}

PAIRS = {
    "dog": (lambda: fo.dog(), lambda: C.dog()),
    "dog_distance_wd": (lambda: fo.dog(0.5, ("distance", 0.1), 1e-6, 0.01, MASK),
                        lambda: C.dog(0.5, ("distance", 0.1), 1e-6, 0.01, MASK)),
    "dog_learning_rate": (lambda: fo.dog(1.0, ("learning_rate", 0.01)),
                          lambda: C.dog(1.0, ("learning_rate", 0.01))),
    "dowg": (lambda: fo.dowg(), lambda: C.dowg()),
    "dowg_options": (lambda: fo.dowg(0.5, 0.01, 1e-6, 0.01), lambda: C.dowg(0.5, 0.01, 1e-6, 0.01)),
    "cocob": (lambda: fo.cocob(), lambda: C.cocob()),
    "cocob_options": (lambda: fo.cocob(0.5, 10.0, 1e-6, 0.01, MASK),
                      lambda: C.cocob(0.5, 10.0, 1e-6, 0.01, MASK)),
    "acprop": (lambda: fo.acprop(0.05), lambda: C.acprop(0.05)),
    "acprop_options": (lambda: fo.acprop(0.05, 0.8, 0.99, 1e-8, 1e-10, 0.01),
                       lambda: C.acprop(0.05, 0.8, 0.99, 1e-8, 1e-10, 0.01)),
}

VALUE_PAIRS = {
    "momo": (lambda: fo.momo(0.5), lambda: C.momo(0.5)),
    "momo_options": (lambda: fo.momo(lambda c: 0.5 / (1 + 0.1 * c), 0.8, -1.0, 0.01, True),
                     lambda: C.momo(lambda c: 0.5 / (1 + 0.1 * c), 0.8, -1.0, 0.01, True)),
    "momo_adam": (lambda: fo.momo_adam(0.1), lambda: C.momo_adam(0.1)),
    "momo_adam_options": (lambda: fo.momo_adam(0.1, 0.8, 0.99, 1e-6, -1.0, 0.01, True),
                          lambda: C.momo_adam(0.1, 0.8, 0.99, 1e-6, -1.0, 0.01, True)),
}


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_against_optax(name):
    make, ref = PAIRS[name]
    want = run_optax(ref())
    assert moved(want) > 1e-3
    assert_same_path(run_funcopt(make()), want, what=name)


@pytest.mark.parametrize("name", sorted(VALUE_PAIRS))
def test_value_methods_against_optax(name):
    make, ref = VALUE_PAIRS[name]
    want = run_optax(ref(), extras="value")
    assert moved(want) > 1e-3
    assert_same_path(run_funcopt(make(), extras="value"), want, what=name)


def _with_value(tx):
    def update(updates, state, params=None, **extra):
        value = sum((x * x).sum() + 1.0 for x in fo.tree_leaves(params))
        return tx.update(updates, state, params, value=value)

    return fo.GradientTransformation(tx.init, update)


@pytest.mark.parametrize("make", [lambda: fo.momo(0.5, adapt_lower_bound=True),
                                  lambda: fo.momo_adam(0.1, weight_decay=0.01)],
                         ids=["momo", "momo_adam"])
def test_contract(make):
    from funcopt.testing import check_transform
    check_transform(_with_value(make()), {k: torch.tensor(v) for k, v in P0.items()})


@pytest.mark.parametrize("make, name", [
    (lambda: fo.dog(init_step=("guess", 1.0)), "init_step"), (lambda: fo.dowg(eps=-1.0), "eps"),
    (lambda: fo.cocob(alpha=0.0), "alpha"), (lambda: fo.acprop(0.1, b2=1.0), "b2"),
    (lambda: fo.momo(beta=1.5), "beta"), (lambda: fo.momo_adam(weight_decay=-1.0), "weight_decay"),
])
def test_bad_hyperparameters_raise_at_construction(make, name):
    with pytest.raises((ValueError, TypeError), match=name):
        make()


def test_momo_needs_value():
    tx = fo.momo()
    p = {k: torch.tensor(v) for k, v in P0.items()}
    with pytest.raises(ValueError, match="value"):
        tx.update(p, tx.init(p), p)


@pytest.mark.parametrize("make, ref", [
    (lambda: fo.mechanize(fo.adam(1.0)), lambda: C.mechanize(optax.adam(1.0))),
    (lambda: fo.mechanize(fo.sgd(1.0, 0.9), 0.1, 1e-6, 1e-4, 3),
     lambda: C.mechanize(optax.sgd(1.0, 0.9), 0.1, 1e-6, 1e-4, 3)),
], ids=["adam", "sgd_options"])
def test_mechanize_against_optax(make, ref):
    want = run_optax(ref())
    assert moved(want) > 1e-3
    assert_same_path(run_funcopt(make()), want, what="mechanize")
