"""Structured square matrices for SINGD's Kronecker factors.

A structure is a small frozen object that maps a tuple of tensors (the *parameters*, what the
optimizer state stores) to and from a dense matrix. Every structure defines three maps first:

* ``to_dense(P)``: the represented ``d x d`` matrix;
* ``extract(M)``: the parameters of a matrix ``M`` that already has the structure
  (``extract(to_dense(P)) == P``);
* ``from_dense(S)``: the projection of a *symmetric* matrix ``S`` onto the structure, as in
  Lin et al. (2024): entries outside the structure are dropped and an off-diagonal block
  that the structure keeps on one side only collects both ``S_ij`` and ``S_ji``.

Every other operation (products, ``from_inner``, traces, adding to the diagonal) is defined
as "do the dense operation, then project" in :class:`Structure`; subclasses override it with
fast paths that give the same numbers (tests check each one against the dense definition).

The set of structures follows the reference package ``singd`` (0.0.5, ``singd/structures``):
``dense``, ``diagonal``, ``block_diagonal(b)`` (``block30diagonal``, ``block3diagonal``),
``hierarchical(k1, k2)`` (``hierarchical15_15``, ``hierarchical3_2``), ``triltoeplitz``,
``triutoeplitz``, ``triltopleftdiag``, ``triutopleftdiag``, ``trilbottomrightdiag``,
``triubottomrightdiag``.

Reference: Lin, Dangel, Eschenhagen, Neklyudov, Kristiadi, Turner, Makhzani, "Structured
Inverse-Free Natural Gradient Descent: Memory-Efficient & Numerically-Stable KFAC",
ICML 2024 (arXiv:2312.05705).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from funcopt.transforms.natural_gradient.kronecker import eye as _eye
from funcopt.transforms.natural_gradient.structure_base import (
    Structure,
    _combine_one,
    _descend_tensor,
)

__all__ = ["Structure", "Dense", "Diagonal", "BlockDiagonal", "Hierarchical", "TrilToeplitz",
           "TriuToeplitz", "TrilCorner", "TriuCorner", "STRUCTURES", "get_structure"]

# --------------------------------------------------------------------------- dense, diagonal


@dataclass(frozen=True)
class Dense(Structure):
    """Unstructured ``d x d`` matrix (parameters: the matrix)."""

    name = "dense"

    def to_dense(self, p):
        return p[0]

    def extract(self, m):
        return (m,)

    from_dense = extract

    def matmul(self, p, x):
        return p[0] @ x

    def rmatmat(self, p, x):
        return p[0].T @ x

    def mul(self, p, q):
        return (p[0] @ q[0],)

    def from_inner(self, p, x=None):
        if x is None:
            return (p[0].T @ p[0],)
        s = p[0].T @ x
        return (s @ s.T,)

    def from_rows(self, p, r):
        s = r @ p[0]            # (r P)^T (r P) = P^T r^T r P, one transposed view
        return (s.T @ s,)

    def precondition(self, p, x):
        return p[0] @ (p[0].T @ x)

    def precondition_rows(self, p, x):
        return (x @ p[0]) @ p[0].T

    def average_trace(self, p):
        return p[0].diagonal().mean()

    def dim(self, p):
        return p[0].shape[0]

    def combine(self, terms, diag):
        return (_combine_one(terms, diag, lambda m, v: m.diagonal().add_(v)),)

    def descend(self, p, m, beta):
        if isinstance(beta, Tensor):
            return (_descend_tensor(p[0], p[0] @ m[0], beta),)
        return (torch.addmm(p[0], p[0], m[0], alpha=-beta),)


@dataclass(frozen=True)
class Diagonal(Structure):
    """Diagonal matrix (parameters: the diagonal vector)."""

    name = "diagonal"

    def to_dense(self, p):
        return torch.diag(p[0])

    def extract(self, m):
        return (m.diagonal().clone(),)

    from_dense = extract

    def eye(self, d, dtype=None, device=None):
        return (torch.ones(d, dtype=dtype or torch.get_default_dtype(), device=device),)

    def matmul(self, p, x):
        return p[0][:, None] * x

    rmatmat = matmul

    def mul(self, p, q):
        return (p[0] * q[0],)

    def from_inner(self, p, x=None):
        sq = p[0] * p[0]
        return (sq if x is None else sq * (x * x).sum(1),)

    def from_rows(self, p, r):
        return (p[0] * p[0] * (r * r).sum(0),)

    def gram_pair(self, p, r):
        sq = p[0] * p[0]        # P^T P, shared with P^T r^T r P
        return (sq * (r * r).sum(0),), (sq,)

    def average_trace(self, p):
        return p[0].mean()

    def diag_add(self, p, value):
        return (p[0] + value,)

    def dim(self, p):
        return p[0].shape[0]

    def combine(self, terms, diag):
        return (_combine_one(terms, diag, lambda m, v: m.add_(v)),)

    def descend(self, p, m, beta):
        if isinstance(beta, Tensor):
            return (_descend_tensor(p[0], p[0] * m[0], beta),)
        return (torch.addcmul(p[0], p[0], m[0], value=-beta),)

    def precondition(self, p, x):
        return (p[0] * p[0])[:, None] * x

    def precondition_rows(self, p, x):
        return x * (p[0] * p[0])


# --------------------------------------------------------------------------- block diagonal


@dataclass(frozen=True)
class BlockDiagonal(Structure):
    """Block-diagonal matrix with ``block_dim x block_dim`` blocks and a smaller last block.

    Parameters: ``(blocks[n, b, b], last[r, r])`` with ``d = n b + r``, ``r < b``.
    """

    block_dim: int = 30
    name = "block_diagonal"

    def _split(self, d):
        return divmod(d, self.block_dim)

    def to_dense(self, p):
        blocks, last = p
        return torch.block_diag(*blocks.unbind(0), last)

    def extract(self, m):
        n, _ = self._split(m.shape[0])
        b = self.block_dim
        core = m[:n * b, :n * b].reshape(n, b, n, b)
        idx = torch.arange(n, device=m.device)
        return core[idx, :, idx, :].clone(), m[n * b:, n * b:].clone()

    from_dense = extract

    def dim(self, p):
        return p[0].shape[0] * self.block_dim + p[1].shape[0]

    def _rows(self, p, x):
        n = p[0].shape[0]
        return x[:n * self.block_dim].reshape(n, self.block_dim, x.shape[1]), x[n * self.block_dim:]

    def matmul(self, p, x):
        xb, xl = self._rows(p, x)
        return torch.cat([torch.bmm(p[0], xb).reshape(-1, x.shape[1]), p[1] @ xl])

    def rmatmat(self, p, x):
        xb, xl = self._rows(p, x)
        return torch.cat([torch.bmm(p[0].transpose(1, 2), xb).reshape(-1, x.shape[1]),
                          p[1].T @ xl])

    def mul(self, p, q):
        return torch.bmm(p[0], q[0]), p[1] @ q[1]

    def from_inner(self, p, x=None):
        if x is None:
            return p[0].transpose(1, 2) @ p[0], p[1].T @ p[1]
        s = self.rmatmat(p, x)
        sb, sl = self._rows(p, s)
        return sb @ sb.transpose(1, 2), sl @ sl.T

    def average_trace(self, p):
        total = p[0].diagonal(dim1=1, dim2=2).sum() + p[1].diagonal().sum()
        return total / self.dim(p)

    def diag_add(self, p, value):
        eb = _eye(self.block_dim, p[0].dtype, p[0].device)
        el = _eye(p[1].shape[0], p[1].dtype, p[1].device)
        return p[0] + value * eb, p[1] + value * el


# --------------------------------------------------------------------------- hierarchical


@dataclass(frozen=True)
class Hierarchical(Structure):
    """Hierarchical matrix ``[[A, B1, B2], [0, diag(c), 0], [0, D, E]]``.

    ``A`` is ``k1 x k1``, ``E`` is ``k2 x k2`` (both dense), ``c`` the diagonal of the middle
    block; parameters ``(A, B, c, D, E)`` with ``B = [B1, B2]``.
    """

    k1: int = 15
    k2: int = 15
    name = "hierarchical"

    def _dims(self, d):
        if d <= self.k1:
            return d, 0, 0
        if d <= self.k1 + self.k2:
            return self.k1, 0, d - self.k1
        return self.k1, d - self.k1 - self.k2, self.k2

    def to_dense(self, p):
        A, B, c, D, E = p
        k1, dd, k2 = A.shape[0], c.shape[0], E.shape[0]
        m = A.new_zeros(k1 + dd + k2, k1 + dd + k2)
        m[:k1, :k1] = A
        m[:k1, k1:] = B
        idx = torch.arange(k1, k1 + dd, device=A.device)
        m[idx, idx] = c
        m[k1 + dd:, k1:k1 + dd] = D
        m[k1 + dd:, k1 + dd:] = E
        return m

    def _parts(self, m, off: float):
        k1, dd, _ = self._dims(m.shape[0])
        return (m[:k1, :k1].clone(), off * m[:k1, k1:], m.diagonal()[k1:k1 + dd].clone(),
                off * m[k1 + dd:, k1:k1 + dd], m[k1 + dd:, k1 + dd:].clone())

    def extract(self, m):
        return self._parts(m, 1.0)

    def from_dense(self, s):
        return self._parts(s, 2.0)

    def average_trace(self, p):
        A, _, c, _, E = p
        return (A.diagonal().sum() + c.sum() + E.diagonal().sum()) / self.dim(p)

    def dim(self, p):
        return p[0].shape[0] + p[2].shape[0] + p[4].shape[0]


# --------------------------------------------------------------------------- triangular Toeplitz


def _diagonal_sums(m: Tensor) -> tuple[Tensor, Tensor]:
    """Sums of the lower (k = 0..d-1 below) and upper diagonals of ``m``.

    Each as one strided reduction: below ``d`` rows of zeros, the element ``(k, i)`` of the
    view with strides ``(d, d + 1)`` is ``m[i + k, i]`` (a sum over a scatter-add would
    serialise on atomic adds into ``d`` bins on a GPU, and not be deterministic)."""
    d = m.shape[0]
    pad = m.new_zeros(d, d)
    lower = torch.cat([m, pad]).as_strided((d, d), (d, d + 1)).sum(1)
    upper = torch.cat([m.T, pad]).as_strided((d, d), (d, d + 1)).sum(1)
    return lower, upper


@dataclass(frozen=True)
class TrilToeplitz(Structure):
    """Lower-triangular Toeplitz matrix; parameters: the lower diagonals' values ``d_0..d_{K-1}``."""

    name = "triltoeplitz"
    lower = True

    def to_dense(self, p):
        v = p[0]
        d = v.shape[0]
        i = torch.arange(d, device=v.device)
        k = i[:, None] - i[None, :] if self.lower else i[None, :] - i[:, None]
        return torch.where(k >= 0, v[k.clamp(min=0)], v.new_zeros(()))

    def _means(self, m, both: bool):
        lower, upper = _diagonal_sums(m)
        own, other = (lower, upper) if self.lower else (upper, lower)
        total = own + other if both else own
        if both:
            total = torch.cat([own[:1], total[1:]])   # the main diagonal counts once
        d = m.shape[0]
        return (total / torch.arange(d, 0, -1, dtype=m.dtype, device=m.device),)

    def extract(self, m):
        return self._means(m, both=False)

    def from_dense(self, s):
        return self._means(s, both=True)

    def average_trace(self, p):
        return p[0][0]

    def dim(self, p):
        return p[0].shape[0]


