"""funcopt transforms inside an ordinary PyTorch training loop, through ``funcopt.Optimizer``.

Trains a small classifier on scikit-learn's digits with:
  1. fo.adamw + OneCycleLR + GradScaler under bfloat16 autocast + gradient accumulation,
     checkpointed mid-way with state_dict() and resumed to the same parameters;
  2. a method that needs per-sample gradients (per-example clipping, as in DP-SGD), given to
     the transform through ``opt.step(per_sample_grads=...)``;
  3. Levenberg-Marquardt, which re-evaluates the residuals itself, driven by a closure.

Run: python examples/torch_optim_adapter.py
"""

from __future__ import annotations

import io
from typing import Any

import torch
from sklearn.datasets import load_digits
from torch.func import functional_call, grad, vmap

import funcopt as fo


def data() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def part1_scheduler_amp_accumulation(x: torch.Tensor, y: torch.Tensor) -> None:
    steps, accumulate = 60, 4
    names = ("model", "opt", "sched", "scaler")

    def make() -> tuple[Any, ...]:
        model = make_model()
        opt = fo.Optimizer(model.parameters(), fo.adamw(learning_rate=1e-3, weight_decay=1e-2))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=steps,
                                                    cycle_momentum=False)
        return model, opt, sched, torch.amp.GradScaler("cpu")

    def train(model, opt, sched, scaler, first: int, last: int) -> None:
        for _ in range(first, last):
            opt.zero_grad()
            for xb, yb in zip(x[:1600].chunk(accumulate), y[:1600].chunk(accumulate)):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = torch.nn.functional.cross_entropy(model(xb), yb) / accumulate
                scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()

    run = make()
    train(*run, 0, steps // 2)
    checkpoint = io.BytesIO()
    torch.save({k: obj.state_dict() for k, obj in zip(names, run)}, checkpoint)
    train(*run, steps // 2, steps)
    print(f"[1] adamw+OneCycleLR+GradScaler(bf16)+accumulation: "
          f"test accuracy {accuracy(run[0], x[1600:], y[1600:]):.3f}")
    checkpoint.seek(0)
    ckpt = torch.load(checkpoint, weights_only=True)
    resumed = make()
    for k, obj in zip(names, resumed):
        obj.load_state_dict(ckpt[k])
    lr = resumed[1].param_groups[0]["lr"]
    train(*resumed, steps // 2, steps)
    same = all(torch.equal(a, b) for a, b in zip(run[0].state_dict().values(),
                                                 resumed[0].state_dict().values()))
    print(f"    resumed from the step-{steps // 2} checkpoint (lr={lr:.2e}): "
          f"{'the same' if same else 'DIFFERENT'} parameters as the uninterrupted run")


def clip_per_sample(max_norm: float) -> fo.GradientTransformation:
    """Replace the gradient by the mean of per-sample gradients each clipped to ``max_norm``:
    ``g = (1/B) sum_b g_b * min(1, C/||g_b||)`` (Abadi et al. 2016, DP-SGD without noise)."""

    def init(params: Any) -> fo.EmptyState:
        return fo.EmptyState()

    def update(updates: Any, state: fo.EmptyState, params: Any = None, *,
               per_sample_grads: Any = None, **extra: Any) -> tuple[Any, fo.EmptyState]:
        if per_sample_grads is None:
            raise ValueError("clip_per_sample needs opt.step(per_sample_grads=...)")
        leaves = fo.tree_leaves(per_sample_grads)
        norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in leaves]).sum(0).sqrt()
        factor = (max_norm / (norms + 1e-12)).clamp(max=1.0)
        clipped = [(g * factor.view(-1, *[1] * (g.ndim - 1))).mean(0) for g in leaves]
        return fo.tree_unflatten(fo.tree_structure(updates), clipped), state

    return fo.GradientTransformation(init, update)


def part2_per_sample_inputs(x: torch.Tensor, y: torch.Tensor) -> None:
    model = make_model()
    names = [n for n, _ in model.named_parameters()]
    opt = fo.Optimizer(model.parameters(), fo.chain(clip_per_sample(1.0), fo.sgd(learning_rate=0.5)))

    def sample_loss(ps: list[torch.Tensor], xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, dict(zip(names, ps)), (xb[None],))
        return torch.nn.functional.cross_entropy(out, yb[None])

    for _ in range(100):
        idx = torch.randint(0, 1600, (64,))
        params = [p.detach() for p in model.parameters()]
        psg = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x[idx], y[idx])
        for p, g in zip(model.parameters(), psg):  # p.grad tells the adapter what to update
            p.grad = g.mean(0)
        opt.step(per_sample_grads=psg)
    print(f"[2] per-sample clipping via step(per_sample_grads=...): "
          f"test accuracy {accuracy(model, x[1600:], y[1600:]):.3f}")


def part3_levenberg_marquardt_closure() -> None:
    torch.manual_seed(0)
    t = torch.linspace(0, 4, 50, dtype=torch.float64)
    target = 2.5 * torch.exp(-1.3 * t) + 0.01 * torch.randn(50, dtype=torch.float64)
    a = torch.nn.Parameter(torch.tensor(1.0, dtype=torch.float64))
    k = torch.nn.Parameter(torch.tensor(0.1, dtype=torch.float64))

    def residuals(ps: list[torch.Tensor]) -> torch.Tensor:
        return ps[0] * torch.exp(-ps[1] * t) - target

    opt = fo.Optimizer([a, k], fo.levenberg_marquardt(residuals))

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = 0.5 * residuals([a, k]).pow(2).sum()
        loss.backward()
        return loss

    for _ in range(15):
        loss = opt.step(closure)
    print(f"[3] Levenberg-Marquardt with a closure: a={a.item():.3f} (2.5), "
          f"k={k.item():.3f} (1.3), loss {loss.item():.2e}")


if __name__ == "__main__":
    x, y = data()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    part1_scheduler_amp_accumulation(x, y)
    part2_per_sample_inputs(x, y)
    part3_levenberg_marquardt_closure()
