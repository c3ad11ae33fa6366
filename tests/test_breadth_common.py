"""Shared runner for the reference tests of tests/test_breadth_*.py: the same smooth problem
solved by a funcopt transform (torch, float64) and by optax (JAX on the CPU, x64), step by step.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("JAX_PLATFORMS", "cpu")
jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)
optax = pytest.importorskip("optax")
jnp = jax.numpy

import funcopt as fo  # noqa: E402

SHAPES = {"w": (4, 3), "b": (3,), "v": (2, 5)}
_RNG = np.random.default_rng(0)
A = {k: _RNG.uniform(0.5, 2.0, size=s) for k, s in SHAPES.items()}
T = {k: _RNG.normal(size=s) for k, s in SHAPES.items()}
P0 = {k: _RNG.normal(size=s) for k, s in SHAPES.items()}


def loss(p, m, a, t):
    """``sum(A (p - T)^2 / 2 + cos(3 p) / 10)`` with ``m`` = torch or jax.numpy."""
    return sum((0.5 * a[k] * (p[k] - t[k]) ** 2 + 0.1 * m.cos(3.0 * p[k])).sum() for k in p)


_AT = ({k: torch.tensor(v) for k, v in A.items()}, {k: torch.tensor(v) for k, v in T.items()})
_AJ = ({k: jnp.asarray(v) for k, v in A.items()}, {k: jnp.asarray(v) for k, v in T.items()})


def torch_loss(p):
    return loss(p, torch, *_AT)


def jax_loss(p):
    return loss(p, jnp, *_AJ)


def run_funcopt(tx, steps=30, extras=None, p0=None):
    """The parameters after each of ``steps`` steps (numpy float64)."""
    p = {k: torch.tensor(v) for k, v in (p0 or P0).items()}
    state = tx.init(p)
    out = []
    for _ in range(steps):
        g, value = torch.func.grad_and_value(torch_loss)(p)
        kw = {}
        if extras == "value":
            kw = {"value": value}
        elif extras == "linesearch":
            kw = {"value": value, "grad": g, "value_fn": torch_loss}
        elif extras == "obj_fn":
            kw = {"obj_fn": torch_loss}
        u, state = tx.update(g, state, p, **kw)
        p = fo.apply_updates(p, u)
        out.append({k: v.numpy().copy() for k, v in p.items()})
    return out


def run_optax(tx, steps=30, extras=None, p0=None):
    p = {k: jnp.asarray(v) for k, v in (p0 or P0).items()}
    state = tx.init(p)
    out = []
    if extras == "linesearch":  # compiled once: an eager while_loop recompiles every step
        ls_update = jax.jit(lambda g, s, q, v: tx.update(g, s, q, value=v, grad=g,
                                                         value_fn=jax_loss))
    if extras == "obj_fn":
        obj_update = jax.jit(lambda g, s, q: tx.update(g, s, q, obj_fn=jax_loss))
    for _ in range(steps):
        value, g = jax.value_and_grad(jax_loss)(p)
        if extras == "linesearch":
            u, state = ls_update(g, state, p, value)
        else:
            kw = {"value": value} if extras == "value" else {}
            update = obj_update if extras == "obj_fn" else tx.update
            u, state = update(g, state, p, **kw)
        p = optax.apply_updates(p, u)
        out.append({k: np.asarray(v) for k, v in p.items()})
    return out


def assert_same_path(got, want, rtol=1e-6, atol=1e-12, what=""):
    for i, (a, b) in enumerate(zip(got, want)):
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol,
                                       err_msg=f"{what}: leaf {k!r} at step {i + 1}")
    assert len(got) == len(want) > 0


def moved(path):
    """How far the run moved from P0 (a reference test on a run that never moved is void)."""
    return max(float(np.abs(path[-1][k] - P0[k]).max()) for k in P0)
