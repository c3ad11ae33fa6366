"""How fast can a *pure* eager AdamW step be on a CPU? The passes over the state, timed alone.

funcopt's default path keeps the optax contract: ``update`` returns new state and an update
tree, and ``apply_updates`` adds it to new parameters. Without compiling, each element-wise
operation is one ``_foreach`` pass over the leaves. This script times, on the 85k-parameter
MLP of ``step_speed.py --cases mlp``:

* ``pure-10``: the ten out-of-place passes an optax-style AdamW chain makes (moment updates,
  denominator, ratio, bias-correction scale, weight decay, learning rate, apply) with Python
  numbers for every coefficient (no step-count tensor ops, no pytree work);
* ``pure-7``: the fewest out-of-place passes that produce new moments and new parameters
  directly (``addcdiv`` into decayed parameters), which the update contract does not allow;
* ``funcopt-eager``: ``fo.adamw`` pure update plus ``fo.apply_updates`` (``scale_by_adam``
  through torch's fused Adam kernel on new tensors), and the same step with ``scale_by_adam``'s
  ``_foreach`` path (the one a compiled step traces);
* torch.optim.AdamW with ``foreach=True`` and ``fused=True`` (in place).

Usage: ``python benchmarks/eager_passes.py [--repeat 1000]`` (one thread; the rows take
turns in blocks of 20 steps).
"""

from __future__ import annotations

import argparse

import torch
from step_speed import timeit_turns  # this folder's step-time helpers

import funcopt as fo
from funcopt.transforms import first_order

SHAPES = [(100, 784), (100,), (64, 100), (64,), (10, 64), (10,)]
LR, WD, B1, B2, EPS = 1e-3, 1e-2, 0.9, 0.999, 1e-8


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=1000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    p = [torch.randn(s, generator=gen) for s in SHAPES]
    g = [torch.randn(s, generator=gen) for s in SHAPES]
    m = [torch.zeros(s) for s in SHAPES]
    v = [torch.rand(s, generator=gen) for s in SHAPES]
    coef = 0.5  # stands for sqrt(1 - b2^t) / (1 - b1^t) at some step t

    def pure10():
        m2 = torch._foreach_lerp(m, g, 1 - B1)
        v2 = torch._foreach_addcmul(torch._foreach_mul(v, B2), g, g, value=1 - B2)
        d = torch._foreach_add(torch._foreach_sqrt(v2), EPS)
        u = torch._foreach_mul(torch._foreach_div(m2, d), coef)
        u = torch._foreach_mul(torch._foreach_add(u, p, alpha=WD), -LR)
        return torch._foreach_add(p, u), m2, v2

    def pure7():
        m2 = torch._foreach_lerp(m, g, 1 - B1)
        v2 = torch._foreach_mul(v, B2)
        torch._foreach_addcmul_(v2, g, g, value=1 - B2)
        d = torch._foreach_sqrt(v2)
        torch._foreach_add_(d, EPS)
        new_p = torch._foreach_mul(p, 1 - LR * WD)
        torch._foreach_addcdiv_(new_p, m2, d, value=-LR * coef)
        return new_p, m2, v2

    tx = fo.adamw(LR, B1, B2, EPS, weight_decay=WD)
    fusable = first_order._fusable

    def funcopt_eager(fused: bool):
        box = {"p": [x.clone() for x in p], "s": tx.init(p)}

        def step():
            first_order._fusable = fusable if fused else (lambda *a: False)
            u, box["s"] = tx.update(g, box["s"], box["p"])
            box["p"] = fo.apply_updates(box["p"], u)
            first_order._fusable = fusable

        return step

    rows = [("pure-10 (optax-style passes, number coefficients)", pure10),
            ("pure-7 (new params directly; not the update contract)", pure7),
            ("funcopt-eager (fo.adamw + apply_updates)", funcopt_eager(True)),
            ("funcopt-eager, _foreach path of scale_by_adam", funcopt_eager(False))]
    for flag in ("foreach", "fused"):
        params = [torch.nn.Parameter(x.clone()) for x in p]
        for q, gg in zip(params, g):
            q.grad = gg
        rows.append((f"torch.optim.AdamW({flag}=True)",
                     torch.optim.AdamW(params, lr=LR, weight_decay=WD, **{flag: True}).step))
    print(f"torch {torch.__version__}, 1 thread, {sum(torch.Size(s).numel() for s in SHAPES):,} "
          "parameters in 6 tensors\n\n| step | ms |\n| --- | --- |")
    seconds = timeit_turns([fn for _, fn in rows], "cpu", args.repeat, warmup=100)
    for (name, _), t in zip(rows, seconds):
        print(f"| {name} | {t * 1e3:.3f} |")


if __name__ == "__main__":
    main()
