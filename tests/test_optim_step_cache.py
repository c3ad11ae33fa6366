"""fo.Optimizer's flat step keeps what cannot change between steps: the param group's values
once checked and written into the state (compared with the group's numbers at every step),
and torch's fused kernel prepared for one state object (prepared again when the state is
another object). Every change a user, an LR scheduler or a checkpoint makes between steps must
still reach the step; each test compares with torch.optim (float64) or with a second run."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch

import funcopt as fo

TOL = {"rtol": 1e-12, "atol": 1e-14}
X = torch.randn(16, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

# (funcopt transform, the same method in torch.optim): kernel paths and one eager flat path
PAIRS: dict[str, tuple[Callable[[], fo.GradientTransformation], Callable[..., torch.optim.Optimizer]]] = {
    "sgd-momentum": (lambda: fo.sgd(1e-2, momentum=0.9),
                     lambda ps: torch.optim.SGD(ps, 1e-2, momentum=0.9)),
    "sgd": (lambda: fo.sgd(1e-2), lambda ps: torch.optim.SGD(ps, 1e-2)),
    "adamw": (lambda: fo.adamw(1e-2, weight_decay=1e-2),
              lambda ps: torch.optim.AdamW(ps, 1e-2, weight_decay=1e-2)),
    "rmsprop": (lambda: fo.rmsprop(1e-2, decay=0.99, eps=1e-8, eps_in_sqrt=False),
                lambda ps: torch.optim.RMSprop(ps, 1e-2, alpha=0.99, eps=1e-8)),
}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(),
                               torch.nn.Linear(7, 2)).double()


def _grads(model: torch.nn.Module) -> None:
    model.zero_grad()
    model(X).pow(2).sum().backward()


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad()
        model(X).pow(2).sum().backward()
        opt.step()


def _same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, **TOL)


def _pair(name: str) -> tuple[torch.nn.Module, fo.Optimizer, torch.nn.Module, torch.optim.Optimizer]:
    make, make_torch = PAIRS[name]
    model = _model()
    ref = copy.deepcopy(model)
    opt = fo.Optimizer(model.parameters(), make())
    assert opt._flat[0] is not None  # the flat path, whose step keeps things between steps
    return model, opt, ref, make_torch(list(ref.parameters()))


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_scheduler_writes_reach_every_step(name: str) -> None:
    """An LR scheduler writes group["lr"] after every step: each new value is used."""
    model, opt, ref, topt = _pair(name)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.3)
    tsched = torch.optim.lr_scheduler.StepLR(topt, step_size=2, gamma=0.3)
    for _ in range(7):
        _train(model, opt, 1)
        _train(ref, topt, 1)
        sched.step()
        tsched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.3**3)
    _same(model, ref)


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_lr_written_by_hand_between_steps(name: str) -> None:
    """Plain writes, back to an earlier value, an int, and the same value again."""
    model, opt, ref, topt = _pair(name)
    for lr in (1e-2, 3e-3, 1e-2, 1e-2, 0, 2e-2, 1, 5e-3):
        opt.param_groups[0]["lr"] = lr
        topt.param_groups[0]["lr"] = lr
        _train(model, opt, 1)
        _train(ref, topt, 1)
        _same(model, ref)


def test_a_tensor_lr_changed_in_place_between_steps() -> None:
    """A 0-d tensor in group["lr"] may change in place: its value is read at every step."""
    model, opt, ref, topt = _pair("sgd-momentum")
    lr = torch.tensor(1e-2, dtype=torch.float64)
    opt.param_groups[0]["lr"] = lr
    for value in (1e-2, 4e-3, 4e-3, 2e-2):
        lr.fill_(value)
        topt.param_groups[0]["lr"] = value
        _train(model, opt, 1)
        _train(ref, topt, 1)
        _same(model, ref)


def test_betas_written_between_steps() -> None:
    """Several values at once (an element-wise inject_hyperparams AdamW: the eager flat path)."""
    model = _model()
    ref = copy.deepcopy(model)
    tx = fo.elementwise(fo.inject_hyperparams(fo.adamw)(
        learning_rate=1e-2, b1=0.9, b2=0.999, weight_decay=1e-2))
    opt = fo.Optimizer(model.parameters(), tx)
    assert opt._flat[0] is not None
    topt = torch.optim.AdamW(ref.parameters(), 1e-2, weight_decay=1e-2)
    for betas, wd in (((0.9, 0.999), 1e-2), ((0.8, 0.99), 1e-2), ((0.8, 0.99), 0.0),
                      ((0.95, 0.9), 0.0), ((0.95, 0.9), 0.0)):
        for o in (opt, topt):
            o.param_groups[0].update(betas=betas, weight_decay=wd)
        _train(model, opt, 1)
        _train(ref, topt, 1)
        _same(model, ref)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1e-3, "0.1", True])
def test_a_bad_lr_after_many_steps_is_refused_before_any_work(bad: object) -> None:
    model, opt, _, _ = _pair("sgd-momentum")
    _train(model, opt, 3)
    before = [p.detach().clone() for p in model.parameters()]
    state = [t.clone() for t in fo.tree_leaves(opt.transform_states[0])]
    _grads(model)
    opt.param_groups[0]["lr"] = bad
    with pytest.raises(ValueError, match="lr"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(torch.equal(a, b) for a, b in zip(fo.tree_leaves(opt.transform_states[0]), state))
    opt.param_groups[0]["lr"] = 1e-2  # a good value again: the step runs
    opt.step()
    assert not torch.equal(next(model.parameters()).detach(), before[0])


@pytest.mark.parametrize("name", ["sgd-momentum", "adamw"])
def test_load_state_dict_between_steps_is_used(name: str) -> None:
    """Steps 4-5 from a state saved after step 3 and loaded after step 5 repeat steps 4-5 (the
    kernel steps the loaded tensors, not the ones it stepped before); loading the state saved
    before any step makes the next step a first step again (SGD: buffer = gradient)."""
    model, opt, _, _ = _pair(name)
    at_start = copy.deepcopy(opt.state_dict())
    _train(model, opt, 3)
    saved, params3 = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    _train(model, opt, 2)
    after5 = copy.deepcopy(model)
    model.load_state_dict(params3)
    opt.load_state_dict(saved)
    _train(model, opt, 2)
    _same(model, after5)

    fresh = _model()
    fresh_opt = fo.Optimizer(fresh.parameters(), PAIRS[name][0]())
    fresh.load_state_dict(model.state_dict())
    opt.load_state_dict(at_start)
    _train(model, opt, 2)
    _train(fresh, fresh_opt, 2)
    _same(model, fresh)


def test_a_state_assigned_between_steps_is_used() -> None:
    """transform_states[i] replaced by another object (here: every leaf of the current one
    zeroed) is the state the next step updates, with the group's lr written into it."""
    model, opt, _, _ = _pair("sgd-momentum")
    _train(model, opt, 3)
    twin = _model()
    twin.load_state_dict(model.state_dict())
    twin_opt = fo.Optimizer(twin.parameters(), PAIRS["sgd-momentum"][0]())
    # all zeros, the learning rate too: the step writes group["lr"] into this new object
    opt.transform_states[0] = fo.tree_map(torch.zeros_like, opt.transform_states[0])
    _train(model, opt, 2)
    _train(twin, twin_opt, 2)
    _same(model, twin)
    assert int(opt.transform_states[0][0].count) == 2


