"""The base of SINGD's factor structures: :class:`Structure` (the dense definitions every
structure starts from) and the helpers its fast paths share. The structures themselves and
their names are in :mod:`funcopt.transforms.natural_gradient.structures`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from funcopt.engine import ops
from funcopt.transforms.natural_gradient.kronecker import cast as _cast
from funcopt.transforms.natural_gradient.kronecker import eye as _eye

__all__ = ["Structure", "lincomb"]


Params = tuple[Tensor, ...]


@dataclass(frozen=True)
class Structure:
    """Base class: everything defined through ``to_dense``/``extract``/``from_dense``."""

    name = "structure"

    # ----------------------------------------------------------------- the three maps
    def to_dense(self, p: Params) -> Tensor:
        raise NotImplementedError

    def extract(self, m: Tensor) -> Params:
        raise NotImplementedError

    def from_dense(self, s: Tensor) -> Params:
        raise NotImplementedError

    # ----------------------------------------------------------------- constructors
    def eye(self, d: int, dtype: torch.dtype | None = None,
            device: torch.device | str | None = None) -> Params:
        return self.extract(_eye(d, dtype or torch.get_default_dtype(), device))

    def zeros(self, d: int, dtype: torch.dtype | None = None,
              device: torch.device | str | None = None) -> Params:
        return tuple(torch.zeros_like(t) for t in self.eye(d, dtype, device))

    # ----------------------------------------------------------------- operations
    def matmul(self, p: Params, x: Tensor) -> Tensor:
        """``P @ x`` for a dense ``x``."""
        return self.to_dense(p) @ x

    def rmatmat(self, p: Params, x: Tensor) -> Tensor:
        """``P^T @ x`` for a dense ``x``."""
        return self.to_dense(p).T @ x

    def mul(self, p: Params, q: Params) -> Params:
        """The product ``P Q`` (the structures are closed under multiplication)."""
        return self.extract(self.to_dense(p) @ self.to_dense(q))

    def from_inner(self, p: Params, x: Tensor | None = None) -> Params:
        """``from_dense(P^T x x^T P)`` (``x = I`` when None)."""
        s = self.to_dense(p).T if x is None else self.rmatmat(p, x)
        return self.from_dense(s @ s.T)

    def from_rows(self, p: Params, r: Tensor) -> Params:
        """``from_dense(P^T r^T r P)`` for the rows ``r`` (``n x d``): ``from_inner(p, r^T)``."""
        return self.from_inner(p, r.T)

    def gram_pair(self, p: Params, r: Tensor) -> tuple[Params, Params]:
        """``(from_rows(p, r), from_inner(p))``, the two projections of a SINGD refresh
        (a structure may share work between them)."""
        return self.from_rows(p, r), self.from_inner(p)

    def average_trace(self, p: Params) -> Tensor:
        """``tr(P) / d`` as a 0-d tensor."""
        return self.to_dense(p).diagonal().mean()

    def diag_add(self, p: Params, value: float | Tensor) -> Params:
        """``P + value * I``."""
        d = self.dim(p)
        m = self.to_dense(p)
        return self.extract(m + value * _eye(d, m.dtype, m.device))

    def inf_norm(self, p: Params) -> Tensor:
        """The largest absolute stored entry (0-d tensor)."""
        return torch.stack([t.abs().max() for t in p if t.numel() > 0]).max()

    def dim(self, p: Params) -> int:
        return self.to_dense(p).shape[0]

    def combine(self, terms: list[Term], diag: float) -> Params:
        """``sum_i c_i t_i P_i + diag * I`` for terms ``(P_i, c_i, t_i)``: ``c_i`` a number,
        ``t_i`` a 0-d tensor or None (1)."""
        out = lincomb([(q, c if t is None else t * c) for q, c, t in terms])
        return self.diag_add(out, diag) if diag else out

    def descend(self, p: Params, m: Params, beta: float | Tensor) -> Params:
        """``P - beta P M`` (SINGD's step on a factor: ``P (I - beta M)``)."""
        return lincomb([(p, 1.0), (self.mul(p, m), -beta)])

    def precondition(self, p: Params, x: Tensor) -> Tensor:
        """``P P^T x`` for a dense ``x``."""
        return self.matmul(p, self.rmatmat(p, x))

    def precondition_rows(self, p: Params, x: Tensor) -> Tensor:
        """``x P P^T`` for a dense ``x`` (``m x d``): ``precondition(p, x^T)^T``."""
        return self.precondition(p, x.T).T


Term = tuple[Params, float, "Tensor | None"]


def _combine_one(terms: list[Term], diag: float, add_diag) -> Tensor:
    """:meth:`Structure.combine` for structures stored as one tensor, in few kernels: the
    tensor coefficients enter through ``addcmul`` (no kernel of their own)."""
    (q0, c0, t0), rest = terms[0], terms[1:]
    # out of place: under vmap an unbatched ``out`` cannot take a batched term in place
    out = q0[0] * c0 if t0 is None else (q0[0] * t0) * c0
    for q, c, t in rest:
        if t is None:
            out = torch.add(out, q[0], alpha=c)
        else:
            out = torch.addcmul(out, q[0], _cast(t, out.dtype), value=c)
    if diag:
        add_diag(out, diag)  # in place on a new tensor, by a number
    return out


def _descend_tensor(p: Tensor, pm: Tensor, beta: Tensor) -> Tensor:
    """``p - beta * pm`` (``pm = p m``) for a 0-d tensor ``beta``."""
    return torch.addcmul(p, pm, _cast(beta, p.dtype), value=-1.0)


def lincomb(terms: list[tuple[Params, float | Tensor]]) -> Params:
    """``sum_i c_i P_i`` over parameter tuples of one structure."""
    (p0, c0), rest = terms[0], terms[1:]
    out = ops.mul(list(p0), c0)
    for p, c in rest:
        out = ops.add(out, ops.mul(list(p), c))
    return tuple(out)
