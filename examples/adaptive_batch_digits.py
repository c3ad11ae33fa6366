"""Adaptive batch sizes (AdAdaGrad's norm test) vs fixed batch sizes on scikit-learn's digits.

Logistic regression or a small CNN, AdaGrad as the base method, learning rate by samples seen
(linear warmup over 5% of the samples, cosine decay to lr/10). Prints the test accuracy, the
steps taken and the wall-clock of each run.

    python examples/adaptive_batch_digits.py --model cnn --max-samples 40000

The norm test compares the per-sample gradient variance with eta^2 ||g||^2. At initialisation
the mean gradient of a 10-class problem is small next to the per-sample gradients, so a tight
test (eta=0.5) asks for a batch of over a hundred by the third step (16, 23, then 105 for the
logistic model and 124 for the CNN) and the run then takes few steps for its sample budget;
eta=1.0 lets the batch grow gradually.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import funcopt as fo
from funcopt.batch_size_loop import Batching, fit_adaptive


def digits(device="cpu"):
    """(x_train, y_train, x_test, y_test): 8x8 images scaled to [0, 1], a stratified 75/25 split."""
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(d.target)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return [t.to(device) for t in (xtr, ytr, xte, yte)]


def make_model(kind: str) -> nn.Module:
    if kind == "logistic":
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(16 * 3 * 3, 10))


def loss(out, y):
    return F.cross_entropy(out, y, reduction="none")


def run(kind, method, *, max_samples, lr=0.3, eta=1.0, batch_size=16, max_batch_size=1024,
        max_micro_batch_size=512, seed=0, device="cpu", n_evals=40):
    """One training run; returns its history, with ``test_acc`` on the records where the
    samples seen first pass each of ``n_evals`` evenly spaced marks, and on the last record."""
    xtr, ytr, xte, yte = digits(device)
    torch.manual_seed(seed)
    model = make_model(kind).to(device)
    params = {k: v.detach() for k, v in model.named_parameters()}
    schedule = fo.warmup_cosine_samples(lr, max_samples // 20, max_samples, lr / 10)
    head = [fo.norm_test(eta, batch_size, max_batch_size)] if method == "norm" else []
    tx = fo.chain(*head, fo.scale_by_adagrad(), fo.scale_by_sample_schedule(schedule))
    marks = iter([max_samples * (k + 1) / n_evals for k in range(n_evals)])
    next_mark = [next(marks)]

    def accuracy(p):
        with torch.no_grad():
            out = torch.func.functional_call(model, p, (xte,))
        return float((out.argmax(1) == yte).float().mean())

    def evaluate(record, p):
        if record["samples"] >= next_mark[0]:
            record["test_acc"] = accuracy(p)
            while record["samples"] >= next_mark[0]:
                next_mark[0] = next(marks, float("inf"))

    batching = Batching(batch_size=batch_size, seed=seed,
                        max_micro_batch_size=max_micro_batch_size)
    params, _, hist = fit_adaptive(model, loss, tx, params, xtr, ytr, max_samples=max_samples,
                                   batching=batching, callback=evaluate)
    hist[-1]["test_acc"] = accuracy(params)
    return hist


RUNS = {"norm test eta=1.0": ("norm", 16, 1.0), "norm test eta=0.5": ("norm", 16, 0.5),
        "fixed 16": ("fixed", 16, None), "fixed 256": ("fixed", 256, None)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["logistic", "cnn"], default="logistic")
    ap.add_argument("--max-samples", type=int, default=40_000)
    ap.add_argument("--lr", type=float, default=0.3)
    args = ap.parse_args()
    torch.set_num_threads(1)  # models this small run fastest on one thread
    for name, (method, b, eta) in RUNS.items():
        hist = run(args.model, method, max_samples=args.max_samples, lr=args.lr,
                   eta=eta or 1.0, batch_size=b)
        print(f"{name:18s} steps {len(hist):5d}  final batch {hist[-1]['batch_size']:5d}  "
              f"test acc {hist[-1]['test_acc']:.3f}  time {hist[-1]['time']:.2f}s")


if __name__ == "__main__":
    main()