def test_gradients_and_parameters_replaced_between_steps() -> None:
    """A gradient set by hand, a gradient set to None and a parameter's data replaced, each
    after the fast check has seen every parameter at its view, are all taken into account."""
    model, opt, ref, topt = _pair("sgd-momentum")
    _train(model, opt, 2)
    _train(ref, topt, 2)
    for m in (model, ref):
        _grads(m)
        m[0].weight.grad = torch.full_like(m[0].weight, 0.5)
        m[2].bias.grad = None  # fo: a zero gradient, not moved; torch: skipped
    bias_before = model[2].bias.detach().clone()
    opt.step()
    topt.step()
    assert torch.equal(model[2].bias.detach(), bias_before)
    torch.testing.assert_close(model[0].weight, ref[0].weight, **TOL)
    for m in (model, ref):
        with torch.no_grad():
            m[0].bias.data = m[0].bias.detach() + 1.0  # new memory
    _train(model, opt, 1)
    _train(ref, topt, 1)
    torch.testing.assert_close(model[0].bias, ref[0].bias, **TOL)
    flat = opt._flat[0]
    assert flat is not None and model[0].bias.data_ptr() == flat.views[1].data_ptr()


def test_closure_and_zero_grad_keep_working() -> None:
    model, opt, ref, topt = _pair("sgd-momentum")

    def closure(m: torch.nn.Module, o: torch.optim.Optimizer) -> Callable[[], torch.Tensor]:
        def f() -> torch.Tensor:
            o.zero_grad()
            loss = m(X).pow(2).sum()
            loss.backward()
            return loss
        return f

    for _ in range(4):
        loss = opt.step(closure(model, opt))
        tloss = topt.step(closure(ref, topt))
        torch.testing.assert_close(loss, tloss, **TOL)
        _same(model, ref)
    assert torch.is_grad_enabled()  # the step gives the caller's grad mode back
    with torch.no_grad():
        opt.step(closure(model, opt))
        assert not torch.is_grad_enabled()


