"""Adversarial guards: attacks that the current code withstands, kept as regression tests.

Each test feeds what a careless user or an adversary would (empty trees, 0-d and zero-size
leaves, 16-bit and mixed dtypes, NaN/inf/1e300 gradients, derivatives through ``update``,
checkpoints of every state, schedules at odd steps, AMP loops, batched least squares with a
broken problem, bad command lines) and compares with an independent reference: float64 math,
finite differences, torch.optim, or the exact answer of the problem.
"""

from __future__ import annotations

import math

import optree
import pytest
import torch
from torch.func import jacrev, jvp

import funcopt as fo
from funcopt.bench.__main__ import main as bench_main
from funcopt.testing import assert_trees_equal, check_hyperparameter_grad

DEFAULT_DTYPE = torch.float64
F64 = torch.float64
S = fo.schedules

# transforms that take (grads, state, params) and nothing else, first-order to second-order,
# with the combinators wrapping them; masks need the {"w", "b"} tree and are listed apart.
BUILD = {
    "sgd": lambda: fo.sgd(0.1, momentum=0.9), "adam": lambda: fo.adam(0.1),
    "adamw": lambda: fo.adamw(0.1), "nadam": lambda: fo.nadam(0.1),
    "amsgrad": lambda: fo.amsgrad(0.1), "adamax": lambda: fo.adamax(0.1),
    "rmsprop": lambda: fo.rmsprop(0.1), "adagrad": lambda: fo.adagrad(0.1),
    "adagrad_norm": lambda: fo.adagrad_norm(0.1), "lion": lambda: fo.lion(0.1),
    "laprop": lambda: fo.laprop(0.1), "adopt": lambda: fo.adopt(0.1),
    "schedule_free_adamw": lambda: fo.schedule_free_adamw(0.1),
    "schedule_free_sgd": lambda: fo.schedule_free_sgd(0.1),
    "muon": lambda: fo.muon(), "soap": lambda: fo.soap(), "psgd_kron": lambda: fo.psgd_kron(),
    "clip_by_global_norm": lambda: fo.chain(fo.clip_by_global_norm(1.0), fo.sgd(0.1)),
    "clip_by_block_rms": lambda: fo.chain(fo.clip_by_block_rms(1.0), fo.sgd(0.1)),
    "trust_region_clip": lambda: fo.chain(fo.scale_by_adam(), fo.scale_by_trust_region_clip(),
                                          fo.scale(-0.1)),
    "bias_corrected_rms": lambda: fo.chain(fo.scale_by_bias_corrected_rms(), fo.scale(-0.1)),
    "add_noise": lambda: fo.chain(fo.add_noise(0.1, 0.55, seed=3), fo.scale(-0.1)),
    "apply_if_finite": lambda: fo.apply_if_finite(fo.adam(0.1), 3),
    "conditionally": lambda: fo.conditionally_transform(fo.adam(0.1), lambda c: c % 2 == 0),
    "inject_hyperparams": lambda: fo.inject_hyperparams(fo.adam)(learning_rate=0.1),
    "flatten": lambda: fo.flatten(fo.adamw(0.1)),
    "named_chain": lambda: fo.named_chain(("clip", fo.clip(1.0)), ("sgd", fo.sgd(0.1))),
    "multi_steps": lambda: fo.multi_steps(fo.adam(0.1), 2),
}
MASKED = {
    "masked": lambda: fo.masked(fo.adam(0.1), {"w": True, "b": False}),
    "partition": lambda: fo.partition({"a": fo.adam(0.1), "s": fo.sgd(0.1)},
                                      {"w": "a", "b": "s"}),
}
ALL = {**BUILD, **MASKED}


def _params(dtype=F64):
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(4, 3, generator=g, dtype=F64).to(dtype),
            "b": torch.randn(3, generator=g, dtype=F64).to(dtype)}


