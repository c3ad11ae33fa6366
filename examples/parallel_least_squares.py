"""Data-parallel Levenberg-Marquardt: each process holds a shard of the residuals.

    torchrun --nproc_per_node 2 examples/parallel_least_squares.py

Every rank fits ``y = a exp(-b t) + c`` to its rows of the data; ``J_k^T J_k``, ``J_k^T r_k``
and ``||r_k||^2`` are all-reduced and every rank takes the same steps (one process's steps).
Run as a plain ``python`` script it fits all rows in one process.
"""

import os

import torch
import torch.distributed as dist

from funcopt.least_squares_parallel import least_squares_parallel


def main() -> None:
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    t = torch.linspace(0.0, 3.0, 10_000, dtype=torch.float64)
    y = 2.5 * torch.exp(-1.3 * t) + 0.5 + 0.01 * torch.sin(40 * t)
    t, y = t[rank::world], y[rank::world]  # this rank's shard
    p, info = least_squares_parallel(lambda p: p[0] * torch.exp(-p[1] * t) + p[2] - y,
                                     torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64))
    print(f"rank {rank}/{world}: params {p.tolist()}, cost {float(info.cost[0]):.6g}, "
          f"steps {int(info.steps[0])}, {info.reasons()[0]}")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
