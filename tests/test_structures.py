"""Structured matrices: fast paths equal "dense op then project", and the singd package."""

import warnings

import pytest
import torch

from funcopt.transforms.natural_gradient.structure_base import lincomb
from funcopt.transforms.natural_gradient.structures import (
    STRUCTURES,
    BlockDiagonal,
    Structure,
    get_structure,
)

singd_structures = pytest.importorskip("singd.structures.base")
from singd.structures.blockdiagonal import Block3DiagonalMatrix, Block30DiagonalMatrix  # noqa: E402
from singd.structures.dense import DenseMatrix  # noqa: E402
from singd.structures.diagonal import DiagonalMatrix  # noqa: E402
from singd.structures.hierarchical import Hierarchical3_2Matrix, Hierarchical15_15Matrix  # noqa: E402
from singd.structures.trilbottomrightdiag import TrilBottomRightDiagonalMatrix  # noqa: E402
from singd.structures.triltoeplitz import TrilToeplitzMatrix  # noqa: E402
from singd.structures.triltopleftdiag import TrilTopLeftDiagonalMatrix  # noqa: E402
from singd.structures.triubottomrightdiag import TriuBottomRightDiagonalMatrix  # noqa: E402
from singd.structures.triutoeplitz import TriuToeplitzMatrix  # noqa: E402
from singd.structures.triutopleftdiag import TriuTopLeftDiagonalMatrix  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small matrices: one thread is fastest, and the CI machine is shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

PACKAGE = {
    "dense": DenseMatrix, "diagonal": DiagonalMatrix, "block30diagonal": Block30DiagonalMatrix,
    "block3diagonal": Block3DiagonalMatrix, "hierarchical15_15": Hierarchical15_15Matrix,
    "hierarchical3_2": Hierarchical3_2Matrix, "triltoeplitz": TrilToeplitzMatrix,
    "triutoeplitz": TriuToeplitzMatrix, "triltopleftdiag": TrilTopLeftDiagonalMatrix,
    "trilbottomrightdiag": TrilBottomRightDiagonalMatrix,
    "triutopleftdiag": TriuTopLeftDiagonalMatrix,
    "triubottomrightdiag": TriuBottomRightDiagonalMatrix,
}
DIMS = [1, 2, 7, 33]


class PackageBlockDiagonal(BlockDiagonal):
    """The package's block-diagonal matrix multiplies by ``K`` where its own definition (and
    ours) multiplies by ``K^T`` (``rmatmat`` and ``from_inner``); this reproduces that, so the
    SINGD comparison can show it is the only difference."""

    def rmatmat(self, p, x):
        return self.matmul(p, x)

    def from_inner(self, p, x=None):
        blocks, last = p
        if x is None:
            return blocks @ blocks.transpose(1, 2), last @ last.T
        return super().from_inner(p, x)


def package_like(name):
    s = STRUCTURES[name]
    return PackageBlockDiagonal(s.block_dim) if isinstance(s, BlockDiagonal) else s


def test_every_package_structure_is_offered():
    assert set(PACKAGE) == set(STRUCTURES)
    from singd.optim.optimizer import SINGD
    assert set(SINGD.SUPPORTED_STRUCTURES) <= set(STRUCTURES)


def sym(d, seed):
    x = torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return x + x.T


