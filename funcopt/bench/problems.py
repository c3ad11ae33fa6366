"""Benchmark problems: a params pytree, a loss (and, where it makes sense, residuals) and data.

A problem is plain data plus functions, so users register their own with :func:`register`::

    import funcopt.bench as fb

    @fb.register("my-fit")
    def my_fit(seed: int, device: torch.device) -> fb.Problem:
        ...
        return fb.Problem(params=..., loss_fn=..., batches=..., evaluate=...)
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

import funcopt as fo

__all__ = ["Problem", "register", "PROBLEMS", "DEFAULT_PROBLEMS", "FULL_PROBLEMS", "REQUIRES",
           "missing_packages"]

Batch = Any


@dataclass
class Problem:
    """One optimisation problem.

    params:      the initial parameter pytree (detached tensors).
    loss_fn:     ``loss_fn(params, batch) -> 0-d tensor``.
    batches:     ``batches(step) -> batch``: deterministic for a seed.
    evaluate:    ``evaluate(params) -> {"loss": float, ...}`` on held-out test data (or all the
                 data, for curve fits); called once, at the end of a run.
    validate:    ``validate(params) -> {"loss": float, ...}`` on a validation split, called along
                 the run: it picks the learning rate, draws the curves and times the target.
                 Default: ``evaluate``.
    residual_fn: ``residual_fn(params, batch) -> 1-D tensor`` with ``loss = 0.5 * sum(r**2)``
                 up to a constant factor; problems without one skip least-squares methods.
    model:       the ``nn.Module`` whose ``functional_call`` the loss uses, for methods that
                 capture layer statistics (KFAC, SINGD); ``None`` for plain functions.
    per_sample_loss: ``per_sample_loss(params, x, y) -> 0-d`` for one sample, for methods that
                 need per-sample gradients (adaptive batch sizes); with ``data=(x, y)``.
    steps:       the default number of steps.
    lr_scale:    multiplies every optimizer's default learning rate on this problem.
    batch_size:  samples per step, shown with the results (``None``: the whole data set).
    loss_name:   what ``loss`` is, for the report and the plots' y axes.
    target:      a validation loss; the report gives the steps and seconds to reach it
                 (``None``: no time to target for this problem).
    capture:     keyword arguments for ``funcopt.func.capture_curvature`` (KFAC, SINGD), e.g. a
                 loss for sequence outputs.
    batched:     ``params`` hold ``B`` independent problems along the leading dimension of every
                 leaf, ``batch`` is a pytree of tensors with the same leading ``B`` and
                 ``residual_fn(params, batch)`` returns ``(B, m)`` residuals, row ``b`` from
                 problem ``b`` alone; Levenberg-Marquardt then steps each problem on its own
                 (``torch.func.vmap`` over the rows). Default False.
    """

    params: Any
    loss_fn: Callable[[Any, Batch], torch.Tensor]
    batches: Callable[[int], Batch]
    evaluate: Callable[[Any], dict[str, float]]
    residual_fn: Callable[[Any, Batch], torch.Tensor] | None = None
    model: nn.Module | None = None
    per_sample_loss: Callable[..., torch.Tensor] | None = None
    data: tuple[torch.Tensor, torch.Tensor] | None = None
    steps: int = 200
    lr_scale: float = 1.0
    kind: str = "classification"
    extra: dict[str, Any] = field(default_factory=dict)
    validate: Callable[[Any], dict[str, float]] | None = None
    batch_size: int | None = None
    loss_name: str = "cross-entropy (nats)"
    target: float | None = None
    capture: dict[str, Any] = field(default_factory=dict)
    batched: bool = False


PROBLEMS: dict[str, Callable[[int, torch.device], Problem]] = {}
DEFAULT_PROBLEMS: list[str] = []  # the quick suite (``make demo``)
FULL_PROBLEMS: list[str] = []  # ``--suite full``


REQUIRES: dict[str, tuple[str, ...]] = {}


def check_name(name: str, what: str) -> None:
    """A registered name must be selectable on the command line: text, no commas or spaces."""
    if not isinstance(name, str) or not name or any(c in name for c in ", \t\n"):
        raise ValueError(f"{what} name {name!r} must be non-empty text without commas or spaces "
                         f"(it is given as --{what}s a,b,c)")


def register(name: str, *, default: bool = False, full: bool | None = None,
             requires: tuple[str, ...] = ()):
    """Register ``factory(seed, device) -> Problem`` under ``name``.

    default:  put it in the quick suite, the one that runs when neither ``--problems`` nor
              ``--suite full`` is given.
    full:     put it in ``--suite full`` (default: as ``default``).
    requires: import names of packages the factory needs; the command line refuses to run the
              problem, before any work, when one is not installed.
    A name already taken is a ValueError.
    """
    check_name(name, "problem")
    if name in PROBLEMS:
        raise ValueError(f"a problem named {name!r} is already registered; pick another name")

    def wrap(factory: Callable[[int, torch.device], Problem]):
        if name in PROBLEMS:
            raise ValueError(f"a problem named {name!r} is already registered; pick another name")
        PROBLEMS[name] = factory
        REQUIRES[name] = tuple(requires)
        if default:
            DEFAULT_PROBLEMS.append(name)
        if default if full is None else full:
            FULL_PROBLEMS.append(name)
        return factory

    return wrap


def missing_packages(name: str) -> list[str]:
    """The packages problem ``name`` declared in ``requires`` that cannot be imported here."""
    return [m for m in REQUIRES.get(name, ()) if importlib.util.find_spec(m) is None]


# --------------------------------------------------------------------------- data


def _split(x: torch.Tensor, y: torch.Tensor, n_val: int, seed: int):
    """Shuffle (x, y) with ``seed`` and cut ``n_val`` samples off the end for validation."""
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    return x[:-n_val], y[:-n_val], x[-n_val:], y[-n_val:]


def _digits(device: torch.device, seed: int, image: bool = False):
    """scikit-learn's 1,797 digits: 1,150 train, 250 validation, 397 test (split by ``seed``)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    if image:
        x = x.reshape(-1, 1, 8, 8)
    xa, ya, xte, yte = _split(x, y, 397, seed)
    xtr, ytr, xva, yva = xa[:1150], ya[:1150], xa[1150:], ya[1150:]
    return tuple(t.to(device) for t in (xtr, ytr, xva, yva, xte, yte))


