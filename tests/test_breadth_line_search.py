"""L-BFGS, the backtracking and the zoom line searches against optax 0.2.8, 30 float64 steps."""

from __future__ import annotations

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


def _bt(lib, **kw):
    return lib.scale_by_backtracking_linesearch(max_backtracking_steps=15, **kw)


PAIRS = {
    "lbfgs_backtracking": (lambda: fo.lbfgs(linesearch=_bt(fo)),
                           lambda: optax.lbfgs(linesearch=_bt(optax))),
    "lbfgs_lr_no_linesearch": (lambda: fo.lbfgs(0.3, memory_size=3, linesearch=None),
                               lambda: optax.lbfgs(0.3, memory_size=3, linesearch=None)),
    "lbfgs_unscaled": (
        lambda: fo.lbfgs(None, 4, False, _bt(fo, decrease_factor=0.5, store_grad=True)),
        lambda: optax.lbfgs(None, 4, False, _bt(optax, decrease_factor=0.5, store_grad=True))),
    "lbfgs_default_zoom": (lambda: fo.lbfgs(), lambda: optax.lbfgs()),
    "lbfgs_zoom_keep_capped": (
        lambda: fo.lbfgs(None, 5, True, fo.scale_by_zoom_linesearch(10, 1.5, 0.0, 3.0, 1e-3, 0.5,
                                                                    None)),
        lambda: optax.lbfgs(None, 5, True, optax.scale_by_zoom_linesearch(10, 1.5, 0.0, 3.0, 1e-3,
                                                                          0.5, None))),
    "gd_zoom": (lambda: fo.chain(fo.scale(-1.0), fo.scale_by_zoom_linesearch(15)),
                lambda: optax.chain(optax.scale(-1.0), optax.scale_by_zoom_linesearch(15))),
    "gd_backtracking": (
        lambda: fo.chain(fo.scale(-1.0), _bt(fo, slope_rtol=0.3, increase_factor=2.0,
                                            max_learning_rate=2.0, rtol=1e-3)),
        lambda: optax.chain(optax.scale(-1.0), _bt(optax, slope_rtol=0.3, increase_factor=2.0,
                                                   max_learning_rate=2.0, rtol=1e-3))),
}


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_against_optax(name):
    make, ref = PAIRS[name]
    want = run_optax(ref(), extras="linesearch")
    assert moved(want) > 1e-3
    assert_same_path(run_funcopt(make(), extras="linesearch"), want, what=name)


def test_lbfgs_default_converges_to_a_stationary_point():
    path = run_funcopt(fo.lbfgs(), steps=40, extras="linesearch")
    p = {k: torch.tensor(v) for k, v in path[-1].items()}
    g = torch.func.grad(torch_loss)(p)
    assert max(float(x.abs().max()) for x in g.values()) < 1e-8
    assert float(torch_loss(p)) < float(torch_loss({k: torch.tensor(v) for k, v in P0.items()}))


def test_backtracking_info_and_store_grad():
    tx = _bt(fo, store_grad=True)
    p = {k: torch.tensor(v) for k, v in P0.items()}
    g, value = torch.func.grad_and_value(torch_loss)(p)
    u = {k: -v for k, v in g.items()}
    out, state = tx.update(u, tx.init(p), p, value=value, grad=g, value_fn=torch_loss)
    new = fo.apply_updates(p, out)
    assert float(state.value) == pytest.approx(float(torch_loss(new)), rel=1e-12)
    want = torch.func.grad(torch_loss)(new)
    for k in want:
        torch.testing.assert_close(state.grad[list(sorted(p)).index(k)], want[k])
    assert int(state.info.num_linesearch_steps) >= 1 and float(state.info.decrease_error) == 0.0


def test_missing_value_fn_is_a_clear_error():
    tx = fo.lbfgs()
    p = {k: torch.tensor(v) for k, v in P0.items()}
    with pytest.raises(ValueError, match="value_fn"):
        tx.update(p, tx.init(p), p)


@pytest.mark.parametrize("make, name", [
    (lambda: fo.scale_by_lbfgs(0), "memory_size"),
    (lambda: fo.scale_by_backtracking_linesearch(-1), "max_backtracking_steps"),
    (lambda: fo.scale_by_backtracking_linesearch(5, decrease_factor=1.5), "decrease_factor"),
    (lambda: fo.scale_by_zoom_linesearch(0), "max_linesearch_steps"),
    (lambda: fo.scale_by_zoom_linesearch(5, initial_guess_strategy="two"), "initial_guess"),
    (lambda: fo.lbfgs(linesearch="wolfe"), "linesearch"),
])
def test_bad_hyperparameters_raise_at_construction(make, name):
    with pytest.raises((ValueError, TypeError), match=name):
        make()


def _with_objective(tx):
    """``tx`` with value, grad and value_fn of f(w) = sum(w^2) + sum(w) / 10 given to update."""

    def f(q):
        return sum((x * x).sum() + 0.1 * x.sum() for x in fo.tree_leaves(q))

    def update(updates, state, params=None, **extra):
        g, value = torch.func.grad_and_value(f)(params)
        return tx.update(updates, state, params, value=value, grad=g, value_fn=f)

    return fo.GradientTransformation(tx.init, update)


@pytest.mark.parametrize("make", [
    lambda: fo.lbfgs(), lambda: fo.lbfgs(0.1, 3, False, None),
    lambda: fo.chain(fo.scale(-1.0), fo.scale_by_backtracking_linesearch(4)),
    lambda: fo.lbfgs(linesearch=fo.scale_by_zoom_linesearch(4, 2.0)),
], ids=["lbfgs", "lbfgs_no_linesearch", "backtracking", "zoom"])
def test_contract(make):
    from funcopt.testing import check_transform
    check_transform(_with_objective(make()), {k: torch.tensor(v) for k, v in P0.items()})
