"""PSGD Kron's factor math: the Kronecker factors, their Lie-group fit and the probe draw.

Helpers of :func:`funcopt.transforms.psgd.scale_by_psgd_kron` (see there for the equations).
Leaves of one bucket (same shape, dtype and device) are stacked along a new leading
dimension ``n`` (each factor stacked the same way), so that every step below is one batched
op per bucket rather than one op per leaf. Factor ``i`` acts on slab dimension ``i + 1``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from funcopt.base import Tensor

_F32_EPS = torch.finfo(torch.float32).eps
_TINY = torch.finfo(torch.float32).tiny


def _factor_kinds(shape, max_size, min_ndim, mode) -> list[str]:
    """Per dimension: ``"tri"`` (triangular) or ``"diag"``; ``["scalar"]`` for a 0-d leaf."""
    if not shape:
        return ["scalar"]
    diag = [False] * len(shape)
    biggest = max(range(len(shape)), key=lambda i: shape[i])
    if mode == "one_diag":
        diag[biggest] = True
    elif mode == "smart_one_diag":
        s = sorted(shape)
        diag[biggest] = len(shape) >= 2 and s[-1] > s[-2]
    elif mode == "one_triu":
        smallest = min(range(len(shape)), key=lambda i: (shape[i], i))
        diag = [i != smallest for i in range(len(shape))]
    elif mode == "all_diag":
        diag = [True] * len(shape)
    return ["diag" if (d == 1 or d > max_size or len(shape) < min_ndim or dg) else "tri"
            for d, dg in zip(shape, diag)]


def _init_factor(kind: str, d: int, dtype, device) -> Tensor:
    if kind == "tri":
        return torch.eye(d, dtype=dtype, device=device)
    return torch.ones(() if kind == "scalar" else (d,), dtype=dtype, device=device)


def _kind(q: Tensor) -> str:
    """Kind of a stacked factor: ``(n,)`` for 0-d leaves, ``(n, d)`` diagonal, ``(n, d, d)``."""
    return {1: "scalar", 2: "diag", 3: "tri"}[q.ndim]


def _stack(xs: list[Tensor]) -> Tensor:
    """``torch.stack(xs)``; a single tensor becomes a view with a leading 1 (no copy)."""
    return xs[0][None] if len(xs) == 1 else torch.stack(xs)


# The fit and the preconditioner work on slabs: the leaves of one bucket stacked along a new
# leading dimension ``n`` (each factor stacked the same way), so that every step below is one
# batched op per bucket rather than one op per leaf. Factor ``i`` acts on slab dimension i + 1.

def _along(x: Tensor, i: int, fn) -> Tensor:
    """Apply ``fn`` to ``x`` seen as matrices ``(n, rest, d_i)`` (dimension ``i + 1`` last)."""
    moved = x.movedim(i + 1, -1)
    out = fn(moved.reshape(x.shape[0], -1, moved.shape[-1]))
    return out.reshape(moved.shape).movedim(-1, i + 1)


def _bcast(q: Tensor, i: int, ndim: int) -> Tensor:
    """A diagonal factor ``(n, d_i)`` (or a 0-d leaf's ``(n,)``) shaped to scale dimension
    ``i + 1`` of an ``ndim``-dimensional slab."""
    shape = [1] * ndim
    shape[0] = q.shape[0]
    if q.ndim == 2:
        shape[i + 1] = q.shape[1]
    return q.view(shape)


def _apply_q(qs: list[Tensor], x: Tensor) -> Tensor:
    """``Q x``: each triangular factor multiplies its dimension, diagonal ones scale it."""
    for i, q in enumerate(qs):
        if q.ndim == 3:
            x = _along(x, i, lambda m, q=q: m @ q.mT)
        else:
            x = x * _bcast(q, i, x.ndim)
    return x


def _apply_q_inv_t(qs: list[Tensor], v: Tensor) -> Tensor:
    """``Q^{-T} v``: triangular solves per dimension, divisions for diagonal factors."""
    for i, q in enumerate(qs):
        if q.ndim == 3:
            v = _along(v, i, lambda m, q=q: torch.linalg.solve_triangular(q, m, upper=True,
                                                                            left=False))
        else:
            v = v / _bcast(q, i, v.ndim)
    return v


def _precondition(qs: list[Tensor], x: Tensor) -> Tensor:
    """``P x = Q^T Q x`` factor by factor (``Q_i^T Q_i`` formed once: ``d_i^3`` flops, less
    than a second pass of ``Q_i`` over ``x`` whenever the other dimensions hold more than
    ``d_i`` elements)."""
    for i, q in enumerate(qs):
        if q.ndim == 3:
            x = _along(x, i, lambda m, q=q: m @ (q.mT @ q).mT)
        else:
            x = x * _bcast(q * q, i, x.ndim)
    return x


def _gram_along(x: Tensor, i: int, kind: str) -> Tensor:
    """Contract ``x`` with itself over every dimension but ``i + 1`` (and the leading ``n``)."""
    if kind == "scalar":
        return x * x
    m = x.movedim(i + 1, 1).reshape(x.shape[0], x.shape[i + 1], -1)
    return m @ m.mT if kind == "tri" else (m * m).sum(-1)


def _max_eigenvalue(a: Tensor, iterations: int) -> Tensor:
    """Largest eigenvalue of each symmetric PSD matrix of ``a`` ``(n, d, d)``: start at its
    largest row, power-iterate on ``a^2``, return ``||a x||`` (shape ``(n,)``)."""
    x_norm, idx = a.norm(dim=-1).max(dim=-1)
    x_norm = x_norm.clamp(min=_TINY)[:, None, None]
    a = a / x_norm
    # the row as a gather (indexing with a 0-d tensor reads it on the host: a device sync)
    x = torch.take_along_dim(a, idx[:, None, None], dim=1)

    def mv(v):
        return (v @ a.mT) @ a.mT

    for _ in range(iterations):
        x = torch.nn.functional.normalize(mv(x), dim=-1)
    return ((x * mv(x)).sum(-1).sqrt() * x_norm[:, 0]).view(-1)


def _upper(m: Tensor) -> Tensor:
    """The upper triangles of ``m`` (a masked select: ``torch.triu`` is slow on small CPU
    inputs)."""
    idx = torch.arange(m.shape[-1], device=m.device)
    return torch.where(idx[:, None] <= idx[None, :], m, torch.zeros((), dtype=m.dtype,
                                                                   device=m.device))


def _balance(qs: list[Tensor]) -> list[Tensor]:
    """Rescale each leaf's factors to equal max-abs (geometric mean), leaving their product
    unchanged."""
    if len(qs) < 2:
        return qs
    logs = [q.abs().amax(dim=tuple(range(1, q.ndim))).log() for q in qs]
    mean = sum(logs) / len(qs)
    return [q * _bcast((mean - n).exp(), 0, q.ndim) for q, n in zip(qs, logs)]


def _fit(qs, lbs, h, v, precond_lr, lb_beta, power_iter):
    """One Lie-group step on every (stacked) factor from the pair (probe ``v``, damped
    gradient ``h``); ``lbs``: the lower bounds, ``(n,)`` float64 per factor."""
    qs = _balance(qs)
    a, conj_b = _apply_q(qs, h), _apply_q_inv_t(qs, v)
    new_q, new_lb = [], []
    for i, (q, lb) in enumerate(zip(qs, lbs)):
        kind = _kind(q)
        t1, t2 = _gram_along(a, i, kind), _gram_along(conj_b, i, kind)
        if kind == "tri":
            ell = _max_eigenvalue(t1 + t2, power_iter)
            step = _upper(t1 - t2) @ q
        else:
            ell = (t1 + t2).amax(-1) if kind == "diag" else t1 + t2
            step = q * (t1 - t2)
        # ell <- max(ell, lb + (1 - beta_l) (ell - lb)), kept in float64
        ell = torch.maximum(ell.to(torch.float64), lb + (ell - lb) * (1 - lb_beta))
        new_lb.append(ell)
        new_q.append(q - step / _bcast(ell.to(q.dtype), 0, q.ndim) * precond_lr)
    return new_q, new_lb


# --------------------------------------------------------------------------- the probe draw


@torch.library.custom_op("funcopt::psgd_probe", mutates_args=())
def _probe_op(rng: Tensor, shape: Sequence[int], dtype: torch.dtype, device: torch.device
              ) -> tuple[Tensor, Tensor]:
    """A standard normal draw of ``shape`` from the generator whose state is ``rng``, and the
    generator's state after it: the eager draw as one op, so that ``torch.compile`` keeps it
    in its graph and ``torch.func.vmap`` batches it by the rule below."""
    gen = torch.Generator(device=device)
    gen.set_state(rng.clone())  # a copy: set_state on a view into a larger tensor crashes
    v = torch.randn(tuple(shape), dtype=dtype, device=device, generator=gen)
    return v, gen.get_state()


@_probe_op.register_fake
def _probe_fake(rng, shape, dtype, device):
    return torch.empty(tuple(shape), dtype=dtype, device=device), torch.empty_like(rng)


def _probe_vmap(info, in_dims, rng, shape, dtype, device):
    """Under vmap: one draw when the generator state is shared (not batched), as every element
    of a loop whose transforms were built with the same ``seed`` would draw; one draw per
    element from its own generator state when the state is batched."""
    if in_dims[0] is None:
        return _probe_op(rng, shape, dtype, device), (None, None)
    rows = [_probe_op(r, shape, dtype, device) for r in rng.movedim(in_dims[0], 0).unbind(0)]
    return (torch.stack([v for v, _ in rows]), torch.stack([r for _, r in rows])), (0, 0)


_probe_op.register_vmap(_probe_vmap)


def _initial_scale(g: Tensor, scale, scale_scale, scale_power) -> Tensor:
    """HeavyBall's automatic initial scale ``(mean(g^4)^{-1/8} * scale_scale)^power``."""
    if scale is not None:
        return torch.as_tensor(float(scale), dtype=torch.float64, device=g.device)
    x = g.double().abs().clamp(min=1e-12).log().mul(4).flatten()
    lse = (torch.logsumexp(x, 0) - math.log(max(g.numel(), 1))) / 8
    s = (torch.exp(-lse) * scale_scale) ** (0.5 if scale_power is None else scale_power)
    return torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s))


