"""PSGD Kron step cost: funcopt's ``psgd_kron`` against heavyball 3.2.1's eager ``PSGDKron``.

The parameters follow the pattern of a GPT-like model (``step_speed.py --cases gpt184``):
an embedding ``(vocab, d)`` and per layer ``(3d, d), (3d,), (d, d), (d,), (4d, d), (4d,),
(d, 4d)`` and five ``(d,)`` vectors. Both optimizers run with their defaults except the
learning rate (1e-3) and ``max_size_triangular``, which is scaled with ``d`` (``2d``, i.e.
2048 at ``d = 1024``) so that a reduced model keeps the factor layout of the full one
(triangular factors on the ``d`` dimensions, diagonal ones on ``3d``, ``4d`` and the
vocabulary). In the first 1000 steps the preconditioner is fitted on every step, as here.

Timing: eager steps on the CPU, the two optimizers taking turns in blocks of a few steps
(after a warm-up), median milliseconds per step. Op counts: ``torch.profiler`` over a few
steps; "aten ops" counts every ``aten::`` call (nested ones included), "top-level" only those
not called from another ``aten::`` op, "compute" the top-level ones that do arithmetic or copy
data (views and other metadata-only calls left out; a ``_foreach`` op counts once): roughly
the kernel launches of a GPU step. "host reads" counts ``aten::_local_scalar_dense`` calls
(``.item()``, ``bool()``, indexing with a 0-d tensor), each a device synchronisation on a
GPU. funcopt's count includes one read that only CPU tensors get (the learning rate taken as
a Python number) and leaves out its one ``.tolist()`` per step (the update decision, not a
dispatched op). "GFLOP" counts matrix products (``torch.utils.flop_counter``; triangular
solves are not counted).

Usage::

    python benchmarks/psgd_profile.py --d 256 --vocab 4096 --layers 2 --steps 20 --threads 1
    python benchmarks/psgd_profile.py --d 64 --vocab 1024 --layers 10  # the 121 tensors of d=1024
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

import funcopt as fo

LR = 1e-3
# aten ops that move no data unless they call a copy (a dtype change, a reshape that copies)
METADATA_OPS = {
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::as_strided", "aten::view",
    "aten::_reshape_alias", "aten::_unsafe_view", "aten::alias", "aten::result_type",
    "aten::promote_types", "aten::detach", "aten::lift_fresh", "aten::to", "aten::reshape",
    "aten::select", "aten::slice", "aten::unsqueeze", "aten::squeeze", "aten::expand",
    "aten::transpose", "aten::permute", "aten::t", "aten::mT", "aten::movedim", "aten::unbind",
    "aten::split", "aten::expand_as", "aten::view_as", "aten::resolve_conj", "aten::resolve_neg",
}
COPY_OPS = {"aten::copy_", "aten::_to_copy", "aten::clone"}


def _copies(ev) -> bool:
    """Whether a profiler event copies data somewhere below it."""
    return any(c.name in COPY_OPS or _copies(c) for c in ev.cpu_children)


def shapes(d: int, vocab: int, layers: int) -> list[tuple[int, ...]]:
    per = [(3 * d, d), (3 * d,), (d, d), (d,), (4 * d, d), (4 * d,), (d, 4 * d)] + [(d,)] * 5
    return [(vocab, d)] + per * layers


def tensors(shape_list, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen) for s in shape_list]


def funcopt_step(shape_list, max_tri: int):
    """One pure funcopt step (update + apply) per call, on fixed random gradients."""
    tx = fo.psgd_kron(LR, max_size_triangular=max_tri)
    grads = tensors(shape_list, 1)
    box = {"p": tensors(shape_list, 0)}
    box["s"] = tx.init(box["p"])

    def step():
        u, box["s"] = tx.update(grads, box["s"], box["p"])
        box["p"] = fo.apply_updates(box["p"], u)

    return step


def heavyball_step(shape_list, max_tri: int):
    """One eager heavyball step per call, on fixed random gradients."""
    import heavyball

    heavyball.utils.compile_mode = None  # eager
    params = [torch.nn.Parameter(t) for t in tensors(shape_list, 0)]
    grads = tensors(shape_list, 1)
    opt = heavyball.PSGDKron(params, lr=LR, max_size_triangular=max_tri)

    def step():
        for p, g in zip(params, grads):
            p.grad = g  # heavyball clears p.grad after each step
        opt.step()

    return step


def time_steps(fns, steps: int, warmup: int = 3, block: int = 5) -> list[float]:
    """Median ms per step of each function, taking turns in blocks of ``block`` steps."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    while len(times[0]) < steps:
        for fn, ts in zip(fns, times):
            for _ in range(block):
                t = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t)
    return [statistics.median(ts) * 1e3 for ts in times]


def count_ops(fn, steps: int = 3) -> tuple[float, ...]:
    """(aten ops, top-level aten ops, compute ops, host reads, matmul GFLOP) per step."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    total = top = compute = reads = 0
    for ev in prof.events():
        if not ev.name.startswith("aten::"):
            continue
        total += 1
        reads += ev.name == "aten::_local_scalar_dense"
        parent = ev.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is None:
            top += 1
            compute += ev.name not in METADATA_OPS or _copies(ev)
    with FlopCounterMode(display=False) as flops:
        fn()
    return total / steps, top / steps, compute / steps, reads / steps, flops.get_total_flops() / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per optimizer")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-size-triangular", type=int, default=None,
                    help="default: 2 * d (2048 at d = 1024, both libraries' default)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    max_tri = args.max_size_triangular or 2 * args.d
    shape_list = shapes(args.d, args.vocab, args.layers)
    n = sum(torch.Size(s).numel() for s in shape_list)
    fns = {"funcopt": funcopt_step(shape_list, max_tri), "heavyball": heavyball_step(shape_list, max_tri)}
    ms = time_steps(list(fns.values()), args.steps)
    ops = [count_ops(fn) for fn in fns.values()]
    print(f"d={args.d}, vocab={args.vocab}, layers={args.layers}: {len(shape_list)} tensors, "
          f"{n:,} parameters; {args.threads} thread(s), max_size_triangular={max_tri}, "
          f"median of {args.steps} steps\n")
    print("| optimizer | ms/step | aten ops/step | top-level | compute | host reads | GFLOP/step |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, t, (total, top, compute, reads, gflop) in zip(fns, ms, ops):
        print(f"| {name} | {t:.1f} | {total:.0f} | {top:.0f} | {compute:.0f} | {reads:.0f} | "
              f"{gflop:.2f} |")


if __name__ == "__main__":
    main()
