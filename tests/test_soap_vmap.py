"""SOAP under ``torch.func.vmap`` gives a per-problem loop's numbers, rank-deficient factors
included, and the canonical QR behind it (``soap_qr._canonical_orthonormal``)."""

import optree
import pytest
import torch

import funcopt as fo
from funcopt.testing import check_vmap
from funcopt.transforms import soap_qr
from funcopt.transforms.soap_qr import _canonical_orthonormal

F64 = torch.float64


@pytest.mark.parametrize("steps", [1, 3])
def test_soap_under_vmap_matches_a_loop(steps):
    # vmap over 3 problems of one 4x3 matrix: the first gradient gives a rank-3 4x4 factor,
    # whose QR refresh used to normalise rounding error into the basis q, so batched kernels
    # gave another q than a Python loop (O(1)) and other updates from step 2 on (up to 1.5).
    w = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    check_vmap(fo.scale_by_soap(), {"w": w}, steps=steps)


def _run(tx, params, grads):
    state = tx.init(params)
    for g in grads:
        u, state = tx.update(g, state, params)
        params = optree.tree_map(torch.add, params, u)
    return optree.tree_leaves(params), optree.tree_leaves(state)


SHAPES = {
    "tall": {"w": (4, 3)},  # L rank 3 of 4 at step 1
    "very tall": {"w": (8, 3)},  # L rank 3, then 6, then 8: dependent nonzero columns
    "wide": {"w": (3, 8)},
    "conv and bias": {"c": (4, 3, 2, 2), "b": (5,)},  # merged (4, 12): R rank 4 of 12
}


@pytest.mark.parametrize("precondition_1d", [False, True])
@pytest.mark.parametrize("frequency", [1, 3])
@pytest.mark.parametrize("case", sorted(SHAPES))
def test_vmap_matches_a_loop_over_many_refreshes(case, frequency, precondition_1d):
    """12 float64 steps of 3 problems, the basis refreshed every 1 or 3 steps: vmap's params
    and whole state (factors, bases, moments, counter) equal a Python loop's to 1e-10 of each
    leaf's size."""
    shapes, problems, steps = SHAPES[case], 3, 12
    gen = torch.Generator().manual_seed(0)
    draw = lambda: {k: torch.randn(problems, *s, generator=gen, dtype=F64)  # noqa: E731
                    for k, s in shapes.items()}
    params, grads = draw(), [draw() for _ in range(steps)]
    tx = fo.scale_by_soap(precondition_frequency=frequency,
                          factors=fo.SoapFactors(precondition_1d=precondition_1d))
    got = torch.func.vmap(lambda p, gs: _run(tx, p, gs))(params, grads)
    for i in range(problems):
        want = _run(tx, optree.tree_map(lambda x, i=i: x[i], params),
                    [optree.tree_map(lambda x, i=i: x[i], g) for g in grads])
        for a, b in zip(optree.tree_leaves(got), optree.tree_leaves(want)):
            scale = b.abs().max().item() if b.is_floating_point() and b.numel() else 0.0
            torch.testing.assert_close(a[i], b, rtol=1e-10, atol=1e-10 * scale)


def _rank_deficient(n=7, rank=3, seed=0):
    """``L Q``, as the refresh forms it, of a rank-``rank`` factor ``L`` and its eigenbasis."""
    g = torch.randn(n, rank, generator=torch.Generator().manual_seed(seed), dtype=F64)
    factor = g @ g.T
    q = torch.linalg.eigh(factor)[1].flip(1)
    mq = factor @ q
    return mq[:, torch.argsort((q * mq).sum(1), descending=True)]


def _same_up_to_column_signs(q1, q2, atol):
    torch.testing.assert_close((q1 * q2).sum(0).abs(), torch.ones(q1.shape[1], dtype=q1.dtype),
                               rtol=0, atol=atol)


@pytest.mark.parametrize("seed", range(4))
def test_canonical_q_of_a_rank_deficient_matrix_does_not_follow_rounding(seed):
    """A perturbation at rounding level (1e-15 relative) moves Householder Q by O(1) on a
    rank-deficient matrix and the canonical Q by rounding only; the canonical Q is still a
    QR factor of A (orthonormal, Q^T A upper triangular)."""
    a = _rank_deficient(seed=seed)
    noise = torch.randn(a.shape, generator=torch.Generator().manual_seed(99), dtype=F64)
    b = a + 1e-15 * a.abs().max() * noise
    householder = [torch.linalg.qr(x)[0] for x in (a, b)]
    assert (householder[0].abs() - householder[1].abs()).abs().max() > 1e-2  # rounding ruled
    qa, qb = _canonical_orthonormal([a, b])
    _same_up_to_column_signs(qa, qb, 1e-10)
    torch.testing.assert_close(qa.T @ qa, torch.eye(7, dtype=F64), rtol=0, atol=1e-12)
    r = qa.T @ a
    assert r.tril(-1).abs().max() <= 1e-12 * a.abs().max()


def test_canonical_q_of_full_rank_matrices_is_the_plain_qr_bit_for_bit():
    gen = torch.Generator().manual_seed(1)
    mats = [torch.randn(n, n, generator=gen, dtype=dt) for n, dt in
            [(5, F64), (5, F64), (9, torch.float32)]]
    for a, q in zip(mats, _canonical_orthonormal(mats)):
        assert torch.equal(q, torch.linalg.qr(a)[0])