@dataclass(frozen=True)
class TriuToeplitz(TrilToeplitz):
    """Upper-triangular Toeplitz matrix; parameters: the upper diagonals' values."""

    name = "triutoeplitz"
    lower = False


# --------------------------------------------------------------------------- triangular corners


@dataclass(frozen=True)
class TrilCorner(Structure):
    """Lower-triangular ``[[A, 0], [b, C]]`` with one block diagonal and the other ``1 x 1``.

    ``diag_top_left=True`` (``triltopleftdiag``): ``A`` diagonal ``(d-1)``, ``C`` a scalar,
    ``b`` a row. ``False`` (``trilbottomrightdiag``): ``A`` a scalar, ``C`` diagonal ``(d-1)``,
    ``b`` a column. Parameters ``(A, b, C)`` with diagonal blocks stored as vectors.
    """

    diag_top_left: bool = True
    name = "tril_corner"
    lower = True

    def _boundary(self, d):
        return max(0, d - 1) if self.diag_top_left else min(1, d)

    def _block(self, t, is_diag):
        return torch.diag(t) if is_diag else t

    def to_dense(self, p):
        a, b, c = p
        ta, tc = self.diag_top_left, not self.diag_top_left
        m = torch.block_diag(self._block(a, ta), self._block(c, tc))
        n = a.shape[0]
        if self.lower:
            m[n:, :n] = b
        else:
            m[:n, n:] = b
        return m

    def _parts(self, m, fold: bool):
        n = self._boundary(m.shape[0])
        ta = self.diag_top_left
        a, c = m[:n, :n], m[n:, n:]
        a = a.diagonal().clone() if ta else a.clone()
        c = c.clone() if ta else c.diagonal().clone()
        low, up = m[n:, :n], m[:n, n:]
        b = low if self.lower else up
        if fold:
            b = b + (up.T if self.lower else low.T)
        return a, b.clone(), c

    def extract(self, m):
        return self._parts(m, fold=False)

    def from_dense(self, s):
        return self._parts(s, fold=True)

    def dim(self, p):
        return p[0].shape[0] + p[2].shape[0]


