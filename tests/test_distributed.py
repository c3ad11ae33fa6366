"""Data parallelism over 2 CPU processes (gloo): functional loop, DDP + adapter, FSDP2.

Each worker runs single-process training on the full batch as its reference and checks that
the data-parallel run lands on the same parameters.
"""

from __future__ import annotations

import os
import tempfile
from typing import NamedTuple

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import funcopt as fo

WORLD = 2
STEPS = 5


class _AdamState(NamedTuple):
    count: torch.Tensor
    mu: list
    nu: list
    learning_rate: torch.Tensor


torch.serialization.add_safe_globals([_AdamState])  # a state class loads with weights_only=True


def _adam(lr=1e-2, b1=0.9, b2=0.999, eps=1e-8):
    """Element-wise Adam (float64 transcription of Kingma & Ba, Alg. 1) over a list or dict."""
    def init(params):
        leaves, spec = fo.tree_flatten(params)
        z = [torch.zeros_like(p) for p in leaves]
        return _AdamState(fo.step_counter(params), z, list(z), torch.tensor(lr, dtype=torch.float64))

    def update(grads, s, params=None, **extra):
        g, spec = fo.tree_flatten(grads)
        count = fo.increment(s.count)
        t = count.to(torch.float64)
        mu = [b1 * m + (1 - b1) * x for m, x in zip(s.mu, g)]
        nu = [b2 * v + (1 - b2) * x * x for v, x in zip(s.nu, g)]
        u = [-s.learning_rate * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
             for m, v in zip(mu, nu)]
        return fo.tree_unflatten(spec, u), _AdamState(count, mu, nu, s.learning_rate)

    return fo.GradientTransformation(init, update)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1)).double()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randn(8, 1, generator=g, dtype=torch.float64)


def _loss_fn(model):
    def loss(params, x, y):
        out = torch.func.functional_call(model, params, (x,))
        return torch.nn.functional.mse_loss(out, y)
    return loss


def _functional(tx, shard: bool):
    model = _model()
    params = {k: v.detach() for k, v in model.named_parameters()}
    if shard:
        params = fo.broadcast_params(params)
    loss = _loss_fn(model)
    state = tx.init(params)
    x, y = _data()
    for _ in range(STEPS):
        xb, yb = fo.shard_batch((x, y)) if shard else (x, y)
        grads = torch.func.grad(loss)(params, xb, yb)
        updates, state = tx.update(grads, state, params)
        params = fo.apply_updates(params, updates)
    return params


def _check_functional(rank):
    from funcopt.testing import check_transform

    # a collective cannot run under vmap (it says so); compile is checked on one process
    check_transform(fo.all_reduce_mean(), {"w": torch.ones(2, 3), "b": [torch.zeros(3)]},
                    vmap=False, compile=False)
    g = {"w": torch.full((2,), float(rank)), "n": torch.full((3,), 2.0 * rank, dtype=torch.float64)}
    mean, _ = fo.all_reduce_mean().update(g, fo.EmptyState())
    assert torch.equal(mean["w"], torch.full((2,), 0.5)) and mean["n"].dtype == torch.float64
    assert torch.equal(g["w"], torch.full((2,), float(rank)))  # input untouched
    ref = _functional(_adam(), shard=False)
    got = _functional(fo.chain(fo.all_reduce_mean(), _adam()), shard=True)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-12, atol=1e-14)
    for k in ref:  # ranks agree bit for bit
        other = got[k].clone()
        dist.broadcast(other, src=0)
        assert torch.equal(other, got[k])


def _adapter_run(wrap, make_tx=_adam):
    model = _model()
    net = torch.nn.parallel.DistributedDataParallel(model) if wrap else model
    opt = fo.Optimizer(net.parameters(), make_tx())
    x, y = _data()
    if wrap:
        x, y = fo.shard_batch((x, y))
    for _ in range(STEPS):
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _check_ddp(rank):
    ref = _adapter_run(wrap=False)
    got = _adapter_run(wrap=True)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def _check_fsdp2(rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (WORLD,))  # gloo on the CPU, also where CUDA is present

    # the test's own Adam, and the library's (whose eager fast path must step aside for DTensor)
    for make_tx in (_adam, lambda: fo.adamw(1e-2, weight_decay=1e-2)):
        ref = _adapter_run(wrap=False, make_tx=make_tx)
        model = _model()
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert all(isinstance(p, DTensor) for p in model.parameters())
        opt = fo.Optimizer(model.parameters(), make_tx())
        x, y = fo.shard_batch(_data())
        for _ in range(STEPS):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        for p, r in zip(model.parameters(), ref):
            torch.testing.assert_close(p.full_tensor(), r, rtol=1e-12, atol=1e-14)


def _worker(rank, init_file, checks):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        for name in checks:
            globals()[name](rank)
    finally:
        dist.destroy_process_group()


def _spawn(*checks):
    with tempfile.TemporaryDirectory() as d:
        # spawn, not fork: where CUDA is present autograd's device threads make fork unsafe
        mp.start_processes(_worker, args=(os.path.join(d, "init"), checks), nprocs=WORLD,
                           join=True, start_method="spawn")


def test_two_process_gloo_matches_single_process():
    """Functional loop with all_reduce_mean, DDP + funcopt.Optimizer, FSDP2 DTensor params."""
    _spawn("_check_functional", "_check_ddp", "_check_fsdp2")


def test_needs_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        fo.all_reduce_mean().update({"w": torch.ones(2)}, fo.EmptyState())
    with pytest.raises(ValueError, match="divisible"):
        fo.shard_batch(torch.ones(5, 2), rank=0, world_size=2)
    assert torch.equal(fo.shard_batch(torch.arange(6), rank=1, world_size=3), torch.tensor([2, 3]))