def _mnist1d(device: torch.device, seed: int):
    """MNIST-1D (fixed data set): 3,500 train, 500 validation (split by ``seed``), 1,000 test."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = 42  # the dataset itself is fixed; ``seed`` drives init, split and batching
    d = make_dataset(args)
    to = lambda a, dt: torch.as_tensor(a, dtype=dt)
    xtr, ytr, xva, yva = _split(to(d["x"], torch.float32), to(d["y"], torch.int64), 500, seed)
    xte, yte = to(d["x_test"], torch.float32), to(d["y_test"], torch.int64)
    return tuple(t.to(device) for t in (xtr, ytr, xva, yva, xte, yte))


def minibatches(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int):
    """``batches(step)``: epochs of shuffled minibatches, the same for the same ``seed``."""
    g = torch.Generator().manual_seed(seed + 1)
    n = len(y)
    cache: dict[int, torch.Tensor] = {}

    def batches(step: int):
        epoch, i = divmod(step * batch_size, n)
        if epoch not in cache:
            cache.clear()
            cache[epoch] = torch.randperm(n, generator=g).to(x.device)
        idx = cache[epoch][i : i + batch_size]
        return x[idx], y[idx]

    return batches


def classifier(model: nn.Module, data, seed: int, batch_size: int, steps: int, *,
               target: float | None = None, lr_scale: float = 1.0) -> Problem:
    """A cross-entropy classification problem from ``data = (xtr, ytr, xva, yva, xte, yte)``."""
    xtr, ytr, xva, yva, xte, yte = data
    params = {k: v.detach().clone() for k, v in model.named_parameters()}

    def logits(p, x):
        return functional_call(model, p, (x,))

    def loss_fn(p, batch):
        x, y = batch
        return nn.functional.cross_entropy(logits(p, x), y)

    # one residual per sample, r_i = sqrt(2 l_i / N): half its squared norm is the mean
    # cross-entropy, so Levenberg-Marquardt minimises the same loss as the others; declared per
    # sample, so its Jacobian is built sample by sample (O(N), not O(N^2))
    residual_fn = fo.cross_entropy_residuals(logits, per_sample=True)

    def per_sample_loss(p, x, y):
        return nn.functional.cross_entropy(logits(p, x[None]), y[None])

    @torch.no_grad()
    def scores(p, x, y):
        z = logits(p, x)
        return {"loss": float(nn.functional.cross_entropy(z, y)),
                "accuracy": float((z.argmax(-1) == y).float().mean())}

    def evaluate(p):
        with torch.no_grad():
            train_loss = float(loss_fn(p, (xtr, ytr)))
        return {**scores(p, xte, yte), "train_loss": train_loss}

    return Problem(
        params=params, loss_fn=loss_fn, batches=minibatches(xtr, ytr, batch_size, seed),
        evaluate=evaluate, validate=lambda p: scores(p, xva, yva), residual_fn=residual_fn,
        model=model, per_sample_loss=per_sample_loss, data=(xtr, ytr), steps=steps,
        lr_scale=lr_scale, batch_size=batch_size, target=target,
    )


@register("digits-logreg", default=True)
def digits_logreg(seed: int, device: torch.device) -> Problem:
    """Multinomial logistic regression on scikit-learn's 8x8 digits (64 -> 10)."""
    torch.manual_seed(seed)
    model = nn.Linear(64, 10).to(device)
    # 150 steps: every default rate swept in the quick suite chose the grid's top at scale 1
    return classifier(model, _digits(device, seed), seed, batch_size=128, steps=150, target=0.2,
                      lr_scale=10 ** 0.5)


