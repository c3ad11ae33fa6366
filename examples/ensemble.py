"""Train an ensemble of MLPs at once: ``torch.func.stack_module_state`` + ``vmap`` over a
funcopt transform, against a Python loop over the same models.

Every model has its own initialisation, its own bootstrap sample of the digits data set
(scikit-learn's ``load_digits``, no download) and its own AdamW state; ``vmap`` runs all
``--models`` training steps as one batched step. The final losses of the two ways agree, and
the vmapped ensemble takes a fraction of the loop's time.

    python examples/ensemble.py                 # 16 models, 200 steps
    python examples/ensemble.py --steps 20      # quicker

Exits with status 1 if the two ways disagree.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
from torch.func import functional_call, grad, stack_module_state, vmap

import funcopt as fo


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=16)
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args(argv)

    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    data = load_digits()
    x_all = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y_all = torch.tensor(data.target)
    models = [torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                  torch.nn.Linear(64, 10)) for _ in range(args.models)]
    base = copy.deepcopy(models[0]).to("meta")
    idx = torch.randint(0, len(x_all), (args.models, 256))  # a bootstrap sample per model
    xs, ys = x_all[idx], y_all[idx]

    def loss_fn(params, x, y):
        return torch.nn.functional.cross_entropy(functional_call(base, params, (x,)), y)

    tx = fo.adamw(3e-3, weight_decay=1e-4)

    def step(params, state, x, y):
        updates, state = tx.update(grad(loss_fn)(params, x, y), state, params)
        return fo.apply_updates(params, updates), state

    # all models at once: params and state carry a leading model dimension
    params, _ = stack_module_state(models)
    params = {k: v.detach() for k, v in params.items()}
    state = vmap(tx.init)(params)
    batched_step = vmap(step)
    batched_step(params, state, xs, ys)  # warm-up outside the clock
    t0 = time.perf_counter()
    for _ in range(args.steps):
        params, state = batched_step(params, state, xs, ys)
    t_vmap = time.perf_counter() - t0
    loss_vmap = vmap(loss_fn)(params, xs, ys)

    # the same models one after another
    t0 = time.perf_counter()
    loss_loop = []
    for i, m in enumerate(models):
        p = {k: v.detach() for k, v in m.named_parameters()}
        s = tx.init(p)
        for _ in range(args.steps):
            p, s = step(p, s, xs[i], ys[i])
        loss_loop.append(loss_fn(p, xs[i], ys[i]))
    t_loop = time.perf_counter() - t0
    loss_loop = torch.stack(loss_loop)

    print(f"{args.models} models x {args.steps} AdamW steps on digits (batch 256 each)")
    print(f"  vmap: {t_vmap:6.2f} s   final loss mean {loss_vmap.mean():.4f} "
          f"(min {loss_vmap.min():.4f}, max {loss_vmap.max():.4f})")
    print(f"  loop: {t_loop:6.2f} s   final loss mean {loss_loop.mean():.4f} "
          f"(min {loss_loop.min():.4f}, max {loss_loop.max():.4f})")
    print(f"  vmap / loop time: {t_vmap / t_loop:.2f}")
    err = float((loss_vmap - loss_loop).abs().max())
    print(f"  largest difference in a model's final loss: {err:.2e}")
    return 0 if err < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
