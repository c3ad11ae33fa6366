"""Every alias that torch.optim also has, matched step by step against torch.optim."""

import pytest
import torch

import funcopt as fo

SHAPES = {"scalar": (), "vec": (7,), "mat": (4, 3), "conv": (2, 3, 2, 2), "t3": (3, 1, 5)}
STEPS = 100

# name -> (funcopt transform, torch.optim class, torch kwargs)
CASES = {
    "sgd": (lambda: fo.sgd(0.05), torch.optim.SGD, dict(lr=0.05)),
    "sgd_momentum": (lambda: fo.sgd(0.05, momentum=0.9), torch.optim.SGD,
                     dict(lr=0.05, momentum=0.9)),
    "sgd_nesterov_wd": (lambda: fo.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
                        torch.optim.SGD,
                        dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    "sgd_dampening": (lambda: fo.sgd(0.05, momentum=0.8, dampening=0.3), torch.optim.SGD,
                      dict(lr=0.05, momentum=0.8, dampening=0.3)),
    "adam": (lambda: fo.adam(1e-2, b1=0.8, b2=0.99, eps=1e-6), torch.optim.Adam,
             dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6)),
    "adam_l2": (lambda: fo.chain(fo.add_decayed_weights(1e-2), fo.adam(1e-2)), torch.optim.Adam,
                dict(lr=1e-2, weight_decay=1e-2)),
    "adamw": (lambda: fo.adamw(1e-2, weight_decay=0.1), torch.optim.AdamW,
              dict(lr=1e-2, weight_decay=0.1)),
    "amsgrad": (lambda: fo.amsgrad(1e-2, b2=0.9), torch.optim.Adam,
                dict(lr=1e-2, betas=(0.9, 0.9), amsgrad=True)),
    "adamw_amsgrad": (lambda: fo.adamw(1e-2, weight_decay=0.05, amsgrad=True), torch.optim.AdamW,
                      dict(lr=1e-2, weight_decay=0.05, amsgrad=True)),
    "nadam": (lambda: fo.nadam(1e-2, momentum_decay=4e-3), torch.optim.NAdam, dict(lr=1e-2)),
    "nadam_psi": (lambda: fo.nadam(1e-2, b1=0.85, momentum_decay=1e-2), torch.optim.NAdam,
                  dict(lr=1e-2, betas=(0.85, 0.999), momentum_decay=1e-2)),
    "adamax": (lambda: fo.adamax(2e-3), torch.optim.Adamax, dict(lr=2e-3)),
    "rmsprop": (lambda: fo.rmsprop(1e-2, decay=0.99, eps_in_sqrt=False), torch.optim.RMSprop,
                dict(lr=1e-2)),
    "rmsprop_centered_momentum": (
        lambda: fo.rmsprop(1e-2, decay=0.9, eps=1e-6, eps_in_sqrt=False, centered=True,
                           momentum=0.5),
        torch.optim.RMSprop, dict(lr=1e-2, alpha=0.9, eps=1e-6, centered=True, momentum=0.5)),
    "adagrad": (lambda: fo.adagrad(0.1, 0.0, 1e-10, eps_in_sqrt=False), torch.optim.Adagrad,
                dict(lr=0.1)),
    "adagrad_init": (lambda: fo.adagrad(0.1, 0.5, 1e-10, eps_in_sqrt=False), torch.optim.Adagrad,
                     dict(lr=0.1, initial_accumulator_value=0.5)),
}


def _params(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g, dtype=dtype) for k, s in SHAPES.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_torch_optim(name, dtype):
    make_tx, opt_cls, kwargs = CASES[name]
    params = _params(dtype, seed=0)
    ref = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = opt_cls(list(ref.values()), foreach=False, **kwargs)
    tx = make_tx()
    state = tx.init(params)
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        grads = {k: torch.randn(v.shape, generator=g, dtype=dtype) for k, v in params.items()}
        for k, p in ref.items():
            p.grad = grads[k].clone()
        opt.step()
        updates, state = tx.update(grads, state, params)
        params = fo.apply_updates(params, updates)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    if name.startswith("nadam") and dtype == torch.float64:
        tol = dict(rtol=1e-6, atol=1e-8)  # torch keeps NAdam's mu_product in float32
    for k in params:
        assert params[k].dtype == dtype
        torch.testing.assert_close(params[k], ref[k].detach(), **tol, msg=lambda m, k=k: f"{name}, leaf {k}: {m}")
    moved = sum((params[k] - _params(dtype, 0)[k]).abs().sum() for k in params)
    assert moved > 0
