"""RAdam, Yogi, AdaBelief, LAMB, LARS, Fromage, NAdamW, AdamaxW and the trust-ratio blocks
against optax 0.2.8, 30 steps in float64, and RAdam / NAdamW against torch.optim."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_breadth_common import P0, assert_same_path, moved, optax, run_funcopt, run_optax

import funcopt as fo

DEFAULT_DTYPE = torch.float64

PAIRS = {
    "radam": (lambda: fo.radam(0.05), lambda: optax.radam(0.05)),
    "radam_nesterov_thr": (lambda: fo.radam(0.05, 0.8, 0.99, 1e-6, 1e-9, 4.0, nesterov=True),
                           lambda: optax.radam(0.05, 0.8, 0.99, 1e-6, 1e-9, 4.0, nesterov=True)),
    "yogi": (lambda: fo.yogi(0.05), lambda: optax.yogi(0.05)),
    "yogi_block": (lambda: fo.chain(fo.scale_by_yogi(0.8, 0.9, 1e-4, 1e-8, 0.1), fo.scale(-0.05)),
                   lambda: optax.chain(optax.scale_by_yogi(0.8, 0.9, 1e-4, 1e-8, 0.1),
                                       optax.scale(-0.05))),
    "adabelief": (lambda: fo.adabelief(0.05), lambda: optax.adabelief(0.05)),
    "adabelief_nesterov": (lambda: fo.adabelief(0.05, 0.8, 0.9, 1e-8, 1e-12, nesterov=True),
                           lambda: optax.adabelief(0.05, 0.8, 0.9, 1e-8, 1e-12, nesterov=True)),
    "lamb": (lambda: fo.lamb(0.05), lambda: optax.lamb(0.05)),
    "lamb_wd": (lambda: fo.lamb(0.05, weight_decay=0.1, mask={"w": True, "b": False, "v": True}),
                lambda: optax.lamb(0.05, weight_decay=0.1, mask={"w": True, "b": False, "v": True})),
    "lars": (lambda: fo.lars(0.5), lambda: optax.lars(0.5)),
    "lars_masks": (
        lambda: fo.lars(0.5, 0.01, {"w": True, "b": False, "v": True}, 0.01, 1e-6,
                        {"w": True, "b": False, "v": True}, 0.8, True),
        lambda: optax.lars(0.5, 0.01, {"w": True, "b": False, "v": True}, 0.01, 1e-6,
                           {"w": True, "b": False, "v": True}, 0.8, True)),
    "fromage": (lambda: fo.fromage(0.05), lambda: optax.fromage(0.05)),
    "fromage_schedule": (lambda: fo.fromage(lambda c: 0.05 / (1.0 + 0.1 * c)),
                         lambda: optax.fromage(lambda c: 0.05 / (1.0 + 0.1 * c))),
    "nadamw": (lambda: fo.nadamw(0.05, weight_decay=0.1), lambda: optax.nadamw(0.05, weight_decay=0.1)),
    "adamaxw": (lambda: fo.adamaxw(0.05, weight_decay=0.1), lambda: optax.adamaxw(0.05, weight_decay=0.1)),
    "trust_ratio": (
        lambda: fo.chain(fo.scale_by_trust_ratio(0.1, 0.5, 1e-3), fo.scale(-0.05)),
        lambda: optax.chain(optax.scale_by_trust_ratio(0.1, 0.5, 1e-3), optax.scale(-0.05))),
    "param_block_norm": (
        lambda: fo.chain(fo.scale_by_param_block_norm(), fo.scale(-0.05)),
        lambda: optax.chain(optax.scale_by_param_block_norm(), optax.scale(-0.05))),
    "param_block_rms": (
        lambda: fo.chain(fo.scale_by_param_block_rms(), fo.scale(-0.05)),
        lambda: optax.chain(optax.scale_by_param_block_rms(), optax.scale(-0.05))),
    "normalize_by_update_norm": (lambda: fo.normalize_by_update_norm(-0.1),
                                 lambda: optax.normalize_by_update_norm(-0.1)),
    "rms_positional": (lambda: fo.chain(fo.scale_by_rms(0.9, 1e-8, 0.0, False), fo.scale(-0.01)),
                       lambda: optax.chain(optax.scale_by_rms(0.9, 1e-8, 0.0, False),
                                           optax.scale(-0.01))),
    "rms_bias_corrected": (
        lambda: fo.chain(fo.scale_by_rms(0.9, 1e-8, 0.0, True, True), fo.scale(-0.01)),
        lambda: optax.chain(optax.scale_by_rms(0.9, 1e-8, 0.0, True, True), optax.scale(-0.01))),
    "stddev": (
        lambda: fo.chain(fo.scale_by_rms(0.9, 1e-8, 0.1, centered=True), fo.scale(-0.01)),
        lambda: optax.chain(optax.scale_by_stddev(0.9, 1e-8, 0.1), optax.scale(-0.01))),
    "sgd_positional": (lambda: fo.sgd(0.05, 0.9, True, torch.float64),
                       lambda: optax.sgd(0.05, 0.9, True, None)),
}


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_against_optax(name):
    make, ref = PAIRS[name]
    want = run_optax(ref())
    assert moved(want) > 1e-3
    assert_same_path(run_funcopt(make()), want, what=name)


def _torch_path(opt_cls, steps=30, **kw):
    p = {k: torch.tensor(v, requires_grad=True) for k, v in P0.items()}
    opt = opt_cls(list(p.values()), **kw)
    out = []
    from test_breadth_common import torch_loss
    for _ in range(steps):
        opt.zero_grad()
        torch_loss(p).backward()
        opt.step()
        out.append({k: v.detach().numpy().copy() for k, v in p.items()})
    return out


def test_radam_against_torch_with_eps_zero():
    """With eps = 0 the two placements of eps agree, and torch's rho_t > 5 equals rho_t >= 5
    on these steps: funcopt's RAdam is torch.optim.RAdam."""
    want = _torch_path(torch.optim.RAdam, lr=0.05, eps=0.0)
    assert_same_path(run_funcopt(fo.radam(0.05, eps=0.0)), want, rtol=1e-8, what="radam")


