"""Muon: Newton-Schulz orthogonalised momentum for matrix parameters.

Reference: Keller Jordan et al., "Muon: An optimizer for hidden layers in neural networks",
https://kellerjordan.github.io/posts/muon/, code https://github.com/KellerJordan/Muon.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from funcopt.base import (
    GradientTransformation,
    PyTree,
    ScalarOrSchedule,
    Tensor,
    check_hyperparameter,
    tree_unflatten,
)
from funcopt.engine import expect_state, leaves, ops

__all__ = ["ScaleByMuonState", "newton_schulz", "scale_by_muon", "muon", "NS_COEFFICIENTS"]

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
"""The quintic Newton-Schulz coefficients ``(a, b, c)`` of Muon (Jordan et al. 2024):
``X <- a X + (b A + c A^2) X`` with ``A = X X^T``."""


def newton_schulz(g: Tensor, steps: int = 5, eps: float = 1e-7,
                  coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                  dtype: torch.dtype | None = None) -> Tensor:
    """Approximate ``U V^T`` of ``g = U S V^T`` by the quintic Newton-Schulz iteration.

    .. math::
        X_0 = G / (\\|G\\|_F + \\epsilon), \\quad
        X_{k+1} = a X_k + (b A_k + c A_k^2) X_k, \\quad A_k = X_k X_k^T

    on the wide orientation (transposed when rows > columns). ``steps``: iterations (5);
    ``eps``: :math:`\\epsilon` (1e-7); ``coefficients``: ``(a, b, c)``, the reference's
    (3.4445, -4.7750, 2.0315); ``dtype``: compute dtype (default: ``g``'s, float32 at least;
    the reference uses bfloat16). Leading dims beyond two are batch dims.
    """
    if g.dim() < 2:
        raise ValueError(f"newton_schulz needs a matrix (or batch of matrices); got shape "
                         f"{tuple(g.shape)}. Route 1-d parameters to another transform.")
    a, b, c = coefficients
    x = g.to(dtype or torch.promote_types(g.dtype, torch.float32))
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + eps)
    for _ in range(steps):
        s = x @ x.mT
        x = a * x + (b * s + c * s @ s) @ x
    return (x.mT if tall else x).to(g.dtype)


class ScaleByMuonState(NamedTuple):
    """State of :func:`scale_by_muon`: ``momentum``, one momentum buffer per leaf."""

    momentum: list


def scale_by_muon(momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                  eps: float = 1e-7, ns_dtype: torch.dtype | None = None,
                  mu_dtype: torch.dtype | None = None) -> GradientTransformation:
    """Muon's direction for matrices (conv kernels are flattened to ``(out, -1)``).

    .. math::
        m_t &= \\mu m_{t-1} + (1-\\mu) g_t, \\quad
        \\tilde g_t = (1-\\mu) g_t + \\mu m_t \\text{ (Nesterov) or } m_t \\\\
        u_t &= \\mathrm{NS}(\\tilde g_t)\\, \\sqrt{\\max(1, \\text{rows}/\\text{cols})}

    Args: ``momentum`` :math:`\\mu` (0.95); ``nesterov`` (True); ``ns_steps`` (5); ``eps`` (1e-7);
    ``ns_dtype`` Newton-Schulz compute dtype (None: float32 at least; the reference uses
    bfloat16); ``mu_dtype`` momentum storage dtype (None: the parameter's).
    Every leaf must have at least 2 dims: combine with AdamW through :func:`muon`. A
    zero-size leaf (``(3, 0)``, ``(0, 4)``) gets a zero-size update. Runs under
    ``torch.func.vmap`` (leaf by leaf) and ``torch.compile(fullgraph=True)``.
    Reference: https://github.com/KellerJordan/Muon (``Muon.step``, ``muon_update``).
    """
    check_hyperparameter("momentum", momentum, low=0.0, high=1.0, high_inclusive=False)
    check_hyperparameter("ns_steps", ns_steps, low=1.0)

    def init(params):
        ps, _ = leaves(params, None, "scale_by_muon")
        for p in ps:
            if p.dim() < 2:
                raise ValueError(f"scale_by_muon got a {p.dim()}-d parameter of shape "
                                 f"{tuple(p.shape)}; use fo.muon(...), which sends non-matrix "
                                 "parameters to AdamW, or mask them out")
        return ScaleByMuonState([torch.zeros_like(p, dtype=mu_dtype) for p in ps])

    def update(updates, state, params=None, **extra):
        expect_state(state, ScaleByMuonState, "scale_by_muon")
        g, treedef = leaves(updates, params, "scale_by_muon", state.momentum)
        if not g:
            return updates, state
        buf = ops.lerp([m.to(x.dtype) for m, x in zip(state.momentum, g)], g,
                                  1.0 - momentum)
        out = []
        for x, b in zip(g, buf):  # the Nesterov lerp leaf by leaf: one leaf-sized temporary
            x = torch.lerp(x, b, momentum) if nesterov else b
            if x.numel() == 0:  # nothing to orthogonalise
                out.append(torch.zeros_like(x))
                continue
            rows, cols = x.shape[0], math.prod(x.shape[1:])
            o = newton_schulz(x.reshape(rows, cols), ns_steps, eps, dtype=ns_dtype)
            scale = max(1.0, rows / cols) ** 0.5
            out.append((o * scale).reshape(x.shape))
        mom = [b.to(m.dtype) for b, m in zip(buf, state.momentum)]
        return tree_unflatten(treedef, out), ScaleByMuonState(mom)

    return GradientTransformation(init, update)


def _adamw(learning_rate, b1, b2, eps, weight_decay) -> GradientTransformation:
    """``chain(scale_by_adam, add_decayed_weights, scale_by_learning_rate)``: AdamW."""
    from funcopt.compose import chain
    from funcopt.transforms.first_order import scale_by_adam, scale_by_learning_rate
    from funcopt.transforms.weight_decay import add_decayed_weights

    decay = [add_decayed_weights(weight_decay)] if weight_decay else []
    return chain(scale_by_adam(b1, b2, eps), *decay, scale_by_learning_rate(learning_rate))


def _group(inner: GradientTransformation) -> GradientTransformation:
    """``inner`` as a group of :func:`funcopt.partition`: an empty selection (``None``, which
    a bare-tensor tree becomes in the group it does not belong to) passes through, so that
    ``add_decayed_weights`` there does not ask for parameters that were passed."""

    def update(updates, state, params=None, **extra):
        if updates is None:
            return updates, state
        return inner.update(updates, state, params, **extra)

    return GradientTransformation(inner.init, update)


def _is_matrix_tree(params: PyTree) -> PyTree:
    from funcopt.base import tree_map
    return tree_map(lambda p: "muon" if p.dim() >= 2 else "adam", params)


def muon(
    learning_rate: ScalarOrSchedule = 0.02, momentum: float = 0.95, nesterov: bool = True,
    ns_steps: int = 5, weight_decay: float = 0.0, adam_learning_rate: ScalarOrSchedule = 3e-4,
    adam_b1: float = 0.9, adam_b2: float = 0.95, adam_eps: float = 1e-10,
    adam_weight_decay: float = 0.0, param_labels: PyTree | None = None,
    ns_dtype: torch.dtype | None = None, *, other: GradientTransformation | None = None,
) -> GradientTransformation:
    """Muon for matrices, AdamW (or ``other``) for everything else, via ``partition``.

    Matrices: ``chain(scale_by_muon, add_decayed_weights(weight_decay),
    scale_by_learning_rate(learning_rate))``, i.e. :math:`p \\leftarrow p - \\eta(u + \\lambda p)`
    (the reference decays by :math:`1-\\eta\\lambda` then steps: the same). Other leaves:
    ``adamw(adam_learning_rate, adam_b1, adam_b2, adam_eps, weight_decay=adam_weight_decay)``.
    Defaults follow the reference's ``MuonWithAuxAdam`` (lr 0.02, momentum 0.95, AdamW lr 3e-4,
    betas (0.9, 0.95), eps 1e-10). ``param_labels``: a tree of ``"muon"``/``"adam"`` labels
    (default: ``"muon"`` for every leaf with 2+ dims; embeddings and heads should be labelled
    ``"adam"`` as the reference advises). ``ns_dtype``: Newton-Schulz compute dtype (default
    float32 at least; the reference and HeavyBall use bfloat16, about 2x faster on a GPU).
    ``other``: the transform for the ``"adam"`` leaves, including their learning rate
    (default None: AdamW built from ``adam_*``, i.e. ``chain(scale_by_adam(adam_b1, adam_b2,
    adam_eps), add_decayed_weights(adam_weight_decay), scale_by_learning_rate(
    adam_learning_rate))``; the ``adam_*`` arguments are unused when ``other`` is given).
    Reference: https://github.com/KellerJordan/Muon.
    """
    from funcopt.compose import chain, partition
    from funcopt.transforms.first_order import scale_by_learning_rate
    from funcopt.transforms.weight_decay import add_decayed_weights

    decay = [add_decayed_weights(weight_decay)] if weight_decay else []
    matrix = chain(scale_by_muon(momentum, nesterov, ns_steps, ns_dtype=ns_dtype), *decay,
                   scale_by_learning_rate(learning_rate))
    if other is None:
        other = _adamw(adam_learning_rate, adam_b1, adam_b2, adam_eps, adam_weight_decay)
    return partition({"muon": _group(matrix), "adam": _group(other)},
                     param_labels if param_labels is not None else _is_matrix_tree)
