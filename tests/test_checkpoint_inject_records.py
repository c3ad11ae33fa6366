"""Schedule records inside ``inject_hyperparams`` survive a checkpoint in template mode.

``inject_hyperparams(factory)(learning_rate=schedule)`` keeps a record of the schedule's value
in its ``hyperparams`` and passes that tensor to ``factory``, whose own state copies it
(``learning_rate`` of scale_by_learning_rate, of schedule-free). Neither copy is read by
``update`` (the schedule is evaluated at the count), so
``fo.load_checkpoint(path, params, tx.init(params))`` keeps the saved value in both: the
template's ``init`` marks both (:func:`funcopt.base.mark_if_schedule_value`). A number
template (``learning_rate=0.02``) is read by ``update`` and still wins in both places.
"""

from __future__ import annotations

import optree
import pytest
import torch
from _resume import sched as _sched
from _resume import train as _train
from torch.func import vmap

import funcopt as fo
from funcopt.base import holds_schedule_value
from funcopt.checkpoint import _hyperparameter_names
from funcopt.testing import assert_trees_equal

F64 = torch.float64

INJECTED = {
    "adam": lambda lr: fo.inject_hyperparams(fo.adam)(learning_rate=lr),
    "sgd_momentum": lambda lr: fo.inject_hyperparams(fo.sgd)(learning_rate=lr, momentum=0.9),
    "schedule_free_adamw": lambda lr: fo.inject_hyperparams(fo.schedule_free_adamw)(
        learning_rate=lr),
}


def _params():
    return {"w": torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=F64)}


def _rates(state):
    """The learning-rate leaves of the state's declared hyperparameter fields: the outer
    record (``InjectHyperparamsState.hyperparams['learning_rate']``) and the inner copy."""
    _, leaves, _ = optree.tree_flatten_with_path(state)
    return [leaf for name, leaf in zip(_hyperparameter_names(state), leaves)
            if "learning_rate" in name]


@pytest.mark.parametrize("name", sorted(INJECTED))
def test_the_inner_record_of_an_injected_schedule_keeps_the_saved_value(tmp_path, name):
    tx, params = INJECTED[name](_sched), _params()
    template = tx.init(params)
    assert len(_rates(template)) == 2
    assert all(holds_schedule_value(r) for r in _rates(template))
    _, s3 = _train(tx, params, tx.init(params), 3)
    saved = [float(r) for r in _rates(s3)]
    assert saved[0] == saved[1] == pytest.approx(_sched(2), rel=1e-6)
    fo.save_checkpoint(tmp_path / "c.pt", params, s3, step=3)
    ck = fo.load_checkpoint(tmp_path / "c.pt", params, template)
    assert [float(r) for r in _rates(ck.opt_state)] == saved  # not schedule(0) = 0.1 inside
    assert_trees_equal(ck.opt_state, s3)
    assert_trees_equal(_train(tx, params, ck.opt_state, 3, start=3),
                       _train(tx, params, s3, 3, start=3))


@pytest.mark.parametrize("name", sorted(INJECTED))
def test_an_injected_number_template_takes_its_number_in_both_places(tmp_path, name):
    """Saved with a schedule, loaded into the same transform built with 0.02: the outer and
    the inner field read 0.02 (update reads the number); saved with 0.02 and loaded into the
    schedule's template: both keep the saved 0.02 (records of the last step)."""
    tx_s, tx_n, params = INJECTED[name](_sched), INJECTED[name](0.02), _params()
    assert not any(holds_schedule_value(r) for r in _rates(tx_n.init(params)))
    _, s3 = _train(tx_s, params, tx_s.init(params), 3)
    fo.save_checkpoint(tmp_path / "s.pt", params, s3)
    ck = fo.load_checkpoint(tmp_path / "s.pt", params, tx_n.init(params))
    assert [float(r) for r in _rates(ck.opt_state)] == [0.02, 0.02]
    _, n3 = _train(tx_n, params, tx_n.init(params), 3)
    fo.save_checkpoint(tmp_path / "n.pt", params, n3)
    ck = fo.load_checkpoint(tmp_path / "n.pt", params, tx_s.init(params))
    assert [float(r) for r in _rates(ck.opt_state)] == [0.02, 0.02]


def test_an_injected_tensor_that_is_not_a_schedule_record_is_not_marked():
    """A tensor the caller passes as the learning rate is a value update reads (through the
    transform): its copy in the state is unmarked, so the template's value wins on load."""
    state = fo.adam(torch.tensor(0.1, dtype=F64)).init(_params())
    assert not holds_schedule_value(state[-1].learning_rate)


def test_a_sample_schedule_record_keeps_the_saved_value(tmp_path):
    """scale_by_sample_schedule's learning_rate records the schedule's value at the samples
    seen (update evaluates the schedule): it is marked and keeps the saved value on load."""
    tx, params = fo.scale_by_sample_schedule(fo.warmup_cosine_samples(0.1, 8, 80)), _params()
    assert holds_schedule_value(tx.init(params).learning_rate)
    assert not holds_schedule_value(fo.scale_by_sample_schedule(0.1).init(params).learning_rate)
    state = tx.init(params)
    for _ in range(3):
        _, state = tx.update(params, state, params, batch_size=4)
    assert float(state.learning_rate) > 0
    fo.save_checkpoint(tmp_path / "c.pt", params, state)
    ck = fo.load_checkpoint(tmp_path / "c.pt", params, tx.init(params))
    assert_trees_equal(ck.opt_state, state)


def test_injected_schedule_init_under_vmap_and_compile():
    """The marks change no value: init inside vmap, a vmapped step on a state from
    ``vmap(init)``, and ``torch.compile(init, fullgraph=True)`` (nothing is marked while
    compiling) give the eager numbers."""
    tx = INJECTED["adam"](_sched)
    params = {"w": torch.randn(3, 4, generator=torch.Generator().manual_seed(2), dtype=F64)}
    g = {"w": torch.ones(3, 4, dtype=F64)}

    def run(p, g):
        u, s = tx.update(g, tx.init(p), p)
        return fo.apply_updates(p, u), s

    loop = [run({"w": params["w"][i]}, {"w": g["w"][i]}) for i in range(3)]
    for batched in (vmap(run)(params, g),
                    vmap(lambda p, s, g: tx.update(g, s, p))(params, vmap(tx.init)(params), g)):
        for i, ref in enumerate(loop):
            got = optree.tree_map(lambda x, i=i: x[i] if x.dim() else x, batched[1])
            for a, b in zip(optree.tree_leaves(got), optree.tree_leaves(ref[1])):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
    compiled = torch.compile(tx.init, fullgraph=True, backend="eager")(params)
    assert_trees_equal(compiled, tx.init(params))
    assert not any(holds_schedule_value(r) for r in _rates(compiled))
