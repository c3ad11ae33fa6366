"""Optimizers the benchmark runs, each as a builder ``build(problem) -> Runner``.

A :class:`Runner` is what one training loop needs: ``init(params) -> state`` and
``step(params, state, batch) -> (params, state, loss)``, plus ``eval_params`` for methods whose
evaluation point differs from the training point (schedule-free).
A builder raises :class:`Unavailable` when the method does not apply to a problem (e.g.
Levenberg-Marquardt on a problem with no residuals) or is not part of this installation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import grad_and_value

import funcopt as fo
from funcopt.bench.problems import Problem, check_name

__all__ = ["Runner", "Unavailable", "OPTIMIZERS", "DEFAULT_OPTIMIZERS", "register_optimizer"]


class Unavailable(Exception):
    """The optimizer does not apply to this problem, or is not available here."""


@dataclass
class Runner:
    init: Callable[[Any], Any]
    step: Callable[[Any, Any, Any], tuple[Any, Any, torch.Tensor]]
    eval_params: Callable[[Any, Any], Any] = lambda params, state: params


OPTIMIZERS: dict[str, Callable[[Problem], Runner]] = {}
DEFAULT_OPTIMIZERS: list[str] = []


def register_optimizer(name: str, *, default: bool = True):
    """Register ``build(problem) -> Runner`` under ``name`` (in the default set unless
    ``default=False``); a name already taken is a ValueError."""
    check_name(name, "optimizer")
    if name in OPTIMIZERS:
        raise ValueError(f"an optimizer named {name!r} is already registered; pick another name")

    def wrap(build: Callable[[Problem], Runner]):
        if name in OPTIMIZERS:
            raise ValueError(f"an optimizer named {name!r} is already registered; pick another name")
        OPTIMIZERS[name] = build
        if default:
            DEFAULT_OPTIMIZERS.append(name)
        return build

    return wrap


def _need(*names: str) -> None:
    missing = [n for n in names if not hasattr(fo, n)]
    if missing:
        raise Unavailable(f"funcopt has no {', '.join(missing)} in this version")


def _gradient_runner(problem: Problem, tx: fo.GradientTransformation, eval_params=None) -> Runner:
    gv = grad_and_value(problem.loss_fn)

    def step(params, state, batch):
        grads, loss = gv(params, batch)
        updates, state = tx.update(grads, state, params)
        return fo.apply_updates(params, updates), state, loss

    return Runner(tx.init, step, eval_params or (lambda p, s: p))


def _first_order(alias: str, lr: float, **kwargs):
    def build(problem: Problem) -> Runner:
        _need(alias)
        if problem.kind == "curve-fit":
            raise Unavailable("first-order methods are not run on the curve fits (see LM)")
        return _gradient_runner(problem, getattr(fo, alias)(lr * problem.lr_scale, **kwargs))

    return build


register_optimizer("sgd-momentum")(_first_order("sgd", 0.1, momentum=0.9))
register_optimizer("adamw")(_first_order("adamw", 3e-3, weight_decay=1e-4))
register_optimizer("lion")(_first_order("lion", 1e-3, weight_decay=1e-4))
register_optimizer("soap")(_first_order("soap", 3e-3))
register_optimizer("psgd")(_first_order("psgd_kron", 1e-2))


@register_optimizer("sf-adamw")
def _sf_adamw(problem: Problem) -> Runner:
    _need("schedule_free_adamw", "schedule_free_eval_params")
    if problem.kind == "curve-fit":
        raise Unavailable("first-order methods are not run on the curve fits (see LM)")
    tx = fo.schedule_free_adamw(1e-2 * problem.lr_scale, warmup_steps=10)
    return _gradient_runner(problem, tx, eval_params=fo.schedule_free_eval_params)


@register_optimizer("lm")
def _lm(problem: Problem) -> Runner:
    _need("levenberg_marquardt")
    if problem.residual_fn is None:
        raise Unavailable("the problem has no residual function")
    n = sum(p.numel() for p in fo.tree_leaves(problem.params))
    if n > 5000:  # the damped solve forms a dense N x N (or n x n) Gram matrix per step
        raise Unavailable(f"{n} parameters: the dense Jacobian and its damped solve are too "
                          "slow for this suite; use it on small models")
    tx = fo.levenberg_marquardt(problem.residual_fn)

    def step(params, state, batch):
        zeros = fo.tree_zeros_like(params)
        updates, state = tx.update(zeros, state, params, batch=batch)
        params = fo.apply_updates(params, updates)
        return params, state, problem.loss_fn(params, batch).detach()

    return Runner(tx.init, step)


@register_optimizer("adamw-norm-test")
def _adamw_norm_test(problem: Problem) -> Runner:
    """AdamW whose batch grows by the norm test (AdAdaGrad), from 32 samples up to the data."""
    _need("norm_test", "gradient_and_stats", "find_batch_test_state")
    if problem.model is None or problem.data is None:
        raise Unavailable("needs a model and a data set (per-sample statistics)")
    x, y = problem.data
    tx = fo.chain(fo.norm_test(eta=1.0, batch_size=32, max_batch_size=len(y)),
                  fo.adamw(3e-3 * problem.lr_scale, weight_decay=1e-4))
    output_loss = lambda out, target: torch.nn.functional.cross_entropy(out, target, reduction="none")
    gen = torch.Generator().manual_seed(1234)

    def step(params, state, batch):
        b = int(fo.find_batch_test_state(state).batch_size)  # one host sync: slicing needs it
        idx = torch.randperm(len(y), generator=gen)[:b].to(y.device)
        g, stats, loss = fo.gradient_and_stats(problem.model, output_loss, params, [(x[idx], y[idx])])
        updates, state = tx.update(g, state, params, per_sample_stats=stats, batch_size=b)
        return fo.apply_updates(params, updates), state, loss

    return Runner(tx.init, step)


def _curvature(name: str, lr: float, **kwargs):
    def build(problem: Problem) -> Runner:
        _need(name)
        if problem.model is None or problem.kind != "classification":
            raise Unavailable("needs an nn.Module classifier (layer statistics are captured)")
        tx = getattr(fo, name)(problem.model, lr * problem.lr_scale, **kwargs)

        def step(params, state, batch):
            x, y = batch
            cap = fo.func.capture_curvature(problem.model, params, x, y)
            updates, state = tx.update(cap.grads, state, params, curvature=cap)
            return fo.apply_updates(params, updates), state, cap.loss.detach()

        return Runner(tx.init, step)

    return build


register_optimizer("singd")(_curvature("singd", 3e-2, momentum=0.9, weight_decay=1e-4))
register_optimizer("kfac")(_curvature("kfac", 2e-2, momentum=0.9, damping=1e-1, T=5))
