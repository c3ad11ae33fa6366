"""How the compiled flat AdamW step is written changes its speed: pure, donated with one
foreach copy, donated with one copy per leaf; each with and without ``engine.per_step``.

Times the step (CUDA events, median) on one flat buffer of 1e7 and of 1e9 parameters and prints
the multiple of the memory-bandwidth floor (28 bytes per parameter at the measured copy
bandwidth). Needs a CUDA device.

Usage: ``python benchmarks/compile_variants.py``
"""

from __future__ import annotations

import torch
from step_speed import copy_bandwidth, timeit  # this folder's step-time helpers

import funcopt as fo
import funcopt.engine as engine
import funcopt.transforms.first_order as first_order

REAL_PER_STEP = engine.per_step


def donated_foreach(step):
    """fo.donated as first written: one ``_foreach_copy_`` of all results."""

    def wrapped(params, state, *args):
        new_p, new_s = step(params, state, *args)
        with torch.no_grad():
            torch._foreach_copy_(fo.tree_leaves((params, state)), fo.tree_leaves((new_p, new_s)))
        return params, state

    return wrapped


def run(n: int, variant: str, repeat: int, bandwidth: float) -> None:
    torch._dynamo.reset()
    per_step = REAL_PER_STEP if "no-per-step" not in variant else (lambda x: x)
    engine.per_step = first_order.per_step = per_step
    tx = fo.adamw(1e-3, weight_decay=1e-2)
    p = torch.randn(n, device="cuda")
    g = torch.randn(n, device="cuda")
    box = {"p": p, "s": tx.init(p)}

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return fo.apply_updates(params, updates), state

    if variant.startswith("donated-foreach"):
        step = donated_foreach(step)
    elif variant.startswith("donated"):
        step = fo.donated(step)
    compiled = torch.compile(step, fullgraph=True)

    def call():
        box["p"], box["s"] = compiled(box["p"], box["s"], g)

    ms = timeit(call, "cuda", repeat) * 1e3
    print(f"| {n:.0e} | {variant} | {ms:.3f} | {ms / (n * 28 / bandwidth * 1e3):.2f} |", flush=True)


def main() -> None:
    bandwidth = copy_bandwidth("cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, copy bandwidth "
          f"{bandwidth / 1e9:.0f} GB/s\n\n| params | variant | ms | x floor |\n| --- | --- | --- | --- |")
    for n, repeat in ((10**7, 30), (10**9, 10)):
        for variant in ("pure", "pure-no-per-step", "donated-foreach", "donated-foreach-no-per-step",
                        "donated", "donated-no-per-step"):
            run(n, variant, repeat, bandwidth)


if __name__ == "__main__":
    main()