@register("digits-mlp", full=True)
def digits_mlp(seed: int, device: torch.device) -> Problem:
    """A 64-64-10 tanh MLP on scikit-learn's digits."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)).to(device)
    return classifier(model, _digits(device, seed), seed, batch_size=128, steps=150, target=0.15)


@register("digits-cnn", full=True)
def digits_cnn(seed: int, device: torch.device) -> Problem:
    """A small CNN (conv 8 -> conv 16 -> linear) on scikit-learn's digits as 1x8x8 images."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
    ).to(device)
    return classifier(model, _digits(device, seed, image=True), seed, batch_size=128, steps=100,
                      target=0.15)


@register("mnist1d-mlp", full=True, requires=("mnist1d",))
def mnist1d_mlp(seed: int, device: torch.device) -> Problem:
    """A 40-128-128-10 ReLU MLP on MNIST-1D (needs mnist1d: ``pip install 'funcopt[bench]'``)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(40, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)).to(device)
    return classifier(model, _mnist1d(device, seed), seed, batch_size=128, steps=300, target=1.0)


# --------------------------------------------------------------------------- curve fits


def _nist_problem(name: str, device: torch.device, start: int = 0) -> Problem:
    from funcopt import nist

    prob = nist.load(name)
    fn = nist.residual_fn(prob._replace(x=prob.x.to(device), y=prob.y.to(device)))
    params = {"beta": prob.starts[start].to(device)}
    certified = float(prob.certified_rss)

    def residual_fn(p, batch=None):
        return fn(p["beta"])

    def loss_fn(p, batch=None):
        return 0.5 * residual_fn(p).pow(2).sum()

    @torch.no_grad()
    def evaluate(p):
        rss = float(residual_fn(p).pow(2).sum())
        digits = float(nist.significant_digits(p["beta"].cpu(), prob.certified).min())
        return {"loss": rss, "rss_over_certified": rss / certified, "min_digits": digits}

    return Problem(
        params=params, loss_fn=loss_fn, batches=lambda step: None, evaluate=evaluate,
        residual_fn=residual_fn, steps=60, kind="curve-fit", extra={"certified_rss": certified},
        loss_name="residual sum of squares", target=certified * (1 + 1e-6),
    )


@register("nist-misra1a", default=True)
def nist_misra1a(seed: int, device: torch.device) -> Problem:
    """NIST StRD Misra1a (2 parameters, 14 points, start 1): y = b1 (1 - exp(-b2 x))."""
    return _nist_problem("Misra1a", device)


@register("nist-chwirut2", default=True)
def nist_chwirut2(seed: int, device: torch.device) -> Problem:
    """NIST StRD Chwirut2 (3 parameters, 54 points, start 1): y = exp(-b1 x) / (b2 + b3 x)."""
    return _nist_problem("Chwirut2", device)


# --------------------------------------------------------------------------- batched fits

_REFERENCE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (B, seed, device) -> (costs, success)


def decay_fits(fits: int, seed: int, device: torch.device, points: int = 30):
    """``(t, y)``: ``fits`` data sets of ``y = a exp(-b t) + c + 0.01 noise`` at ``points``
    times in ``[0, 3]``, with ``a ~ U(1, 3)``, ``b ~ U(0.5, 3)``, ``c ~ U(-1, 1)`` (float64)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0.0, 3.0, points, dtype=torch.float64)
    u = torch.rand(fits, 3, generator=g, dtype=torch.float64)
    a, b, c = (1 + 2 * u[:, :1], 0.5 + 2.5 * u[:, 1:2], 2 * u[:, 2:] - 1)
    y = a * torch.exp(-b * t) + c + 0.01 * torch.randn(fits, points, generator=g, dtype=torch.float64)
    return t.to(device), y.to(device)


