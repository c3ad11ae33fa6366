"""Data-parallel least squares over 2 CPU processes (gloo): the steps equal one process's."""

import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _lm_rounding import assert_within, flip_radius

from funcopt.least_squares import least_squares
from funcopt.least_squares_parallel import least_squares_parallel

WORLD = 2
T = torch.linspace(0.0, 3.0, 40, dtype=torch.float64)
Y = 2.5 * torch.exp(-1.3 * T) + 0.5 + 0.05 * torch.sin(7 * T)
P0 = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)


def _residual(p, t, y):
    return p[0] * torch.exp(-p[1] * t) + p[2] - y


def _fit(rank, world, max_steps=1000):
    shard = slice(rank, None, world)  # rows rank, rank + world, ...
    return least_squares_parallel(lambda p: _residual(p, T[shard], Y[shard]), P0.clone(),
                                  max_steps=max_steps)


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        path = [_fit(rank, WORLD, k)[0] for k in (1, 2, 3, 5)]
        p, info = _fit(rank, WORLD)
        torch.save((path, p, info), os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_take_one_process_steps():
    with tempfile.TemporaryDirectory() as d:
        # spawn, not fork: where CUDA is present autograd's device threads make fork unsafe
        mp.start_processes(_worker, args=(os.path.join(d, "init"), d), nprocs=WORLD, join=True,
                           start_method="spawn")
        results = [torch.load(os.path.join(d, f"{r}.pt"), weights_only=False) for r in range(WORLD)]
    one_path = [_fit(0, 1, k)[0] for k in (1, 2, 3, 5)]
    one_p, one_info = _fit(0, 1)
    for path, p, info in results:
        # the iterates after 1, 2, 3 and 5 updates: J^T J summed in another order only
        for a, b in zip(path, one_path):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
        # at the solution rounding decides the last steps (_lm_rounding): one process took a
        # step of 1.7e-9 that two processes rejected, on a CPU with AVX2
        assert_within(p, one_p, flip_radius(lambda q: _residual(q, T, Y), one_p))
        # and the last tolerance test: one update either way
        assert bool(info.success[0]) and abs(int(info.steps[0]) - int(one_info.steps[0])) <= 1
        torch.testing.assert_close(info.cost, one_info.cost, rtol=1e-12, atol=0)
    # the single-problem driver; the normal equations are accurate to cond(J)^2 eps
    p_ref, info_ref = least_squares(lambda p: _residual(p, T, Y), P0.clone())
    torch.testing.assert_close(one_p, p_ref, rtol=1e-8, atol=1e-12)
    assert abs(float(one_info.cost[0]) - info_ref.cost) <= 1e-12 * info_ref.cost


def test_matches_scipy_minpack():
    so = pytest.importorskip("scipy.optimize")
    t, y = T.numpy(), Y.numpy()
    ref = so.least_squares(lambda v: v[0] * np.exp(-v[1] * t) + v[2] - y, P0.numpy(),
                           method="lm", xtol=1e-15, ftol=1e-15, gtol=1e-15)
    p, info = _fit(0, 1)
    np.testing.assert_allclose(p.numpy(), ref.x, rtol=1e-8)
    np.testing.assert_allclose(float(info.cost[0]), ref.cost, rtol=1e-10)
