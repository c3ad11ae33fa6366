"""A mini-batch Levenberg-Marquardt problem for the tests of the column scaling's choice:
three parameters, eight samples, batches of the first ``sz`` rows (``m >= n`` flips with the
batch size around ``n = 3``)."""

from __future__ import annotations

import torch

import funcopt as fo

F64 = torch.float64


def data(dtype: torch.dtype = F64) -> tuple[torch.Tensor, torch.Tensor]:
    """``(X, Y)``: 8 samples of 3 features and their targets (made in float64, then cast)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(8, 3, generator=g, dtype=F64)
    Y = X @ torch.tensor([1.0, -2.0, 3.0], dtype=F64) + 0.1 * torch.sin(X[:, 0])
    return X.to(dtype), Y.to(dtype)


def residual(p, batch):
    """A mildly nonlinear regression's residuals on ``batch = (X, Y)``."""
    xb, yb = batch
    return torch.exp(0.1 * xb @ p["w"]) * 10 - 10 + xb @ p["w"] - yb


def run(t, state, p, sizes, batches=None):
    """Eager updates of the LM transform ``t`` on the first ``sz`` rows for each of ``sizes``
    (``batches``: ``(X, Y)``, default :func:`data`): ``(params, state, out)`` with ``out`` the
    parameters' ``w``, the state's scale and damping after each update (copies)."""
    X, Y = data() if batches is None else batches
    out = []
    for sz in sizes:
        u, state = t.update(None, state, p, batch=(X[:sz], Y[:sz]))
        p = fo.apply_updates(p, u)
        out.append((p["w"].detach().clone(), state.scale.clone(), state.damping.clone()))
    return p, state, out
