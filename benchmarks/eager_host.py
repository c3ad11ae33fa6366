"""Host time of fo.adamw's eager Triton step, with the kernel launch replaced by a no-op.

The Triton path of ``fo.adamw(...).update`` (funcopt/triton_kernels.py) spends its time on the
host when the tree has many small leaves: checking the leaves, allocating the outputs, building
the address table, flattening and unflattening. This script measures that host time on CPU
tensors (the module's private device switch admits them) with the kernel replaced by a launcher
that does nothing, so no GPU and no interpreter are needed. The numbers of the step are then
meaningless (the outputs are never written); only the time is measured.

Rows: ``update`` is ``tx.update(grads, state, params)`` with the state of the previous step fed
back (as in training); ``step`` adds ``fo.apply_updates(params, updates)``. Each row is the
median over ``--repeat`` blocks of ``--block`` calls, in ms per call. With ``--before FILE`` (an
older copy of funcopt/triton_kernels.py) the same rows are measured for it too, the two taking
turns block by block, so that a change in the machine's load hits both alike. Python's cyclic
garbage collector runs as in any program (each step makes thousands of tensor objects, so
collections are part of the cost, and they grow with every live object in the process: the two
contenders share one heap); ``--no-gc`` turns it off to time the step's own work alone.

Usage (Triton installed, or on ``PYTHONPATH``):
    python benchmarks/eager_host.py                      # case b: 1000 leaves of 1000
    python benchmarks/eager_host.py --case gpt           # the gpt184 tree (121 leaves), narrowed
    git show HEAD~1:funcopt/triton_kernels.py > /tmp/tk_before.py
    python benchmarks/eager_host.py --before /tmp/tk_before.py
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import math
import statistics
import time

import torch

import funcopt as fo
from funcopt import triton_kernels as tk


class _NoLaunch:
    """Stands for the compiled kernel: ``kernel[grid](*args, **meta)`` counts and returns."""

    def __init__(self) -> None:
        self.calls = 0

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.calls += 1
        return launch


def _module(path: str | None):
    """funcopt.triton_kernels, or the module in ``path``, with the kernel replaced by a no-op
    launcher and CPU tensors admitted."""
    if path is None:
        module = tk
    else:
        spec = importlib.util.spec_from_file_location("_triton_kernels_before", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    module._DEVICE_TYPES = ("cuda", "cpu")
    fake = _NoLaunch()
    module._kernel = lambda device_type: fake
    return module, fake


def _steps(module, fake, shapes, weight_decay):
    """The ``update`` and ``step`` callables of one contender (its own params and state)."""
    base = fo.adamw(1e-3, weight_decay=weight_decay)
    tx = module.with_triton_adamw(base, 1e-3, b1=0.9, b2=0.999, eps=1e-8,
                                  weight_decay=weight_decay)
    params = [torch.randn(s) for s in shapes]
    grads = [torch.randn(s) for s in shapes]
    box = {"p": params, "s": tx.init(params)}

    def update():
        _, box["s"] = tx.update(grads, box["s"], box["p"])

    def step():
        u, box["s"] = tx.update(grads, box["s"], box["p"])
        box["p"] = fo.apply_updates(box["p"], u)

    calls = fake.calls
    update()
    assert fake.calls > calls, "the Triton path did not run"
    return update, step


def _turns(fns, repeat: int, block: int) -> list[float]:
    """Median ms per call of each function, taking turns in blocks of ``block`` calls."""
    for fn in fns:
        for _ in range(3):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for fn, ts in zip(fns, times):
            t = time.perf_counter()
            for _ in range(block):
                fn()
            ts.append((time.perf_counter() - t) / block)
    return [1e3 * statistics.median(ts) for ts in times]


def _shapes(case: str, leaves: int, numel: int) -> list[tuple[int, ...]]:
    """Case ``b``: ``leaves`` 1-D leaves of ``numel``; case ``gpt``: the 121 leaves of
    step_speed.py's gpt184 tree (embedding, then per layer 12 matrices and vectors) with the
    width 1024 narrowed to 64 and the vocabulary to 1024, so that it fits a CPU's memory."""
    if case == "b":
        return [(numel,)] * leaves
    d, layers, v = 64, 10, 1024
    per = [(3 * d, d), (3 * d,), (d, d), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,), (d,), (d,),
           (d,), (d,)]
    return [(v, d)] + per * layers


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=["b", "gpt"], default="b")
    ap.add_argument("--leaves", type=int, default=1000)
    ap.add_argument("--numel", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--block", type=int, default=10)
    ap.add_argument("--weight-decay", type=float, default=1e-2)
    ap.add_argument("--no-gc", action="store_true", help="time with the garbage collector off")
    ap.add_argument("--before", default=None, help="an older triton_kernels.py to compare with")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    shapes = _shapes(args.case, args.leaves, args.numel)
    names = ["after"] + (["before"] if args.before else [])
    contenders = [_steps(*_module(path), shapes, args.weight_decay)
                  for path in [None] + ([args.before] if args.before else [])]
    print(f"case {args.case}: {len(shapes)} leaves, {sum(map(math.prod, shapes)):,} elements, "
          f"weight_decay={args.weight_decay}, "
          f"gc {'off' if args.no_gc else 'on'}, "
          f"torch {torch.__version__}, median of {args.repeat} blocks of {args.block} calls")
    if args.no_gc:
        gc.collect()
        gc.disable()
    for row in (0, 1):
        times = _turns([c[row] for c in contenders], args.repeat, args.block)
        cells = "  ".join(f"{name} {ms:8.3f} ms" for name, ms in zip(names, times))
        print(f"{('update', 'step')[row]:>7}: {cells}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
