"""Training steps for the checkpoint tests: ``train`` runs a transform a number of steps on
fixed random gradients (step ``k``'s gradient is the same whether the run starts at 0 or
resumes at ``start``), ``sched`` is a schedule whose records differ at every step."""

from __future__ import annotations

import torch

import funcopt as fo


def train(tx, params, state, steps, start=0):
    """Steps ``start`` .. ``start + steps - 1`` of ``tx`` from ``state``: (params, state)."""
    gen = torch.Generator().manual_seed(1)
    grads = [{k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in params.items()}
             for _ in range(start + steps)]
    for g in grads[start:]:
        u, state = tx.update(g, state, params)
        params = fo.apply_updates(params, u)
    return params, state


def sched(step):
    return 0.1 / (1.0 + step)
