"""A small MLP on scikit-learn's digits: Levenberg-Marquardt (cross-entropy residuals) vs Adam."""

import time

import torch
from sklearn.datasets import load_digits
from torch.func import functional_call

import funcopt as fo

torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32)
y = torch.tensor(y)
Xtr, ytr, Xte, yte = X[:1400], y[:1400], X[1400:], y[1400:]
model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10))
init = {k: v.detach().clone() for k, v in model.named_parameters()}


def forward(params, inputs):
    return functional_call(model, params, (inputs,))


def accuracy(params):
    return (forward(params, Xte).argmax(1) == yte).float().mean().item()


def train_lm(steps=30, batch=256):
    tx = fo.levenberg_marquardt(fo.cross_entropy_residuals(forward, per_sample=True))
    params, state = dict(init), tx.init(init)
    for _ in range(steps):
        idx = torch.randint(0, len(Xtr), (batch,))
        upd, state = tx.update(None, state, params, batch=(Xtr[idx], ytr[idx]))
        params = fo.apply_updates(params, upd)
    return params


def train_adam(steps=600, batch=256):
    tx = fo.adam(1e-2)
    params = dict(init)
    opt_state = tx.init(params)
    loss = lambda p, xb, yb: torch.nn.functional.cross_entropy(forward(p, xb), yb)
    for _ in range(steps):
        idx = torch.randint(0, len(Xtr), (batch,))
        grads = torch.func.grad(loss)(params, Xtr[idx], ytr[idx])
        upd, opt_state = tx.update(grads, opt_state, params)
        params = fo.apply_updates(params, upd)
    return params


for name, fn in (("LM, 30 steps", train_lm), ("Adam, 600 steps", train_adam)):
    t = time.perf_counter()
    p = fn()
    print(f"{name:16s} test accuracy {accuracy(p):.3f}  ({time.perf_counter() - t:.1f} s)")
