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


def _check_coeffs(ns_coeffs) -> None:
    """``ns_coeffs`` must be three finite numbers ``(a, b, c)``."""
    if not (isinstance(ns_coeffs, (tuple, list)) and len(ns_coeffs) == 3):
        raise TypeError(f"ns_coeffs={ns_coeffs!r} must be a tuple of three numbers (a, b, c), "
                        f"e.g. {NS_COEFFICIENTS}")
    for name, c in zip("abc", ns_coeffs):
        check_hyperparameter(f"ns_coeffs[{name}]", c, low=None)


class ScaleByMuonState(NamedTuple):
    """State of :func:`scale_by_muon`: ``momentum``, one momentum buffer per leaf."""

    momentum: list


def scale_by_muon(beta: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                  ns_coeffs: tuple[float, float, float] = NS_COEFFICIENTS, eps: float = 1e-7,
                  ns_dtype: torch.dtype | None = None,
                  mu_dtype: torch.dtype | None = None) -> GradientTransformation:
    """Muon's direction for matrices (conv kernels are flattened to ``(out, -1)``).

    .. math::
        m_t &= \\beta m_{t-1} + (1-\\beta) g_t, \\quad
        \\tilde g_t = (1-\\beta) g_t + \\beta m_t \\text{ (Nesterov) or } m_t \\\\
        u_t &= \\mathrm{NS}_{a,b,c}(\\tilde g_t)\\, \\sqrt{\\max(1, \\text{rows}/\\text{cols})}

    Args: ``beta`` :math:`\\beta`, the momentum (0.95); ``nesterov`` (True); ``ns_steps``
    Newton-Schulz iterations (5); ``ns_coeffs`` their ``(a, b, c)`` (default
    :data:`NS_COEFFICIENTS`, (3.4445, -4.7750, 2.0315)); ``eps`` :math:`\\epsilon` of the
    Frobenius normalisation (1e-7); ``ns_dtype`` Newton-Schulz compute dtype (None: float32 at
    least; the reference uses bfloat16); ``mu_dtype`` momentum storage dtype (None: the
    parameter's).
    Every leaf must have at least 2 dims: combine with AdamW through :func:`muon`. A
    zero-size leaf (``(3, 0)``, ``(0, 4)``) gets a zero-size update. Runs under
    ``torch.func.vmap`` (leaf by leaf) and ``torch.compile(fullgraph=True)``.
    Reference: https://github.com/KellerJordan/Muon (``Muon.step``, ``muon_update``).
    """
    check_hyperparameter("beta", beta, low=0.0, high=1.0, high_inclusive=False)
    check_hyperparameter("ns_steps", ns_steps, low=1.0)
    check_hyperparameter("eps", eps, low=0.0)
    _check_coeffs(ns_coeffs)
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
        buf = ops.lerp([m.to(x.dtype) for m, x in zip(state.momentum, g)], g, 1.0 - beta)
        out = []
        for x, b in zip(g, buf):  # the Nesterov lerp leaf by leaf: one leaf-sized temporary
            x = torch.lerp(x, b, beta) if nesterov else b
            if x.numel() == 0:  # nothing to orthogonalise
                out.append(torch.zeros_like(x))
                continue
            rows, cols = x.shape[0], math.prod(x.shape[1:])
            o = newton_schulz(x.reshape(rows, cols), ns_steps, eps, ns_coeffs, ns_dtype)
            scale = max(1.0, rows / cols) ** 0.5
            out.append((o * scale).reshape(x.shape))
        mom = [b.to(m.dtype) for b, m in zip(buf, state.momentum)]
        return tree_unflatten(treedef, out), ScaleByMuonState(mom)

    return GradientTransformation(init, update)


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
    learning_rate: ScalarOrSchedule = 0.02, beta: float = 0.95, nesterov: bool = True,
    ns_steps: int = 5, ns_coeffs: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = 1e-7, weight_decay: float = 0.0, param_labels: PyTree | None = None,
    ns_dtype: torch.dtype | None = None, *, other: GradientTransformation | None = None,
) -> GradientTransformation:
    """Muon for matrices, another transform (default AdamW) for everything else.

    Matrices: ``chain(scale_by_muon(beta, nesterov, ns_steps, ns_coeffs, eps, ns_dtype),
    add_decayed_weights(weight_decay), scale_by_learning_rate(learning_rate))``, i.e.
    :math:`p \\leftarrow p - \\eta(u + \\lambda p)` (the reference decays by
    :math:`1-\\eta\\lambda` then steps: the same). The other leaves get ``other``, a whole
    transform including its own learning rate, through :func:`funcopt.partition`.

    Args:
      learning_rate: :math:`\\eta` for the matrices. Default 0.02.
      beta, nesterov, ns_steps, ns_coeffs, eps, ns_dtype: see :func:`scale_by_muon`
        (defaults 0.95, True, 5, :data:`NS_COEFFICIENTS`, 1e-7, None: float32 at least; the
        reference and HeavyBall orthogonalise in bfloat16, about 2x faster on a GPU).
      weight_decay: :math:`\\lambda` for the matrices (decoupled). Default 0.
      param_labels: a tree of ``"muon"``/``"adam"`` labels (default: ``"muon"`` for every
        leaf with 2+ dims; embeddings and heads should be labelled ``"adam"`` as the reference
        advises).
      other: the transform for the ``"adam"`` leaves (default None:
        ``fo.adamw(3e-4, b1=0.9, b2=0.95, eps=1e-10, weight_decay=0.0)``, the reference's
        ``MuonWithAuxAdam`` numbers). To change those numbers, pass the whole transform:
        ``fo.muon(0.02, other=fo.adamw(1e-3, b1=0.9, b2=0.95, eps=1e-10,
        weight_decay=0.01))``; the former ``adam_learning_rate``, ``adam_b1``, ``adam_b2``,
        ``adam_eps`` and ``adam_weight_decay`` keywords are those arguments of ``fo.adamw``.

    Defaults against other libraries: this follows the reference (lr 0.02, :math:`\\beta`
    0.95, Nesterov, 5 steps, the same coefficients, eps 1e-7, AdamW lr 3e-4 and betas (0.9,
    0.95), eps 1e-10). ``optax.contrib.muon`` (0.2.8) names the same numbers ``beta``,
    ``ns_coeffs``, ``ns_steps`` and ``eps`` but takes eps 1e-8, bias-corrects the momentum,
    requires the learning rate, and defaults its AdamW to betas (0.9, 0.999) at the Muon
    learning rate. ``torch.optim.Muon`` calls :math:`\\beta` ``momentum`` (0.95) and keeps
    :math:`B_t = \\beta B_{t-1} + g_t` (no :math:`1-\\beta`; Newton-Schulz normalises the
    scale away up to eps), with lr 1e-3, weight_decay 0.1, eps 1e-7, the same coefficients
    and shape factor, and leaves non-matrix parameters to another optimizer.

    Reference: https://github.com/KellerJordan/Muon.
    """
    from funcopt.compose import chain, partition
    from funcopt.transforms.first_order import scale_by_adam
    from funcopt.transforms.scaling import scale_by_learning_rate
    from funcopt.transforms.weight_decay import add_decayed_weights

    decay = [add_decayed_weights(weight_decay)] if weight_decay else []
    matrix = chain(scale_by_muon(beta, nesterov, ns_steps, ns_coeffs, eps, ns_dtype), *decay,
                   scale_by_learning_rate(learning_rate))
    if other is None:
        # fo.adamw(3e-4, b1=0.9, b2=0.95, eps=1e-10, weight_decay=0.0), from its blocks (the
        # aliases sit a layer above this module)
        other = chain(scale_by_adam(0.9, 0.95, 1e-10), scale_by_learning_rate(3e-4))
    return partition({"muon": _group(matrix), "adam": _group(other)},
                     param_labels if param_labels is not None else _is_matrix_tree)
