"""A functional training loop for growing batch sizes: micro-batches and data parallelism.

Each step takes the next ``b`` samples of a seeded shuffle (the same order on every rank),
gives rank r its share, splits that share into micro-batches of at most
``max_micro_batch_size`` samples and accumulates, per micro-batch, the gradient sum and the
sums of :class:`funcopt.func.PerSampleStats` (one forward and one backward pass each, see
:func:`funcopt.func.batch_grad_and_sq_norms`). The sums are all-reduced across ranks
(``torch.distributed``, any backend), so the mean gradient g and the statistics are those of
the whole global batch. Inner-product tests need <g_i, g> with the global g: a second,
forward-mode pass over the micro-batches (:func:`funcopt.func.per_sample_inner_products`) and
one more all-reduce. The transform ``tx`` then gets ``update(g, state, params,
per_sample_stats=stats, batch_size=b)``; the next batch size is read from the test's state
(one host synchronisation per step, needed to slice the data).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call

from funcopt.base import GradientTransformation, apply_updates, find_state, replace
from funcopt.engine import ops
from funcopt.func.per_sample import (
    PerSampleStats,
    batch_grad_and_sq_norms,
    finalize_stats,
    per_sample_inner_products,
    sample_loss,
)
from funcopt.transforms.adaptive_batch import InnerProductTestState, NormTestState

__all__ = ["split_batch", "gradient_and_stats", "find_batch_test_state", "Batching", "fit_adaptive"]

Tensor = torch.Tensor


def split_batch(batch_size: int, world_size: int = 1, rank: int = 0,
                max_micro_batch_size: int | None = None,
                accumulation_steps: int = 1) -> list[tuple[int, int]]:
    """This rank's micro-batches of a global batch, as (start, end) offsets into the batch.

    Rank r gets a contiguous share of b // w or b // w + 1 samples; every rank splits its share
    into s = max(accumulation_steps, ceil(b / (w m))) nearly equal micro-batches (m =
    ``max_micro_batch_size``), so no micro-batch exceeds m and all ranks take s micro-steps.
    Empty micro-batches are dropped (b < w s).
    """
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"split_batch: need batch_size >= 1, world_size >= 1 and 0 <= rank < "
                         f"world_size; got {batch_size}, {world_size}, {rank}")
    base, extra = divmod(batch_size, world_size)
    start = rank * base + min(rank, extra)
    share = base + (rank < extra)
    m = max_micro_batch_size or batch_size
    steps = max(accumulation_steps, math.ceil(batch_size / (world_size * m)))
    q, r = divmod(share, steps)
    out, pos = [], start
    for i in range(steps):
        n = q + (i < r)
        if n:
            out.append((pos, pos + n))
        pos += n
    return out


def _all_reduce(tensors: list[Tensor], group) -> list[Tensor]:
    """Sum each tensor over the ranks of ``group`` in one all-reduce (no-op without one)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    return [chunk.view_as(t) for chunk, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def gradient_and_stats(
    model: nn.Module, output_loss: Callable[[Tensor, Tensor], Tensor], params: dict[str, Tensor],
    micro_batches: list[tuple[Tensor, Tensor]], *, inner: bool = False, norms: bool = True,
    chunk_size: int | None = None, group=None,
) -> tuple[dict[str, Tensor], PerSampleStats, Tensor]:
    """Mean gradient, per-sample statistics and mean loss of a batch given as micro-batches.

    Args:
        model, output_loss: the model and ``output_loss(outputs, targets) -> (b,)`` losses.
        params: dict name -> tensor.
        micro_batches: this rank's list of (inputs, targets).
        inner: also compute sum_i <g_i, g> and sum_i <g_i, g>^2 (inner-product tests).
        norms: compute S2 = sum_i ||g_i||^2 (False: only the gradient, for fixed batches).
        chunk_size: vmap chunk size for fallback layers and inner products.
        group: torch.distributed process group (default: the world, when initialised).

    Returns:
        ``(g, stats, mean_loss)`` with g and the stats over all ranks' samples.
    """
    names = list(params)
    grad_sum = [torch.zeros_like(params[k]) for k in names]
    ref = grad_sum[0]
    s2, loss_sum = ref.new_zeros(()), ref.new_zeros(())
    count = ref.new_zeros(())
    for x, y in micro_batches:
        if norms:
            g, sq, losses = batch_grad_and_sq_norms(model, output_loss, params, x, y, chunk_size)
            s2 = s2 + sq.sum()
            gl = [g[k] for k in names]
        else:
            leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
            with torch.enable_grad():
                losses = output_loss(functional_call(model, leaves, (x,)), y)
                gl = list(torch.autograd.grad(losses.sum(), [leaves[k] for k in names]))
            losses = losses.detach()
        grad_sum = list(ops.add(grad_sum, gl))
        loss_sum = loss_sum + losses.sum()
        count = count + x.shape[0]
    *grad_sum, s2, loss_sum, count = _all_reduce(grad_sum + [s2, loss_sum, count], group)
    mean, stats = finalize_stats(count, dict(zip(names, grad_sum)), s2)
    if inner:
        fn = per_sample_inner_products(sample_loss(model, output_loss), chunk_size=chunk_size)
        p1, p2 = ref.new_zeros(()), ref.new_zeros(())
        for x, y in micro_batches:
            p = fn(mean, params, x, y)
            p1, p2 = p1 + p.sum(), p2 + p.square().sum()
        p1, p2 = _all_reduce([p1, p2], group)
        stats = replace(stats, sum_inner=p1, sum_sq_inner=p2)
    return mean, stats, loss_sum / count


def find_batch_test_state(state: Any) -> NormTestState | InnerProductTestState | None:
    """The first norm/inner-product test state inside a (chained) state, or None."""
    return find_state(state, (NormTestState, InnerProductTestState))


def _index_stream(n: int, seed: int, device):
    gen = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(n, generator=gen), 0

    def take(b: int) -> Tensor:
        nonlocal perm, pos
        parts = []
        while b > 0:
            if pos == n:
                perm, pos = torch.randperm(n, generator=gen), 0
            k = min(b, n - pos)
            parts.append(perm[pos:pos + k])
            pos, b = pos + k, b - k
        return torch.cat(parts).to(device)

    return take


def _positive(value: Any, name: str, none_ok: bool) -> None:
    if value is None and none_ok:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"Batching: {name} must be a positive int{' or None' if none_ok else ''}"
                         f"; got {value!r}")


