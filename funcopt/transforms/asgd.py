"""Averaged SGD (ASGD) as torch.optim.ASGD, with the averaged parameters kept in the state."""

# ruff: noqa: F405 (the names of the toolkit's star import)
from __future__ import annotations

from typing import Any, NamedTuple

import torch

from funcopt.base import find_state
from funcopt.engine import check_hyperparameter, check_number
from funcopt.transforms._toolkit import *  # noqa: F403

__all__ = ["ASGDState", "asgd", "asgd_averaged_params"]


class ASGDState(NamedTuple):
    """State of :func:`asgd`: ``count`` (0-d int64 step t), ``eta`` and ``mu`` (0-d float64:
    the step size and averaging weight for the next step) and ``ax``, the averaged
    parameters (a tree like the parameters; read it with :func:`asgd_averaged_params`)."""

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count by design (optax's name)
    eta: Tensor
    mu: Tensor
    ax: Any


def asgd(
    learning_rate: float = 1e-2, lambd: float = 1e-4, alpha: float = 0.75, t0: float = 1e6,
    weight_decay: float = 0.0,
) -> GradientTransformation:
    r"""Averaged stochastic gradient descent (Polyak-Ruppert averaging with torch's decay).

    .. math::
        g_t &= \nabla f(\theta_{t-1}) + w\,\theta_{t-1} \\
        \theta_t &= \theta_{t-1}(1 - \lambda \eta_{t-1}) - \eta_{t-1} g_t \\
        \bar\theta_t &= \theta_t \text{ if } \mu_{t-1} = 1 \text{ else }
            \bar\theta_{t-1} + \mu_{t-1}(\theta_t - \bar\theta_{t-1}) \\
        \eta_t &= \frac{\gamma}{(1 + \lambda\gamma t)^{\alpha}}, \quad
        \mu_t = \frac{1}{\max(1, t - t_0)}

    with :math:`\eta_0 = \gamma`, :math:`\mu_0 = 1`. The output is the update
    :math:`\theta_t - \theta_{t-1}`; :math:`\bar\theta` (``ax``) is kept in the state for
    evaluation (:func:`asgd_averaged_params`).

    Args:
      learning_rate: :math:`\gamma` > 0 (default 1e-2).
      lambd: :math:`\lambda` >= 0, the decay term (default 1e-4).
      alpha: :math:`\alpha` >= 0, the power of the step-size decay (default 0.75).
      t0: :math:`t_0` >= 0, the step at which averaging starts (default 1e6).
      weight_decay: :math:`w` >= 0, L2 penalty added to the gradient (default 0).

    Needs ``params``. ``maximize`` is :func:`funcopt.maximize` chained first. Reference:
    Polyak & Juditsky, "Acceleration of Stochastic Approximation by Averaging", 1992;
    torch.optim.ASGD (the same defaults and numbers).
    """
    for name, value in (("learning_rate", learning_rate), ("lambd", lambd), ("alpha", alpha),
                        ("t0", t0), ("weight_decay", weight_decay)):
        check_number(f"asgd: {name}", value)
        check_hyperparameter(f"asgd: {name}", value, low=0.0)
    if not isinstance(learning_rate, Tensor) and learning_rate <= 0:
        raise ValueError(f"asgd: learning_rate={learning_rate!r} must be > 0")

    def init(params):
        count = step_counter(params)
        f64 = dict(dtype=torch.float64, device=count.device)
        return ASGDState(count, torch.as_tensor(learning_rate).to(**f64),
                         torch.ones((), **f64), tree_map(torch.zeros_like, params))

    def update(updates, state, params=None, **extra):
        expect_state(state, ASGDState, "asgd")
        g, treedef, p = param_leaves(updates, params, "asgd")
        ax = tree_leaves(state.ax)
        if weight_decay:
            g = torch._foreach_add(g, p, alpha=weight_decay)
        eta = state.eta
        new_p = [x * (1 - lambd * eta).to(x.dtype) - eta.to(x.dtype) * gi for x, gi in zip(p, g)]
        mu = state.mu
        new_ax = [torch.where(mu == 1, q, a + (q - a) * mu.to(q.dtype)) for a, q in zip(ax, new_p)]
        count = increment(state.count)
        t = count.to(torch.float64)
        new_eta = learning_rate / (1 + lambd * learning_rate * t) ** alpha
        new_mu = 1 / torch.clamp_min(t - t0, 1.0)
        out = [q - x for q, x in zip(new_p, p)]
        return tree_unflatten(treedef, out), ASGDState(count, new_eta, new_mu,
                                                       tree_unflatten(treedef, new_ax))

    return GradientTransformation(init, update)


def asgd_averaged_params(state: Any) -> Any:
    """The averaged parameters ``ax`` of the first :class:`ASGDState` found in ``state`` (an
    ASGD state, or the state of a chain or wrapper holding one), for evaluation.

    Raises ValueError when ``state`` holds no ASGD state.
    """
    found = find_state(state, ASGDState)
    if found is None:
        raise ValueError("asgd_averaged_params: state holds no ASGDState; pass the state of "
                         "fo.asgd(...) or of a chain containing it")
    return found.ax