def test_nadamw_without_momentum_schedule_is_adamw_with_nesterov():
    got = run_funcopt(fo.nadamw(0.05, weight_decay=0.1))
    want = run_funcopt(fo.adamw(0.05, weight_decay=0.1, nesterov=True))
    assert_same_path(got, want, rtol=0, what="nadamw")


def test_trust_ratio_is_one_for_a_zero_block():
    tx = fo.scale_by_trust_ratio()
    p = {"a": torch.zeros(3), "b": torch.ones(2)}
    g = {"a": torch.ones(3), "b": torch.zeros(2)}
    u, _ = tx.update(g, tx.init(p), p)
    assert torch.equal(u["a"], g["a"]) and torch.equal(u["b"], g["b"])


@pytest.mark.parametrize("make, name", [
    (lambda: fo.radam(0.1, b2=1.0), "b2"), (lambda: fo.yogi(0.1, eps=-1.0), "eps"),
    (lambda: fo.adabelief(0.1, b1=1.5), "b1"), (lambda: fo.lamb(-0.1), "learning_rate"),
    (lambda: fo.lars(0.1, weight_decay=-1.0), "weight_decay"),
    (lambda: fo.scale_by_trust_ratio(min_norm=-1.0), "min_norm"),
    (lambda: fo.fromage(float("nan")), "learning_rate"),
    (lambda: fo.scale_by_yogi(initial_accumulator_value=-1.0), "initial_accumulator_value"),
])
def test_bad_hyperparameters_raise_at_construction(make, name):
    with pytest.raises((ValueError, TypeError), match=name):
        make()


def test_sgd_weight_decay_is_keyword_only():
    with pytest.raises(TypeError):
        fo.sgd(0.1, 0.9, False, torch.float64, 1e-2)  # weight_decay no longer 5th positional
    assert np.isfinite(run_funcopt(fo.sgd(0.05, weight_decay=1e-2))[-1]["w"]).all()
