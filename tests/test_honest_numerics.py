"""No silent wrong answers from the first-order transforms, the wrappers and fo.Optimizer.

Each case was once accepted silently (a frozen run, a broadcast state, an ignored value);
each must now give the right numbers, a visible failure, or one clear error naming the
argument or leaf before any work.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import funcopt as fo

DEFAULT_DTYPE = torch.float64

ALIASES = ("sgd adam adamw nadam amsgrad adamax rmsprop adagrad adagrad_norm lion laprop adopt "
           "schedule_free_adamw schedule_free_sgd").split()


def _p(dtype=torch.float64):
    return {"b": torch.ones(2, dtype=dtype), "w": torch.ones(3, 2, dtype=dtype)}


# --------------------------------------------------------------------------- wrong trees


PER_LEAF_STATE = [n for n in ALIASES if n not in ("sgd", "adagrad_norm")] + ["sgd-momentum", "soap", "psgd_kron"]


@pytest.mark.parametrize("name", PER_LEAF_STATE)
def test_renamed_parameter_is_a_value_error_naming_the_leaf(name):
    """init saw {b: (2,), w: (3, 2)}; a renamed parameter gives {w: (3, 2), x: (2,)}: the
    state must not broadcast into the new leaf. (States keep no names: a renamed leaf of
    the same shape in the same place cannot be told apart; sgd without momentum and
    adagrad_norm keep nothing per leaf, so for them the new tree is simply a new tree.)"""
    if name == "sgd-momentum":
        tx = fo.sgd(0.1, momentum=0.9)
    else:
        tx = getattr(fo, name)(0.1) if name in ALIASES else getattr(fo, name)()
    state = tx.init(_p())
    new = {"w": torch.ones(3, 2), "x": torch.ones(2)}
    with pytest.raises(ValueError, match=r"\['(w|x)'\]"):
        tx.update(new, state, new)


@pytest.mark.parametrize("name", ALIASES)
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_non_float_leaves_are_a_type_error_naming_the_leaf(name, dtype):
    p = {"w": torch.ones(3, 2), "n": torch.ones(2).to(dtype)}
    tx = getattr(fo, name)(0.1)
    with pytest.raises(TypeError, match=r"\['n'\]"):
        tx.update(p, tx.init(p), p)


def test_adam_with_an_sgd_state_is_a_clear_error():
    p = _p()
    with pytest.raises(TypeError, match="scale_by_adam: got a TraceState state"):
        fo.adam(0.1).update(p, fo.sgd(0.1, momentum=0.9).init(p), p)


# --------------------------------------------------------------------------- hyperparameters


@pytest.mark.parametrize("name", ALIASES)
@pytest.mark.parametrize("lr", [math.inf, -math.inf, math.nan, -1.0])
def test_bad_learning_rates_are_refused_at_construction(name, lr):
    with pytest.raises(ValueError, match="learning_rate"):
        getattr(fo, name)(lr)


def test_bad_tensor_learning_rate_is_refused_at_construction():
    with pytest.raises(ValueError, match="learning_rate"):
        fo.adam(torch.tensor(float("inf")))


def test_inject_hyperparams_refuses_out_of_range_values_at_construction():
    with pytest.raises(ValueError, match="b1"):
        fo.inject_hyperparams(fo.adam)(0.1, b1=1.5)


def test_a_schedule_where_only_a_number_works_is_a_type_error_at_construction():
    with pytest.raises(TypeError, match="b1"):
        fo.lion(0.1, b1=lambda count: 0.9)


# --------------------------------------------------------------------------- non-finite values


def test_lion_nan_gradient_is_visible_not_a_frozen_coordinate():
    p = {"w": torch.ones(3)}
    tx = fo.lion(0.1)
    s = tx.init(p)
    u, s = tx.update({"w": torch.tensor([1.0, math.nan, 1.0])}, s, p)
    assert math.isnan(float(u["w"][1]))  # sign(nan) used to give 0: silently never moving
    # apply_if_finite skips that step and keeps moving afterwards
    tx = fo.apply_if_finite(fo.lion(0.1))
    s = tx.init(p)
    _, s = tx.update({"w": torch.tensor([1.0, math.nan, 1.0])}, s, p)
    u, s = tx.update({"w": torch.ones(3)}, s, p)
    assert int(s.total_notfinite) == 1 and bool((u["w"] != 0).all())


@pytest.mark.parametrize("name", ["adam", "nadam", "amsgrad", "rmsprop", "adagrad"])
def test_apply_if_finite_skips_a_step_that_overflows_the_state(name):
    """A finite float32 gradient of 1e30 squares to inf in the second moment while the
    update stays finite; the step must be skipped, and the run must keep moving."""
    p = {"w": torch.ones(3, dtype=torch.float32)}
    tx = fo.apply_if_finite(getattr(fo, name)(0.1))
    s = tx.init(p)
    _, s = tx.update({"w": torch.full((3,), 1e30, dtype=torch.float32)}, s, p)
    assert int(s.total_notfinite) == 1
    assert fo.tree_check_finite(s.inner_state)
    u, s = tx.update({"w": torch.ones(3, dtype=torch.float32)}, s, p)
    assert bool((u["w"] != 0).all()) and int(s.total_notfinite) == 1


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(ALIASES), st.floats(-1e38, 1e38, allow_nan=False, allow_infinity=False))
def test_apply_if_finite_never_passes_a_non_finite_update_or_state(name, g):
    p = {"w": torch.ones(2, dtype=torch.float32)}
    tx = fo.apply_if_finite(getattr(fo, name)(0.1))
    s = tx.init(p)
    for _ in range(2):
        u, s = tx.update({"w": torch.full((2,), g, dtype=torch.float32)}, s, p)
        assert fo.tree_check_finite(u) and fo.tree_check_finite(
            [x for x in fo.tree_leaves(s) if x.is_floating_point()])


# --------------------------------------------------------------------------- autograd


def test_apply_updates_warns_when_params_that_require_grad_build_a_graph():
    p = {"w": torch.ones(3, requires_grad=True)}
    with pytest.warns(UserWarning, match="require grad"):
        fo.apply_updates(p, {"w": torch.ones(3)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fo.apply_updates({"w": torch.ones(3)}, {"w": torch.ones(3)})  # detached: no warning
        lr = torch.tensor(0.1, requires_grad=True)  # differentiating on purpose: no warning
        fo.apply_updates(p, {"w": torch.ones(3) * lr})


def test_gradient_through_unrolled_updates_with_autograd():
    """The same derivative with plain autograd as with torch.func (a learned learning rate)."""
    lr = torch.tensor(0.05, requires_grad=True)
    p = {"w": torch.zeros(3)}
    target = torch.tensor([1.0, -2.0, 3.0])
    tx = fo.adam(lr)
    s = tx.init(p)
    for _ in range(3):
        g = {"w": 2 * (p["w"] - target)}
        u, s = tx.update(g, s, p)
        p = fo.apply_updates(p, u)
    loss = ((p["w"] - target) ** 2).sum()
    loss.backward()

    def unrolled(h):
        q, st_ = {"w": torch.zeros(3)}, fo.adam(h).init({"w": torch.zeros(3)})
        for _ in range(3):
            u, st_ = fo.adam(h).update({"w": 2 * (q["w"] - target)}, st_, q)
            q = fo.apply_updates(q, u)
        return ((q["w"] - target) ** 2).sum()

    want = torch.func.grad(unrolled)(torch.tensor(0.05))
    assert lr.grad is not None and float(lr.grad) != 0.0
    torch.testing.assert_close(lr.grad, want)


# --------------------------------------------------------------------------- fo.Optimizer


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


@pytest.mark.parametrize("kwargs", [dict(lr=-1.0), dict(lr=math.nan), dict(lr=math.inf)])
def test_optimizer_refuses_bad_learning_rates(kwargs):
    with pytest.raises(ValueError, match="lr"):
        fo.Optimizer(_model().parameters(), fo.adamw(1e-3), **kwargs)


def test_optimizer_refuses_bad_betas_in_a_group():
    m = _model()
    tx = fo.inject_hyperparams(fo.adam)(learning_rate=1e-3)
    with pytest.raises(ValueError, match="betas"):
        fo.Optimizer([{"params": m.parameters(), "betas": (1.5, 2.0)}], tx)
    opt = fo.Optimizer(m.parameters(), tx)
    opt.param_groups[0]["lr"] = math.nan  # written by hand (or a scheduler) before a step
    m(torch.randn(2, 4)).sum().backward()
    with pytest.raises(ValueError, match="lr"):
        opt.step()


def test_scheduler_on_a_transform_without_learning_rate_names_the_fix():
    opt = fo.Optimizer(_model().parameters(), fo.scale_by_adam())
    with pytest.raises(KeyError, match="scale_by_learning_rate"):
        torch.optim.lr_scheduler.StepLR(opt, step_size=2)


def test_load_state_dict_without_state_is_a_clear_error():
    opt = fo.Optimizer(_model().parameters(), fo.adamw(1e-3))
    sd = opt.state_dict()
    with pytest.raises(ValueError, match="state"):
        opt.load_state_dict({k: v for k, v in sd.items() if k != "state"})
    with pytest.raises(ValueError, match="param group 0"):
        opt.load_state_dict({**sd, "state": {}})


@pytest.mark.parametrize("make", [lambda m: fo.kfac(m, 1e-2, kl_clip=1e-3, T=1),
                                  lambda m: fo.singd(m, 1e-2)])
def test_optimizer_runs_kfac_and_singd_and_schedules_the_step_not_the_clip(make):
    m = _model()
    opt = fo.Optimizer(m.named_parameters(), make(m))
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    params = {k: v.detach() for k, v in m.named_parameters()}
    before = {k: v.clone() for k, v in params.items()}
    cap = fo.func.capture_curvature(m, params, x, y)
    for k, p in m.named_parameters():
        p.grad = cap.grads[k].clone()
    opt.step(curvature=cap)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-3)
    lr = fo.find_hyperparams(opt.transform_states[0])["learning_rate"]
    opt.step(curvature=cap)  # the group's lr is written into the step's field
    assert float(fo.find_hyperparams(opt.transform_states[0])["learning_rate"]) == pytest.approx(5e-3)
    assert float(lr) == pytest.approx(1e-2)
    assert any(not torch.equal(before[k], v.detach()) for k, v in m.named_parameters())


def test_kfac_with_unnamed_parameters_names_the_fix():
    m = _model()
    with pytest.raises(TypeError, match="named_parameters"):
        fo.Optimizer(m.parameters(), fo.kfac(m, 1e-2))


@pytest.mark.parametrize("name", ["adam", "adamw", "amsgrad"])
def test_float16_adam_with_small_gradients_stays_finite_and_moves(name):
    """Gradients of 1e-3 square to 1e-6, below float16's normal range, and eps = 1e-8 is 0 in
    float16: the moments live in float32, and the parameters follow the float32 run."""
    p16 = {"w": torch.ones(4, dtype=torch.float16)}
    p32 = {"w": torch.ones(4, dtype=torch.float32)}
    tx = getattr(fo, name)(1e-3)
    s16, s32 = tx.init(p16), tx.init(p32)
    for _ in range(10):
        u16, s16 = tx.update({"w": torch.full((4,), 1e-3, dtype=torch.float16)}, s16, p16)
        u32, s32 = tx.update({"w": torch.full((4,), 1e-3, dtype=torch.float32)}, s32, p32)
        p16, p32 = fo.apply_updates(p16, u16), fo.apply_updates(p32, u32)
    assert bool(torch.isfinite(p16["w"]).all())
    torch.testing.assert_close(p16["w"].float(), p32["w"], rtol=0, atol=2e-3)
    assert float(p16["w"][0]) < 0.995  # it moved (10 steps of about -1e-3)


def test_a_schedule_learning_rate_is_computed_in_the_parameters_float64():
    sched = fo.schedules.warmup_cosine_decay(0.0, 0.1, 5, 50)
    tx = fo.scale_by_learning_rate(sched)
    p = torch.ones(3, dtype=torch.float64)
    for step in (1, 3, 7, 31):
        _, s = tx.update(p, tx.init(p)._replace(count=torch.tensor(step)), p)
        if step < 5:
            want = 0.1 * step / 5
        else:
            want = 0.5 * 0.1 * (1 + math.cos(math.pi * (step - 5) / 45))
        assert s.learning_rate.dtype == torch.float64
        assert abs(float(s.learning_rate) - want) <= 1e-15, (step, float(s.learning_rate), want)


def test_psgd_warmup_is_float64():
    from funcopt.schedules.one_based import psgd_warmup

    lr = psgd_warmup(0.3, 7)
    for c in (0, 2, 6, 40):
        t = c + 1
        assert abs(float(lr(torch.tensor(c))) - 0.3 * t / max(t, 8)) <= 1e-16
