"""A small CNN on scikit-learn's 8x8 digits: SINGD vs KFAC vs AdamW.

    python examples/digits_cnn_singd.py [--epochs 20] [--structure diagonal]

Each optimizer trains the same CNN from the same initialisation on the same mini-batches and
prints the test accuracy and the time per step (after the first epoch, which pays for the
first calls). The natural-gradient methods get their curvature from ``capture_curvature`` (one
forward and backward pass per step).

SINGD starts from identity preconditioners, so its first epochs take plain momentum steps
while K and C adapt at ``lr_cov``. A larger learning rate or ``lr_cov`` learns faster at first
and diverges later on this problem: with lr 5e-2 the dense run falls from 0.97 test accuracy
at epoch 9 to 0.76 at epoch 15, and lr_cov 5e-2 ends in NaN.
"""

from __future__ import annotations

import argparse
import time

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import funcopt as fo


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * 2 * 2, 64), nn.ReLU(), nn.Linear(64, 10))


def load():
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(y)
    return train_test_split(x, y, test_size=0.25, random_state=0)


def train(name, model, tx, data, epochs, batch, natural):
    x_tr, x_te, y_tr, y_te = data
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    state = tx.init(params)
    gen = torch.Generator().manual_seed(1)
    steps, elapsed = 0, 0.0
    loss_fn = torch.nn.functional.cross_entropy
    for epoch in range(epochs):
        perm = torch.randperm(len(x_tr), generator=gen)
        for i in range(0, len(x_tr) - batch + 1, batch):
            idx = perm[i:i + batch]
            start = time.perf_counter()
            if natural:
                cap = fo.func.capture_curvature(model, params, x_tr[idx], y_tr[idx])
                grads, extra = cap.grads, {"curvature": cap}
            else:
                xb, yb = x_tr[idx], y_tr[idx]
                grads = torch.func.grad(lambda p, xb=xb, yb=yb: loss_fn(
                    torch.func.functional_call(model, p, (xb,)), yb))(params)
                extra = {}
            updates, state = tx.update(grads, state, params, **extra)
            params = fo.apply_updates(params, updates)
            if epoch > 0:
                elapsed += time.perf_counter() - start
                steps += 1
    with torch.no_grad():
        logits = torch.func.functional_call(model, params, (x_te,))
    acc = (logits.argmax(1) == y_te).float().mean().item()
    print(f"{name:>22}: test accuracy {acc:.3f}, {1e3 * elapsed / steps:.2f} ms/step")
    return acc


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--structure", default="dense", help="SINGD structure of K and C")
    args = ap.parse_args()
    data = load()
    model = make_model()
    s = args.structure
    runs = {
        "AdamW": (fo.adamw(3e-3, weight_decay=1e-4), False),
        f"SINGD ({s})": (fo.singd(model, 1e-2, momentum=0.9, weight_decay=1e-4, damping=1e-3,
                                  lr_cov=1e-2, T=5, structures=(s, s)), True),
        "KFAC": (fo.kfac(model, 1e-2, momentum=0.9, T=5), True),  # damping 1e-3, KL clip
    }
    for name, (tx, natural) in runs.items():
        train(name, model, tx, data, args.epochs, args.batch, natural)


if __name__ == "__main__":
    main()