def _grads(params, seed=1, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return optree.tree_map(
        lambda p: (torch.randn(p.shape, generator=g, dtype=F64) * scale).to(p.dtype), params)


def _finite(tree) -> bool:
    return all(bool(torch.isfinite(x).all()) for x in optree.tree_leaves(tree)
               if x.is_floating_point())


def _run(tx, params, steps=3):
    state = tx.init(params)
    for s in range(steps):
        upd, state = tx.update(_grads(params, seed=s + 1), state, params)
    return upd, state


# ----------------------------------------------------------------------------- odd trees


ODD_TREES = {
    "zero-size leaf": lambda: {"w": torch.zeros(0, 3, dtype=F64), "b": torch.randn(3, dtype=F64)},
    "0-d leaf": lambda: {"w": torch.tensor(0.5, dtype=F64), "b": torch.randn(3, dtype=F64)},
    "float16": lambda: _params(torch.float16),
    "bfloat16": lambda: _params(torch.bfloat16),
    "float64 and float16 leaves": lambda: {"w": _params()["w"],
                                           "b": _params(torch.float16)["b"]},
}


@pytest.mark.parametrize("tree", sorted(ODD_TREES))
@pytest.mark.parametrize("name", sorted(set(ALL) - {"muon"}))
def test_odd_trees_give_finite_updates_shaped_and_typed_like_the_gradients(name, tree):
    """Zero-size, 0-d, 16-bit and mixed-dtype leaves: every update has its gradient's shape and
    dtype and is finite (standard-normal gradients: nothing may overflow)."""
    params = ODD_TREES[tree]()
    upd, state = _run(ALL[name](), params)
    for u, p in zip(optree.tree_leaves(upd), optree.tree_leaves(params)):
        assert u.shape == p.shape and u.dtype == p.dtype
    assert _finite(upd) and _finite(state)


@pytest.mark.parametrize("name", sorted(set(BUILD) - {"multi_steps"}))
def test_an_empty_tree_gives_empty_updates(name):
    """A model whose parameters are all frozen: {} in, {} out, no error."""
    tx = BUILD[name]()
    state = tx.init({})
    for _ in range(2):
        upd, state = tx.update({}, state, {})
        assert upd == {}


def test_muon_refuses_a_0d_leaf_naming_the_fix():
    with pytest.raises(ValueError, match="fo.muon"):
        _run(fo.scale_by_muon(), {"w": torch.tensor(0.5, dtype=F64)})


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
@pytest.mark.parametrize("name", ["apply_if_finite", "multi_steps", "inject_hyperparams",
                                  "masked", "partition"])
def test_non_float_gradients_through_combinators_are_a_type_error_naming_the_leaf(name, dtype):
    params = _params()
    grads = {"w": _grads(params)["w"], "b": torch.ones(3).to(dtype)}
    tx = ALL[name]()
    with pytest.raises(TypeError, match=r"\['b'\]"):
        tx.update(grads, tx.init(params), params)


# ----------------------------------------------------------------------------- apply_if_finite


@pytest.mark.parametrize("bad", [math.nan, math.inf, 1e300])
@pytest.mark.parametrize("name", sorted(ALL))
def test_apply_if_finite_around_any_transform_lets_nothing_non_finite_through(name, bad):
    """One gradient entry NaN, inf or 1e300 (whose square overflows a second moment): the
    step is skipped (zero update, the state as before) and the next good step is finite."""
    params = _params()
    tx = fo.apply_if_finite(ALL[name]())
    _, state = tx.update(_grads(params), tx.init(params), params)
    g = _grads(params, seed=2)
    g["w"][0, 0] = bad
    upd, state2 = tx.update(g, state, params)
    assert _finite(upd) and _finite(state2)
    assert int(state2.total_notfinite) == (0 if bool(state2.last_finite) else 1)
    upd, state3 = tx.update(_grads(params, seed=3), state2, params)
    assert _finite(upd) and _finite(state3)


# ----------------------------------------------------------------------------- derivatives


@pytest.mark.parametrize("name", sorted(set(ALL) - {"add_noise"}))
def test_jacrev_and_jvp_through_update_match_finite_differences(name):
    """d update / d gradient at step 2, by reverse mode and by forward mode, against central
    differences in float64 (the state of step 1 held fixed)."""
    params = _params()
    tx = ALL[name]()
    _, state = tx.update(_grads(params), tx.init(params), params)
    g2 = _grads(params, seed=2)

    def f(w):
        u, _ = tx.update({"w": w, "b": g2["b"]}, state, params)
        return u["w"]

    tangent = _grads({"t": g2["w"]}, seed=9)["t"]
    eps = 1e-6
    fd = (f(g2["w"] + eps * tangent) - f(g2["w"] - eps * tangent)) / (2 * eps)
    jac = jacrev(f)(g2["w"]).reshape(12, 12) @ tangent.reshape(12)
    _, fwd = jvp(f, (g2["w"],), (tangent,))
    torch.testing.assert_close(jac.reshape(4, 3), fd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fwd, fd, rtol=1e-5, atol=1e-6)


HYPER = {
    "flatten": (lambda lr: fo.flatten(fo.adam(lr)), 0.05),
    "multi_steps": (lambda lr: fo.multi_steps(fo.adam(lr), 2), 0.05),
    "masked": (lambda lr: fo.masked(fo.adam(lr), {"w": True, "b": False}), 0.05),
    "partition": (lambda lr: fo.partition({"a": fo.adam(lr), "s": fo.sgd(lr)},
                                          {"w": "a", "b": "s"}), 0.05),
    "apply_if_finite": (lambda lr: fo.apply_if_finite(fo.adam(lr)), 0.05),
    "conditionally": (lambda lr: fo.conditionally_transform(fo.adam(lr), lambda c: c % 2 == 0),
                      0.05),
    "clip_by_global_norm": (lambda m: fo.chain(fo.clip_by_global_norm(m), fo.scale(-0.1)), 0.5),
    "clip_by_block_rms": (lambda m: fo.chain(fo.clip_by_block_rms(m), fo.scale(-0.1)), 0.5),
    "adam eps": (lambda e: fo.adam(0.05, eps=e), 0.1),
    "adam b2": (lambda b: fo.adam(0.05, b2=b), 0.9),
    "lion b1": (lambda b: fo.lion(0.05, b1=b), 0.8),
    "rmsprop decay": (lambda d: fo.rmsprop(0.05, decay=d), 0.8),
    "psgd_kron": (lambda lr: fo.psgd_kron(lr), 0.01),
    "inject_hyperparams b1": (lambda b: fo.inject_hyperparams(fo.adam)(learning_rate=0.05, b1=b),
                              0.8),
    "flatten(inject_hyperparams)": (
        lambda lr: fo.flatten(fo.inject_hyperparams(fo.adam)(learning_rate=lr)), 0.05),
    "sgd nesterov": (lambda m: fo.sgd(0.05, momentum=m, nesterov=True), 0.5),
    "schedule_free_adamw weight_decay": (lambda wd: fo.schedule_free_adamw(0.05, weight_decay=wd),
                                         0.1),
    "flatten(adamw) weight_decay": (lambda wd: fo.flatten(fo.adamw(0.05, weight_decay=wd)), 0.3),
    "adopt b1": (lambda b: fo.adopt(0.05, b1=b), 0.8),
    "amsgrad b2": (lambda b: fo.amsgrad(0.05, b2=b), 0.9),
    "add_noise eta": (lambda eta: fo.chain(fo.add_noise(eta, 0.55, seed=0), fo.scale(-0.1)), 0.1),
}


@pytest.mark.parametrize("name", sorted(HYPER))
def test_tensor_hyperparameters_inside_combinators_keep_their_gradient(name):
    """d loss / d h through three unrolled updates against central finite differences."""
    make, value = HYPER[name]
    check_hyperparameter_grad(make, value, _params())


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(ALL))
def test_every_state_saved_loads_into_a_fresh_init_bit_for_bit(tmp_path, name, dtype):
    params = _params(dtype)
    _, state = _run(ALL[name](), params, steps=2)
    fo.save_checkpoint(tmp_path / "ck.pt", params, state, step=2, extra={"note": name})
    ck = fo.load_checkpoint(tmp_path / "ck.pt", params, ALL[name]().init(params))
    assert_trees_equal(ck.opt_state, state)
    assert type(ck.opt_state) is type(state) and ck.step == 2 and ck.extra == {"note": name}


