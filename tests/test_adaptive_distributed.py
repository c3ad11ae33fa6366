"""Two gloo processes on the CPU decide the same batch sizes and reach the same parameters as
one process on the concatenated batches."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from funcopt.batch_size_loop import Batching, fit_adaptive
from funcopt.compose import chain
from funcopt.transforms.adaptive_batch import (
    augmented_inner_product_test,
    norm_test,
    scale_by_sample_schedule,
)

MAKERS = {"norm": lambda: norm_test(0.6, 4, 64),
          "aug_ip": lambda: augmented_inner_product_test(0.6, 0.8, 4, 64)}


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def run(kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(120, 5, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    params = {k: v.detach() for k, v in model.named_parameters()}
    tx = chain(MAKERS[kind](), scale_by_sample_schedule(0.5))
    params, _, hist = fit_adaptive(model, ce, tx, params, x, y, max_samples=300,
                                   batching=Batching(max_micro_batch_size=9, seed=3))
    return params, [r["batch_size"] for r in hist]


def worker(rank, world, init_file, out_dir, kind):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        params, sizes = run(kind)
        torch.save({"params": params, "sizes": sizes}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_two_gloo_ranks_equal_one_process(kind):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(2, os.path.join(tmp, "init"), tmp, kind), nprocs=2, join=True)
        results = [torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(2)]
    params, sizes = run(kind)
    assert len(set(sizes)) > 1  # the batch grew, so the decisions are non-trivial
    for res in results:
        assert res["sizes"] == sizes
        for k in params:
            torch.testing.assert_close(res["params"][k], params[k], rtol=1e-9, atol=1e-11)
