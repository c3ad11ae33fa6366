"""Data-parallel training with torch.distributed.

Functional loop: every rank holds the same params and optimizer state, computes gradients on
its own shard of the batch, and averages them with :func:`all_reduce_mean` as the first
transform of the chain (the counterpart of ``jax.lax.pmean`` in an optax chain)::

    dist.init_process_group("nccl")          # or "gloo" on CPUs
    params = fo.broadcast_params(params)     # identical start on every rank
    tx = fo.chain(fo.all_reduce_mean(), fo.adamw(learning_rate=1e-3))
    state = tx.init(params)
    for batch in data:
        x, y = fo.shard_batch(batch)         # this rank's rows
        grads = torch.func.grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)
        params = fo.apply_updates(params, updates)

With equal shard sizes and a mean loss, the averaged gradient is the full-batch gradient, so
every rank takes the step single-process training on the whole batch would take.

DDP: wrap the model in ``DistributedDataParallel`` and use :class:`funcopt.Optimizer` as any
torch optimizer; DDP averages ``p.grad`` during ``backward`` (do not add ``all_reduce_mean``).

FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters and gradients are DTensors sharded
over ranks and gradients arrive already reduced. Element-wise transforms (SGD, Adam(W), Lion,
clipping by value, ...) run unchanged on the local shards through :class:`funcopt.Optimizer`
because ``torch._foreach_*`` ops accept DTensors. Transforms that need whole tensors
(global norms, matrix preconditioners such as SOAP/Muon/Shampoo, Jacobians) need a gather
first and are not supported on DTensor parameters.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from funcopt.base import (
    EmptyState,
    GradientTransformation,
    Params,
    PyTree,
    tree_flatten,
    tree_unflatten,
)
from funcopt.engine import functorch_active, leaves

__all__ = ["all_reduce_mean", "tree_all_reduce_mean", "broadcast_params", "shard_batch"]


def _require_initialized(who: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{who} needs torch.distributed: call torch.distributed.init_process_group(...) "
            "first (or leave it out of single-process runs)"
        )


def _check_plain(leaves: list[Any], who: str) -> None:
    for x in leaves:
        if type(x).__name__ == "DTensor":
            raise TypeError(
                f"{who} got a DTensor: FSDP2/DTensor gradients are already reduced over the "
                "mesh; drop the all-reduce from the chain"
            )


def tree_all_reduce_mean(tree: PyTree, group: Any = None) -> PyTree:
    """The mean of ``tree`` over the ranks of ``group``, as a new tree (inputs not mutated).

    Leaves are packed into one flat buffer per dtype and device, so the whole tree costs one
    collective per dtype: ``mean_i = (1/N) * sum_r x_i^(r)`` for ``N`` ranks.
    """
    _require_initialized("tree_all_reduce_mean")
    leaves, treedef = tree_flatten(tree)
    _check_plain(leaves, "tree_all_reduce_mean")
    world = dist.get_world_size(group)
    buckets: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, x in enumerate(leaves):
        buckets.setdefault((x.dtype, x.device), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(leaves)
    for idx in buckets.values():
        flat = torch.cat([leaves[i].reshape(-1) for i in idx])  # a fresh buffer: no aliasing
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat = flat.div_(world) if flat.is_floating_point() or flat.is_complex() else flat // world
        for i, piece in zip(idx, flat.split([leaves[i].numel() for i in idx])):
            out[i] = piece.view_as(leaves[i])
    return tree_unflatten(treedef, out)


def all_reduce_mean(group: Any = None) -> GradientTransformation:
    """Average the updates over the ranks of a process group (data-parallel gradients).

    ``u_i <- (1/N) * sum_{r=1..N} u_i^(r)``, with ``N`` the size of ``group``.

    Args:
      group: the ``torch.distributed`` process group (default ``None``: the world).

    Put it first in a chain, before any transform that depends on the gradient (moments,
    clipping by global norm), so every rank keeps the same state. Stateless; it needs an
    initialised process group when ``update`` runs, not when it is built.
    Reference: ``jax.lax.pmean`` as used with optax.
    """

    def init(params: Params) -> EmptyState:
        return EmptyState()

    def update(updates: PyTree, state: EmptyState, params: Params | None = None, **extra: Any
               ) -> tuple[PyTree, EmptyState]:
        leaves(updates, params, "all_reduce_mean")
        if functorch_active():
            raise RuntimeError(
                "all_reduce_mean cannot run under torch.func transforms (vmap, grad): a "
                "collective does not batch. Reduce the gradients outside the transformed "
                "function, or leave all_reduce_mean out of the vmapped chain")
        return tree_all_reduce_mean(updates, group), state

    return GradientTransformation(init, update)


def broadcast_params(params: PyTree, src: int = 0, group: Any = None) -> PyTree:
    """A copy of ``params`` holding rank ``src``'s values on every rank (inputs not mutated)."""
    _require_initialized("broadcast_params")
    leaves, treedef = tree_flatten(params)
    _check_plain(leaves, "broadcast_params")
    out = [x.detach().clone() for x in leaves]
    for x in out:
        dist.broadcast(x, src=src, group=group)
    return tree_unflatten(treedef, out)


def shard_batch(
    batch: PyTree, rank: int | None = None, world_size: int | None = None, group: Any = None
) -> PyTree:
    """This rank's contiguous slice (along dim 0) of every tensor in ``batch``.

    ``rank``/``world_size`` default to the process group's. The batch size must be divisible
    by the world size, so that the mean of the shard means is the full-batch mean.
    """
    if rank is None or world_size is None:
        _require_initialized("shard_batch")
        rank = dist.get_rank(group) if rank is None else rank
        world_size = dist.get_world_size(group) if world_size is None else world_size
    leaves, treedef = tree_flatten(batch)
    out = []
    for x in leaves:
        if x.shape[0] % world_size:
            raise ValueError(
                f"batch size {x.shape[0]} is not divisible by world size {world_size}; "
                "use a batch size that is a multiple of the number of ranks"
            )
        n = x.shape[0] // world_size
        out.append(x[rank * n:(rank + 1) * n])
    return tree_unflatten(treedef, out)