def test_a_state_loaded_into_another_transforms_template_is_refused(tmp_path):
    params = _params()
    _, state = _run(fo.adam(0.1), params, steps=1)
    fo.save_checkpoint(tmp_path / "ck.pt", params, state)
    with pytest.raises(ValueError, match="different"):
        fo.load_checkpoint(tmp_path / "ck.pt", params, fo.amsgrad(0.1).init(params))


# ----------------------------------------------------------------------------- schedules


SCHEDULES = {
    "constant": S.constant(0.1), "linear": S.linear(1.0, 0.0, 100),
    "polynomial": S.polynomial(1.0, 0.0, 2.0, 100, 10),
    "exponential_decay": S.exponential_decay(1.0, 10, 0.5),
    "piecewise_constant": S.piecewise_constant(1.0, {20: 0.5, 10: 2.0}),
    "cosine_decay": S.cosine_decay(1.0, 100), "warmup_cosine_decay":
    S.warmup_cosine_decay(0.0, 1.0, 10, 100), "warmup_cosine": S.warmup_cosine(1.0, 10, 100),
    "warmup_constant": S.warmup_constant(0.0, 1.0, 10), "linear_onecycle": S.linear_onecycle(100, 1.0),
    "inverse_sqrt": S.inverse_sqrt(1.0, 10), "inverse_sqrt no warmup": S.inverse_sqrt(1.0, 0),
    "palm_beta2": S.palm_beta2(),
    "join_schedules": S.join_schedules([S.constant(1.0), S.linear(1.0, 0.0, 10)], [5]),
}


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedules_agree_for_number_and_tensor_steps_and_clamp_negative_steps(name):
    """A Python step (float64 math) and a 0-d int64 tensor step (float32 and float64 math)
    give the same value; a negative step is step 0; values stay finite far past the end."""
    s = SCHEDULES[name]
    for t in (-5, 0, 1, 5, 10, 11, 99, 100, 101, 10**6, 2**24 + 1, 2**40):
        a = float(s(t))
        b = float(s(torch.tensor(t)))
        c = float(s(torch.tensor(t), dtype=F64))
        assert math.isfinite(a)
        assert abs(a - c) <= 1e-12 * max(1.0, abs(a))
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)) + 1e-7
        if t < 0:
            assert a == float(s(0))


