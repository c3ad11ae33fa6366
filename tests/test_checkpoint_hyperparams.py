"""load_checkpoint and the hyperparameters held in an optimizer state.

The pure path (``fo.load_checkpoint(path, params, tx.init(params))``) takes the declared
hyperparameter fields (``learning_rate`` of scale_by_learning_rate, inject_hyperparams'
``hyperparams``) from the template: a transform rebuilt with a new learning rate steps with it,
as in optax, where they are arguments of the transform. ``hyperparams="saved"`` keeps the saved
values. fo.Optimizer.load_state_dict keeps torch.optim's rule (the saved ``lr`` wins).
"""

from __future__ import annotations

import contextlib
import math
import warnings

import optree
import pytest
import torch

import funcopt as fo
from funcopt.testing import assert_trees_equal

F64 = torch.float64


def _params():
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(4, 3, generator=g, dtype=F64),
            "b": torch.randn(3, generator=g, dtype=F64)}


def _grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    return optree.tree_map(lambda p: torch.randn(p.shape, generator=g, dtype=F64), params)


def _run(tx, params, state, steps, first_seed=1):
    for i in range(steps):
        upd, state = tx.update(_grads(params, first_seed + i), state, params)
        params = fo.apply_updates(params, upd)
    return params, state


@contextlib.contextmanager
def _no_warnings():
    """A block in which any warning is an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def test_resuming_with_a_new_learning_rate_uses_the_new_learning_rate(tmp_path):
    # A user trains with fo.adam(0.1), saves, then resumes with a lower rate:
    #   tx2 = fo.adam(1e-4); ck = fo.load_checkpoint(path, p, tx2.init(p))
    # scale_by_learning_rate reads a number learning rate from its state field (so that
    # fo.Optimizer can write it); load_checkpoint used to restore the saved field over the
    # template's, and the resumed steps were -0.1 * sign(g), 1000x too large. The template's
    # value now wins.
    p = {"w": torch.randn(3, dtype=F64)}
    g = {"w": torch.ones(3, dtype=F64)}
    tx = fo.adam(0.1)
    _, state = tx.update(g, tx.init(p), p)
    fo.save_checkpoint(tmp_path / "ck.pt", p, state, step=1)
    tx2 = fo.adam(1e-4)
    with _no_warnings():
        ck = fo.load_checkpoint(tmp_path / "ck.pt", p, tx2.init(p))
    upd, _ = tx2.update(g, ck.opt_state, p)
    # Adam's step with a constant gradient is -lr / (1 + eps) (the bias-corrected ratio is 1)
    torch.testing.assert_close(upd["w"], torch.full((3,), -1e-4 / (1 + 1e-8), dtype=F64),
                               rtol=1e-12, atol=0)


@pytest.mark.parametrize("choice", [None, "template"])  # None: the default
def test_a_new_learning_rate_continues_as_torch_adam_with_its_lr_changed(tmp_path, choice):
    """Reference: torch.optim.Adam run at lr 0.1, its param group set to 1e-3, run on."""
    params = _params()
    tx = fo.adam(0.1)
    p, state = _run(tx, params, tx.init(params), 3)
    fo.save_checkpoint(tmp_path / "ck.pt", p, state, step=3)
    tx2 = fo.adam(1e-3)
    kw = {} if choice is None else {"hyperparams": choice}
    with _no_warnings():
        ck = fo.load_checkpoint(tmp_path / "ck.pt", params, tx2.init(params), **kw)
    assert int(ck.opt_state[0].count) == 3  # moments and counts are the saved ones
    p_fo, _ = _run(tx2, ck.params, ck.opt_state, 3, first_seed=4)

    ref = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.Adam(list(ref.values()), lr=0.1)
    for i in range(6):
        if i == 3:
            opt.param_groups[0]["lr"] = 1e-3
        g = _grads(params, 1 + i)
        for k in ref:
            ref[k].grad = g[k]
        opt.step()
    for k in params:
        torch.testing.assert_close(p_fo[k], ref[k].detach(), rtol=1e-12, atol=1e-14)


def test_hyperparams_saved_keeps_the_saved_learning_rate_bit_for_bit(tmp_path):
    params = _params()
    tx = fo.adam(0.1)
    p, state = _run(tx, params, tx.init(params), 2)
    fo.save_checkpoint(tmp_path / "ck.pt", p, state, step=2)
    with _no_warnings():
        ck = fo.load_checkpoint(tmp_path / "ck.pt", params, fo.adam(1e-4).init(params),
                                hyperparams="saved")
    assert_trees_equal(ck.opt_state, state)
    assert ck.opt_state[1].learning_rate.item() == torch.tensor(0.1, dtype=F64).item()


SAME = {
    "adam": lambda: fo.adam(0.1),
    "sgd momentum": lambda: fo.sgd(0.05, momentum=0.9),
    "schedule_free_adamw": lambda: fo.schedule_free_adamw(0.1),
    "inject_hyperparams(adam)": lambda: fo.inject_hyperparams(fo.adam)(learning_rate=0.1),
    "partition": lambda: fo.partition({"a": fo.adam(0.1), "s": fo.sgd(0.01)},
                                      {"w": "a", "b": "s"}),
    "flatten(adamw)": lambda: fo.flatten(fo.adamw(0.1)),
}


@pytest.mark.parametrize("name", sorted(SAME))
def test_the_same_learning_rate_round_trips_bit_for_bit_without_a_warning(tmp_path, name):
    params = _params()
    tx = SAME[name]()
    p, state = _run(tx, params, tx.init(params), 3)
    p_full, s_full = _run(tx, p, state, 2, first_seed=4)
    fo.save_checkpoint(tmp_path / "ck.pt", p, state, step=3)
    with _no_warnings():
        ck = fo.load_checkpoint(tmp_path / "ck.pt", params, SAME[name]().init(params))
    assert_trees_equal(ck.opt_state, state, "loaded state")
    p_res, s_res = _run(tx, ck.params, ck.opt_state, 2, first_seed=4)
    assert_trees_equal(p_res, p_full, "resumed params")
    assert_trees_equal(s_res, s_full, "resumed state")


def test_only_the_changed_field_is_replaced(tmp_path):
    params = _params()
    make = lambda lr_s: fo.partition({"a": fo.adam(0.1), "s": fo.sgd(lr_s)},  # noqa: E731
                                     {"w": "a", "b": "s"})
    tx = make(0.01)
    p, state = _run(tx, params, tx.init(params), 2)
    fo.save_checkpoint(tmp_path / "ck.pt", p, state, step=2)
    ck = fo.load_checkpoint(tmp_path / "ck.pt", params, make(0.5).init(params))
    changed = [x for x, y in zip(optree.tree_leaves(ck.opt_state), optree.tree_leaves(state))
               if not torch.equal(x, y)]
    assert len(changed) == 1 and changed[0].item() == 0.5
    # the sgd branch steps with the new rate: b <- b - 0.5 g, the adam branch is untouched
    g = _grads(params, 9)
    upd, _ = make(0.5).update(g, ck.opt_state, ck.params)
    torch.testing.assert_close(upd["b"], -0.5 * g["b"], rtol=1e-15, atol=0)
    upd_old, _ = tx.update(g, state, p)
    assert torch.equal(upd["w"], upd_old["w"])


def test_a_value_written_into_the_state_is_replaced_or_kept_on_request(tmp_path):
    """inject_hyperparams: a rate lowered by writing the state during training."""
    params = _params()
    tx = fo.inject_hyperparams(fo.sgd)(learning_rate=0.1)
    p, state = _run(tx, params, tx.init(params), 2)
    state.hyperparams["learning_rate"] = torch.tensor(0.02, dtype=F64)
    fo.save_checkpoint(tmp_path / "ck.pt", p, state, step=2)
    g = _grads(params, 7)

    ck = fo.load_checkpoint(tmp_path / "ck.pt", params, tx.init(params))
    upd, _ = tx.update(g, ck.opt_state, ck.params)
    torch.testing.assert_close(upd["w"], -0.1 * g["w"], rtol=1e-15, atol=0)

    ck = fo.load_checkpoint(tmp_path / "ck.pt", params, tx.init(params), hyperparams="saved")
    upd, _ = tx.update(g, ck.opt_state, ck.params)
    torch.testing.assert_close(upd["w"], -0.02 * g["w"], rtol=1e-15, atol=0)


@pytest.mark.parametrize("choice", [None, "template", "saved"])
def test_a_schedule_resumes_at_the_saved_step_count(tmp_path, choice):
    """warmup_cosine(1.0, 10, 100) at step t < 10 is t / 10; Adam's step with a constant
    gradient is -lr / (1 + eps)."""
    schedule = fo.schedules.warmup_cosine(1.0, 10, 100)
    tx = fo.adam(schedule)
    p = {"w": torch.zeros(3, dtype=F64)}
    g = {"w": torch.ones(3, dtype=F64)}
    state = tx.init(p)
    for _ in range(4):
        _, state = tx.update(g, state, p)
    fo.save_checkpoint(tmp_path / "ck.pt", p, state, step=4)
    uninterrupted, _ = tx.update(g, state, p)
    # the field records schedule(3) = 0.3; a fresh init holds schedule(0)
    kw = {} if choice is None else {"hyperparams": choice}
    with _no_warnings():
        ck = fo.load_checkpoint(tmp_path / "ck.pt", p, tx.init(p), **kw)
    assert int(ck.opt_state[1].count) == 4 and int(ck.opt_state[0].count) == 4
    upd, s2 = tx.update(g, ck.opt_state, p)
    assert torch.equal(upd["w"], uninterrupted["w"])
    torch.testing.assert_close(upd["w"], torch.full((3,), -0.4 / (1 + 1e-8), dtype=F64),
                               rtol=1e-12, atol=0)
    assert math.isclose(s2[1].learning_rate.item(), 0.4, rel_tol=1e-15)


def test_optimizer_state_dict_restores_the_saved_lr_as_torch_optim_does():
    """fo.Optimizer.load_state_dict keeps torch.optim's rule: the saved group's lr wins over
    the lr the new optimizer was built with, and the steps go on as torch.optim.Adam's."""
    torch.manual_seed(0)
    w0 = torch.randn(5, dtype=F64)
    grads = [torch.randn(5, dtype=F64) for _ in range(6)]

    def steps(opt, w, gs):
        for g in gs:
            w.grad = g.clone()
            opt.step()

    w_fo, w_t = w0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
    opt_fo, opt_t = fo.Optimizer([w_fo], fo.adam(0.1)), torch.optim.Adam([w_t], lr=0.1)
    steps(opt_fo, w_fo, grads[:3])
    steps(opt_t, w_t, grads[:3])
    sd_fo, sd_t = opt_fo.state_dict(), opt_t.state_dict()

    v_fo = w_fo.detach().clone().requires_grad_(True)
    v_t = w_t.detach().clone().requires_grad_(True)
    new_fo, new_t = fo.Optimizer([v_fo], fo.adam(1e-4)), torch.optim.Adam([v_t], lr=1e-4)
    new_fo.load_state_dict(sd_fo)
    new_t.load_state_dict(sd_t)
    assert new_t.param_groups[0]["lr"] == 0.1  # torch's own rule
    assert new_fo.param_groups[0]["lr"] == 0.1
    steps(new_fo, v_fo, grads[3:])
    steps(new_t, v_t, grads[3:])
    torch.testing.assert_close(v_fo.detach(), v_t.detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("bad", ["new", "Template", True, 1, ["saved"]])
def test_a_bad_hyperparams_argument_is_one_value_error_before_reading(tmp_path, bad):
    params = _params()
    with pytest.raises(ValueError, match="hyperparams=.*'template'.*'saved'"):
        fo.load_checkpoint(tmp_path / "missing.pt", params, fo.adam(0.1).init(params),
                           hyperparams=bad)
