"""Memory-saving second moments: Adafactor's factored RMS and SM3's cover-set accumulators.

A factored leaf keeps one vector per kept dimension instead of a tensor of the leaf's shape,
so its state has other shapes than the leaf: the work is done leaf by leaf (each leaf has its
own reductions), and the leaf checks compare the updates against the params.
"""

# ruff: noqa: F405 (the names of the toolkit's star import)
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from funcopt.engine import check_number, host_number
from funcopt.transforms import first_order as fo
from funcopt.transforms._toolkit import *  # noqa: F403
from funcopt.transforms.clipping import clip_by_block_rms
from funcopt.transforms.trust_ratio import scale_by_param_block_rms
from funcopt.transforms.weight_decay import add_decayed_weights

__all__ = [
    "FactoredState", "ScaleBySM3State", "scale_by_factored_rms", "adafactor", "scale_by_sm3",
    "sm3",
]


class FactoredState(NamedTuple):
    """State of :func:`scale_by_factored_rms` (Adafactor): the step count, the row and
    column factors of the second moment for matrices, and the full second moment ``v`` for
    other leaves."""

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count by design (optax's name)
    v_row: Any
    v_col: Any
    v: Any


def _decay_rate_pow(t: Any, exponent: float = 0.8) -> Any:
    """Adafactor's default :math:`\\hat\\beta_{2,t} = 1 - (t+1)^{-c}` at step ``t`` = 0, 1, ...,
    in float32 as optax computes it: the exponent rounded to float32, the power computed in
    float64 and rounded to float32, then ``1 -`` in float32."""
    c = float(torch.tensor(-exponent, dtype=torch.float32))
    if isinstance(t, Tensor):
        return 1.0 - ((t.to(torch.float64) + 1) ** c).to(torch.float32)
    return float(1.0 - torch.tensor((t + 1) ** c, dtype=torch.float32))


def _factored_dims(shape: torch.Size, factored: bool, min_dim: int) -> tuple[int, int] | None:
    """The two largest dimensions ``(d1, d0)`` (second largest first) when the leaf is factored:
    at least 2-d and its second largest dimension at least ``min_dim`` (ties: the later one is
    the largest, as numpy's stable argsort)."""
    if not factored or len(shape) < 2:
        return None
    order = sorted(range(len(shape)), key=lambda i: shape[i])
    if shape[order[-2]] < min_dim:
        return None
    return order[-2], order[-1]


def _factored_leaf(g: Tensor, row: Tensor, col: Tensor, decay: Any, eps: Any,
                   dims: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    d1, d0 = dims
    g2 = g * g + eps
    row = decay * row + (1.0 - decay) * g2.mean(d0)
    col = decay * col + (1.0 - decay) * g2.mean(d1)
    reduced_d1 = d1 - 1 if d1 > d0 else d1
    row_factor = (row / row.mean(reduced_d1, keepdim=True)).rsqrt()
    out = g * row_factor.unsqueeze(d0) * col.rsqrt().unsqueeze(d1)
    return out, row, col


def scale_by_factored_rms(
    factored: bool = True, decay_rate: float = 0.8, step_offset: int = 0,
    min_dim_size_to_factor: int = 128, epsilon: float = 1e-30,
    decay_rate_fn: Callable[[Any, Any], Any] = _decay_rate_pow,
) -> GradientTransformation:
    r"""Adafactor's scaling by a factored estimate of the second moment.

    With :math:`\hat\beta_t` = ``decay_rate_fn(t - step_offset, decay_rate)`` (default
    :math:`1 - (t+1)^{-0.8}`, t = 0, 1, ...) and :math:`G = g^2 + \epsilon`: a leaf whose two
    largest dimensions (rows r, columns c) are both at least ``min_dim_size_to_factor`` keeps

    .. math:: R_t = \hat\beta_t R_{t-1} + (1-\hat\beta_t)\operatorname{mean}_c G,\quad
        C_t = \hat\beta_t C_{t-1} + (1-\hat\beta_t)\operatorname{mean}_r G,\quad
        u = g\,\big(R_t/\operatorname{mean}(R_t)\big)^{-1/2} C_t^{-1/2};

    other leaves keep :math:`V_t = \hat\beta_t V_{t-1} + (1-\hat\beta_t) G` and
    :math:`u = g V_t^{-1/2}`. Unused fields hold a zero of shape (1,), as optax.

    Args:
      factored: factor the leaves that qualify (default True).
      decay_rate: the exponent :math:`c` given to ``decay_rate_fn`` (default 0.8).
      step_offset: subtracted from the step before ``decay_rate_fn`` (default 0).
      min_dim_size_to_factor: the second largest dimension needed to factor (default 128).
      epsilon: :math:`\epsilon` > 0 added to :math:`g^2` (default 1e-30).
      decay_rate_fn: ``(step, decay_rate) -> beta`` (default :math:`1 - (t+1)^{-c}`).

    The default decay is computed in float32, as optax computes it.

    Reference: Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory
    Cost", ICML 2018; optax ``scale_by_factored_rms``.
    """
    _check("decay_rate", decay_rate)
    _check("epsilon", epsilon, low=0.0, low_inclusive=False)
    if not isinstance(min_dim_size_to_factor, int) or min_dim_size_to_factor < 1:
        raise ValueError(f"min_dim_size_to_factor={min_dim_size_to_factor!r} must be an int >= 1")

    def init(params):
        rows, cols, vs = [], [], []
        for p in tree_leaves(params):
            dims = _factored_dims(p.shape, factored, min_dim_size_to_factor)
            one = torch.zeros(1, dtype=p.dtype, device=p.device)
            if dims is None:
                r, c, v = one, one.clone(), torch.zeros_like(p)
            else:
                r, c, v = torch.zeros_like(p.sum(dims[1])), torch.zeros_like(p.sum(dims[0])), one
            rows.append(r)
            cols.append(c)
            vs.append(v)
        return FactoredState(step_counter(params), rows, cols, vs)

    def update(updates, state, params=None, **extra):
        params = require_params(params, "scale_by_factored_rms")
        g, treedef = _leaves(updates, params, "scale_by_factored_rms")
        if len(state.v) != len(g):
            raise ValueError(f"scale_by_factored_rms: the state holds {len(state.v)} leaves, the "
                             f"updates {len(g)}; re-run init on these params")
        step = host_number(state.count)
        if isinstance(step, Tensor):
            step = step.to(scalar_dtype(g))
        decay = decay_rate_fn(step - step_offset, decay_rate)
        outs, rows, cols, vs = [], [], [], []
        for x, p, r, c, v in zip(g, tree_leaves(params), state.v_row, state.v_col, state.v):
            dims = _factored_dims(p.shape, factored, min_dim_size_to_factor)
            if dims is None:
                v = decay * v + (1.0 - decay) * (x * x + epsilon)
                u = x * v.rsqrt()
            else:
                u, r, c = _factored_leaf(x, r, c, decay, epsilon, dims)
            outs.append(u)
            rows.append(r)
            cols.append(c)
            vs.append(v)
        return tree_unflatten(treedef, _as(outs, g)), FactoredState(
            increment(state.count), _as(rows, state.v_row), _as(cols, state.v_col),
            _as(vs, state.v))

    return GradientTransformation(init, update)


def adafactor(
    learning_rate: ScalarOrSchedule | None = None, min_dim_size_to_factor: int = 128,
    decay_rate: float = 0.8, decay_offset: int = 0, multiply_by_parameter_scale: bool = True,
    clipping_threshold: float | None = 1.0, momentum: float | None = None,
    dtype_momentum: torch.dtype = torch.float32, weight_decay_rate: ScalarOrSchedule | None = None,
    eps: float = 1e-30, factored: bool = True,
) -> GradientTransformation:
    r"""Adafactor, as optax composes it.

    ``chain(scale_by_factored_rms(factored, decay_rate, decay_offset, min_dim_size_to_factor,
    eps), [clip_by_block_rms(clipping_threshold)], [scale_by_learning_rate(lr,
    flip_sign=False)], [scale_by_param_block_rms()], [ema(momentum, debias=False)],
    [add_decayed_weights(weight_decay_rate)], scale(-1))``: the bracketed steps are left out
    when their argument is None/False.

    Args:
      learning_rate: :math:`\eta` or None (default None: no scaling, the relative step
        ``multiply_by_parameter_scale`` alone sets the size).
      min_dim_size_to_factor, decay_rate, decay_offset, eps, factored: see
        :func:`scale_by_factored_rms` (defaults 128, 0.8, 0, 1e-30, True).
      multiply_by_parameter_scale: multiply by the parameter block RMS (default True).
      clipping_threshold: block RMS clipping :math:`d` (default 1.0; None: no clipping).
      momentum: EMA decay of the updates (default None: none).
      dtype_momentum: dtype of that EMA (default float32, as optax).
      weight_decay_rate: decoupled weight decay, not scaled by the learning rate (default
        None: none), on every leaf.

    optax's ``weight_decay_mask`` is not an argument: the decay is the last step before the
    sign flip, so a masked decay is ``fo.chain(fo.adafactor(...), fo.scale(-1),
    fo.add_decayed_weights(rate, mask), fo.scale(-1))``, the same numbers as optax's
    ``adafactor(..., weight_decay_rate=rate, weight_decay_mask=mask)``.

    torch.optim.Adafactor (torch >= 2.5) is a different variant (no factoring threshold, its
    own decay and relative step); funcopt follows optax.

    Reference: Shazeer & Stern, ICML 2018; optax ``adafactor``.
    """
    tx: list[GradientTransformation] = [
        scale_by_factored_rms(factored, decay_rate, decay_offset, min_dim_size_to_factor, eps)]
    if clipping_threshold is not None:
        tx.append(clip_by_block_rms(clipping_threshold))
    if learning_rate is not None:
        tx.append(fo.scale_by_learning_rate(learning_rate, flip_sign=False))
    if multiply_by_parameter_scale:
        tx.append(scale_by_param_block_rms())
    if momentum is not None:
        tx.append(fo.ema(momentum, debias=False, accumulator_dtype=dtype_momentum))
    if weight_decay_rate is not None:
        tx.append(add_decayed_weights(weight_decay_rate))
    tx.append(fo.scale(-1.0))
    return chain(*tx)


class ScaleBySM3State(NamedTuple):
    """State of :func:`scale_by_sm3`: the momentum and the per-dimension accumulators of SM3
    (Anil et al. 2019)."""

    mu: Any
    nu: Any


def _sm3_accumulator(g: Tensor, covers: list[Tensor], b2: float) -> Tensor:
    """``(1 - b2) g^2 + b2 min_i cover_i`` (coefficients 1, 1 when b2 = 1), the covers
    broadcast along their dimension."""
    g2 = g * g
    if g.dim() < 2:
        prev = covers[0]
    else:
        shaped = [c.reshape([1] * i + [g.shape[i]] + [1] * (g.dim() - i - 1))
                  for i, c in enumerate(covers)]
        prev = shaped[0]
        for c in shaped[1:]:
            prev = torch.minimum(prev, c)
    return ((1.0 - b2) if b2 != 1.0 else 1.0) * g2 + b2 * prev


def scale_by_sm3(b1: float = 0.9, b2: float = 1.0, eps: float = 1e-8) -> GradientTransformation:
    r"""SM3's scaling: one accumulator per row, column, ... (cover sets) instead of per entry.

    For a leaf with dimensions :math:`i = 1..k` and covers :math:`\mu^{(i)}`:

    .. math:: a_t = (1-\beta_2) g_t^2 + \beta_2 \min_i \mu^{(i)}_{t-1}\ (\text{both
        coefficients 1 when } \beta_2 = 1),\quad
        \mu^{(i)}_t = \max_{\text{other dims}} a_t,\\
        \nu_t = \beta_1 \nu_{t-1} + (1-\beta_1)\, g_t\, a_t^{-1/2}\,[a_t > 0],\quad u_t = \nu_t,

    (with :math:`a_t^{-1/2}` computed as :math:`(a_t+\epsilon)^{-1/2}`); a leaf of fewer than
    2 dimensions keeps one accumulator per entry.

    Args:
      b1: :math:`\beta_1`, momentum of the output (default 0.9).
      b2: :math:`\beta_2`, decay of the accumulators (default 1: sums, as the paper).
      eps: :math:`\epsilon` (default 1e-8).

    Reference: Anil et al., "Memory-Efficient Adaptive Optimization", NeurIPS 2019; optax
    ``scale_by_sm3``.
    """
    _check_beta("b1", b1)
    _check("b2", b2, high=1.0)
    _check("eps", eps)

    def covers_of(p: Tensor) -> list[Tensor]:
        if p.dim() < 2:
            return [torch.zeros_like(p)]
        return [torch.zeros(n, dtype=p.dtype, device=p.device) for n in p.shape]

    def init(params):
        leaves = tree_leaves(params)
        return ScaleBySM3State([covers_of(p) for p in leaves], _zeros(leaves, None))

    def update(updates, state, params=None, **extra):
        g, treedef = _leaves(updates, params, "scale_by_sm3", state.nu)
        if not g:
            return updates, state
        accs = [_sm3_accumulator(x, c, b2) for x, c in zip(g, state.mu)]
        scaled = [x * torch.where(a > 0, (a + eps).rsqrt(), 0.0) for x, a in zip(g, accs)]
        nu = _moment(_as(state.nu, g), scaled, b1)
        mu = [[a] if a.dim() < 2 else
              [a.amax(dim=[d for d in range(a.dim()) if d != i]) for i in range(a.dim())]
              for a in accs]
        return tree_unflatten(treedef, _as(nu, g)), ScaleBySM3State(mu, _as(nu, state.nu))

    return GradientTransformation(init, update)


def sm3(learning_rate: float, momentum: float = 0.9) -> GradientTransformation:
    r"""SM3: ``chain(scale_by_sm3(momentum), scale(-learning_rate))``,
    :math:`\theta_{t+1} = \theta_t - \eta\,\nu_t` (see :func:`scale_by_sm3`).

    Args:
      learning_rate: :math:`\eta`, a number or 0-d tensor (no schedule, as optax).
      momentum: :math:`\beta_1` (default 0.9).

    Reference: Anil et al., NeurIPS 2019; optax ``sm3``.
    """
    check_number("learning_rate", learning_rate)
    _check("learning_rate", learning_rate)
    return chain(scale_by_sm3(momentum), fo.scale(-learning_rate))