def batched_decay_fits(fits: int, seed: int, device: torch.device, steps: int) -> Problem:
    """``fits`` independent fits of ``y = a exp(-b t) + c`` to 30 points each, all from the
    start ``(1, 1, 0)``, as one problem with parameters ``{"abc": (fits, 3)}``.

    loss: the mean over the fits of each fit's cost ``0.5 ||r_b||^2``. The reference is
    ``funcopt.least_squares(residual_fn, params, batched=True)`` (MINPACK tolerances 1e-8),
    solved once per (fits, seed, device); ``evaluate`` counts the fits whose cost is within a
    relative 1e-6 of a reference fit that succeeded (``converged``), and the target is the
    reference's mean cost times ``1 + 1e-6``."""
    t, y = decay_fits(fits, seed, device)
    params = {"abc": torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64, device=device).repeat(fits, 1)}

    def residual_fn(p, data):
        x = p["abc"]
        return x[:, :1] * torch.exp(-x[:, 1:2] * t) + x[:, 2:] - data

    def costs(p):
        return 0.5 * residual_fn(p, y).pow(2).sum(1)

    key = (fits, seed, str(device))
    if key not in _REFERENCE:
        _, info = fo.least_squares(lambda p: residual_fn(p, y), params, batched=True)
        _REFERENCE[key] = (info.cost, info.success)
    ref, ref_ok = _REFERENCE[key]

    @torch.no_grad()
    def evaluate(p):
        c = costs(p)
        close = ((c - ref).abs() <= 1e-6 * ref) & ref_ok  # only fits whose reference succeeded
        return {"loss": float(c.mean()), "total_cost": float(c.sum()), "fits": float(fits),
                "converged": float(close.sum()), "reference_successes": float(ref_ok.sum())}

    return Problem(
        params=params, loss_fn=lambda p, data: 0.5 * residual_fn(p, data).pow(2).sum(1).mean(),
        batches=lambda step: y, evaluate=evaluate, residual_fn=residual_fn, steps=steps,
        kind="curve-fit", loss_name="mean cost 0.5 ||r||^2 over the fits",
        target=float(ref.mean()) * (1 + 1e-6), batched=True, extra={"fits": fits},
    )


@register("curve-fits-batched", default=True, full=False)
def curve_fits_batched(seed: int, device: torch.device) -> Problem:
    """1,000 independent fits of y = a exp(-b t) + c (30 points each), solved together."""
    return batched_decay_fits(1000, seed, device, steps=15)


@register("curve-fits-batched-large", full=True)
def curve_fits_batched_large(seed: int, device: torch.device) -> Problem:
    """100,000 independent fits of y = a exp(-b t) + c (30 points each), for a GPU."""
    return batched_decay_fits(100_000, seed, device, steps=20)
