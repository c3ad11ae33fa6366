"""Adaptive batch sizes (AdAdaGrad's norm test) vs fixed batch sizes on scikit-learn's digits.

Logistic regression or a small CNN, AdaGrad as the base method, learning rate by samples seen.
Prints test accuracy against samples seen and wall-clock for each run.

    python examples/adaptive_batch_digits.py --model cnn --max-samples 60000
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import funcopt as fo
from funcopt.adaptive import fit_adaptive


def digits(device="cpu"):
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


def run(kind, method, *, max_samples, lr, eta=0.5, batch_size=16, max_batch_size=1024,
        max_micro_batch_size=512, seed=0, device="cpu", eval_every=5):
    """One training run; returns its history with test accuracy on every eval_every-th step."""
    xtr, ytr, xte, yte = digits(device)
    torch.manual_seed(seed)
    model = make_model(kind).to(device)
    params = {k: v.detach() for k, v in model.named_parameters()}
    schedule = fo.warmup_cosine_samples(lr, max_samples // 20, max_samples, lr / 10)
    head = [fo.norm_test(eta, batch_size, max_batch_size)] if method == "norm" else []
    tx = fo.chain(*head, fo.scale_by_adagrad(), fo.scale_by_sample_schedule(schedule))

    def evaluate(record, p):
        if record["step"] % eval_every == 0:
            with torch.no_grad():
                out = torch.func.functional_call(model, p, (xte,))
            record["test_acc"] = float((out.argmax(1) == yte).float().mean())

    params, _, hist = fit_adaptive(model, loss, tx, params, xtr, ytr, max_samples=max_samples,
                              batch_size=batch_size, max_micro_batch_size=max_micro_batch_size,
                              seed=seed, callback=evaluate)
    with torch.no_grad():
        out = torch.func.functional_call(model, params, (xte,))
    hist[-1]["test_acc"] = float((out.argmax(1) == yte).float().mean())  # final accuracy
    return hist


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["logistic", "cnn"], default="logistic")
    ap.add_argument("--max-samples", type=int, default=40_000)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--eta", type=float, default=0.5)
    args = ap.parse_args()
    runs = {"norm test": ("norm", 16), "fixed 16": ("fixed", 16), "fixed 256": ("fixed", 256)}
    for name, (method, b) in runs.items():
        hist = run(args.model, method, max_samples=args.max_samples, lr=args.lr, eta=args.eta,
                   batch_size=b)
        accs = [r for r in hist if "test_acc" in r]
        last = accs[-1] if accs else hist[-1]
        print(f"{name:10s} steps {len(hist):5d}  final batch {hist[-1]['batch_size']:5d}  "
              f"test acc {last.get('test_acc', float('nan')):.3f}  time {hist[-1]['time']:.2f}s")


if __name__ == "__main__":
    main()