def random_params(s, d, seed):
    """Random parameters: every stored entry drawn independently."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(t.shape, dtype=torch.float64, generator=gen)
                 for t in s.eye(d, torch.float64))


def close32(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("name", sorted(STRUCTURES))
def test_structure_matches_the_package(name, d):
    """In float32: the package's Toeplitz matrices do not take float64."""
    s, cls = package_like(name), PACKAGE[name]
    S, X = sym(d, 1).float(), torch.randn(d, 5)
    P = tuple(t.float() for t in random_params(s, d, 2))
    Q = tuple(t.float() for t in random_params(s, d, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        close32(s.to_dense(s.from_dense(S)), cls.from_dense(S).to_dense())
        close32(s.extract(s.to_dense(P)), P)  # extract inverts to_dense
        pk = _package_from_params(cls, s, P)
        qk = _package_from_params(cls, s, Q)
        close32(pk.to_dense(), s.to_dense(P))
        close32(s.to_dense(s.mul(P, Q)), (pk @ qk).to_dense())
        close32(s.matmul(P, X), pk @ X)
        close32(s.rmatmat(P, X), pk.rmatmat(X))
        close32(s.to_dense(s.from_inner(P, X)), pk.from_inner(X).to_dense())
        close32(s.to_dense(s.from_inner(P)), pk.from_inner().to_dense())
        close32(s.average_trace(P), pk.average_trace())
        close32(s.to_dense(s.diag_add(P, 0.7)), pk.diag_add_(0.7).to_dense())
        close32(s.to_dense(s.eye(d, torch.float32)), cls.eye(d, dtype=torch.float32).to_dense())
        close32(s.to_dense(s.zeros(d, torch.float32)), torch.zeros(d, d))
        pk2 = _package_from_params(cls, s, P)
        close32(s.inf_norm(P), pk2.infinity_vector_norm())


def _package_from_params(cls, s, p):
    """A package matrix whose stored tensors equal ours: copy entry by entry."""
    obj = cls.eye(s.dim(p), dtype=torch.float32)
    theirs = _package_tensors(obj)
    mine = [t for t in p]
    assert len(theirs) == len(mine), (cls, len(theirs), len(mine))
    for t, m in zip(theirs, mine):
        t.copy_(m.reshape(t.shape))
    return obj


def _package_tensors(obj):
    if hasattr(obj, "_substructure_names"):  # recursive: A, B, C
        return _package_tensors(obj.A) + [obj.B] + _package_tensors(obj.C)
    return [getattr(obj, name) for name in obj._tensor_names]


@pytest.mark.parametrize("name", sorted(STRUCTURES))
def test_fast_paths_equal_dense_op_then_project(name):
    s = STRUCTURES[name]
    d = 34
    P, Q = random_params(s, d, 4), random_params(s, d, 5)
    X = torch.randn(d, 3, dtype=torch.float64)
    base = Structure
    close(s.to_dense(s.mul(P, Q)), s.to_dense(base.mul(s, P, Q)))
    close(s.matmul(P, X), base.matmul(s, P, X))
    close(s.rmatmat(P, X), base.rmatmat(s, P, X))
    close(s.to_dense(s.from_inner(P, X)), s.to_dense(base.from_inner(s, P, X)))
    close(s.to_dense(s.from_inner(P)), s.to_dense(base.from_inner(s, P)))
    close(s.average_trace(P), base.average_trace(s, P))
    close(s.to_dense(s.diag_add(P, -1.5)), s.to_dense(base.diag_add(s, P, -1.5)))
    close(s.to_dense(s.eye(d, torch.float64)), torch.eye(d, dtype=torch.float64))
    # the product stays in the structure: extract(to_dense) is exact on it
    M = s.to_dense(P) @ s.to_dense(Q)
    close(s.to_dense(s.extract(M)), M)
    close(s.to_dense(lincomb([(P, 2.0), (Q, -0.5)])), 2 * s.to_dense(P) - 0.5 * s.to_dense(Q))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_keeps_dtype(dtype):
    for s in STRUCTURES.values():
        P = s.eye(5, dtype)
        X = torch.randn(5, 2).to(dtype)
        assert all(t.dtype == dtype for t in s.from_inner(P, X))
        assert s.matmul(P, X).dtype == dtype


def test_unknown_structure_names_the_choices():
    with pytest.raises(ValueError, match="triltoeplitz"):
        get_structure("toeplitz")


@pytest.mark.parametrize("name", sorted(STRUCTURES))
def test_combine_descend_precondition_equal_the_dense_math(name):
    """SINGD's fused steps (Dense and Diagonal override them) against float64 dense math:
    ``combine`` is ``sum_i c_i t_i P_i + diag I``, ``descend`` is ``P - beta P M`` (beta a
    number or a 0-d tensor), ``precondition`` is ``P P^T X``."""
    s = STRUCTURES[name]
    d = 34
    P, Q, R = (random_params(s, d, k) for k in (6, 7, 8))
    dense = s.to_dense
    X = torch.randn(d, 3, dtype=torch.float64)
    t1, t2 = torch.tensor(0.3, dtype=torch.float64), torch.tensor(-1.7, dtype=torch.float64)
    eye = torch.eye(d, dtype=torch.float64)
    for terms, want in [
        ([(P, 0.5, None), (Q, 2.0, t1), (R, -0.25, t2)],
         0.5 * dense(P) + 2.0 * 0.3 * dense(Q) - 0.25 * -1.7 * dense(R) - 0.75 * eye),
        ([(Q, 2.0, t1), (R, -0.25, None)], 0.6 * dense(Q) - 0.25 * dense(R) - 0.75 * eye),
    ]:
        close(dense(s.combine(terms, -0.75)), want)
    close(dense(s.combine([(P, 3.0, None)], 0.0)), 3.0 * dense(P))
    step = dense(P) @ dense(Q)
    close(dense(s.descend(P, Q, 0.1)), dense(P) - 0.1 * step)
    close(dense(s.descend(P, Q, t1)), dense(P) - 0.3 * step)
    close(s.precondition(P, X), dense(P) @ dense(P).T @ X)