def _select(cond, new: list[Tensor], old: list[Tensor]) -> list[Tensor]:
    """``new`` where ``cond`` holds, else ``old``: a Python bool in eager steps, a bool tensor
    (``torch.where``, no host read) in traced ones."""
    if isinstance(cond, Tensor):
        return [torch.where(cond, a, b) for a, b in zip(new, old)]
    return new if cond else old


class _Probes:
    """The probe draws of one step, bucket after bucket, from the generator state ``rng``.

    Eager: one ``torch.Generator`` on ``device`` (as HeavyBall's ``randn_like`` on the global
    one). Traced: the same draws through the ``funcopt::psgd_probe`` op, which
    ``torch.compile`` keeps in its graph and ``vmap`` batches; the generator state is threaded
    from draw to draw, and :meth:`state` keeps the old one where no fit ran.
    """

    def __init__(self, rng: Tensor, device: torch.device, traced: bool):
        self.start, self.rng, self.traced = rng, rng, traced
        if not traced:
            self.gen = torch.Generator(device=device)
            self.gen.set_state(rng)

    def __call__(self, b: Tensor) -> Tensor:
        if self.traced:
            v, self.rng = _probe_op(self.rng, list(b.shape), b.dtype, b.device)
            return v
        return torch.randn(b.shape, dtype=b.dtype, device=b.device, generator=self.gen)

    def state(self, fit) -> Tensor:
        if not self.traced:
            return self.gen.get_state()
        return torch.where(fit.to(self.rng.device), self.rng, self.start)


def _buckets(leaves: list[Tensor], mu: list[Tensor], qs: list[list[Tensor]]) -> list[list[int]]:
    """Leaf indices grouped by (shape, dtype, device), in order of first appearance.

    HeavyBall stacks such leaves: they share one initial scale and one probe draw. The dtypes
    of the momentum and the factors join the key, so that stacking never promotes a leaf's
    state to another leaf's dtype.
    """
    groups: dict[tuple, list[int]] = {}
    for i, x in enumerate(leaves):
        key = (tuple(x.shape), x.dtype, x.device, mu[i].dtype, qs[i][0].dtype)
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def _scaled(q: list[Tensor], s: Tensor) -> list[Tensor]:
    """The unit factors times ``s^{1/k}`` (``k`` factors; a 0-d leaf's one factor gets ``s``)."""
    return [qi * (s ** (1.0 / len(q))).to(qi.dtype) for qi in q]
