"""Adaptive batch sizes: cost of per-sample statistics, and norm test vs fixed batches.

    python benchmarks/adaptive_batch.py [--device cuda] [--skip-training]

Part 1 times, on an MLP 784-512-512-10, one batch gradient, the fast per-sample squared norms
(funcopt.func.batch_grad_and_sq_norms: gradient + every ||g_i||^2), materialised vmap(grad)
and the jvp inner products. Part 2 trains logistic regression on digits with the norm test
and with fixed batches (examples/adaptive_batch_digits.py) and plots test accuracy against
samples seen and wall-clock, and the batch-size trajectory, to benchmarks/adaptive_batch.png.
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

from funcopt.func import batch_grad_and_sq_norms, per_sample_grads, per_sample_inner_products
from funcopt.func import sample_loss

HERE = os.path.dirname(os.path.abspath(__file__))


def timed(fn, device, reps=10):
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e3


def cost_table(device, batch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                          nn.Linear(512, 10)).to(device)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(batch, 784, device=device), torch.randint(0, 10, (batch,), device=device)
    loss = lambda o, t: F.cross_entropy(o, t, reduction="none")

    def batch_grad():
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        torch.autograd.grad(loss(functional_call(model, leaves, (x,)), y).sum(), list(leaves.values()))

    psg = per_sample_grads(sample_loss(model, loss))
    inner = per_sample_inner_products(sample_loss(model, loss))
    rows = {"batch gradient": timed(batch_grad, device),
            "gradient + per-sample norms (fast)": timed(
                lambda: batch_grad_and_sq_norms(model, loss, params, x, y), device),
            "per-sample gradients (vmap)": timed(lambda: psg(params, x, y), device),
            "per-sample inner products (jvp)": timed(lambda: inner(params, params, x, y), device)}
    return rows


def training(out_png, max_samples):
    sys.path.insert(0, os.path.join(HERE, "..", "examples"))
    from adaptive_batch_digits import run
    runs = {"norm test (eta=0.5)": ("norm", 16), "fixed 16": ("fixed", 16),
            "fixed 256": ("fixed", 256)}
    hists = {n: run("logistic", m, max_samples=max_samples, lr=0.1, batch_size=b)
             for n, (m, b) in runs.items()}
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for name, h in hists.items():
        ev = [r for r in h if "test_acc" in r]
        ax[0].plot([r["samples"] for r in ev], [r["test_acc"] for r in ev], label=name)
        ax[1].plot([r["time"] for r in ev], [r["test_acc"] for r in ev], label=name)
        ax[2].plot([r["samples"] for r in h], [r["batch_size"] for r in h], label=name)
    for a, xl, yl in zip(ax, ["samples seen", "seconds", "samples seen"],
                         ["test accuracy", "test accuracy", "batch size"]):
        a.set_xlabel(xl), a.set_ylabel(yl), a.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    return {n: (len(h), h[-1]["batch_size"], h[-1]["test_acc"], h[-1]["time"])
            for n, h in hists.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--max-samples", type=int, default=20_000)
    ap.add_argument("--skip-training", action="store_true")
    args = ap.parse_args()
    rows = cost_table(args.device, args.batch)
    base = rows["batch gradient"]
    print(f"MLP 784-512-512-10, batch {args.batch}, {args.device}, median of 10")
    for k, v in rows.items():
        print(f"| {k} | {v:.2f} ms | {v / base:.2f}x |")
    if not args.skip_training:
        res = training(os.path.join(HERE, "adaptive_batch.png"), args.max_samples)
        for n, (steps, b, acc, t) in res.items():
            print(f"| {n} | {steps} | {b} | {acc:.3f} | {t:.1f} s |")


if __name__ == "__main__":
    main()