@pytest.mark.parametrize("key, value", [("momentum", 0.5), ("weight_decay", 0.2),
                                        ("nesterov", True), ("betas", (0.8, 0.9))])
def test_a_torch_hyperparameter_the_transform_does_not_expose_is_refused_not_ignored(key, value):
    """torch.optim applies group['momentum'] (or weight_decay ...) written between steps; a
    plain fo.sgd has no such hyperparameter in its state, and the write was silently ignored
    (parameters 0.09 off torch's after 8 steps). Now the step refuses it, naming the fix."""
    w = torch.nn.Parameter(torch.ones(3))
    opt = fo.Optimizer([w], fo.sgd(0.01, momentum=0.9))
    w.grad = torch.ones(3)
    opt.step()
    opt.param_groups[0][key] = value
    before = w.detach().clone()
    with pytest.raises(ValueError, match=rf"\['{key}'\].*inject_hyperparams"):
        opt.step()
    assert torch.equal(w.detach(), before)


def test_scheduler_bookkeeping_keys_and_exposed_hyperparameters_are_accepted():
    """Keys a scheduler adds (initial_lr, max_lr ...) and the transform's own hyperparameters
    (inject_hyperparams: momentum) may be written; the writes take effect as in torch."""
    w = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    ref = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = fo.Optimizer([w], fo.inject_hyperparams(fo.sgd)(learning_rate=0.1, momentum=0.9))
    tref = torch.optim.SGD([ref], lr=0.1, momentum=0.9)
    for o in (opt, tref):
        o.param_groups[0]["max_lr"] = 1.0
    for step in range(4):
        if step == 2:
            opt.param_groups[0]["momentum"] = tref.param_groups[0]["momentum"] = 0.5
        for p in (w, ref):
            p.grad = p.detach() ** 2
        opt.step()
        tref.step()
    torch.testing.assert_close(w.detach(), ref.detach(), rtol=1e-12, atol=0)


def test_two_parameters_swapping_storage_keep_their_values():
    """a.data, b.data = b.data, a.data inside one flat group: the copy into a's view used to
    overwrite b's new data before it was read (both ended as b's values)."""
    a = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    b = torch.nn.Parameter(torch.tensor([2.0, 2.0]))
    opt = fo.Optimizer([a, b], fo.sgd(0.0))
    a.data, b.data = b.data, a.data
    (a.sum() + b.sum()).backward()
    opt.step()
    assert a.tolist() == [2.0, 2.0] and b.tolist() == [1.0, 1.0]
