"""Learn per-layer learning rates by differentiating through unrolled optimizer steps.

The inner loop trains a small MLP for ``--inner`` steps of SGD with one learning rate per
layer; the outer loop differentiates the validation loss after those steps with respect to
the (log) learning rates with ``torch.func.grad`` and updates them with Adam. A funcopt
transform keeps a tensor hyperparameter's graph through ``update``, so the derivative flows
through every inner step (the MAML-style use of an optimizer library).

    python examples/meta_learning.py            # 60 outer steps
    python examples/meta_learning.py --outer 10 # quicker

Prints the outer (validation) loss as it falls and the learned learning rates; exits with
status 1 if the outer loss did not fall.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.func import functional_call, grad

import funcopt as fo


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--outer", type=int, default=60, help="outer (meta) steps")
    ap.add_argument("--inner", type=int, default=5, help="unrolled inner SGD steps")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    params0 = {k: v.detach() for k, v in model.named_parameters()}
    w_true = torch.randn(8, 1)
    x_tr, x_va = torch.randn(128, 8), torch.randn(128, 8)
    y_tr, y_va = x_tr @ w_true, x_va @ w_true

    def loss_fn(params, x, y):
        return torch.nn.functional.mse_loss(functional_call(model, params, (x,)), y)

    layers = sorted({k.split(".")[0] for k in params0})  # "0", "2": one rate per layer

    def outer_loss(log_lr):
        # one SGD per layer, its learning rate a differentiable 0-d tensor
        tx = fo.partition({name: fo.sgd(log_lr[name].exp()) for name in layers},
                          {k: k.split(".")[0] for k in params0})
        params, state = params0, tx.init(params0)
        for _ in range(args.inner):
            updates, state = tx.update(grad(loss_fn)(params, x_tr, y_tr), state, params)
            params = fo.apply_updates(params, updates)
        return loss_fn(params, x_va, y_va)

    log_lr = {name: torch.tensor(-4.0) for name in layers}  # lr = e^-4 = 0.018 to start (too small for 5 steps)
    meta = fo.adam(0.1)
    meta_state = meta.init(log_lr)
    first = float(outer_loss(log_lr))
    for step in range(args.outer):
        g = grad(outer_loss)(log_lr)
        updates, meta_state = meta.update(g, meta_state, log_lr)
        log_lr = fo.apply_updates(log_lr, updates)
        if step % max(1, args.outer // 6) == 0 or step == args.outer - 1:
            rates = ", ".join(f"layer {k}: {float(v.exp()):.3f}" for k, v in log_lr.items())
            print(f"outer step {step:3d}  validation loss {float(outer_loss(log_lr)):.4f}  ({rates})")
    last = float(outer_loss(log_lr))
    print(f"validation loss after {args.inner} inner steps: {first:.4f} -> {last:.4f}")
    return 0 if last < first else 1


if __name__ == "__main__":
    sys.exit(main())
