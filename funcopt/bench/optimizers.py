"""Optimizers the benchmark runs, each as a builder ``build(problem) -> Runner``, or
``build(problem, lr) -> Runner`` for one registered with a default learning rate (the
benchmark then tunes ``lr`` on a log grid around that default times ``problem.lr_scale``).

A :class:`Runner` is what one training loop needs: ``init(params) -> state`` and
``step(params, state, batch) -> (params, state, loss)``, plus ``eval_params`` for methods whose
evaluation point differs from the training point (schedule-free).
A builder raises :class:`Unavailable` when the method does not apply to a problem (e.g.
Levenberg-Marquardt on a problem with no residuals) or is not part of this installation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.func import grad_and_value, vmap

import funcopt as fo
from funcopt.bench.problems import Problem, check_name

__all__ = ["Runner", "Unavailable", "OPTIMIZERS", "DEFAULT_OPTIMIZERS", "LEARNING_RATES",
           "register_optimizer"]


class Unavailable(Exception):
    """The optimizer does not apply to this problem, or is not available here."""


@dataclass
class Runner:
    """init(params) -> state; step(params, state, batch) -> (params, state, loss);
    eval_params(params, state) -> the point to evaluate; settings: what the report shows
    beside the learning rate (``schedule``, and ``batch_size`` where the method picks it)."""

    init: Callable[[Any], Any]
    step: Callable[[Any, Any, Any], tuple[Any, Any, torch.Tensor]]
    eval_params: Callable[[Any, Any], Any] = lambda params, state: params
    settings: dict[str, Any] = field(default_factory=dict)


OPTIMIZERS: dict[str, Callable[..., Runner]] = {}
DEFAULT_OPTIMIZERS: list[str] = []
LEARNING_RATES: dict[str, float] = {}  # default learning rate of each tunable optimizer


def register_optimizer(name: str, *, default: bool = True, lr: float | None = None):
    """Register a builder under ``name`` (in the default set unless ``default=False``).

    lr: the default learning rate. Given, the builder is called ``build(problem, lr=value)``
        and the benchmark tunes ``value`` (``--tune off`` uses ``lr * problem.lr_scale``);
        ``None`` (a method with no learning rate), it is called ``build(problem)``.
    A name already taken, or an ``lr`` that is not a positive number, is a ValueError.
    """
    check_name(name, "optimizer")
    if name in OPTIMIZERS:
        raise ValueError(f"an optimizer named {name!r} is already registered; pick another name")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float))
                           or not 0 < lr < float("inf")):
        raise ValueError(f"register_optimizer({name!r}, lr={lr!r}): lr must be a positive "
                         "number (the default learning rate), or None for no learning rate")

    def wrap(build: Callable[..., Runner]):
        if name in OPTIMIZERS:
            raise ValueError(f"an optimizer named {name!r} is already registered; pick another name")
        OPTIMIZERS[name] = build
        if lr is not None:
            LEARNING_RATES[name] = float(lr)
        if default:
            DEFAULT_OPTIMIZERS.append(name)
        return build

    return wrap


def _need(*names: str) -> None:
    missing = [n for n in names if not hasattr(fo, n)]
    if missing:
        raise Unavailable(f"funcopt has no {', '.join(missing)} in this version")


def _gradient_runner(problem: Problem, tx: fo.GradientTransformation, eval_params=None,
                     schedule: str = "constant") -> Runner:
    gv = grad_and_value(problem.loss_fn)

    def step(params, state, batch):
        grads, loss = gv(params, batch)
        updates, state = tx.update(grads, state, params)
        return fo.apply_updates(params, updates), state, loss

    return Runner(tx.init, step, eval_params or (lambda p, s: p), {"schedule": schedule})


def _no_curve_fits(problem: Problem) -> None:
    if problem.kind == "curve-fit":
        raise Unavailable("first-order methods are not run on the curve fits (see LM)")


def _first_order(alias: str, **kwargs):
    def build(problem: Problem, lr: float) -> Runner:
        _need(alias)
        _no_curve_fits(problem)
        return _gradient_runner(problem, getattr(fo, alias)(lr, **kwargs))

    return build


register_optimizer("sgd-momentum", lr=0.1)(_first_order("sgd", momentum=0.9))
register_optimizer("adamw", lr=3e-3)(_first_order("adamw", weight_decay=1e-4))
# Lion's update is a sign (every coordinate moves by lr), so its authors advise a learning rate
# 3-10x smaller than AdamW's (Chen et al. 2023, "Symbolic Discovery of Optimization
# Algorithms", arXiv:2302.06675, section 5): 1e-3 against AdamW's 3e-3 here
register_optimizer("lion", lr=1e-3)(_first_order("lion", weight_decay=1e-4))
register_optimizer("soap", lr=3e-3)(_first_order("soap"))
register_optimizer("psgd", lr=1e-2)(_first_order("psgd_kron"))


# the breadth of optax's aliases and optax.contrib: in --list, run with --optimizers NAME,...
register_optimizer("radam", lr=3e-3, default=False)(_first_order("radam"))
register_optimizer("lamb", lr=3e-3, default=False)(_first_order("lamb", weight_decay=1e-4))
register_optimizer("adafactor", lr=1e-2, default=False)(_first_order("adafactor"))
register_optimizer("ademamix", lr=3e-3, default=False)(_first_order("ademamix"))
register_optimizer("prodigy", lr=1.0, default=False)(_first_order("prodigy"))
register_optimizer("dadapt-adamw", lr=1.0, default=False)(_first_order("dadapt_adamw"))


@register_optimizer("sam", lr=3e-3, default=False)
def _sam(problem: Problem, lr: float) -> Runner:
    """SAM over AdamW (optax.contrib.sam's non-opaque mode): every other step moves to the
    adversarial point ``rho = 0.05`` along the normalised gradient; the loss shown alternates
    between the two points."""
    _need("sam", "normalize_by_update_norm")
    _no_curve_fits(problem)
    adv = fo.chain(fo.normalize_by_update_norm(), fo.scale(0.05))
    return _gradient_runner(problem, fo.sam(fo.adamw(lr, weight_decay=1e-4), adv),
                            schedule="constant (SAM, rho 0.05)")


@register_optimizer("lbfgs", lr=1.0, default=False)
def _lbfgs(problem: Problem, lr: float) -> Runner:
    """L-BFGS with optax's zoom line search on each mini-batch's loss (its value, gradient
    and loss function are passed to every update)."""
    _need("lbfgs")
    _no_curve_fits(problem)
    tx = fo.lbfgs(lr)
    gv = grad_and_value(problem.loss_fn)

    def step(params, state, batch):
        grads, loss = gv(params, batch)
        updates, state = tx.update(grads, state, params, value=loss, grad=grads,
                                   value_fn=lambda p: problem.loss_fn(p, batch))
        return fo.apply_updates(params, updates), state, loss

    return Runner(tx.init, step, settings={"schedule": "zoom line search"})


@register_optimizer("sf-adamw", lr=1e-2)
def _sf_adamw(problem: Problem, lr: float) -> Runner:
    _need("schedule_free_adamw", "schedule_free_eval_params")
    _no_curve_fits(problem)
    tx = fo.schedule_free_adamw(lr, warmup_steps=10)
    return _gradient_runner(problem, tx, eval_params=fo.schedule_free_eval_params,
                            schedule="schedule-free, 10 warm-up steps")


@register_optimizer("lm")
def _lm(problem: Problem) -> Runner:
    """Levenberg-Marquardt: no learning rate (its damping adapts at every step), not tuned.
    On a batched problem every fit has its own state (damping, trust region) and takes its own
    step: the transform is mapped over the rows with ``torch.func.vmap``."""
    _need("levenberg_marquardt")
    if problem.residual_fn is None:
        raise Unavailable("the problem has no residual function")
    n = sum(p.numel() for p in fo.tree_leaves(problem.params))
    if problem.batched:
        n //= fo.tree_leaves(problem.params)[0].shape[0]
    if n > 5000:  # the damped solve forms a dense N x N (or n x n) Gram matrix per step
        raise Unavailable(f"{n} parameters: the dense Jacobian and its damped solve are too "
                          "slow for this suite; use it on small models")
    if problem.batched:
        return _batched_lm(problem)
    tx = fo.levenberg_marquardt(problem.residual_fn)

    def step(params, state, batch):
        zeros = fo.tree_zeros_like(params)
        updates, state = tx.update(zeros, state, params, batch=batch)
        params = fo.apply_updates(params, updates)
        return params, state, problem.loss_fn(params, batch).detach()

    return Runner(tx.init, step, settings={"schedule": "adaptive damping (no learning rate)"})


def _batched_lm(problem: Problem) -> Runner:
    """``levenberg_marquardt`` on one row (``residual_fn`` of a batch of one), ``vmap``-ed over
    the rows: one update of every fit per step."""
    residual_fn = problem.residual_fn
    assert residual_fn is not None
    one = lambda tree: fo.tree_map(lambda a: a[None], tree)
    tx = fo.levenberg_marquardt(lambda p, batch: residual_fn(one(p), one(batch))[0])
    update = vmap(lambda s, p, b: tx.update(fo.tree_zeros_like(p), s, p, batch=b))

    def step(params, state, batch):
        updates, state = update(state, params, batch)
        params = fo.apply_updates(params, updates)
        return params, state, problem.loss_fn(params, batch).detach()

    return Runner(vmap(tx.init), step, settings={
        "schedule": "adaptive damping per fit (no learning rate), vmap over the fits"})


@register_optimizer("adamw-norm-test", lr=3e-3)
def _adamw_norm_test(problem: Problem, lr: float) -> Runner:
    """AdamW whose batch grows by the norm test (AdAdaGrad), from 32 samples up to 128 (or
    the whole training set, if smaller)."""
    _need("norm_test", "gradient_and_stats", "find_batch_test_state")
    if problem.model is None or problem.data is None or problem.kind != "classification":
        raise Unavailable("needs a classifier with a model and a data set (per-sample statistics)")
    x, y = problem.data
    most = min(len(y), 128)
    tx = fo.chain(fo.norm_test(eta=1.0, batch_size=32, max_batch_size=most),
                  fo.adamw(lr, weight_decay=1e-4))
    output_loss = lambda out, target: torch.nn.functional.cross_entropy(out, target, reduction="none")
    gen = torch.Generator().manual_seed(1234)

    def step(params, state, batch):
        b = int(fo.find_batch_test_state(state).batch_size)  # one host sync: slicing needs it
        idx = torch.randperm(len(y), generator=gen)[:b].to(y.device)
        g, stats, loss = fo.gradient_and_stats(problem.model, output_loss, params, [(x[idx], y[idx])])
        updates, state = tx.update(g, state, params, per_sample_stats=stats, batch_size=b)
        return fo.apply_updates(params, updates), state, loss

    return Runner(tx.init, step, settings={
        "schedule": "constant", "batch_size": f"adaptive, 32 to {most} (norm test)"})


def _curvature(name: str, **kwargs):
    def build(problem: Problem, lr: float) -> Runner:
        _need(name)
        if problem.model is None or problem.kind not in ("classification", "language-model"):
            raise Unavailable("needs an nn.Module classifier (layer statistics are captured)")
        settings = {"schedule": "constant"}
        extra = {}
        if problem.kind == "language-model":  # embeddings and norms: AdamW at its default
            extra["fallback"] = fo.adamw(3e-3 * problem.lr_scale, weight_decay=1e-4)
            settings["fallback"] = f"adamw lr {3e-3 * problem.lr_scale:g} outside Linear layers"
        tx = getattr(fo, name)(problem.model, lr, **kwargs, **extra)

        def step(params, state, batch):
            x, y = batch
            cap = fo.func.capture_curvature(problem.model, params, x, y, **problem.capture)
            updates, state = tx.update(cap.grads, state, params, curvature=cap)
            return fo.apply_updates(params, updates), state, cap.loss.detach()

        return Runner(tx.init, step, settings=settings)

    return build


register_optimizer("singd", lr=3e-2)(_curvature("singd", momentum=0.9, weight_decay=1e-4))
register_optimizer("kfac", lr=2e-2)(_curvature("kfac", momentum=0.9, damping=1e-1, T=5))
