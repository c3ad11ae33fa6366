"""fo.Optimizer's flat groups off CUDA run torch's fused AdamW/SGD kernels for plain
fo.adamw / fo.sgd: the numbers of torch.optim (fused) and of the pure update, the state the
pure update keeps, and the transform's own update wherever the kernel does not apply."""

from __future__ import annotations

import copy

import pytest
import torch

import funcopt as fo
from funcopt.torch_kernels import kernel_for

CASES = {
    "adamw": (lambda: fo.adamw(1e-2, weight_decay=1e-2),
              lambda ps: torch.optim.AdamW(ps, 1e-2, weight_decay=1e-2)),
    "adam": (lambda: fo.adamw(3e-3, b1=0.8, b2=0.99, eps=1e-6, weight_decay=0.0),
             lambda ps: torch.optim.Adam(ps, 3e-3, betas=(0.8, 0.99), eps=1e-6)),
    "sgd": (lambda: fo.sgd(1e-2), lambda ps: torch.optim.SGD(ps, 1e-2)),
    "sgd-momentum": (lambda: fo.sgd(1e-2, 0.9, weight_decay=1e-3, dampening=0.1),
                     lambda ps: torch.optim.SGD(ps, 1e-2, momentum=0.9, weight_decay=1e-3,
                                                dampening=0.1)),
    "sgd-nesterov": (lambda: fo.sgd(1e-2, 0.9, nesterov=True),
                     lambda ps: torch.optim.SGD(ps, 1e-2, momentum=0.9, nesterov=True)),
}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(),
                               torch.nn.Linear(7, 2)).double()


def _train(model: torch.nn.Module, opt, x: torch.Tensor, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_torch_and_the_pure_update(name: str) -> None:
    make, make_torch = CASES[name]
    x = torch.randn(16, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    model = _model()
    ref, pure_model = copy.deepcopy(model), copy.deepcopy(model)
    opt = fo.Optimizer(model.parameters(), make())
    assert opt._flat[0] is not None and opt._flat[0].kernel is not None
    _train(model, opt, x, 6)
    _train(ref, make_torch(list(ref.parameters())), x, 6)

    tx = make()
    params = {k: v.detach().clone() for k, v in pure_model.named_parameters()}
    state = tx.init(params)
    for _ in range(6):
        g = torch.func.grad(
            lambda p: torch.func.functional_call(pure_model, p, (x,)).pow(2).sum())(params)
        u, state = tx.update(g, state, params)
        params = fo.apply_updates(params, u)
    for a, b, c in zip(model.parameters(), ref.parameters(), params.values()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-14)
    # the counters advanced as the pure update's did
    counts = [s.count for s in opt.transform_states[0] if hasattr(s, "count")]
    assert [int(c) for c in counts] == [6] * len(counts)


def test_state_goes_on_in_the_pure_update_and_lr_changes_apply() -> None:
    """Three kernel steps, a learning-rate change through param_groups, three more; then the
    state continues in the pure update: all as six steps of torch.optim.AdamW."""
    x = torch.randn(16, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    model = _model()
    ref = copy.deepcopy(model)
    opt = fo.Optimizer(model.parameters(), fo.adamw(1e-2, weight_decay=1e-2))
    topt = torch.optim.AdamW(ref.parameters(), 1e-2, weight_decay=1e-2)
    _train(model, opt, x, 3)
    _train(ref, topt, x, 3)
    opt.param_groups[0]["lr"] = 3e-3
    topt.param_groups[0]["lr"] = 3e-3
    _train(model, opt, x, 3)
    _train(ref, topt, x, 3)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    loaded = fo.Optimizer(model.parameters(), fo.adamw(1e-2, weight_decay=1e-2))
    loaded.load_state_dict(opt.state_dict())
    _train(model, loaded, x, 2)
    _train(ref, topt, x, 2)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("tx", [
    fo.adamw(fo.schedules.cosine_decay_schedule(1e-2, 10)),
    fo.adamw(torch.tensor(1e-2)),
    fo.adamw(1e-2, nesterov=True),
    fo.adamw(1e-2, amsgrad=True),
    fo.adamw(1e-2, eps_root=1e-8),
    fo.adamw(1e-2, mu_dtype=torch.float32),
    fo.adamw(1e-2, weight_decay=fo.schedules.linear_schedule(1e-2, 0.0, 10)),
    fo.sgd(1e-2, 0.9, accumulator_dtype=torch.float32),
    fo.sgd(fo.schedules.linear_schedule(1e-2, 0.0, 10)),
    fo.lion(1e-3),
], ids=lambda tx: "tx")
def test_no_kernel_where_it_would_change_the_method(tx) -> None:
    assert kernel_for(tx) is None


def test_parameters_without_a_gradient_keep_their_values() -> None:
    model = _model()
    opt = fo.Optimizer(model.parameters(), fo.adamw(1e-2))
    x = torch.randn(4, 5, dtype=torch.float64)
    model(x).sum().backward()
    last = model[2]
    last.bias.grad = None
    before, first = last.bias.detach().clone(), model[0].weight.detach().clone()
    opt.step()
    assert torch.equal(last.bias.detach(), before)
    assert not torch.equal(model[0].weight.detach(), first)
