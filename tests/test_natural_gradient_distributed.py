"""Data-parallel KFAC and SINGD: two gloo processes, each on half of every batch, with the
gradients and the factor statistics averaged over ``process_group``, take the same steps as
one process on the whole batch."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import funcopt as fo

WORLD = 2


def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 4, 2, stride=2),
                          nn.Flatten(), nn.Linear(4 * 2 * 2, 3)).double()
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 2, 4, 4, generator=gen, dtype=torch.float64),
             torch.randint(0, 3, (8,), generator=gen)) for _ in range(4)]
    return model, data


def make_tx(method, model, group):
    if method == "kfac":
        return fo.kfac(model, 0.1, momentum=0.9, damping=1e-2, T=2, process_group=group)
    return fo.singd(model, 0.05, T=2, lr_cov=5e-2, structures=("dense", "diagonal"),
                    process_group=group)


def train(method, rank=0, world=1, group=None):
    model, data = model_and_data()
    tx = make_tx(method, model, group)
    params = {k: v.detach() for k, v in model.named_parameters()}
    state = tx.init(params)
    for x, y in data:
        rows = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        cap = fo.func.capture_curvature(model, params, x[rows], y[rows])
        grads = cap.grads if group is None else fo.tree_all_reduce_mean(cap.grads, group)
        upd, state = tx.update(grads, state, params, curvature=cap)
        params = fo.apply_updates(params, upd)
    return params


METHODS = ("kfac", "singd")


def _worker(rank, store_path, out_path):
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, WORLD)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD)
    try:
        params = {m: train(m, rank, WORLD, dist.group.WORLD) for m in METHODS}
        if rank == 0:
            torch.save(params, out_path)
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_process_on_the_whole_batch(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    out = str(tmp_path / "params.pt")
    mp.spawn(_worker, args=(str(tmp_path / "store"), out), nprocs=WORLD, join=True)
    got = torch.load(out)
    start = dict(model_and_data()[0].named_parameters())
    for method in METHODS:
        ref = train(method)
        for k in ref:
            assert not torch.allclose(ref[k], start[k])
            torch.testing.assert_close(got[method][k], ref[k], rtol=1e-9, atol=1e-11,
                                       msg=lambda m, method=method, k=k: f"{method} {k}: {m}")