@dataclass(frozen=True)
class Batching:
    """How :func:`fit_adaptive` draws its batches and cuts them into forward/backward passes.

    Args:
        batch_size: the fixed global batch size when ``tx`` has no batch-size test (ignored
            when it has one). Default None (then ``tx`` must have a test).
        seed: seed of the shuffle, the same on every rank. Default 0.
        max_micro_batch_size: m, the most samples per forward/backward
            (``--max_micro_batch_size``); None for no limit. Default 5000.
        accumulation_steps: the least number of micro-batches per rank and step. Default 1.
        chunk_size: vmap chunk size for the statistics (``--max_test_micro_batch_size``);
            None for one chunk. Default None.

    A bad value raises ValueError naming the field.
    """

    batch_size: int | None = None
    seed: int = 0
    max_micro_batch_size: int | None = 5000
    accumulation_steps: int = 1
    chunk_size: int | None = None

    def __post_init__(self) -> None:
        _positive(self.batch_size, "batch_size", True)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"Batching: seed must be an int; got {self.seed!r}")
        _positive(self.max_micro_batch_size, "max_micro_batch_size", True)
        _positive(self.accumulation_steps, "accumulation_steps", False)
        _positive(self.chunk_size, "chunk_size", True)


def fit_adaptive(
    model: nn.Module, output_loss: Callable[[Tensor, Tensor], Tensor],
    tx: GradientTransformation, params: dict[str, Tensor], inputs: Tensor, targets: Tensor, *,
    max_samples: int, batching: Batching | None = None, group=None,
    callback: Callable[[dict[str, Any], dict[str, Tensor]], None] | None = None,
    state: Any = None,
) -> tuple[dict[str, Tensor], Any, list[dict[str, Any]]]:
    """Train until ``max_samples`` samples are seen, with the batch size set by ``tx``'s test.

    Args:
        model, output_loss: model and per-sample output loss (``reduction="none"``).
        tx: a transform; if it contains :func:`norm_test` / :func:`inner_product_test` /
            :func:`augmented_inner_product_test`, the batch size follows that test's state,
            otherwise it stays ``batching.batch_size``.
        params: dict name -> tensor (every rank passes the same values).
        inputs, targets: the whole training set (the same on every rank).
        max_samples: stop once this many samples were seen (``--max_samples``).
        batching: how the batches are drawn and cut (:class:`Batching`: the fixed batch size
            without a test, the shuffle seed, micro-batches, vmap chunks); default
            ``Batching()``.
        group: torch.distributed group for data parallelism (default: world, if initialised).
        callback: ``callback(record, params)`` after every step.
        state: a state to continue from (default ``tx.init(params)``).

    Returns:
        ``(params, state, history)``; history has one dict per step: step, samples,
        batch_size, loss, statistic, micro_batches, time (seconds since the start, not
        counting the time spent in ``callback``).
    """
    batching = Batching() if batching is None else batching
    if not isinstance(batching, Batching):
        raise TypeError(f"fit_adaptive: batching must be a Batching(...), got "
                        f"{type(batching).__name__}; e.g. batching=Batching(batch_size=64)")
    batch_size, seed = batching.batch_size, batching.seed
    state = tx.init(params) if state is None else state
    test = find_batch_test_state(state)
    if test is None and batch_size is None:
        raise ValueError("fit_adaptive: tx has no batch-size test; pass "
                         "batching=Batching(batch_size=b)")
    inner = isinstance(test, InnerProductTestState)
    world = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank(group) if world > 1 else 0
    take = _index_stream(inputs.shape[0], seed, inputs.device)
    history, samples, step, t0, paused = [], 0, 0, time.perf_counter(), 0.0
    while samples < max_samples:
        if test is not None:
            b = int(test.batch_size)  # host sync: slicing data
        else:
            assert batch_size is not None  # checked before the loop
            b = batch_size
        idx = take(b)
        parts = split_batch(b, world, rank, batching.max_micro_batch_size,
                            batching.accumulation_steps)
        micro = [(inputs[idx[s:e]], targets[idx[s:e]]) for s, e in parts]
        g, stats, loss = gradient_and_stats(model, output_loss, params, micro, inner=inner,
                                            norms=test is not None, chunk_size=batching.chunk_size,
                                            group=group)
        updates, state = tx.update(g, state, params, per_sample_stats=stats, batch_size=b)
        params = apply_updates(params, updates)
        test = find_batch_test_state(state)
        samples, step = samples + b, step + 1
        record = {"step": step, "samples": samples, "batch_size": b, "loss": float(loss),
                  "statistic": float(test.statistic) if test is not None else math.nan,
                  "micro_batches": len(parts), "time": time.perf_counter() - t0 - paused}
        history.append(record)
        if callback is not None:
            t_cb = time.perf_counter()
            callback(record, params)
            paused += time.perf_counter() - t_cb
    return params, state, history

