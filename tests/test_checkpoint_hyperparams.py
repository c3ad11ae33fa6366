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


def _four_steps_saved(tx, tmp_path):
    """Four steps of ``tx`` from zeros with a constant gradient of ones, saved to
    ``tmp_path / "ck.pt"``: ``(params, grads, state)``."""
    p = {"w": torch.zeros(3, dtype=F64)}
    g = {"w": torch.ones(3, dtype=F64)}
    state = tx.init(p)
    for _ in range(4):
        _, state = tx.update(g, state, p)
    fo.save_checkpoint(tmp_path / "ck.pt", p, state, step=4)
    return p, g, state


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
    p, g, state = _four_steps_saved(tx, tmp_path)
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


@pytest.mark.parametrize("case", [
    # size, steps before the save, lr saved, lr of the new optimizer, fo / torch builders, tol
    (5, 3, 0.1, 1e-4, lambda lr: fo.adam(lr), lambda ps, lr: torch.optim.Adam(ps, lr=lr),
     (1e-12, 1e-14)),
    (4, 2, 0.1, 0.7, lambda lr: fo.sgd(lr, momentum=0.9),
     lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9), (1e-13, 1e-15)),
], ids=["adam", "sgd-momentum"])
def test_optimizer_state_dict_restores_the_saved_lr_as_torch_optim_does(case):
    """fo.Optimizer.load_state_dict keeps torch.optim's rule: the saved group's lr wins over
    the lr the new optimizer was built with, and the steps go on as torch.optim's (Adam; SGD
    with momentum)."""
    size, before, lr, new_lr, make_fo, make_torch, (rtol, atol) = case
    torch.manual_seed(0)
    w0 = torch.randn(size, dtype=F64)
    grads = [torch.randn(size, dtype=F64) for _ in range(before + 3)]

    def steps(opt, w, gs):
        for g in gs:
            w.grad = g.clone()
            opt.step()

    w_fo, w_t = w0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
    opt_fo, opt_t = fo.Optimizer([w_fo], make_fo(lr)), make_torch([w_t], lr)
    steps(opt_fo, w_fo, grads[:before])
    steps(opt_t, w_t, grads[:before])
    sd_fo, sd_t = opt_fo.state_dict(), opt_t.state_dict()

    v_fo = w_fo.detach().clone().requires_grad_(True)
    v_t = w_t.detach().clone().requires_grad_(True)
    new_fo, new_t = fo.Optimizer([v_fo], make_fo(new_lr)), make_torch([v_t], new_lr)
    new_fo.load_state_dict(sd_fo)
    new_t.load_state_dict(sd_t)
    assert new_t.param_groups[0]["lr"] == lr  # torch's own rule
    assert new_fo.param_groups[0]["lr"] == lr
    steps(new_fo, v_fo, grads[before:])
    steps(new_t, v_t, grads[before:])
    torch.testing.assert_close(v_fo.detach(), v_t.detach(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("bad", ["new", "Template", True, 1, ["saved"]])
def test_a_bad_hyperparams_argument_is_one_value_error_before_reading(tmp_path, bad):
    params = _params()
    with pytest.raises(ValueError, match="hyperparams=.*'template'.*'saved'"):
        fo.load_checkpoint(tmp_path / "missing.pt", params, fo.adam(0.1).init(params),
                           hyperparams=bad)


# --------------------------------------------------------------------------- dtype and shape


def _saved_inject(tmp_path, steps=2):
    """inject_hyperparams(sgd) at 0.1 in float64 (the params' dtype), saved after ``steps``."""
    params = _params()
    tx = fo.inject_hyperparams(fo.sgd)(learning_rate=0.1)
    p, state = _run(tx, params, tx.init(params), steps)
    fo.save_checkpoint(tmp_path / "ck.pt", p, state, step=steps)
    return params, p, state


def test_template_mode_takes_a_float32_hyperparameter_over_a_float64_save(tmp_path):
    """The saved float64 hyperparameter is replaced, so its dtype is not compared: the load
    keeps the template's float32 rate and steps with it (reference: p - 0.01 g in float64,
    with 0.01 rounded to float32 as the transform holds it)."""
    params, p, state = _saved_inject(tmp_path)
    tx32 = fo.inject_hyperparams(fo.sgd, hyperparam_dtype=torch.float32)(learning_rate=0.01)
    with _no_warnings():
        ck = fo.load_checkpoint(tmp_path / "ck.pt", params, tx32.init(params))
    lr = ck.opt_state.hyperparams["learning_rate"]
    assert lr.dtype == torch.float32 and lr.item() == torch.tensor(0.01, dtype=torch.float32).item()
    assert int(ck.opt_state.count) == 2
    assert_trees_equal(ck.params, p)
    g = _grads(params, 11)
    upd, s2 = tx32.update(g, ck.opt_state, ck.params)
    lr64 = float(torch.tensor(0.01, dtype=torch.float32))
    for k in params:
        torch.testing.assert_close(upd[k], -lr64 * g[k], rtol=1e-7, atol=0)
    assert s2.hyperparams["learning_rate"].dtype == torch.float32


def test_template_mode_takes_a_hyperparameter_of_another_shape(tmp_path):
    """A template whose hyperparameter field has another shape than the saved one (a
    per-run rate written as a (1,)-tensor) still loads: the template's leaf replaces it."""
    params, _, _ = _saved_inject(tmp_path)
    template = fo.inject_hyperparams(fo.sgd)(learning_rate=0.1).init(params)
    template.hyperparams["learning_rate"] = torch.tensor([0.05], dtype=F64)
    ck = fo.load_checkpoint(tmp_path / "ck.pt", params, template)
    assert torch.equal(ck.opt_state.hyperparams["learning_rate"],
                       torch.tensor([0.05], dtype=F64))
    assert ck.opt_state.hyperparams["learning_rate"] is not template.hyperparams["learning_rate"]


def test_saved_mode_names_the_hyperparameter_field_of_another_dtype(tmp_path):
    params, _, _ = _saved_inject(tmp_path)
    tx32 = fo.inject_hyperparams(fo.sgd, hyperparam_dtype=torch.float32)(learning_rate=0.1)
    with pytest.raises(ValueError, match=r"hyperparameter InjectHyperparamsState\.hyperparams"
                                         r"\['\w+'\]\).*float64.*float32.*"
                                         r"hyperparams='template'") as e:
        fo.load_checkpoint(tmp_path / "ck.pt", params, tx32.init(params), hyperparams="saved")
    assert "parameters changed" not in str(e.value)


def test_saved_mode_names_a_scale_by_learning_rate_field_of_another_dtype(tmp_path):
    params = _params()
    tx = fo.sgd(0.1)
    fo.save_checkpoint(tmp_path / "ck.pt", params, tx.init(params))
    template = (tx.init(params)[0]._replace(learning_rate=torch.tensor(0.5)),)  # float32
    with pytest.raises(ValueError, match=r"ScaleByLearningRateState\.learning_rate.*"
                                         r"hyperparams='template'"):
        fo.load_checkpoint(tmp_path / "ck.pt", params, template, hyperparams="saved")
    ck = fo.load_checkpoint(tmp_path / "ck.pt", params, template)  # the template's float32
    assert ck.opt_state[0].learning_rate.dtype == torch.float32
    assert ck.opt_state[0].learning_rate.item() == 0.5


@pytest.mark.parametrize("choice", ["template", "saved"])
def test_other_leaves_of_another_dtype_are_still_refused(tmp_path, choice):
    """Only declared hyperparameter leaves skip the comparison: Adam's moments (float32 in
    the template, float64 saved) and a step count (int32) are refused in both modes."""
    params = _params()
    tx = fo.inject_hyperparams(fo.adam)(learning_rate=0.1)
    p, state = _run(tx, params, tx.init(params), 2)
    fo.save_checkpoint(tmp_path / "ck.pt", p, state, step=2)
    template = tx.init(params)
    mu32 = optree.tree_map(lambda x: x.float(), template.inner_state[0].mu)
    bad_mu = template._replace(inner_state=(template.inner_state[0]._replace(mu=mu32),
                                            *template.inner_state[1:]))
    bad_count = template._replace(count=template.count.int())
    for bad in (bad_mu, bad_count):
        with pytest.raises(ValueError, match="the parameters changed shape or dtype"):
            fo.load_checkpoint(tmp_path / "ck.pt", params, bad, hyperparams=choice)
    params32 = optree.tree_map(lambda x: x.float(), params)
    with pytest.raises(ValueError, match="saved params leaf 0 .*float64.*float32"):
        fo.load_checkpoint(tmp_path / "ck.pt", params32, template, hyperparams=choice)


def test_template_mode_still_needs_the_hyperparameter_leaf_in_the_file(tmp_path):
    """The saved file must hold the same structure: a template with an extra hyperparameter
    entry is refused as a different transform."""
    params, _, _ = _saved_inject(tmp_path)
    template = fo.inject_hyperparams(fo.sgd)(learning_rate=0.1, momentum=0.9).init(params)
    with pytest.raises(ValueError, match="does not match the template"):
        fo.load_checkpoint(tmp_path / "ck.pt", params, template)


# --------------------------------------------------------------------------- schedule records


@pytest.mark.parametrize("choice", ["template", "saved"])
def test_a_schedule_record_keeps_the_saved_value_on_load(tmp_path, choice):
    """With a schedule the learning_rate field records the schedule's value at the last step
    (warmup_cosine(1.0, 10, 100) at step 4 is 0.4); update does not read it, so template mode
    keeps the saved record instead of the template's schedule(0) = 0."""
    schedule = fo.schedules.warmup_cosine(1.0, 10, 100)
    tx = fo.adam(schedule)
    p, state = _run(tx, _params(), tx.init(_params()), 5)
    fo.save_checkpoint(tmp_path / "ck.pt", p, state, step=5)
    template = tx.init(p)
    assert template[1].learning_rate.item() == 0.0
    ck = fo.load_checkpoint(tmp_path / "ck.pt", p, template, hyperparams=choice)
    assert math.isclose(ck.opt_state[1].learning_rate.item(), 0.4, rel_tol=1e-15)
    assert_trees_equal(ck.opt_state, state)
    # and it goes on as the uninterrupted run
    assert_trees_equal(_run(tx, ck.params, ck.opt_state, 2, first_seed=6),
                       _run(tx, p, state, 2, first_seed=6))


def test_a_number_template_replaces_a_saved_schedule_record(tmp_path):
    """Saved with a schedule, resumed with a number: the number is what update reads, so it
    is the template's (reference: Adam's step with a constant gradient, -lr / (1 + eps))."""
    tx = fo.adam(fo.schedules.warmup_cosine(1.0, 10, 100))
    p, g, state = _four_steps_saved(tx, tmp_path)
    tx2 = fo.adam(1e-3)
    ck = fo.load_checkpoint(tmp_path / "ck.pt", p, tx2.init(p))
    assert ck.opt_state[1].learning_rate.item() == 1e-3
    upd, _ = tx2.update(g, ck.opt_state, p)
    torch.testing.assert_close(upd["w"], torch.full((3,), -1e-3 / (1 + 1e-8), dtype=F64),
                               rtol=1e-12, atol=0)


def test_a_schedule_record_of_another_dtype_is_cast_to_the_template(tmp_path):
    """sgd(schedule) saved with float64 parameters, resumed with a state built for float32
    ones (its record is float32): the record keeps the saved value, schedule(2) = 0.2, in the
    template's dtype; a copy of the template's field (``.double()``) is unmarked and is
    taken as it is, schedule(0) = 0."""
    tx = fo.sgd(fo.schedules.warmup_cosine(1.0, 10, 100))
    p, state = _run(tx, _params(), tx.init(_params()), 3)
    fo.save_checkpoint(tmp_path / "ck.pt", p, state, step=3)
    p32 = optree.tree_map(lambda x: x.float(), p)
    ck = fo.load_checkpoint(tmp_path / "ck.pt", p, tx.init(p32))
    lr = ck.opt_state[0].learning_rate
    assert lr.dtype == torch.float32 and lr.item() == torch.tensor(0.2, dtype=F64).float().item()
    assert int(ck.opt_state[0].count) == 3
    copied = (tx.init(p32)[0]._replace(learning_rate=tx.init(p32)[0].learning_rate.double()),)
    ck = fo.load_checkpoint(tmp_path / "ck.pt", p, copied)
    assert ck.opt_state[0].learning_rate.item() == 0.0


def test_the_schedule_mark_is_on_the_init_tensor_only():
    from funcopt.base import holds_schedule_value

    p = {"w": torch.zeros(2)}
    scheduled = fo.adam(fo.schedules.warmup_cosine(1.0, 10, 100)).init(p)[1].learning_rate
    assert holds_schedule_value(scheduled)
    assert not holds_schedule_value(scheduled.clone())
    assert not holds_schedule_value(fo.adam(0.1).init(p)[1].learning_rate)
    assert not holds_schedule_value(0.1)


def test_a_scheduled_init_still_compiles_with_fullgraph():
    """The mark is not made while compiling (Dynamo cannot trace a weak reference), so
    ``torch.compile(init, fullgraph=True)`` works as before; its output is unmarked."""
    from funcopt.base import holds_schedule_value

    tx = fo.adam(fo.schedules.warmup_cosine(1.0, 10, 100))
    p = {"w": torch.zeros(3, dtype=F64)}
    state = torch.compile(tx.init, fullgraph=True, backend="eager")(p)
    assert_trees_equal(state, tx.init(p))
    assert not holds_schedule_value(state[1].learning_rate)


@pytest.mark.parametrize("make,field", [
    (lambda s: fo.schedule_free_adamw(s), lambda st: st.learning_rate),
    (lambda s: fo.inject_hyperparams(fo.sgd)(learning_rate=s),
     lambda st: st.hyperparams["learning_rate"]),
])
def test_schedule_records_of_schedule_free_and_inject_hyperparams_keep_the_saved_value(
        tmp_path, make, field):
    """Their schedules' records (update evaluates the schedule at the count) keep the saved
    value on load, as scale_by_learning_rate's; the resumed steps equal the uninterrupted."""
    tx = make(fo.schedules.warmup_cosine(1.0, 10, 100))
    p, state = _run(tx, _params(), tx.init(_params()), 5)
    fo.save_checkpoint(tmp_path / "ck.pt", p, state, step=5)
    template = tx.init(p)
    assert field(template).item() == 0.0
    ck = fo.load_checkpoint(tmp_path / "ck.pt", p, template)
    assert field(ck.opt_state).item() == field(state).item() > 0
    # (inject_hyperparams' inner sgd keeps its own copy of the rate, marked as well: the whole
    # loaded state is the saved one; tests/test_checkpoint_inject_records.py)
    assert_trees_equal(ck.opt_state, state)
    assert_trees_equal(_run(tx, ck.params, ck.opt_state, 2, first_seed=6),
                       _run(tx, p, state, 2, first_seed=6))