def test_canonical_q_keeps_nan_visible():
    a = _rank_deficient()
    a[2, 3] = float("nan")
    assert torch.isnan(_canonical_orthonormal([a])[0]).any()


def test_traced_path_runs_the_second_qr_on_every_matrix(monkeypatch):
    """While tracing there is no host read: every matrix goes through the second QR, with its
    dependent columns zeroed, and a full-rank one comes out as from the first."""
    calls = []
    real = soap_qr._orthonormal
    monkeypatch.setattr(soap_qr, "_orthonormal",
                        lambda mats, chol=None: calls.append(len(mats)) or real(mats, chol))
    full = torch.randn(3, 5, 5, generator=torch.Generator().manual_seed(2), dtype=F64)
    deficient = torch.stack([_rank_deficient(5, 2, s) for s in range(3)])
    got = torch.func.vmap(lambda x, y: _canonical_orthonormal([x, y]))(full, deficient)
    assert calls == [2, 2]
    for i in range(3):
        want = _canonical_orthonormal([full[i], deficient[i]])
        _same_up_to_column_signs(got[0][i], want[0], 1e-12)
        _same_up_to_column_signs(got[1][i], want[1], 1e-10)


def _assert_keeps_the_range(q, factor, rank):
    """``rank`` columns of ``q`` lie in ``factor``'s range and the others are orthogonal to it
    (to 1e-12), so those columns' projector keeps every vector of the range: Adam in the
    basis sees the gradient's directions as coordinates of their own."""
    u = torch.linalg.eigh(factor)[1][:, -rank:]  # the range: eigenvalues well above rounding
    inside = (u.T @ q).norm(dim=0)
    kept = inside > 0.5
    assert int(kept.sum()) == rank, inside
    torch.testing.assert_close(inside, kept.to(F64), rtol=0, atol=1e-12)
    v = factor @ torch.randn(factor.shape[0], 3, generator=torch.Generator().manual_seed(0),
                             dtype=F64)
    qk = q[:, kept]
    assert (qk @ (qk.T @ v) - v).abs().max() <= 1e-12 * v.abs().max()


def _dominant_last(n):
    """The refresh's ``L Q`` of a rank-one ``L = 5 J`` (all entries 5, the factor of an
    all-equal gradient) with the dominant column last, as the row-sum order may put it: the
    others are rounding-sized multiples of the all-ones vector, which used to make QR's first
    column that vector and the dominant column test dependent (the basis lost it)."""
    factor = torch.full((n, n), 5.0, dtype=F64)
    q = torch.linalg.eigh(factor)[1].flip(1)
    mq = factor @ q
    return factor, mq[:, torch.arange(n).roll(-1)]


@pytest.mark.parametrize("cholesky", [True, False])
def test_canonical_q_of_a_rank_deficient_matrix_contains_its_range(cholesky):
    """Rank-deficient ``L Q`` (the refresh's order, shuffled columns, the dominant column
    after rounding-sized ones): the kept columns of the canonical Q span ``L``'s range to
    1e-12, the fills are orthogonal to it; eagerly and traced alike."""
    cases = [_dominant_last(n) for n in (2, 5, 9)]
    for n, rank, seed in [(7, 3, 0), (7, 1, 1), (12, 5, 2), (6, 5, 3)]:
        a = _rank_deficient(n, rank, seed)
        g = torch.randn(n, rank, generator=torch.Generator().manual_seed(seed), dtype=F64)
        shuffle = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        cases += [(g @ g.T, a), (g @ g.T, a[:, shuffle])]
    mats = [a for _, a in cases]
    traced = torch.func.vmap(lambda x: _canonical_orthonormal([x], cholesky)[0])
    for (factor, a), q in zip(cases, _canonical_orthonormal(mats, cholesky)):
        rank = int(torch.linalg.matrix_rank(factor))
        _assert_keeps_the_range(q, factor, rank)
        _assert_keeps_the_range(traced(a[None])[0], factor, rank)
        torch.testing.assert_close(q.T @ q, torch.eye(len(q), dtype=F64), rtol=0, atol=1e-12)


def test_soap_bases_contain_their_factors_ranges():
    """Through SOAP, refreshed every step: a (1, 5) leaf's all-equal gradients (a rank-one
    right factor) and an (8, 3) leaf's random ones (a left factor of rank 3, then 6): each
    refreshed basis contains its factor's range."""
    gen = torch.Generator().manual_seed(0)
    for shape, draw in [((1, 5), lambda: torch.ones(1, 5, dtype=F64)),
                        ((8, 3), lambda: torch.randn(8, 3, generator=gen, dtype=F64))]:
        tx = fo.scale_by_soap(precondition_frequency=1)
        p = {"w": torch.zeros(shape, dtype=F64)}
        state = tx.init(p)
        for _ in range(3):
            _, state = tx.update({"w": draw()}, state, p)
            for factor, q in zip(state.gg[0], state.q[0]):
                rank = int(torch.linalg.matrix_rank(factor))
                if 0 < rank < len(factor):
                    _assert_keeps_the_range(q, factor, rank)
