"""Sophia against optax.contrib 0.2.8, 30 float64 steps. The test loss is separable, so its
Hessian is diagonal and Hutchinson's estimate z * (H z) is exact for any signs z: funcopt's
and optax's estimators (with different random streams) give the same numbers."""

from __future__ import annotations

import pytest
import torch
from test_breadth_common import P0, assert_same_path, moved, optax, run_funcopt, run_optax

import funcopt as fo

DEFAULT_DTYPE = torch.float64
C = optax.contrib


@pytest.mark.parametrize("make, ref", [
    (lambda: fo.sophia(0.05), lambda: C.sophia(0.05)),
    (lambda: fo.sophia(0.05, 0.9, 0.9, 1e-6, 0.0, None, 0.05, 0.5, 3),
     lambda: C.sophia(0.05, 0.9, 0.9, 1e-6, 0.0, None, 0.05, 0.5, 3)),
    (lambda: fo.sophia(0.01, eps=0.5, weight_decay=0.0, clip_threshold=None, update_interval=1),
     lambda: C.sophia(0.01, eps=0.5, weight_decay=0.0, clip_threshold=None, update_interval=1)),
], ids=["defaults", "options", "unclipped_every_step"])
def test_against_optax(make, ref):
    want = run_optax(ref(), extras="obj_fn")
    assert moved(want) > 1e-3
    assert_same_path(run_funcopt(make(), extras="obj_fn"), want, what="sophia")


def test_hutchinson_is_unbiased_on_a_coupled_quadratic():
    h = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 3.0]])
    est = fo.hutchinson_estimator_diag_hessian(7)
    p = {"x": torch.zeros(3)}
    s, total = est.init(p), torch.zeros(3)
    for _ in range(4000):
        d, s = est.update(p, s, p, obj_fn=lambda q: 0.5 * q["x"] @ h @ q["x"])
        total += d["x"]
    torch.testing.assert_close(total / 4000, torch.diagonal(h), atol=0.05, rtol=0)


def _with_obj_fn(tx):
    def update(updates, state, params=None, **extra):
        return tx.update(updates, state, params,
                         obj_fn=lambda q: sum((x**4).sum() for x in fo.tree_leaves(q)))

    return fo.GradientTransformation(tx.init, update)


def test_contract():
    from funcopt.testing import check_transform
    check_transform(_with_obj_fn(fo.sophia(0.1, update_interval=2)),
                    {k: torch.tensor(v) for k, v in P0.items()})


@pytest.mark.parametrize("make, name", [
    (lambda: fo.sophia(0.1, update_interval=0), "update_interval"),
    (lambda: fo.sophia(0.1, b1=1.0), "b1"),
    (lambda: fo.hutchinson_estimator_diag_hessian(1.5), "random_seed"),
])
def test_bad_hyperparameters_raise_at_construction(make, name):
    with pytest.raises((ValueError, TypeError), match=name):
        make()


@pytest.mark.parametrize("flag", ["verbose", "print_win_rate_every_n_steps"])
def test_printing_flags_are_not_taken(flag):
    """optax's printing flags did nothing here; passing one is a TypeError naming it."""
    with pytest.raises(TypeError, match=flag):
        fo.sophia(0.1, **{flag: 1})
    with pytest.raises(TypeError, match=flag):
        fo.scale_by_sophia(**{flag: 1})
