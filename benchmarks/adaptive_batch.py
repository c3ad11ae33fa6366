"""Adaptive batch sizes: cost of per-sample statistics, and norm test vs fixed batches.

    python benchmarks/adaptive_batch.py [--device cuda] [--skip-training] [--out benchmarks/adaptive_batch.png]

Part 1 times, on MLPs 784-512-512-10 (compute-bound on a CPU) and 784-32-32-10 (bound by
per-operation overhead, as the larger one is on a GPU), one batch gradient, the fast
per-sample squared norms (funcopt.func.batch_grad_and_sq_norms: gradient + every ||g_i||^2),
materialised vmap(grad) and the jvp inner products. Part 2 trains logistic regression and a
small CNN on digits with the norm test (eta 1.0 and 0.5) and with fixed batches of 16 and 256
(examples/adaptive_batch_digits.py) and plots test accuracy against samples seen and
wall-clock, and the batch-size trajectory, to ``--out`` (a PNG) when given.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from funcopt.func import (
    batch_grad_and_sq_norms,
    per_sample_grads,
    per_sample_inner_products,
    sample_loss,
)

HERE = os.path.dirname(os.path.abspath(__file__))


def timed(fns, device, reps=20):
    """Median and minimum milliseconds of each function, runs interleaved (fair under load)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = {k: [] for k in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(reps):
        for k, fn in fns.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t)
    return {k: (sorted(v)[len(v) // 2] * 1e3, min(v) * 1e3) for k, v in times.items()}


def cost_table(device, batch, width=512):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                          nn.Linear(width, 10)).to(device)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(batch, 784, device=device), torch.randint(0, 10, (batch,), device=device)
    loss = lambda o, t: F.cross_entropy(o, t, reduction="none")

    def batch_grad():
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        torch.autograd.grad(loss(functional_call(model, leaves, (x,)), y).sum(), list(leaves.values()))

    psg = per_sample_grads(sample_loss(model, loss))
    inner = per_sample_inner_products(sample_loss(model, loss))
    fns = {"batch gradient": batch_grad,
           "gradient + per-sample norms (fast)":
               lambda: batch_grad_and_sq_norms(model, loss, params, x, y),
           "per-sample gradients (vmap)": lambda: psg(params, x, y),
           "per-sample inner products (jvp)": lambda: inner(params, params, x, y)}
    rows = timed(fns, device)
    return rows


def training(out_png, max_samples, seeds):
    """Norm test vs fixed batches on digits (logistic regression and the small CNN); the plot
    goes to ``out_png`` when it is given."""
    sys.path.insert(0, os.path.join(HERE, "..", "examples"))
    import matplotlib
    from adaptive_batch_digits import RUNS, run
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 3, figsize=(16, 8))
    table = []
    for row, kind in enumerate(["logistic", "cnn"]):
        for name, (method, b, eta) in RUNS.items():
            hists = [run(kind, method, max_samples=max_samples, lr=0.3, eta=eta or 1.0,
                         batch_size=b, seed=s) for s in range(seeds)]
            h = hists[0]
            ev = [r for r in h if "test_acc" in r]
            ax[row, 0].plot([r["samples"] for r in ev], [r["test_acc"] for r in ev], label=name)
            ax[row, 1].plot([r["time"] for r in ev], [r["test_acc"] for r in ev], label=name)
            ax[row, 2].plot([r["samples"] for r in h], [r["batch_size"] for r in h], label=name)
            accs = [x[-1]["test_acc"] for x in hists]
            table.append((kind, name, sum(len(x) for x in hists) / seeds,
                          sum(x[-1]["batch_size"] for x in hists) / seeds,
                          sum(accs) / seeds, min(accs), max(accs),
                          sum(x[-1]["time"] for x in hists) / seeds))
        for a, xl, yl in zip(ax[row], ["samples seen", "seconds (excluding evaluation)",
                                       "samples seen"],
                             ["test accuracy", "test accuracy", "batch size"]):
            a.set_xlabel(xl), a.set_ylabel(yl), a.set_title(f"{kind}, seed 0"), a.legend()
        ax[row, 0].set_ylim(0.5, 1.0), ax[row, 1].set_ylim(0.5, 1.0)
        ax[row, 1].set_xscale("log"), ax[row, 2].set_yscale("log")
    fig.tight_layout()
    if out_png:
        fig.savefig(out_png, dpi=90)
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    ap.add_argument("--max-samples", type=int, default=40_000)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--out", default=None,
                    help="write the training plot (PNG) here, e.g. benchmarks/adaptive_batch.png")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    for width in (512, 32):
        rows = cost_table(args.device, args.batch, width)
        med0, min0 = rows["batch gradient"]
        print(f"MLP 784-{width}-{width}-10, batch {args.batch}, {args.device}, "
              f"{args.threads} thread(s), 20 interleaved runs: median, min, ratios")
        for k, (med, lo) in rows.items():
            print(f"| {k} | {med:.3f} ms | {lo:.3f} ms | {med / med0:.2f}x | {lo / min0:.2f}x |")
    if not args.skip_training:
        table = training(args.out, args.max_samples, args.seeds)
        print(f"digits, {args.max_samples} samples, AdaGrad lr 0.3 (warmup-cosine by samples), "
              f"mean of {args.seeds} seeds")
        print("| model | run | steps | final batch | test acc (min-max) | seconds |")
        for kind, name, steps, b, acc, lo, hi, t in table:
            print(f"| {kind} | {name} | {steps:.0f} | {b:.0f} | {acc:.3f} ({lo:.3f}-{hi:.3f}) "
                  f"| {t:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
