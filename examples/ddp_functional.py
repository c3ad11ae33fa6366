"""Data-parallel training two ways, checked against single-process full-batch training.

  A. the functional loop: chain(all_reduce_mean(), adamw) over torch.func gradients;
  B. a DistributedDataParallel model with funcopt.Optimizer(adamw).

Every rank trains on its shard of each batch; the script reports, on rank 0, the largest
difference between the data-parallel parameters and single-process training on the full batch,
and the time per step.

Run on CPUs:      python examples/ddp_functional.py --backend gloo --nproc 2
Run on 2 GPUs:    python examples/ddp_functional.py --backend nccl --nproc 2
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.datasets import load_digits
from torch.func import functional_call, grad

import funcopt as fo


def make_model(device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 10))
    return net.to(device=device, dtype=dtype)


def batches(device: torch.device, dtype: torch.dtype, batch: int, steps: int) -> list[Any]:
    x, y = load_digits(return_X_y=True)
    x_t = torch.tensor(x / 16.0, dtype=dtype, device=device)
    y_t = torch.tensor(y, device=device)
    g = torch.Generator().manual_seed(0)
    idx = [torch.randint(0, len(x), (batch,), generator=g) for _ in range(steps)]
    return [(x_t[i.to(device)], y_t[i.to(device)]) for i in idx]


def functional_train(model: torch.nn.Module, data: list[Any], distributed: bool) -> Any:
    params = {k: v.detach() for k, v in model.named_parameters()}
    tx = fo.adamw(learning_rate=3e-3, weight_decay=1e-2)
    if distributed:
        params = fo.broadcast_params(params)
        tx = fo.chain(fo.all_reduce_mean(), tx)

    def loss_fn(p: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(functional_call(model, p, (x,)), y)

    state = tx.init(params)
    for xb, yb in data:
        if distributed:
            xb, yb = fo.shard_batch((xb, yb))
        grads = grad(loss_fn)(params, xb, yb)
        updates, state = tx.update(grads, state, params)
        params = fo.apply_updates(params, updates)
    return list(params.values())


def adapter_train(model: torch.nn.Module, data: list[Any], distributed: bool) -> Any:
    net = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
    opt = fo.Optimizer(net.parameters(), fo.adamw(learning_rate=3e-3, weight_decay=1e-2))
    for xb, yb in data:
        if distributed:
            xb, yb = fo.shard_batch((xb, yb))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(xb), yb).backward()
        opt.step()
    return [p.detach() for p in model.parameters()]


def timed(fn: Any, *args: Any) -> tuple[Any, float]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def worker(rank: int, args: argparse.Namespace, port: int) -> None:
    device = torch.device(f"cuda:{rank}") if args.backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(args.backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=args.nproc, device_id=device if device.type == "cuda" else None)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    data = batches(device, dtype, args.batch, args.steps)
    for name, train in (("functional + all_reduce_mean", functional_train),
                        ("DDP + funcopt.Optimizer", adapter_train)):
        for flag in (False, True):  # warm-up (first-call costs, NCCL communicators)
            train(make_model(device, dtype), data[:2], flag)
        ref, t_ref = timed(train, make_model(device, dtype), data, False)
        got, t_dp = timed(train, make_model(device, dtype), data, True)
        diff = max((a - b).abs().max().item() for a, b in zip(got, ref))
        if rank == 0:
            print(f"{name:30s} {args.backend}/{args.nproc} ranks {args.dtype}: max |dp - single| = "
                  f"{diff:.3e}; {1e3 * t_dp / args.steps:.2f} ms/step data-parallel, "
                  f"{1e3 * t_ref / args.steps:.2f} ms/step single (full batch)")
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    args = ap.parse_args()
    if args.backend == "nccl" and torch.cuda.device_count() < args.nproc:
        raise SystemExit(f"--backend nccl needs {args.nproc} GPUs; found {torch.cuda.device_count()}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(worker, args=(args, port), nprocs=args.nproc, join=True)


if __name__ == "__main__":
    main()
