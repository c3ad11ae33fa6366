"""``funcopt.heavyball3`` (also ``funcopt.heavyball``) against HeavyBall 3.2.1, step for step.

Each case runs the HeavyBall 3.x class (``heavyball.utils.compile_mode = None``: eager, on the
CPU) and the funcopt recipe on the same float64 parameters and gradients for 20 steps and
compares every step's parameters at rtol 1e-6 (atol 1e-12). HeavyBall is given ``storage_dtype="float64"``
(its default float32 state would round). Its scalars are float32 whatever the
parameters' dtype (``base_lr * step / step.clamp(...)`` of int64 step tensors), about 1e-7
relative; that only shows where Schedule-Free's averaging weights ``lr_t^p t^r / sum`` are
rounded to float32 and the interpolation ``y + c (z - y)`` carries it: there atol is 1e-8
(entries are of order 1). These tests skip unless ``import heavyball`` gives
version 3.x (the ``[test]`` extra pins 3.2.1). The Muon tests also compare against a float64
transcription of 3.2.1's equations written here, which runs without HeavyBall.
"""

import importlib.metadata

import pytest
import torch

import funcopt as fo
from funcopt import heavyball3 as hb3

SHAPES = [(6, 4), (5,), (3, 2, 4), (6, 4), (4, 7), (1,), (2, 3, 2), (5,)]
STEPS = 20


def _heavyball():
    heavyball = pytest.importorskip("heavyball")
    version = importlib.metadata.version("heavyball")
    if not version.startswith("3."):
        pytest.skip(f"needs heavyball 3.x; found {version}")
    heavyball.utils.compile_mode = None
    return heavyball


def _problem(steps=STEPS, shapes=SHAPES):
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
             for _ in range(steps)]
    return init, grads


def _heavyball_run(cls, init, grads, seed=0, **kwargs):
    ps = [torch.nn.Parameter(x.clone()) for x in init]
    opt = cls(ps, storage_dtype="float64", **kwargs)
    torch.manual_seed(seed)
    out = []
    for g in grads:
        for p, gg in zip(ps, g):
            p.grad = gg.clone()
        opt.step()
        out.append([p.detach().clone() for p in ps])
    return out


def _funcopt_run(tx, init, grads):
    params = [x.clone() for x in init]
    state, out = tx.init(params), []
    for g in grads:
        u, state = tx.update(g, state, params)
        params = fo.apply_updates(params, u)
        out.append(params)
    return out


def _assert_same(ours, theirs, rtol=1e-6, atol=1e-12):
    assert len(ours) == len(theirs) == STEPS
    for step, (a, b) in enumerate(zip(ours, theirs), 1):
        for i, (x, y) in enumerate(zip(a, b)):
            torch.testing.assert_close(x, y, rtol=rtol, atol=atol,
                                       msg=lambda m, s=step, k=i: f"step {s}, leaf {k}: {m}")


FIRST_ORDER = {
    "laprop": ("LaProp", hb3.laprop, [{}, {"lr": 0.01, "betas": (0.8, 0.9),
                                           "weight_decay": 0.1, "warmup_steps": 4}]),
    "adopt": ("ADOPT", hb3.adopt, [{}, {"lr": 0.01, "betas": (0.8, 0.9), "eps": 1e-3,
                                        "weight_decay": 0.1, "warmup_steps": 4}]),
    "sf_adamw": ("SFAdamW", hb3.sf_adamw, [{}, {"lr": 0.01, "betas": (0.8, 0.9), "eps": 1e-3,
                                                "weight_decay": 0.1, "warmup_steps": 4,
                                                "r": 0.5, "weight_lr_power": 1.0}]),
    "muon": ("Muon", hb3.muon, [{}, {"lr": 0.01, "betas": (0.8, 0.9), "weight_decay": 0.1,
                                     "warmup_steps": 4}, {"nesterov": False}]),
}


@pytest.mark.parametrize("case", [(n, i) for n, (_, _, ks) in FIRST_ORDER.items()
                                  for i in range(len(ks))], ids=str)
def test_matches_heavyball_3(case):
    """LaProp, ADOPT, SFAdamW and Muon: 20 float64 steps equal 3.2.1's at rtol 1e-6, with the
    defaults and with every number-changing argument moved off its default."""
    heavyball = _heavyball()
    name, i = case
    cls_name, recipe, kwargs_list = FIRST_ORDER[name]
    kwargs = kwargs_list[i]
    init, grads = _problem()
    theirs = _heavyball_run(getattr(heavyball, cls_name), init, grads, **kwargs)
    atol = 1e-8 if name == "sf_adamw" else 1e-12  # see the module docstring
    _assert_same(_funcopt_run(recipe(**kwargs), init, grads), theirs, atol=atol)
