"""save_checkpoint/load_checkpoint: a resumed functional loop is bit-identical."""

from __future__ import annotations

import random
from typing import NamedTuple

import numpy as np
import pytest
import torch

import funcopt as fo
import funcopt.checkpoint as ck


class _MomentumState(NamedTuple):
    count: torch.Tensor
    trace: dict


torch.serialization.add_safe_globals([_MomentumState])  # a state class loads with weights_only=True


def _momentum(lr=0.05, beta=0.9):
    """Heavy-ball momentum (Polyak 1964): m <- beta*m + g, u = -lr*m."""
    def init(params):
        return _MomentumState(fo.step_counter(params), fo.tree_zeros_like(params))

    def update(grads, s, params=None, **extra):
        trace = fo.tree_add(fo.tree_scale(s.trace, beta), grads)
        return fo.tree_scale(trace, -lr), _MomentumState(fo.increment(s.count), trace)

    return fo.GradientTransformation(init, update)


def _setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Dropout(0.3), torch.nn.Linear(16, 1))
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, x, y):
        return torch.nn.functional.mse_loss(torch.func.functional_call(model, p, (x,)), y)

    return params, loss


def _run(params, state, tx, loss, steps):
    for _ in range(steps):
        # data drawn from all three RNGs, and dropout from torch's
        n = 4 + random.randrange(4) + int(np.random.randint(0, 3))
        x, y = torch.randn(n, 5), torch.randn(n, 1)
        g = torch.func.grad(loss, argnums=0)(params, x, y)
        updates, state = tx.update(g, state, params)
        params = fo.apply_updates(params, updates)
    return params, state


def _seed_all(seed):
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def test_resume_is_bit_identical(tmp_path):
    tx = _momentum()
    params, loss = _setup()
    _seed_all(1)
    p, s = _run(params, tx.init(params), tx, loss, 3)
    ck.save_checkpoint(tmp_path / "c.pt", p, s, step=3, extra={"note": "half way"})
    p_full, s_full = _run(p, s, tx, loss, 4)

    _seed_all(12345)  # a different RNG state must be replaced by the saved one
    template, _ = _setup()
    ckpt = ck.load_checkpoint(tmp_path / "c.pt", template, tx.init(template))
    assert ckpt.step == 3 and ckpt.extra == {"note": "half way"}
    p_res, s_res = _run(ckpt.params, ckpt.opt_state, tx, loss, 4)
    for k in p_full:
        assert torch.equal(p_full[k], p_res[k])
    for a, b in zip(fo.tree_leaves(s_full), fo.tree_leaves(s_res)):
        assert torch.equal(a, b)
    assert type(s_res) is _MomentumState and s_res.count.dtype == torch.int64


def test_file_loads_with_weights_only(tmp_path):
    params, _ = _setup()
    ck.save_checkpoint(tmp_path / "c.pt", params, _momentum().init(params))
    payload = torch.load(tmp_path / "c.pt", weights_only=True)
    assert set(payload) >= {"params", "opt_state", "rng", "step"}
    assert not (tmp_path / "c.pt.tmp").exists()


def test_mismatched_template_is_refused(tmp_path):
    params, _ = _setup()
    ck.save_checkpoint(tmp_path / "c.pt", params, _momentum().init(params))
    with pytest.raises(ValueError, match="different transform or model"):
        ck.load_checkpoint(tmp_path / "c.pt", params, fo.EmptyState())
    bigger = dict(params, **{"0.weight": torch.zeros(17, 5)})
    with pytest.raises(ValueError, match="shape"):
        ck.load_checkpoint(tmp_path / "c.pt", bigger, _momentum().init(params))
    with pytest.raises(TypeError, match="not a tensor"):
        ck.save_checkpoint(tmp_path / "d.pt", params, {"lr": 0.1})


def test_rng_state_roundtrip():
    _seed_all(7)
    saved = ck.get_rng_state()
    a = (torch.rand(3), random.random(), np.random.rand())
    ck.set_rng_state(saved)
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
