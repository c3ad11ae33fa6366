"""Where one contender's optimizer step spends its time: ``torch.profiler`` over a few steps.

Builds a contender of ``step_speed.py`` (same shapes, settings, fixed random gradients), runs
``--warmup`` steps, profiles ``--steps`` more and prints the operators with the most device
time (self CUDA time on a GPU, self CPU time on a CPU), per step, with their call counts.

Usage::

    python benchmarks/profile_step.py --device cuda --cases gpt184 --methods soap --contenders funcopt-eager
    python benchmarks/profile_step.py --device cpu --cases mlp --contenders funcopt-eager,torch-foreach --threads 1 --steps 200 --by-shape
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(__file__))
import step_speed  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cases", default="mlp")
    ap.add_argument("--methods", default="adamw")
    ap.add_argument("--contenders", default="funcopt-eager")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--by-shape", action="store_true", help="one row per op and input shapes")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = args.device.startswith("cuda")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    key = "self_device_time_total" if gpu else "self_cpu_time_total"
    for case in args.cases.split(","):
        shapes = step_speed.shapes_for(case, args.device)
        for method in args.methods.split(","):
            for name, setup in step_speed.contenders(method, args.contenders.split(",")).items():
                step = setup(shapes, args.device)
                if step is None:
                    continue
                for _ in range(args.warmup):
                    step()
                if gpu:
                    torch.cuda.synchronize()
                with profile(activities=acts, record_shapes=args.by_shape) as prof:
                    for _ in range(args.steps):
                        step()
                    if gpu:
                        torch.cuda.synchronize()
                events = prof.key_averages(group_by_input_shape=args.by_shape)
                total = sum(getattr(e, key) for e in events) / args.steps
                print(f"\n## {case}, {method}, {name}: {total / 1e3:.2f} ms of "
                      f"{'device' if gpu else 'CPU'} self time per step over {args.steps} steps")
                print("| op | input shapes | ms/step | calls/step | us/call |")
                print("| --- | --- | --- | --- | --- |")
                for e in sorted(events, key=lambda e: -getattr(e, key))[: args.top]:
                    shapes_in = str(e.input_shapes) if args.by_shape else ""
                    print(f"| {e.key} | {shapes_in} | {getattr(e, key) / 1e3 / args.steps:.3f} | "
                          f"{e.count / args.steps:.0f} | {getattr(e, key) / e.count:.1f} |")
                del step
    return 0


if __name__ == "__main__":
    sys.exit(main())
