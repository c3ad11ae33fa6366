"""Linear operators with structure tags: the ``A`` of ``A x = b``.

An operator knows its shape, dtype and device, whether it is symmetric and positive definite
(tags that solvers use to choose a method), how to apply itself to a vector (``matvec``) and,
when asked, how to become a dense matrix (``as_matrix``). Build one with :func:`dense`,
:func:`gram`, :func:`gram_dual`, :func:`matrix_free`, :func:`block_diagonal` or
:func:`gauss_newton`; solve with a :class:`~funcopt.solvers.base.LinearSolver`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "LinearOperator",
    "DenseOperator",
    "GramOperator",
    "MatrixFreeOperator",
    "BlockDiagonalOperator",
    "dense",
    "gram",
    "gram_dual",
    "matrix_free",
    "block_diagonal",
    "gauss_newton",
    "scaled_norm",
]

class LinearOperator:
    """A linear map ``A`` of shape ``(m, n)`` with structure tags."""

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device
    symmetric: bool = False
    positive_definite: bool = False

    def matvec(self, x: Tensor) -> Tensor:
        """``A @ x`` for ``x`` of shape ``(n,)`` or ``(n, k)``."""
        raise NotImplementedError

    def as_matrix(self) -> Tensor:
        """The dense ``(m, n)`` matrix."""
        raise NotImplementedError

    def diagonal(self) -> Tensor:
        """The diagonal of ``A`` (used by the Jacobi preconditioner)."""
        return torch.diagonal(self.as_matrix())

    def check_finite(self) -> None:
        """Raise ValueError when the operator's data holds NaN or inf (one host sync)."""

    @property
    def square(self) -> bool:
        return self.shape[0] == self.shape[1]


def scaled_norm(v: Tensor, dim: int | None = None) -> Tensor:
    """The Euclidean norm ``||v||_2`` computed as ``c * ||v / c||`` with ``c = max |v|``, so it
    neither overflows nor underflows when the norm itself is representable (MINPACK's
    ``enorm``, LAPACK's ``dnrm2`` do the same). ``dim``: None for the whole tensor, or the
    dimension to reduce (e.g. 0 for column norms). NaN in, NaN out; inf in, inf out.

    ``c`` is ``max |v|`` clamped to ``[tiny, max]`` of the dtype: 0 (a zero ``v``, norm 0)
    becomes ``tiny`` and inf (norm inf) the largest number, a NaN stays NaN (norm NaN); the
    clamp also moves a maximum below ``tiny`` (all of ``v`` subnormal) to ``tiny``, a power of
    two. Five operations (see :func:`max_and_norm`).
    """
    if dim is None:
        return max_and_norm(v)[1]
    s = torch.linalg.vector_norm(v, float("inf"), dim=dim, keepdim=True)  # max |v|
    c = _norm_scale(s)
    return (torch.linalg.vector_norm(v / c, dim=dim, keepdim=True) * c).squeeze(dim)


def max_and_norm(v: Tensor) -> tuple[Tensor, Tensor]:
    """``(max |v|, ||v||_2)`` over all of ``v`` (0-d tensors), the norm as :func:`scaled_norm`
    computes it. ``max |v|`` is NaN where ``v`` holds a NaN, so ``v`` is finite exactly where
    ``max |v| <= finfo.max``."""
    s = torch.linalg.vector_norm(v, float("inf"))
    c = _norm_scale(s)
    return s, torch.linalg.vector_norm(v / c) * c


def norm_parts(v: Tensor) -> tuple[Tensor, Tensor]:
    """``(c, ||v / c||)`` over all of ``v``, whose product (one rounding) is :func:`scaled_norm`'s
    ``||v||``: for a caller that multiplies them elsewhere (on the host)."""
    c = _norm_scale(torch.linalg.vector_norm(v, float("inf")))
    return c, torch.linalg.vector_norm(v / c)