@dataclass(frozen=True)
class TriuCorner(TrilCorner):
    """Upper-triangular ``[[A, b], [0, C]]``; see :class:`TrilCorner`."""

    name = "triu_corner"
    lower = False


STRUCTURES: dict[str, Structure] = {
    "dense": Dense(),
    "diagonal": Diagonal(),
    "block30diagonal": BlockDiagonal(30),
    "block3diagonal": BlockDiagonal(3),
    "hierarchical15_15": Hierarchical(15, 15),
    "hierarchical3_2": Hierarchical(3, 2),
    "triltoeplitz": TrilToeplitz(),
    "triutoeplitz": TriuToeplitz(),
    "triltopleftdiag": TrilCorner(True),
    "trilbottomrightdiag": TrilCorner(False),
    "triutopleftdiag": TriuCorner(True),
    "triubottomrightdiag": TriuCorner(False),
}


def get_structure(structure: str | Structure) -> Structure:
    """A :class:`Structure` from its name (a key of :data:`STRUCTURES`) or itself."""
    if isinstance(structure, Structure):
        return structure
    if structure not in STRUCTURES:
        raise ValueError(f"unknown structure {structure!r}: pass one of {sorted(STRUCTURES)} or "
                         "a Structure such as BlockDiagonal(16) or Hierarchical(8, 8)")
    return STRUCTURES[structure]