@pytest.mark.parametrize("make", [
    lambda: S.linear(1.0, 0.0, 0), lambda: S.linear(math.nan, 0.0, 10),
    lambda: S.linear(1.0, 0.0, 10.5), lambda: S.linear(1.0, 0.0, True),
    lambda: S.exponential_decay(1.0, 10, -0.5), lambda: S.piecewise_constant(1.0, {-1: 0.5}),
    lambda: S.join_schedules([S.constant(1.0), S.constant(2.0), S.constant(3.0)], [10, 5]),
    lambda: S.warmup_cosine_decay(0.0, 1.0, 100, 50), lambda: S.linear_onecycle(100, 1.0, 1.5),
    lambda: S.constant("a"), lambda: S.palm_beta2(math.nan),
])
def test_bad_schedule_arguments_are_a_value_error(make):
    with pytest.raises(ValueError):
        make()


@pytest.mark.parametrize("step, error", [(True, TypeError), (math.nan, ValueError),
                                         (torch.tensor([1, 2]), ValueError), ("3", TypeError)])
def test_bad_steps_are_refused(step, error):
    with pytest.raises(error):
        S.linear(1.0, 0.0, 10)(step)


# ----------------------------------------------------------------------------- fo.Optimizer


def test_optimizer_with_grad_scaler_and_step_lr_matches_torch_adam_through_an_inf_step():
    """GradScaler skips the step whose loss is inf, StepLR halves lr each step: the weights
    and step counts equal torch.optim.Adam's in the same loop."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1, dtype=torch.float32)
    ref_model = torch.nn.Linear(3, 1, dtype=torch.float32)
    ref_model.load_state_dict(model.state_dict())
    opt = fo.Optimizer(model.parameters(), fo.adam(0.1))
    ref = torch.optim.Adam(ref_model.parameters(), lr=0.1)
    loops = []
    for m, o in ((model, opt), (ref_model, ref)):
        loops.append((m, o, torch.amp.GradScaler("cpu", init_scale=2.0**10),
                      torch.optim.lr_scheduler.StepLR(o, 1, 0.5)))
    x, y = torch.randn(8, 3, dtype=torch.float32), torch.randn(8, 1, dtype=torch.float32)
    for i in range(4):
        for m, o, scaler, sched in loops:
            o.zero_grad()
            loss = ((m(x) - y) ** 2).mean() * (math.inf if i == 1 else 1.0)
            scaler.scale(loss).backward()
            scaler.step(o)
            scaler.update()
            sched.step()
    torch.testing.assert_close(model.weight, ref_model.weight, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(model.bias, ref_model.bias, rtol=1e-6, atol=1e-7)
    assert int(opt.transform_states[0][0].count) == int(ref.state[ref_model.weight]["step"]) == 3
    assert opt.param_groups[0]["lr"] == pytest.approx(ref.param_groups[0]["lr"])


@pytest.mark.parametrize("group", [{"lr": math.nan}, {"lr": -1.0}, {"betas": (0.9, 1.0)},
                                   {"lr": torch.tensor([0.1, 0.2])}, {"weight_decay": 0.1}])
def test_optimizer_refuses_bad_group_values_naming_the_key(group):
    w = torch.nn.Parameter(torch.randn(3))
    key = next(iter(group))
    with pytest.raises(ValueError, match=key):
        fo.Optimizer([{"params": [w], **group}], fo.adam(0.1))


def test_optimizer_refuses_a_nan_lr_written_by_a_user_between_steps():
    w = torch.nn.Parameter(torch.randn(3))
    opt = fo.Optimizer([w], fo.adam(0.1))
    opt.param_groups[0]["lr"] = math.nan
    w.grad = torch.ones(3)
    before = w.detach().clone()
    with pytest.raises(ValueError, match="lr"):
        opt.step()
    assert torch.equal(w.detach(), before)


# ----------------------------------------------------------------------------- least squares


def test_batched_least_squares_flags_each_problem():
    """Four copies of r = (a - 3) c with c = 1, 1e200, 1e-200, NaN: the first three reach
    a = 3 with success, the NaN one fails and stays where it started."""
    c = torch.tensor([[1.0], [1e200], [1e-200], [math.nan]], dtype=F64)

    def r(a):
        return (a - 3) * c * torch.ones(4, 4, dtype=F64)

    a, info = fo.least_squares(r, torch.ones(4, 1, dtype=F64), batched=True)
    assert info.success.tolist() == [True, True, True, False]
    torch.testing.assert_close(a[:3], torch.full((3, 1), 3.0, dtype=F64))
    assert a[3].item() == 1.0


@pytest.mark.parametrize("x0", [math.nan, math.inf])
def test_least_squares_from_a_non_finite_start_is_a_value_error(x0):
    with pytest.raises(ValueError, match="non-finite"):
        fo.least_squares(lambda a: (a - 3) * torch.ones(4, dtype=F64),
                         torch.tensor([x0], dtype=F64))


def test_least_squares_with_a_zero_size_leaf_fits_the_others():
    params = {"a": torch.zeros(0, dtype=F64), "b": torch.ones(1, dtype=F64)}
    out, info = fo.least_squares(lambda q: torch.cat([q["a"], q["b"] - 3]), params)
    assert info.success and out["a"].shape == (0,)
    torch.testing.assert_close(out["b"], torch.tensor([3.0], dtype=F64))


def test_least_squares_that_cannot_move_a_badly_scaled_parameter_is_not_success():
    """r = 1e-20 a - 3 from a = 1: float64 cannot see the cost change of any step the trust
    region allows at first; whatever happens, a reported success must be the answer."""
    a, info = fo.least_squares(lambda a: torch.cat([a * 1e-20 - 3, a * 1e-20 - 3]),
                               torch.tensor([1.0], dtype=F64))
    if info.success:
        torch.testing.assert_close(a, torch.tensor([3e20], dtype=F64))


# ----------------------------------------------------------------------------- benchmark CLI


@pytest.mark.parametrize("argv, message", [
    (["--device", "cuda:-1"], "--device"), (["--device", "meta"], "only cpu and cuda"),
    (["--out", "/dev/null"], "existing file"), (["--out", ""], "current folder"),
    (["--plugin", "/nonexistent.py"], "no such file"), (["--threads", "-3"], "--threads"),
])
def test_bench_user_mistakes_are_one_line(tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    tiny = ["--problems", "nist-misra1a", "--optimizers", "lm", "--steps", "1", "--no-progress"]
    with pytest.raises(SystemExit) as e:
        bench_main(tiny + argv)
    assert isinstance(e.value.code, str) and e.value.code.startswith("error: ")
    assert "\n" not in e.value.code and message in e.value.code
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_bench_plugin_that_is_a_folder_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        bench_main(["--plugin", str(tmp_path), "--list"])
    assert isinstance(e.value.code, str) and "is a folder" in e.value.code