def _norm_scale(s: Tensor) -> Tensor:
    """``s`` (a maximum magnitude) clamped to ``[tiny, max]`` of its dtype; NaN stays NaN."""
    info = torch.finfo(s.dtype)
    return s.clamp(info.tiny, info.max)


def _require_finite(t: Tensor, what: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(
            f"{what} contains NaN or inf; a linear solve of non-finite data has no meaning. "
            "Check the computation that produced it (e.g. the residuals or the Jacobian)."
        )


def _require_float(t: Tensor, what: str) -> None:
    if not (t.is_floating_point() or t.is_complex()):
        raise TypeError(f"{what} must be a floating-point tensor; got dtype {t.dtype}")


class DenseOperator(LinearOperator):
    """A dense matrix ``A`` (``(m, n)``; square for most solvers)."""

    def __init__(self, A: Tensor, *, symmetric: bool = False, positive_definite: bool = False):
        if not isinstance(A, Tensor) or A.ndim != 2:
            raise ValueError(f"dense: A must be a 2-D tensor; got {getattr(A, 'shape', A)!r}")
        _require_float(A, "dense: A")
        if (symmetric or positive_definite) and A.shape[0] != A.shape[1]:
            raise ValueError(f"dense: a symmetric matrix must be square; got shape {tuple(A.shape)}")
        self.A = A
        self.shape = (A.shape[0], A.shape[1])
        self.dtype, self.device = A.dtype, A.device
        self.symmetric = symmetric or positive_definite
        self.positive_definite = positive_definite

    def matvec(self, x: Tensor) -> Tensor:
        return self.A @ x

    def as_matrix(self) -> Tensor:
        return self.A

    def check_finite(self) -> None:
        _require_finite(self.A, "the operator's matrix A")


def _damping_tensor(damping: float | Tensor, like: Tensor) -> Tensor:
    if isinstance(damping, Tensor):
        if damping.ndim != 0:
            raise ValueError(f"damping must be a float or a 0-d tensor; got shape {tuple(damping.shape)}")
        if damping.device.type == "cpu":  # no host sync on the CPU; elsewhere at check_finite
            _require_valid_damping(damping)
        return damping.to(dtype=like.dtype, device=like.device)
    if not isinstance(damping, (int, float)) or isinstance(damping, bool):
        raise TypeError(f"damping must be a float or a 0-d tensor; got {type(damping).__name__}")
    if not damping >= 0:
        raise ValueError(f"damping={damping} must be >= 0 (it is the lambda of J^T J + lambda D)")
    return torch.tensor(float(damping), dtype=like.dtype, device=like.device)


def _require_valid_damping(damping: Tensor) -> None:
    if not bool(damping >= 0):  # False for NaN too
        raise ValueError(f"damping={float(damping)} must be >= 0 (it is the lambda of "
                         "J^T J + lambda D); pass a non-negative number or 0-d tensor")


class GramOperator(LinearOperator):
    """``J^T J + lambda * diag(d)`` (form "primal", ``n x n``) or ``J J^T + lambda * I``
    (form "dual", ``m x m``) for a Jacobian ``J`` of shape ``(m, n)``.

    Symmetric and positive semidefinite; tagged positive definite because it is definite
    whenever ``lambda * d > 0`` (a Cholesky solve reports the cases where it is not).
    ``matvec`` never forms the Gram matrix: it costs two products with ``J``. ``as_matrix``
    forms ``J^T J`` (or ``J J^T``) on every call, unless the operator holds it: ``gram`` (the
    undamped Gram matrix, given or made by :meth:`with_gram`) is kept by :meth:`with_damping`,
    so a Levenberg-Marquardt step that tries several dampings forms it once. Operators are
    never changed after construction.
    """

    def __init__(self, J: Tensor, damping: float | Tensor, diag: Tensor | None = None,
                 *, form: str = "primal", gram: Tensor | None = None):
        if not isinstance(J, Tensor) or J.ndim != 2:
            raise ValueError(f"gram: J must be a 2-D (residuals x unknowns) tensor; got {getattr(J, 'shape', J)!r}")
        _require_float(J, "gram: J")
        if form not in ("primal", "dual"):
            raise ValueError(f"gram: form must be 'primal' or 'dual'; got {form!r}")
        if diag is not None:
            if form == "dual":
                raise ValueError("gram: the dual form J J^T + lambda I takes no diag; "
                                 "scale the columns of J instead (see damped_least_squares)")
            if not isinstance(diag, Tensor) or diag.shape != (J.shape[1],):
                raise ValueError(f"gram: diag must be a tensor of shape ({J.shape[1]},), one entry "
                                 f"per unknown; got {getattr(diag, 'shape', diag)!r}")
            if diag.dtype != J.dtype or diag.device != J.device:
                raise ValueError(f"gram: diag has dtype {diag.dtype} on {diag.device} but J has "
                                 f"{J.dtype} on {J.device}; convert diag with .to(J)")
        self.J, self.diag, self.form = J, diag, form
        self.damping = _damping_tensor(damping, J)
        size = J.shape[1] if form == "primal" else J.shape[0]
        if gram is not None and (not isinstance(gram, Tensor) or gram.shape != (size, size)):
            raise ValueError(f"gram: the formed Gram matrix must have shape ({size}, {size}); "
                             f"got {getattr(gram, 'shape', gram)!r}")
        self.gram = gram
        self.shape = (size, size)
        self.dtype, self.device = J.dtype, J.device
        self.symmetric = self.positive_definite = True

    def _damp(self, x: Tensor) -> Tensor:
        if self.diag is None:
            return self.damping * x
        d = self.diag if x.ndim == 1 else self.diag[:, None]
        return self.damping * d * x

    def matvec(self, x: Tensor) -> Tensor:
        J = self.J
        if self.form == "primal":
            return J.mT @ (J @ x) + self._damp(x)
        return J @ (J.mT @ x) + self._damp(x)

    def with_damping(self, damping: float | Tensor) -> GramOperator:
        """The same operator with another ``lambda``, holding the same ``gram`` (if any)."""
        return GramOperator(self.J, damping, self.diag, form=self.form, gram=self.gram)

    def with_gram(self) -> GramOperator:
        """The same operator holding its undamped Gram matrix ``J^T J`` (or ``J J^T``),
        formed now (once) and shared by every operator :meth:`with_damping` makes from it."""
        if self.gram is not None:
            return self
        J = self.J
        G = _gram_matrix(J.mT if self.form == "primal" else J)
        return GramOperator(J, self.damping, self.diag, form=self.form, gram=G)

    def as_matrix(self) -> Tensor:
        G = self.gram
        if G is None:  # exactly symmetric, as a formed Gram matrix is
            G = _gram_matrix(self.J.mT if self.form == "primal" else self.J)
        d = self.damping if self.diag is None else self.damping * self.diag
        return torch.diagonal_scatter(G, G.diagonal() + d)  # one copy of G

    def diagonal(self) -> Tensor:
        d = (self.J * self.J).sum(0 if self.form == "primal" else 1)
        return d + (self.damping * self.diag if self.diag is not None else self.damping)

    def check_finite(self) -> None:
        """Raise ValueError when ``J``, the damping or ``diag`` is not finite, the damping is
        negative, or the Gram matrix overflows: its largest diagonal entry, the squared norm of
        a column (primal) or row (dual) of ``J``, exceeds the dtype's range."""
        _require_finite(self.J, "the Jacobian J")
        _require_finite(self.damping, "the damping")
        _require_valid_damping(self.damping)
        if self.diag is not None:
            _require_finite(self.diag, "the scaling diag")
        norms = scaled_norm(self.J, dim=0 if self.form == "primal" else 1)
        big = norms.max() if norms.numel() else torch.zeros((), dtype=norms.dtype)
        if not bool(torch.isfinite(big * big)):
            what = "J^T J" if self.form == "primal" else "J J^T"
            raise ValueError(
                f"the Gram matrix {what} overflows {self.dtype}: J has a "
                f"{'column' if self.form == 'primal' else 'row'} of norm {float(big):.3g}, whose "
                "square is not finite. Rescale the problem (divide J and r by a constant), or use "
                "solvers.damped_least_squares, which rescales J itself")


def _gram_matrix(A: Tensor) -> Tensor:
    """``A A^T``, exactly symmetric; a large one from its blocks on and below the diagonal:
    ``A`` split into at most 16 blocks of at least 32 rows, block ``i`` times the rows of blocks
    ``>= i``, and the blocks above the diagonal copied from those below. With 16 blocks that
    is 17/32 of the multiplications of one matrix product (a symmetric rank-k update, which
    torch does not offer). On the CPU (one thread, float32) ``J J^T`` for ``J`` of 512 x 10^4
    took 21 ms against 47 ms as one product (33 ms with 8 blocks), and of 1024 x 3 10^4 283 ms
    against 455 ms. The blocks cost some 240 more operations, which outweigh the work saved
    below :data:`GRAM_BLOCK_WORK` multiply-adds (``m^2 n`` for ``A`` of ``m x n``): there,
    and for ``A`` of at most 32 rows, it is one product.

    A matrix product ``B B^T`` need not be symmetric: a BLAS may sum entry ``(i, j)`` and entry
    ``(j, i)`` in different orders (MKL's double precision kernels on an AMD CPU with AVX2 do,
    from 8 rows on), so the upper triangle of the product, or of each diagonal block, is
    replaced by its lower one (:func:`_mirror_lower_`: 4 more operations for one product; 80
    of the blocks' 240, 0.1 ms for 16 blocks of 32 rows on one CPU thread)."""
    m = A.shape[0]
    k = max(32, -(-m // 16))
    if m <= k or m * m * A.shape[1] < GRAM_BLOCK_WORK[A.device.type == "cpu"]:
        return _mirror_lower_(A @ A.mT)
    G = A.new_empty(m, m)
    for i, (Gr, Gc) in enumerate(zip(G.split(k), G.split(k, dim=1))):
        Gc[i * k:] = A[i * k:] @ A[i * k:(i + 1) * k].mT
        _mirror_lower_(Gc[i * k:(i + 1) * k])
        Gr[:, (i + 1) * k:] = Gc[(i + 1) * k:].mT
    return G


def _mirror_lower_(G: Tensor) -> Tensor:
    """The square ``G`` (a view, or a batch of them) with its strict upper triangle set, in
    place, to the transpose of its strict lower one. The entries on and below the diagonal
    keep their values (a zero its sign only up to ``-0 + 0 = +0``): a product that was
    symmetric is unchanged, and a solver that reads the lower triangle sees the same matrix."""
    G.tril_()
    G += G.mT.triu(1)  # ``triu`` copies before the sum: no entry is read after it is written
    return G


GRAM_BLOCK_WORK = (2**38, 2**29)
"""Multiply-adds of ``A A^T`` (``m^2 n``) from which :func:`_gram_matrix` forms it by blocks:
on a GPU (first number) and on the CPU (second). The extra operations of the blocks cost about
1 ms to launch on an H100 when they were 150 (some 1.5 ms for the 240 now) and 0.8 ms on one
CPU thread; half of ``2^38`` multiply-adds is some 5 ms of an H100's float32 work, half of
``2^29`` some 3 ms of one CPU thread."""


class MatrixFreeOperator(LinearOperator):
    """An operator given only by its action ``v -> A v`` on vectors of shape ``(n,)``."""

    def __init__(self, fn: Callable[[Tensor], Tensor], size: int, *, dtype: torch.dtype,
                 device: torch.device | str, symmetric: bool = False,
                 positive_definite: bool = False):
        if not callable(fn):
            raise TypeError(f"matrix_free: matvec must be callable; got {type(fn).__name__}")
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"matrix_free: size must be a positive int; got {size!r}")
        self.fn = fn
        self.shape = (size, size)
        self.dtype, self.device = dtype, torch.device(device)
        self.symmetric = symmetric or positive_definite
        self.positive_definite = positive_definite

    def matvec(self, x: Tensor) -> Tensor:
        if x.ndim == 1:
            return self.fn(x)
        try:
            return torch.func.vmap(self.fn, in_dims=1, out_dims=1)(x)
        except Exception:  # a matvec that vmap cannot trace: apply it column by column
            return torch.stack([self.fn(c) for c in x.unbind(1)], dim=1)

    def as_matrix(self) -> Tensor:
        """Materialise ``A`` by applying it to the identity (``n`` matvecs)."""
        return self.matvec(torch.eye(self.shape[0], dtype=self.dtype, device=self.device))


class BlockDiagonalOperator(LinearOperator):
    """``diag(A_1, ..., A_p)``: solvers solve each block on its own."""

    def __init__(self, blocks: Sequence[LinearOperator | Tensor]):
        ops = [b if isinstance(b, LinearOperator) else DenseOperator(b) for b in blocks]
        if not ops:
            raise ValueError("block_diagonal: give at least one block")
        for i, op in enumerate(ops):
            if not op.square:
                raise ValueError(f"block_diagonal: block {i} has shape {op.shape}; blocks must be square")
            if op.dtype != ops[0].dtype or op.device != ops[0].device:
                raise ValueError(f"block_diagonal: block {i} is {op.dtype} on {op.device}, block 0 is "
                                 f"{ops[0].dtype} on {ops[0].device}; convert the blocks to one dtype and device")
        self.blocks = ops
        self.sizes = [op.shape[0] for op in ops]
        n = sum(self.sizes)
        self.shape = (n, n)
        self.dtype, self.device = ops[0].dtype, ops[0].device
        self.symmetric = all(op.symmetric for op in ops)
        self.positive_definite = all(op.positive_definite for op in ops)

    def split(self, x: Tensor) -> list[Tensor]:
        return list(torch.split(x, self.sizes, dim=0))

    def matvec(self, x: Tensor) -> Tensor:
        return torch.cat([op.matvec(p) for op, p in zip(self.blocks, self.split(x))], dim=0)

    def as_matrix(self) -> Tensor:
        return torch.block_diag(*[op.as_matrix() for op in self.blocks])

    def diagonal(self) -> Tensor:
        return torch.cat([op.diagonal() for op in self.blocks])

    def check_finite(self) -> None:
        for op in self.blocks:
            op.check_finite()


# --------------------------------------------------------------------------- constructors


def dense(A: Tensor, *, symmetric: bool = False, positive_definite: bool = False) -> DenseOperator:
    """The operator of a dense matrix ``A`` (shape ``(m, n)``).

    Args:
        A: the matrix.
        symmetric: tag ``A = A^T`` (default False); lets "auto" use eigh/LDL-free paths.
        positive_definite: tag ``A`` symmetric positive definite (default False); lets "auto"
            use Cholesky (with a fallback when the factorisation fails).
    """
    return DenseOperator(A, symmetric=symmetric, positive_definite=positive_definite)


def gram(J: Tensor, damping: float | Tensor, diag: Tensor | str | None = None) -> GramOperator:
    """The damped Gram operator ``J^T J + lambda * D`` of the Gauss-Newton / Levenberg-Marquardt
    normal equations (Levenberg 1944; Marquardt 1963).

    Args:
        J: the Jacobian, shape ``(m, n)`` (m residuals, n unknowns).
        damping: ``lambda >= 0``, a float or a 0-d tensor.
        diag: ``D = diag(diag)``: None for ``D = I`` (Levenberg), a tensor of shape ``(n,)``,
            or ``"marquardt"`` for ``D = diag(J^T J)`` (Marquardt's scaling).
    """
    if isinstance(diag, str):
        if diag != "marquardt":
            raise ValueError(f"gram: diag must be None, a tensor or 'marquardt'; got {diag!r}")
        diag = (J * J).sum(0)
    return GramOperator(J, damping, diag, form="primal")


def gram_dual(J: Tensor, damping: float | Tensor) -> GramOperator:
    """The dual Gram operator ``J J^T + lambda * I`` (``m x m``), cheaper than ``J^T J`` when
    there are fewer residuals m than unknowns n: ``(J^T J + lambda I)^{-1} J^T r =
    J^T (J J^T + lambda I)^{-1} r``.

    Args:
        J: the Jacobian, shape ``(m, n)``.
        damping: ``lambda >= 0``, a float or a 0-d tensor.
    """
    return GramOperator(J, damping, None, form="dual")


def matrix_free(matvec: Callable[[Tensor], Tensor], size: int, *, dtype: torch.dtype,
                device: torch.device | str, symmetric: bool = False,
                positive_definite: bool = False) -> MatrixFreeOperator:
    """An operator known only through ``matvec(v) = A v`` for ``v`` of shape ``(size,)``.

    Args:
        matvec: the product; batched right-hand sides are applied through ``torch.func.vmap``
            (column by column when the function cannot be vmapped).
        size: n, the length of ``v``.
        dtype, device: those of ``v`` and ``A v``.
        symmetric, positive_definite: structure tags (default False); CG needs both.
    """
    return MatrixFreeOperator(matvec, size, dtype=dtype, device=device, symmetric=symmetric,
                              positive_definite=positive_definite)


def block_diagonal(blocks: Sequence[LinearOperator | Tensor]) -> BlockDiagonalOperator:
    """``diag(A_1, ..., A_p)`` from operators or dense square tensors; each block is solved
    on its own (tags: symmetric / positive definite when every block is)."""
    return BlockDiagonalOperator(blocks)


def gauss_newton(residual_fn: Callable[[Tensor], Tensor], x: Tensor, damping: float | Tensor,
                 diag: Tensor | None = None) -> MatrixFreeOperator:
    """The matrix-free damped Gauss-Newton operator ``v -> J^T (J v) + lambda * D v`` with
    ``J = d residual_fn / d x`` at ``x``, from ``torch.func.jvp`` (J v) and ``torch.func.vjp``
    (J^T u); J is never formed.

    Args:
        residual_fn: maps a flat parameter vector ``x`` (shape ``(n,)``) to residuals ``(m,)``.
        x: the point of linearisation.
        damping: ``lambda >= 0``.
        diag: ``D = diag(diag)`` (shape ``(n,)``) or None for ``D = I``.
    """
    lam = _damping_tensor(damping, x)
    vjp_fn = torch.func.vjp(residual_fn, x)[1]  # (output, pullback); the pullback only

    def matvec(v: Tensor) -> Tensor:
        jv = torch.func.jvp(residual_fn, (x,), (v,))[1]
        out = vjp_fn(jv)[0]
        return out + lam * (v if diag is None else diag * v)

    return MatrixFreeOperator(matvec, x.numel(), dtype=x.dtype, device=x.device,
                              positive_definite=True)


def check_rhs(operator: LinearOperator, b: Tensor) -> None:
    """Raise a clear error when ``b`` does not fit ``operator``."""
    if not isinstance(operator, LinearOperator):
        raise TypeError(f"solve: operator must be a LinearOperator (make one with solvers.dense, "
                        f"solvers.gram, ...); got {type(operator).__name__}")
    if not isinstance(b, Tensor) or b.ndim not in (1, 2) or b.shape[0] != operator.shape[0]:
        raise ValueError(f"solve: b must have shape ({operator.shape[0]},) or ({operator.shape[0]}, k) "
                         f"for an operator of shape {operator.shape}; got {getattr(b, 'shape', b)!r}")
    if b.dtype != operator.dtype or b.device != operator.device:
        raise ValueError(f"solve: b is {b.dtype} on {b.device} but the operator is {operator.dtype} "
                         f"on {operator.device}; convert b with b.to(dtype, device)")
